"""WBSRModel: BasicSR's SRModel with supernet training, HES progress, BDLoss's sigma and dynamic inference.

Only what differs from ``SRModel`` is overridden:

- Training: each iteration chooses which subnets to train (``train: wbsr: subnet_sampling``), sets that
  plan on the network, and runs ``SRModel.optimize_parameters`` unchanged. The choice comes from a
  generator seeded by ``manual_seed`` and the iteration (``flops_squared``, ``sandwich``) or from each
  sample's (``routed``) or tile's (``tiles``) difficulty. With ``train: wbsr: distill``, the largest
  subnet's detached output on the same batch is an extra target (in-place distillation), through a
  squared-error (default) or an L1 term (``train: wbsr: distill_loss``; the L1 term collapsed training).
  HES datasets learn the iteration from BasicSR's ``BaseModel`` itself (:mod:`wbsr_data.hes_dataset`),
  as under any BasicSR model; the model also reports it after each step, for loops that call
  ``optimize_parameters`` without ``update_learning_rate``.
- BDLoss: without a ``gmm_path`` the mixture is fitted at start-up from the training set; its noise
  sigma gets its own Adam optimizer with a constant learning rate (not scheduled), stepped right after
  the network's, averaged over DDP ranks, and saved in the training state.
- Checkpoints carry the difficulty thresholds and projection (``'wbsr'`` entry next to ``'params'``), so
  a test run needs only the weights. Saving and loading are BasicSR's own methods (its retries on a
  failed write, ``module.`` prefixes, ``params_ema``), called up: BasicSR writes into a temporary folder
  beside the target, the model adds its entry and renames the file into place (atomic), and checks the
  file with ``weights_only=True`` before BasicSR loads it.
- Validation and ``basicsr/test.py``: :class:`~wbsr_models.router.Router` does the inference, and the
  log table gains the average GFLOPs, both FLOPs ratios and the share of patches per subnet; with
  ``save_img`` an allocation map is written beside every SR image.

Start-up checks (also under ``basicsr/train.py`` and ``basicsr/test.py``): every option the plugin knows is checked by
type and range (:mod:`wbsr_models.checks`), the router is built once against the network (a subnet index, a budget
below the cheapest subnet, a mode's missing checkpoint artefact fail before the first training step), and a loaded
checkpoint must have finite weights. A training set that fills no batch and a test model without
``pretrain_network_g`` are warned about when the model is built (``wbsr-train`` and ``wbsr-test`` refuse them before
the run; a model is also built outside runs), and a run that ends without a training step refuses to save an
untrained ``net_g_latest.pth``. An SR output that is not finite is an error naming the image in a test run, a warning during
training's validation.

Works with plain BasicSR networks too (one subnet): then this is "the network trained with WBSR" and
routing is tiled inference.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import OrderedDict
from copy import deepcopy
from dataclasses import replace
from os import path as osp
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel

from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import master_only
from wbsr_arch.supernet import TileAssignment
from wbsr_arch.tiles import TileGrid
from wbsr_data.difficulty import DifficultyProjection, gradient_vectors
from wbsr_data.fileio import CorruptFileError, atomic_path, new_temp_dir, torch_load, torch_save
from wbsr_data.hes_dataset import set_train_progress
from wbsr_data.pairs import ImageFileError
from wbsr_data.patch_index import load_or_build_index

from .baselines import ArmTable, build_arm_table
from .checks import check_finite_weights, check_one_batch, check_option_file, check_router
from .router import Router, RoutingOptions, RoutingResult, eq15_subnets
from .routing.artefacts import RoutingArtefacts
from .visualize import allocation_map, subnet_labels

SUBNET_SAMPLING = ('flops_squared', 'sandwich', 'routed', 'tiles', 'full')
CHECKPOINT_FORMAT = 1


DISTILL_LOSSES = {'l1': torch.nn.functional.l1_loss, 'mse': torch.nn.functional.mse_loss}


def distill_difference(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The distillation term named by ``train.wbsr.distill_loss``."""
    if kind not in DISTILL_LOSSES:
        raise ValueError(f'train.wbsr.distill_loss must be one of {sorted(DISTILL_LOSSES)}, got {kind!r}')
    return DISTILL_LOSSES[kind]


