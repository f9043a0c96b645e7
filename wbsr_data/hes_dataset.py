"""HESPairedImageDataset: Hierarchical Equalization Sampling as a drop-in for ``PairedImageDataset``.

Item ``i`` of the dataset is candidate ``i`` of the patch index, so BasicSR's ``EnlargedSampler``
(which ``train.py`` fixes) draws candidates uniformly: the *sample-level* phase, P_i = 1/N. After the
switch, at ``switch_ratio`` of the training iterations, every item is instead drawn *class-level*: class
k with mass ``pi_k = delta^-(k-1) / sum_j delta^-(j-1)`` (renormalised over non-empty classes), then a
candidate uniformly inside the class, i.e. with probability ``pi_k / N_k``. Harder classes are drawn
more; ``delta = 1`` is uniform sampling.

The phase follows the model's real training iteration. The model calls :func:`set_train_progress`
after every iteration (and on resume); the value lives in a shared-memory tensor that every DataLoader
worker, forked, spawned or persistent, reads when it makes a sample. A sample is made for the
iteration after the last one reported, so the switch is never early; with ``num_worker_per_gpu > 0``
samples are made ahead of time, so the first class-level batch can arrive up to
``num_workers * prefetch_factor`` iterations late. With ``num_worker_per_gpu: 0`` it is exact.
Random draws use Python's ``random`` like BasicSR's own augmentation, so they are seeded per rank and per
worker by BasicSR and a run is deterministic for a given seed.
"""
from __future__ import annotations

import copy
import random
import weakref
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils import data

from basicsr.data.transforms import augment
from basicsr.utils import get_root_logger, img2tensor
from torchvision.transforms.functional import normalize

from .patch_index import IndexOptions, PatchIndex, load_or_build_index
from .pairs import make_file_client, read_pair

SAMPLE_LEVEL, CLASS_LEVEL = 0, 1
_LIVE_DATASETS: 'weakref.WeakSet[HESPairedImageDataset]' = weakref.WeakSet()


def set_train_progress(current_iter: int, total_iter: int) -> None:
    """Tell every HES dataset of this process that iteration ``current_iter`` of ``total_iter`` is done."""
    for dataset in list(_LIVE_DATASETS):
        dataset.set_progress(current_iter, total_iter)


def class_masses(counts: np.ndarray, delta: float) -> np.ndarray:
    """pi_k proportional to delta^-(k-1) over the classes that have candidates (classes 1..K)."""
    k = np.arange(len(counts), dtype=np.float64)
    mass = np.where(counts > 0, float(delta)**-k, 0.)
    return mass / mass.sum()