class DistilledLoss(torch.nn.Module):
    """``pixel_loss(output, gt) + weight * D(output, teacher)``: in-place distillation (universally slimmable
    networks, BigNAS) on top of the model's pixel loss; the teacher is a detached output of the largest subnet and
    ``D`` the mean absolute (``'l1'``) or squared (``'mse'``) difference."""

    def __init__(self, pixel_loss: torch.nn.Module, teacher: torch.Tensor, weight: float, kind: str = 'mse') -> None:
        super().__init__()
        self.pixel_loss, self.teacher, self.weight = pixel_loss, teacher.detach(), float(weight)
        self.difference = distill_difference(kind)
        self.last_distill = float('nan')

    def forward(self, output: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        distill = self.difference(output, self.teacher)
        self.last_distill = float(distill.detach())
        return self.pixel_loss(output, gt) + self.weight * distill


class WBSRModel(SRModel):
    """SR model for WBSR training and dynamic inference (see the module docstring and the README)."""

    def __init__(self, opt: dict) -> None:
        check_option_file(opt, bool(opt.get('is_train')))
        if not opt.get('is_train') and not (opt.get('path') or {}).get('pretrain_network_g'):
            get_root_logger().warning('path.pretrain_network_g is not set: this test model has untrained weights')
        wbsr_opt = dict((opt.get('train') or {}).get('wbsr') or {})
        self.subnet_sampling = str(wbsr_opt.pop('subnet_sampling', 'routed'))  # the README's sampling sweep
        self.sandwich_random = int(wbsr_opt.pop('sandwich_random', 2))
        tile_size = wbsr_opt.pop('tile_size', None)
        self.distill = float(wbsr_opt.pop('distill', 0.0))
        self.distill_loss = str(wbsr_opt.pop('distill_loss', 'mse'))
        self.amp = wbsr_opt.pop('amp', False)
        if wbsr_opt:
            raise ValueError(f'train.wbsr: unknown option(s) {sorted(wbsr_opt)}; known: amp, subnet_sampling, '
                             'sandwich_random, tile_size, distill, distill_loss')
        if self.distill < 0:
            raise ValueError(f'train.wbsr.distill must be >= 0, got {self.distill}')
        distill_difference(self.distill_loss)  # a bad name fails here, not at the first distillation step
        if not isinstance(self.amp, bool):
            raise ValueError(f'train.wbsr.amp must be true or false, got {self.amp!r}')
        self.grad_scaler: Optional[torch.amp.GradScaler] = None
        if self.subnet_sampling not in SUBNET_SAMPLING:
            raise ValueError(f'train.wbsr.subnet_sampling must be one of {SUBNET_SAMPLING}, '
                             f'got {self.subnet_sampling!r}')
        self.train_tile_size = None if tile_size is None else int(tile_size)
        if self.train_tile_size is not None and self.train_tile_size < 1:
            raise ValueError(f'train.wbsr.tile_size must be >= 1, got {tile_size}')
        self.routing = RoutingOptions.from_opt((opt.get('val') or {}).get('routing'))
        self.difficulty: Optional[DifficultyProjection] = None
        self.routing_artefacts = RoutingArtefacts()  # class errors, error predictor: read from a loaded checkpoint
        self.optimizer_sigma: Optional[torch.optim.Optimizer] = None
        self.arm_table: Optional[ArmTable] = ArmTable.load(self.routing.arm_lut) if self.routing.arm_lut else None
        self._routers: dict[int, Router] = {}
        self._route_log: list[dict[str, Any]] = []
        self._val_context: dict[str, Any] = {}
        self.lq_path = self.hes_phase = None
        self._trained = False  # a training step ran in this process, or the run resumed from one
        super().__init__(opt)
        if self.is_train:
            train_set = opt['datasets']['train']
            index = load_or_build_index(train_set)
            self.difficulty = index.projection
            if train_set.get('type') == 'HESPairedImageDataset':  # BasicSR's loop would end at iteration 0
                try:
                    check_one_batch(len(index), int(train_set['batch_size_per_gpu']), int(opt.get('world_size') or 1),
                                    train_set.get('dataset_enlarge_ratio') or 1,
                                    what=f'candidate patches ({len(index.pairs)} images)')
                except ValueError as exc:
                    get_root_logger().warning(str(exc))
        elif self.difficulty is None:
            get_root_logger().warning('the checkpoint holds no difficulty thresholds; routing fits them on each '
                                      "test image's own patches")
        # what depends on the network (subnet index, budget, the mode's artefacts): now, not at the first validation
        router = check_router(self.bare_net, self.routing, int(self.opt['scale']), self.difficulty, self.arm_table,
                              self.routing_artefacts, arm_table_later=True)
        if router is not None:
            self._routers[id(self.bare_net)] = router
            if router.by_default:
                get_root_logger().info(f'val.routing.mode not given: routing {router.describe()}')

    # ---- helpers -------------------------------------------------------------------------------------
    @property
    def bare_net(self) -> torch.nn.Module:
        return self.get_bare_model(self.net_g)

    @property
    def num_subnets(self) -> int:
        return int(getattr(self.bare_net, 'num_subnets', 1))

    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        """Like BaseModel's, plus DDP on CPU (gloo) and find_unused_parameters for supernets."""
        net = net.to(self.device)
        if self.opt['dist']:
            find_unused = bool(self.opt.get('find_unused_parameters', False))
            if getattr(net, 'num_subnets', 1) > 1 and not find_unused:
                get_root_logger().warning('find_unused_parameters is off, but subnets leave parameters unused: '
                                          'turning it on')
                find_unused = True
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            return DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
        if self.opt['num_gpu'] > 1:
            return DataParallel(net)
        return net

    # ---- training ------------------------------------------------------------------------------------
    def init_training_settings(self) -> None:
        pixel_opt = self.opt['train'].get('pixel_opt')
        if pixel_opt and pixel_opt.get('type') == 'BDLoss' and not pixel_opt.get('gmm_path'):
            self.opt['train']['pixel_opt'] = dict(pixel_opt, gmm_path=self._startup_gmm(pixel_opt))
        if self.num_subnets > 1 and self.subnet_sampling in ('sandwich', 'routed', 'tiles') and \
                isinstance(self.net_g, DataParallel):
            raise ValueError(f'subnet_sampling={self.subnet_sampling} trains one subnet per sample, which '
                             'DataParallel cannot split: use one GPU or DDP (--launcher pytorch)')
        super().init_training_settings()

    def _startup_gmm(self, pixel_opt: dict) -> str:
        from wbsr_losses.fit_gmm import check_image_sizes
        from wbsr_losses.gmm import DEFAULT_BLUR_SIGMA, DEFAULT_LABEL_SPACE, fit_gmm_for_options
        label_space = pixel_opt.get('label_space', DEFAULT_LABEL_SPACE)
        path = osp.join(self.opt['path']['experiments_root'], f'bd_gmm_{label_space}.npz')
        if self.opt['rank'] == 0 and not osp.isfile(path):  # a resumed run reuses its own file
            blur_sigma = float(pixel_opt.get('blur_sigma', DEFAULT_BLUR_SIGMA))
            check_image_sizes(self.opt['datasets']['train'], label_space, blur_sigma)  # refused by name
            fit_gmm_for_options(pixel_opt, self.opt['datasets']['train'], path)
        if self.opt['dist']:
            torch.distributed.barrier()
        return path

    def setup_optimizers(self) -> None:
        super().setup_optimizers()
        sigma = getattr(self.cri_pix, 'noise_sigma', None)
        if sigma is not None and sigma.requires_grad:
            self.optimizer_sigma = torch.optim.Adam([sigma], lr=float(self.cri_pix.sigma_lr))
            self.cri_pix.mark_sigma_optimized()
            # Stepped right after the network's optimizer, outside BasicSR's schedulers: constant lr.
            self.optimizer_g.register_step_post_hook(lambda *_: self._step_sigma())

    def _step_sigma(self) -> None:
        sigma = self.optimizer_sigma.param_groups[0]['params'][0]
        if sigma.grad is None:
            return
        if self.opt['dist']:
            torch.distributed.all_reduce(sigma.grad)
            sigma.grad /= self.opt['world_size']
        self.optimizer_sigma.step()
        self.optimizer_sigma.zero_grad(set_to_none=True)

    def training_plan(self, lq: torch.Tensor, current_iter: int) -> tuple[int, Any]:
        """``(repeats, subnets)``: how many copies of the batch to stack and which subnet(s) to set.

        ``subnets`` is an index for the whole batch or one index per (stacked) sample. The random choices
        depend only on ``manual_seed`` and ``current_iter``, never on the rank.
        """
        m = self.num_subnets
        if m == 1 or self.subnet_sampling == 'full':
            return 1, None
        rng = np.random.default_rng([int(self.opt.get('manual_seed') or 0), int(current_iter)])
        if self.subnet_sampling == 'flops_squared':
            cost = np.asarray(self.bare_net.subnet_flops(lq.shape[-2:]), dtype=np.float64)
            return 1, int(rng.choice(m, p=cost**2 / (cost**2).sum()))
        if self.subnet_sampling == 'sandwich':
            middle = rng.permutation(np.arange(1, m - 1))[:max(0, self.sandwich_random)].tolist()
            chosen = [m - 1, 0] + middle
            return len(chosen), torch.tensor(chosen).repeat_interleave(lq.shape[0])
        if self.subnet_sampling == 'tiles':
            return 1, self.tile_plan(lq)
        scores = self.difficulty.score(gradient_vectors(lq))
        classes = self.difficulty.classify(scores)
        return 1, torch.from_numpy(eq15_subnets(classes, self.difficulty.num_classes, m))

    def tile_plan(self, lq: torch.Tensor) -> TileAssignment:
        """``tiles`` sampling: every crop cut into tiles, each tile on the subnet Eq. 15 gives it at test time.

        The tile side is ``train.wbsr.tile_size``, by default the smaller of ``val.routing.tile_size`` and half
        the LR crop, so that every crop holds tiles whose neighbours run other subnets.
        """
        _, _, h, w = lq.shape
        size = self.train_tile_size or max(1, min(self.routing.tile_size, min(h, w) // 2))
        grid = TileGrid.regular(h, w, size)
        vectors = np.stack([gradient_vectors(lq[:, :, t:t + bh, lf:lf + bw]).cpu().numpy()
                            for t, lf, bh, bw in grid.boxes().tolist()], axis=1)  # (N, tiles, 4)
        classes = self.difficulty.classify(self.difficulty.score(vectors))
        subnets = eq15_subnets(classes, self.difficulty.num_classes, self.num_subnets)
        return TileAssignment(subnets.reshape(len(lq), *grid.shape), grid=grid)

    def optimize_parameters(self, current_iter: int) -> None:
        self._trained = True
        repeats, subnets = self.training_plan(self.lq, current_iter)
        lq, gt = self.lq, self.gt
        if repeats > 1:
            self.lq, self.gt = lq.repeat(repeats, 1, 1, 1), gt.repeat(repeats, 1, 1, 1)
        pixel_loss = self.cri_pix
        if self.distill > 0 and subnets is not None:
            # in-place distillation: the largest subnet's output on the same batch, without gradient, is an extra
            # target of the subnets being trained (its own samples, if any, gain nothing from it)
            with torch.no_grad():
                teacher = self.bare_net(self.lq, subnet=self.num_subnets - 1)
            self.cri_pix = DistilledLoss(pixel_loss, teacher, self.distill, self.distill_loss)
        if subnets is not None:
            self.bare_net.set_subnet(subnets)
        try:
            if self.amp:
                self._optimize_amp()
            else:
                super().optimize_parameters(current_iter)
        finally:
            if subnets is not None:
                self.bare_net.set_subnet(None)
            self.lq, self.gt = lq, gt
            if self.cri_pix is not pixel_loss:
                self.log_dict['l_distill'] = self.cri_pix.last_distill
                self.cri_pix = pixel_loss
        if self.optimizer_sigma is not None:
            self.log_dict['noise_sigma'] = float(self.cri_pix.noise_sigma.detach())
        if self.hes_phase is not None:  # share of the batch drawn class-level (0 before the switch, 1 after)
            self.log_dict['hes_phase'] = float(torch.as_tensor(self.hes_phase, dtype=torch.float32).mean())
        set_train_progress(current_iter, int(self.opt['train']['total_iter']))

    def _optimize_amp(self) -> None:
        """``SRModel.optimize_parameters`` under mixed precision (``train.wbsr.amp``).

        The network runs under ``torch.autocast`` (float16 on CUDA, bfloat16 on the CPU); the losses are computed
        in float32 on its output, and a gradient scaler scales the loss and unscales the gradients before the
        steps, BDLoss's sigma included (its optimizer steps from the network optimizer's post-hook, so it is
        skipped with the network's step when the scaler finds inf/NaN gradients). The scaler's state is not
        saved in training states: a resumed run starts again from the default scale.
        """
        if self.grad_scaler is None:
            self.grad_scaler = torch.amp.GradScaler(self.device.type)
            get_root_logger().info(f'train.wbsr.amp: autocast to {self._amp_dtype} on {self.device.type}, '
                                   'losses in float32, gradient scaling')
        self.optimizer_g.zero_grad()
        if self.optimizer_sigma is not None:
            self.optimizer_sigma.zero_grad(set_to_none=True)  # a skipped step leaves no stale gradient behind
        with torch.autocast(self.device.type, dtype=self._amp_dtype):
            output = self.net_g(self.lq)
        self.output = output.float()
        l_total, loss_dict = 0, OrderedDict()
        if self.cri_pix:
            loss_dict['l_pix'] = self.cri_pix(self.output, self.gt)
            l_total += loss_dict['l_pix']
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            for key, value in (('l_percep', l_percep), ('l_style', l_style)):
                if value is not None:
                    loss_dict[key] = value
                    l_total += value
        self.grad_scaler.scale(l_total).backward()
        if self.optimizer_sigma is not None:
            self.grad_scaler.unscale_(self.optimizer_sigma)
        self.grad_scaler.step(self.optimizer_g)
        self.grad_scaler.update()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    @property
    def _amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == 'cuda' else torch.bfloat16

    # ---- checkpoints ---------------------------------------------------------------------------------
    def wbsr_state(self) -> dict[str, Any]:
        """The ``'wbsr'`` checkpoint entry: difficulty thresholds/projection, subnets, network options, scale."""
        return {
            'format': CHECKPOINT_FORMAT,
            'difficulty': None if self.difficulty is None else self.difficulty.to_dict(),
            'subnets': [list(p) for p in getattr(self.bare_net, 'subnets', [])],
            'network': deepcopy(dict(self.opt['network_g'])),
            'scale': int(self.opt['scale']),
        }

    @contextlib.contextmanager
    def _basicsr_writes_into(self, path_key: str, target: str) -> Iterator[str]:
        """Let BasicSR's save method write into a new hidden folder beside ``target``; yields that folder.

        BasicSR's methods write to ``opt['path'][path_key]``: for the call, the model's ``opt`` is a copy
        with that one path changed (the option dict itself is not touched). The folder is removed after.
        """
        folder = new_temp_dir(target)  # named with this process's id: a killed save's folder is removed later
        original = self.opt
        self.opt = {**original, 'path': {**original['path'], path_key: folder}}
        try:
            yield folder
        finally:
            self.opt = original
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _put_in_place(written: str, target: str, extras: Optional[dict[str, Any]]) -> None:
        """Move what BasicSR wrote to ``target`` atomically, with ``extras`` added to the saved dict."""
        if not osp.isfile(written):
            return  # BasicSR gave up after its retries and said so in the log ("Still cannot save ...")
        if extras:
            saved = torch_load(written)
            saved.update(extras)
            torch_save(saved, target)
        else:
            with atomic_path(target) as tmp:
                os.replace(written, tmp)

    def save(self, epoch: int, current_iter: int) -> None:
        """BasicSR's ``save``; at the end of a training run (BasicSR calls ``save(epoch=-1, current_iter=-1)``) that made
        no training step (its data filled no batch), an error instead of an untrained ``net_g_latest.pth``."""
        if epoch == -1 and current_iter == -1 and self.is_train and not self._trained:
            raise ValueError('the run ends without a training step (datasets.train fills no batch of '
                             'batch_size_per_gpu); the untrained network is not saved as net_g_latest.pth')
        super().save(epoch, current_iter)

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params') -> None:
        """BasicSR's ``save_network``, plus the ``'wbsr'`` entry; the file appears atomically."""
        label = 'latest' if current_iter == -1 else current_iter
        target = osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        with self._basicsr_writes_into('models', target) as folder:
            super().save_network(net, net_label, current_iter, param_key)
            self._put_in_place(osp.join(folder, osp.basename(target)), target, {'wbsr': self.wbsr_state()})

    def load_network(self, net, load_path, strict=True, param_key='params') -> None:
        """BasicSR's ``load_network``, after a safe read of the file that also takes the ``'wbsr'`` entry.

        The file is first read with ``weights_only=True`` (a pickled object or a truncated file is refused
        by name, before BasicSR unpickles anything) and the difficulty thresholds are taken from it.
        """
        checkpoint = torch_load(load_path)
        if not isinstance(checkpoint, dict):
            raise CorruptFileError(load_path, 'not a BasicSR checkpoint (a dict of state dicts)')
        extras = checkpoint.get('wbsr') if isinstance(checkpoint.get('wbsr'), dict) else {}
        try:
            if extras.get('difficulty') is not None:
                self.difficulty = DifficultyProjection.from_dict(extras['difficulty'])
            self.routing_artefacts = RoutingArtefacts.from_checkpoint_entry(extras)
            if self.is_train and self.routing_artefacts.default is not None:
                # the predictor was fitted on the weights this run changes: validation without a mode runs Eq. 15
                self.routing_artefacts.default = None
                get_root_logger().info(f'{load_path}: its default routing is not used while training (its predictor '
                                       'was fitted on the weights before); validation without val.routing.mode runs '
                                       'Eq. 15')
        except ValueError as exc:
            raise CorruptFileError(load_path, str(exc)) from None
        if param_key is not None and param_key not in checkpoint and 'params' not in checkpoint:
            raise CorruptFileError(load_path, f'no {param_key!r} entry (keys: {sorted(checkpoint)})')
        params = checkpoint.get(param_key) if param_key in checkpoint else checkpoint.get('params', checkpoint)
        if isinstance(params, dict):
            check_finite_weights(params, load_path)  # NaN weights would give black images and a low PSNR, exit 0
        super().load_network(net, load_path, strict, param_key)

    @master_only
    def save_training_state(self, epoch, current_iter) -> None:
        """BasicSR's ``save_training_state``, plus BDLoss's learnt sigma; the file appears atomically."""
        if current_iter == -1:
            return
        target = osp.join(self.opt['path']['training_states'], f'{current_iter}.state')
        extras = None
        if self.optimizer_sigma is not None:
            extras = {'wbsr': {'noise_sigma': self.cri_pix.noise_sigma.detach().cpu().clone(),
                               'optimizer_sigma': self.optimizer_sigma.state_dict()}}
        with self._basicsr_writes_into('training_states', target) as folder:
            super().save_training_state(epoch, current_iter)
            self._put_in_place(osp.join(folder, osp.basename(target)), target, extras)

    def resume_training(self, resume_state) -> None:
        super().resume_training(resume_state)
        self._trained = self._trained or int(resume_state.get('iter') or 0) > 0
        extras = resume_state.get('wbsr')
        if extras and self.optimizer_sigma is not None:
            with torch.no_grad():
                self.cri_pix.noise_sigma.copy_(extras['noise_sigma'])
            self.optimizer_sigma.load_state_dict(extras['optimizer_sigma'])

    # ---- test time -----------------------------------------------------------------------------------
    def feed_data(self, data) -> None:
        super().feed_data(data)
        self.lq_path = data.get('lq_path')
        self.hes_phase = data.get('hes_phase')  # per sample, from HESPairedImageDataset

    def router_for(self, net: torch.nn.Module) -> Router:
        bare = self.get_bare_model(net)
        if id(bare) not in self._routers:
            self._routers[id(bare)] = Router(bare, self.routing, int(self.opt['scale']), self.difficulty,
                                             self.arm_table, self.routing_artefacts)
        return self._routers[id(bare)]

    def test(self) -> None:
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        was_training = net.training
        net.eval()
        router = self.router_for(net)
        self._routed_by = router.options  # the mode that ran (a checkpoint's default resolved)
        outputs = []
        for i in range(self.lq.shape[0]):
            start = time.perf_counter()
            result = router(self.lq[i:i + 1])
            if not bool(torch.isfinite(result.output).all()):
                self._non_finite(i)
            self._record(result, time.perf_counter() - start, i)
            outputs.append(result.output)
        self.output = torch.cat(outputs, 0)
        if was_training:
            net.train()

    def _non_finite(self, i: int) -> None:
        """An SR output with NaN or infinite values: an error naming the image in a test run (its PSNR and its black
        PNG would be meaningless), a warning during training's validation (the run goes on; the loss shows why)."""
        name = self.lq_path[i] if self.lq_path else f'image {i}'
        message = f'{name}: the SR output has NaN or infinite values (the network overflows on this image)'
        if not self.opt['is_train']:
            raise ImageFileError(message)
        get_root_logger().warning(message)

    def _record(self, result: RoutingResult, seconds: float, i: int) -> None:
        self._route_log.append({'flops': result.flops, 'ratio_regions': result.ratio_regions,
                                'ratio_whole': result.ratio_whole, 'shares': result.shares(), 'seconds': seconds})
        ctx = self._val_context
        if not ctx.get('save_img') or not self.lq_path:
            return
        name = osp.splitext(osp.basename(self.lq_path[i]))[0]
        if self.opt['is_train']:
            path = osp.join(self.opt['path']['visualization'], name, f"{name}_{ctx['current_iter']}_alloc.png")
        else:
            suffix = self.opt['val'].get('suffix') or self.opt['name']
            path = osp.join(self.opt['path']['visualization'], ctx['dataset'], f'{name}_{suffix}_alloc.png')
        lq_img = tensor2img([self.lq[i].detach().cpu()])
        net = self.get_bare_model(self.net_g)
        imwrite(allocation_map(lq_img, result, subnet_labels(net)), path)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        dataset_name = dataloader.dataset.opt['name']
        if self.routing.mode == 'arm' and self.arm_table is None:
            self._build_arm_table_in_sample(dataloader)
        self._route_log = []
        self._val_context = {'dataset': dataset_name, 'current_iter': current_iter, 'save_img': save_img,
                             'logged': False}
        super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        if not self._val_context['logged'] and self._route_log:
            get_root_logger().info(f'Validation {dataset_name}\n' + self._routing_summary(current_iter, tb_logger,
                                                                                          dataset_name))

    def _build_arm_table_in_sample(self, dataloader) -> None:
        logger = get_root_logger()
        logger.warning('val.routing.mode is arm but no arm_lut is given: building the ARM table on the validation '
                       'set itself (in-sample, optimistic for ARM)')
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        probe = Router(self.get_bare_model(net), replace(self.routing, mode='wbsr', arm_lut=None, arm_eta=None),
                       int(self.opt['scale']), self.difficulty)
        pairs = ((data['lq'].to(self.device), data['gt'].to(self.device)) for data in dataloader)
        self.arm_table = build_arm_table(probe, pairs, source=dataloader.dataset.opt['name'])
        path = osp.join(self.opt['path']['visualization'], '..', 'arm_table.npz')
        self.arm_table.save(osp.normpath(path))
        logger.info(f'ARM table saved to {osp.normpath(path)}')
        self._routers.clear()

    def _routing_summary(self, current_iter, tb_logger, dataset_name: str) -> str:
        log = self._route_log
        gflops = float(np.mean([r['flops'] for r in log])) / 1e9
        ratio_p = float(np.mean([r['ratio_regions'] for r in log]))
        ratio_w = float(np.mean([r['ratio_whole'] for r in log]))
        seconds = float(np.mean([r['seconds'] for r in log]))
        shares = np.mean([r['shares'] for r in log], axis=0)
        routed_by = getattr(self, '_routed_by', self.routing)
        patches = routed_by.scheme == 'patches' and routed_by.mode not in ('full', 'fixed')
        text = f'\t # gflops: {gflops:.4f}\n'
        if patches:  # the papers' convention; with tiles it is the whole image
            text += f'\t # flops_vs_full_patches: {100 * ratio_p:.2f}%\n'
        text += (f'\t # flops_vs_full_image: {100 * ratio_w:.2f}%\n\t # seconds_per_image: {seconds:.4f}\n'
                 f"\t # subnet_share ({routed_by.mode}, {routed_by.scheme}): "
                 f"{' '.join(f'{100 * v:.1f}' for v in shares)}\n")
        if tb_logger:
            tb_logger.add_scalar(f'routing/{dataset_name}/gflops', gflops, current_iter)
            if patches:
                tb_logger.add_scalar(f'routing/{dataset_name}/flops_vs_full_patches', ratio_p, current_iter)
            tb_logger.add_scalar(f'routing/{dataset_name}/flops_vs_full_image', ratio_w, current_iter)
            for i, v in enumerate(shares):
                tb_logger.add_scalar(f'routing/{dataset_name}/share_subnet{i}', float(v), current_iter)
        return text

    def _log_validation_metric_values(self, current_iter, dataset_name, tb_logger) -> None:
        """BasicSR's metric log and tensorboard scalars, then the routing figures of the same validation."""
        super()._log_validation_metric_values(current_iter, dataset_name, tb_logger)
        if self._route_log:
            get_root_logger().info(f'Routing {dataset_name}\n' + self._routing_summary(current_iter, tb_logger,
                                                                                       dataset_name))
            self._val_context['logged'] = True