class HESPairedImageDataset(data.Dataset):
    """Paired LR/GT training dataset with Hierarchical Equalization Sampling.

    Takes every option of BasicSR's ``PairedImageDataset`` (``dataroot_gt``, ``dataroot_lq``,
    ``filename_tmpl``, ``meta_info_file``, ``io_backend`` disk or lmdb, ``gt_size``, ``use_hflip``,
    ``use_rot``, ``mean``/``std``, ``scale``) plus:

    - ``num_classes`` (K): difficulty classes. Default: 10.
    - ``delta``: class-level decay, in (0, 1]; class k gets mass proportional to delta^-(k-1).
      Default: 0.9 (see the README's sweep).
    - ``switch_ratio``: fraction of ``total_iter`` after which sampling is class-level. Default: 0.7.
    - ``patch_stride``: grid stride of candidate GT crops, a multiple of ``scale``. Default: ``gt_size // 2``
      (rounded down to a multiple of ``scale``).
    - ``projection``: ``pca`` or ``sum`` (spec section 1). Default: ``pca``.
    - ``index_cache``: folder of the patch-index cache. Default: ``$WBSR_CACHE_DIR`` or
      ``~/.cache/wbsr/hes_index``.
    - ``skip_small_images``: leave out (with a warning) images smaller than ``gt_size`` instead of
      refusing them. Default: false.

    Items are dicts with ``lq``, ``gt``, ``lq_path``, ``gt_path`` like ``PairedImageDataset``, plus
    ``hes_class`` (1..K of the candidate) and ``hes_phase`` (0 sample-level, 1 class-level).
    The option dict is never modified.
    """

    def __init__(self, opt: Mapping[str, Any]) -> None:
        super().__init__()
        self.opt = copy.deepcopy(dict(opt))
        self.delta = float(self.opt.get('delta', 0.9))
        self.switch_ratio = float(self.opt.get('switch_ratio', 0.7))
        if not 0. < self.delta <= 1.:
            raise ValueError(f'delta must be in (0, 1], got {self.delta}')
        if not 0. <= self.switch_ratio <= 1.:
            raise ValueError(f'switch_ratio must be in [0, 1], got {self.switch_ratio}')
        self.index_options = IndexOptions.from_dataset_opt(self.opt)
        self.index: PatchIndex = load_or_build_index(self.opt)
        self.scale, self.gt_size = self.index_options.scale, self.index_options.gt_size
        self.mean, self.std = self.opt.get('mean'), self.opt.get('std')
        counts = self.index.class_counts()
        self.class_mass = class_masses(counts, self.delta)
        order = np.argsort(self.index.classes, kind='stable')
        self._class_members = np.split(order, np.cumsum(counts)[:-1])
        self._class_cdf = np.cumsum(self.class_mass)
        # [last completed iteration, total iterations]; total -1 until a model reports progress.
        self._progress = torch.tensor([0, -1], dtype=torch.int64).share_memory_()
        self._file_client = None
        self._warned_no_progress = False
        _LIVE_DATASETS.add(self)

    # ---- what the model and the tools use -----------------------------------------------------------
    @property
    def difficulty_projection(self):
        """Thresholds and projection of this dataset's classes (stored by the model in checkpoints)."""
        return self.index.projection

    def set_progress(self, current_iter: int, total_iter: int) -> None:
        self._progress[0] = int(current_iter)
        self._progress[1] = int(total_iter)

    def switch_iter(self, total_iter: int) -> int:
        """Last iteration of the sample-level phase."""
        return int(round(self.switch_ratio * total_iter))

    def current_phase(self) -> int:
        """Phase of the next sample: the one for the iteration after the last reported one."""
        done, total = (int(v) for v in self._progress.tolist())
        if total < 0:
            if not self._warned_no_progress:
                self._warned_no_progress = True
                get_root_logger().warning('HESPairedImageDataset: no training progress reported (the model is not '
                                          'WBSRModel), so sampling stays sample-level (uniform)')
            return SAMPLE_LEVEL
        return CLASS_LEVEL if done + 1 > self.switch_iter(total) else SAMPLE_LEVEL

    def draw_class_level(self) -> int:
        """One candidate drawn class-level, from Python's ``random`` (seeded by BasicSR)."""
        k = min(int(np.searchsorted(self._class_cdf, random.random(), side='right')), len(self._class_cdf) - 1)
        while self.class_mass[k] == 0:  # guard against float round-off at the top of the CDF
            k -= 1
        members = self._class_members[k]
        return int(members[random.randrange(len(members))])

    # ---- torch Dataset ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        phase = self.current_phase()
        cand = self.draw_class_level() if phase == CLASS_LEVEL else int(idx)
        if self._file_client is None:
            self._file_client = make_file_client(self.opt)
        pair = self.index.pairs[int(self.index.image[cand])]
        gt, lq = read_pair(self._file_client, pair, self.scale)
        top, left, size = int(self.index.top[cand]), int(self.index.left[cand]), self.gt_size
        gt = gt[top:top + size, left:left + size]
        s = self.scale
        lq = lq[top // s:(top + size) // s, left // s:(left + size) // s]
        gt, lq = augment([gt, lq], self.opt.get('use_hflip', False), self.opt.get('use_rot', False))
        gt, lq = img2tensor([gt, lq], bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(lq, self.mean, self.std, inplace=True)
            normalize(gt, self.mean, self.std, inplace=True)
        return {'lq': lq, 'gt': gt, 'lq_path': pair['lq_path'], 'gt_path': pair['gt_path'],
                'hes_class': int(self.index.classes[cand]), 'hes_phase': phase}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_file_client'] = None  # lmdb environments do not cross process boundaries
        return state
