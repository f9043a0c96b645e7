"""Gradient-projection dynamic inference (spec section 5), and the modes it is compared with.

Routing is two independent choices:

- *which subnet each region gets*, the mode: one entry of the registry :data:`wbsr_models.routing.modes.MODES`
  (``wbsr``: Eq. 15; ``budget``: the paper's position rule under a FLOPs budget; ``calibrated``: measured class
  errors; ``learned``: every subnet's error predicted per region, under a budget or a quality target; ``alpha``;
  ``arm``; ``full`` / ``fixed``: one subnet on the whole image), or any ``assign`` callback (the benchmark's oracle);
- *how the image is cut and run*, the scheme (:mod:`wbsr_models.regions`): ``tiles`` (default:
  non-overlapping tiles, one seamless pass of the supernet in which each tile runs only its subnet's
  layers and channels, :meth:`~wbsr_arch.supernet.SupernetMixin.forward_tiles`) or ``patches`` (the
  ClassSR/ARM/PCSR protocol: overlapping 32/28 patches run separately, overlaps averaged; kept so that
  numbers compare with the papers).

Whole-image modes run one subnet over the image (bounded memory on large images). FLOPs are reported three
ways: executed (a predictor's included), the full network on the same regions (the papers' convention for
patches), and the full network run once on the whole image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from numbers import Integral
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from basicsr.utils import get_root_logger
from wbsr_arch.flops import count_flops
from wbsr_arch.supernet import DEFAULT_TILE_MAX_PIXELS, DEFAULT_TILE_SIZE
from wbsr_arch.tiles import TileGrid
from wbsr_data.difficulty import DifficultyProjection, gradient_vectors

from .regions import SCHEMES, Regions, cut
from .routing.allocation import (alpha_subnets, budget_subnets, calibrated_subnets, eq15_subnets,  # noqa: F401
                                 shifted_subnets, tradeoff_subnets)
from .routing.artefacts import RoutingArtefacts
from .routing.modes import (MODES, OPTIONS, Selection, describe, get_mode,  # noqa: F401  (MODES: re-exported)
                            modes_reading)

#: What each checkpoint artefact a mode may need is, for the error that says it is missing.
NEEDS = {'class_errors': 'the measured error of every subnet on every difficulty class in the checkpoint (run '
         'wbsr-calibrate on it)',
         'arm_table': 'an ARM lookup table (val.routing.arm_lut)',
         'predictor': 'an error predictor in the checkpoint (run wbsr-calibrate --predictor on it)'}
#: Rows of the strips a large image runs in when one subnet covers it (the bands of bounded memory are whole strips).
BAND_STEP = 8


@dataclass(frozen=True)
class RoutingOptions:
    """The ``val: routing:`` block of an option file.

    Attributes:
        mode: A registered mode (:data:`wbsr_models.routing.modes.MODES`). Default (``None``): the checkpoint's default
            routing (:func:`default_routing`): the one ``wbsr-calibrate --predictor`` chose, else ``wbsr`` (Eq. 15).
        scheme: ``tiles`` (one seamless pass, non-overlapping tiles) or ``patches`` (overlapping patches run
            separately, the papers' protocol). Default: ``tiles``.
        tile_size: LR tile side of the ``tiles`` scheme. Default: 32.
        patch_size: LR patch size of the ``patches`` scheme. Default: 32.
        step: LR step between patches (<= patch_size). Default: 28.
        batch_size: Largest number of patches run at once (``patches``). Default: 64.
        budget, max_loss, slope, cost, level, alpha, subnet, arm_lut, arm_eta: Options of the modes that read them
            (:data:`wbsr_models.routing.modes.OPTIONS`); an option the mode does not read is refused.
        max_pixels: Memory bound: the largest LR area whose high-resolution stage runs at once (``tiles``, and
            whole-image modes on larger images; the trunk takes up to 16x as much). Default: 65536.
        num_classes: K used when a checkpoint has no thresholds. Default: 10.
    """

    mode: Optional[str] = None
    scheme: str = 'tiles'
    tile_size: int = DEFAULT_TILE_SIZE
    patch_size: int = 32
    step: int = 28
    batch_size: int = 64
    budget: Optional[float] = None
    max_loss: Optional[float] = None
    slope: Optional[float] = None
    cost: Optional[str] = None
    level: Optional[str] = None
    alpha: Optional[float] = None
    subnet: Optional[int] = None
    arm_lut: Optional[str] = None
    arm_eta: Optional[float] = None
    max_pixels: int = DEFAULT_TILE_MAX_PIXELS
    num_classes: int = 10

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_opt(cls, opt: Optional[Mapping[str, Any]], where: str = 'val.routing') -> 'RoutingOptions':
        opt = dict(opt or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(opt) - set(names))
        if unknown:
            raise ValueError(f'{where}: unknown option(s) {unknown}; known: {sorted(names)}')
        try:
            return cls(**opt)
        except ValueError as exc:
            raise ValueError(str(exc).replace('val.routing', where, 1)) from None

    def validate(self, where: str = 'val.routing') -> None:
        """Types, ranges and the mode's options; what depends on the network is checked by :class:`Router`."""
        mode = get_mode(self.mode, f'{where}.mode') if self.mode is not None else None
        if self.scheme not in SCHEMES:
            raise ValueError(f'{where}.scheme must be one of {SCHEMES}, got {self.scheme!r}')
        for name in ('tile_size', 'patch_size', 'step', 'batch_size', 'max_pixels', 'num_classes'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f'{where}.{name} must be an integer >= 1, got {value!r}')
        if self.step > self.patch_size:
            raise ValueError(f'{where}: need step <= patch_size, got patch_size={self.patch_size}, step={self.step}')
        for name, option in OPTIONS.items():
            value = getattr(self, name)
            if mode is None:  # the checkpoint's default routing: it brings its own options
                if value is not None:
                    raise ValueError(f'{where}.{name} is read by {" and ".join(modes_reading(name))} mode(s): give '
                                     f'{where}.mode too (without one, the checkpoint\'s default routing runs)')
                continue
            if value is None:
                if name in mode.required:
                    raise ValueError(f'{where}.{name} is required for {self.mode} mode ({option.help})')
                continue
            if name not in mode.reads():
                raise ValueError(f'{where}.{name} is read by {" and ".join(modes_reading(name))} mode(s), not by '
                                 f'{self.mode} mode; remove it or change the mode')
            option.check(value, where)
        if mode is not None:
            mode.check_options(self, where)


@dataclass
class RoutingResult:
    """One routed image: the SR output, where each subnet ran and what it cost."""

    output: torch.Tensor  # (1, C, sH, sW)
    subnets: np.ndarray  # per region (row-major), index into net.subnets
    boxes: np.ndarray  # (n, 4) top, left, height, width of each region (LR pixels)
    scheme: str  # 'tiles', 'patches' or 'whole'
    classes: Optional[np.ndarray]  # per region 1..K, None for full/fixed
    flops: int  # executed
    flops_full_regions: int  # the full network on the same regions (= the whole image for tiles and whole)
    flops_full_image: int  # the full network once on the whole image
    num_subnets: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio_regions(self) -> float:
        return self.flops / self.flops_full_regions

    @property
    def ratio_whole(self) -> float:
        return self.flops / self.flops_full_image

    def shares(self) -> np.ndarray:
        """Fraction of the image's LR pixels per subnet (in net.subnets order; overlaps of patches counted once
        per patch)."""
        area = (self.boxes[:, 2] * self.boxes[:, 3]).astype(np.float64)
        counts = np.bincount(self.subnets, weights=area, minlength=self.num_subnets)
        return counts / max(1., counts.sum())


def default_routing(options: RoutingOptions, routing: Optional[RoutingArtefacts]) -> RoutingOptions:
    """``options`` (no mode given) with the checkpoint's default routing: the mode and options that
    ``wbsr-calibrate --predictor`` chose on its held-out training images (``routing.default``, used where the
    checkpoint also carries the error predictor it was chosen with), else ``wbsr`` (Eq. 15)."""
    stored = routing.usable_default if routing is not None else None
    return replace(options, **(stored.options if stored is not None else {'mode': 'wbsr'}))


class Router:
    """Runs a (super)network on an LR image according to :class:`RoutingOptions`.

    Everything that depends on the network and the checkpoint is checked here, before any image: the mode's needs
    (class errors, an ARM table, an error predictor), a subnet index, a budget below the cheapest subnet.

    Args:
        net: A WBSR supernet (``subnets``, ``subnet_flops``, ``forward(x, subnet=...)``, ``forward_tiles``) or
            any plain BasicSR network (treated as one subnet: routing becomes whole-image or patch inference).
        options: Routing options.
        scale: Upscaling factor of ``net``.
        projection: Difficulty thresholds and projection (from the checkpoint or the training index);
            ``None`` fits them on each test image's own regions, with a warning.
        arm_table: ARM lookup table (``arm`` mode), see :mod:`wbsr_models.baselines`.
        routing: The checkpoint's routing artefacts (class errors, error predictor).
    """

    def __init__(self, net: nn.Module, options: RoutingOptions, scale: int,
                 projection: Optional[DifficultyProjection] = None, arm_table: Any = None,
                 routing: Optional[RoutingArtefacts] = None) -> None:
        self.routing = routing or RoutingArtefacts()
        self.by_default = options.mode is None  # the checkpoint's default routing runs
        if self.by_default:
            options = default_routing(options, self.routing)
        self.net, self.options, self.scale = net, options, int(scale)
        self.projection, self.arm_table = projection, arm_table
        self.mode = get_mode(options.mode)
        self.num_subnets = int(getattr(net, 'num_subnets', 1))
        self.num_in_ch = int(getattr(net, 'num_in_ch', 3))
        self.seamless = hasattr(net, 'forward_tiles')
        self._warned: set[str] = set()
        self._plain_flops: dict[tuple[int, int], int] = {}
        self._full_tile_flops: dict[tuple, int] = {}
        self._time_table = None
        missing = {'class_errors': self.class_errors is None, 'arm_table': arm_table is None,
                   'predictor': self.predictor is None}
        for need in self.mode.needs:
            if missing.get(need):
                raise ValueError(f'val.routing.mode {options.mode} needs {NEEDS[need]}')
        if self.predictor is not None:
            self.predictor.to(next(net.parameters()).device)
        self.mode.check_router(self)

    def describe(self) -> str:
        """How logs name what this router runs: ``learned (slope 0.004, level classes)``, and where it came from when
        no mode was given."""
        text = describe(self.options)
        if self.by_default:
            text += (', the checkpoint\'s default (chosen by wbsr-calibrate on its held-out training images)'
                     if self.stored_default else ', the default of a checkpoint that stores none (Eq. 15)')
        return text

    @property
    def stored_default(self) -> bool:
        """No mode was given and the checkpoint's stored default runs (not Eq. 15)."""
        return self.by_default and self.routing.usable_default is not None

    @property
    def class_errors(self):
        return self.routing.class_errors

    @property
    def predictor(self):
        return self.routing.predictor

    # ---- costs ---------------------------------------------------------------------------------------
    def costs(self, lr_hw: tuple[int, int]) -> np.ndarray:
        """FLOPs of each subnet on an LR input of ``lr_hw`` (ascending)."""
        if hasattr(self.net, 'subnet_flops'):
            return np.asarray(self.net.subnet_flops(lr_hw), dtype=np.int64)
        lr_hw = tuple(int(v) for v in lr_hw)
        if lr_hw not in self._plain_flops:
            self._plain_flops[lr_hw] = count_flops(self.net, (1, self.num_in_ch, *lr_hw))
        return np.asarray([self._plain_flops[lr_hw]], dtype=np.int64)

    # ---- running -------------------------------------------------------------------------------------
    def run_subnet(self, x: torch.Tensor, subnet: int) -> torch.Tensor:
        """``x`` through one subnet (or through a plain network).

        On the CPU the input is made channels-last, so that every convolution runs in that layout (about a quarter
        faster than the default layout here, and the layout the tile scheme uses: every mode is timed alike).
        """
        if x.device.type == 'cpu':
            x = x.contiguous(memory_format=torch.channels_last)
        if not hasattr(self.net, 'subnets'):
            return self.net(x)
        return self.net(x, subnet=int(subnet))

    def patch_sr(self, patches: torch.Tensor, rows: np.ndarray, subnet: int) -> torch.Tensor:
        """SR of ``patches[rows]`` with one subnet (the benchmark overrides this to reuse outputs)."""
        return self.run_subnet(patches[torch.as_tensor(rows)], subnet)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            get_root_logger().warning(message)

    def prepare(self, lq: torch.Tensor) -> torch.Tensor:
        """Check an LR image ``(1, C, H, W)`` and give it the network's channels (gray and RGBA are converted)."""
        if lq.dim() != 4 or lq.shape[0] != 1:
            raise ValueError(f'the router takes one LR image (1, C, H, W), got shape {tuple(lq.shape)}')
        if lq.shape[2] < 1 or lq.shape[3] < 1:
            raise ValueError(f'empty LR image of shape {tuple(lq.shape)}')
        channels = lq.shape[1]
        if channels == self.num_in_ch:
            return lq
        if channels == 1 and self.num_in_ch == 3:
            return lq.expand(-1, 3, -1, -1)
        if channels == 4 and self.num_in_ch == 3:
            return lq[:, :3]
        raise ValueError(f'the network takes {self.num_in_ch} channels, the image has {channels}')

    def regions(self, lq: torch.Tensor) -> Regions:
        """The regions of a prepared LR image under this router's scheme."""
        opts = self.options
        return cut(lq, opts.scheme, patch_size=opts.patch_size, step=opts.step, tile_size=opts.tile_size)

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, assign: Optional[Callable[..., np.ndarray]] = None) -> RoutingResult:
        """Route one LR image ``(1, C, H, W)``.

        ``assign``, if given, replaces the mode's choice: it receives ``(regions, classes, costs)`` (the
        :class:`~wbsr_models.regions.Regions`, their classes 1..K and the ``(n, M)`` FLOPs of every subnet on
        every region) and returns one subnet index per region, row-major (used by the benchmark's oracle).
        """
        lq = self.prepare(lq)
        if self.mode.whole_image and assign is None:
            return self._whole(lq, self.mode.whole_subnet(self))
        if self.options.scheme == 'tiles' and not self.seamless:  # a plain network: one pass is the whole image
            return self._whole(lq, 0)
        regions = self.regions(lq)
        costs = regions.costs(self.costs)
        classes, position, num_classes = self.classify(regions)
        extra: dict = {}
        subnets = self.choose(regions, classes, position, num_classes, costs, assign, lq=lq, extra=extra)
        run = self._run_tiles if self.options.scheme == 'tiles' else self._run_patches
        result = run(lq, regions, subnets, classes, costs)
        result.extra.update(extra)
        if assign is None and 'predictor' in self.mode.needs:  # the predictor's work is part of the routed cost
            extra = self.predictor.flops(regions.image_hw, len(regions))
            result.flops += extra
            result.extra['predictor_flops'] = extra
        return result

    def classify(self, regions: Regions) -> tuple[np.ndarray, np.ndarray, int]:
        """Difficulty classes 1..K, continuous positions in [0, 1] and K of every region."""
        vectors = regions.per_region(lambda crops: gradient_vectors(crops).cpu().numpy())
        projection = self.projection
        if projection is None:
            self.warn_once('routing without stored difficulty thresholds (not a WBSR checkpoint): thresholds '
                           "are fitted on each test image's own regions")
            projection = DifficultyProjection.fit(vectors, self.options.num_classes)
        scores = projection.score(vectors)
        return projection.classify(scores), projection.position(scores), projection.num_classes

    def choose(self, regions: Regions, classes: np.ndarray, position: np.ndarray, num_classes: int,
               costs: np.ndarray, assign: Optional[Callable[..., np.ndarray]] = None,
               lq: Optional[torch.Tensor] = None, extra: Optional[dict] = None) -> np.ndarray:
        """One subnet per region: the mode's policy, or ``assign``'s (``extra`` receives what the mode reports)."""
        if assign is not None:
            subnets = np.asarray(assign(regions, classes, costs), dtype=np.int64)
        elif self.num_subnets == 1:
            subnets = np.zeros(len(regions), dtype=np.int64)
        else:
            selection = Selection(self, lq, regions, classes, position, num_classes, costs)
            subnets = np.asarray(self.mode.select(selection), dtype=np.int64)
            if extra is not None:
                extra.update(selection.extra)
        if subnets.shape != (len(regions), ) or subnets.min() < 0 or subnets.max() >= self.num_subnets:
            raise ValueError(f'subnet assignment must give one index in 0..{self.num_subnets - 1} per region')
        return subnets

    # ---- what the learned mode reads --------------------------------------------------------------------
    def predicted_errors(self, lq: torch.Tensor, regions: Regions) -> np.ndarray:
        """The error predictor's mean squared error per pixel ``(n, M)`` of every subnet on every region."""
        return self.predictor.predict(lq[:, :3], regions.boxes)

    def time_table(self):
        """Seconds per LR pixel of every subnet on this device (:mod:`wbsr_models.routing.timing`), cached."""
        if self._time_table is None:
            from .routing.timing import time_table
            self._time_table = time_table(self.net, self.predictor, self.options.tile_size)
        return self._time_table

    def region_seconds(self, regions: Regions) -> np.ndarray:
        """``(n, M)`` seconds of every subnet on every region, by this device's time table."""
        return self.time_table().region_seconds(regions.boxes[:, 2] * regions.boxes[:, 3])

    def predictor_cost(self, regions: Regions, unit: str) -> float:
        """The error predictor's cost on this image, in FLOPs or seconds."""
        h, w = regions.image_hw
        if unit == 'seconds':
            return self.time_table().predictor_seconds * h * w
        return float(self.predictor.flops((h, w), len(regions)))

    def _result(self, output: torch.Tensor, regions: Regions, subnets: np.ndarray, classes: Optional[np.ndarray],
                flops: int, flops_full_regions: int) -> RoutingResult:
        h, w = regions.image_hw
        return RoutingResult(output=output, subnets=subnets, boxes=regions.boxes, scheme=regions.scheme,
                             classes=classes, flops=int(flops), flops_full_regions=int(flops_full_regions),
                             flops_full_image=int(self.costs((h, w))[-1]), num_subnets=self.num_subnets)

    # ---- whole image ---------------------------------------------------------------------------------
    def _whole(self, lq: torch.Tensor, subnet: int) -> RoutingResult:
        _, _, h, w = lq.shape
        costs = self.costs((h, w))
        if h * w <= self.options.max_pixels:
            output, flops = self.run_subnet(lq, subnet), int(costs[subnet])
        elif self.seamless:  # exact, in bands of bounded memory: every strip of rows on the same subnet
            grid = TileGrid(tuple(range(0, h, BAND_STEP)) + (h, ), (0, w))
            run = self.net.forward_tiles(lq, np.full(grid.shape, subnet), grid=grid,
                                         max_pixels=self.options.max_pixels)
            output, flops = run.output, run.flops
        else:
            output, flops = self._tiled(lq, subnet)
        boxes = np.array([[0, 0, h, w]], dtype=np.int64)
        return RoutingResult(output=output, subnets=np.array([subnet]), boxes=boxes, scheme='whole', classes=None,
                             flops=flops, flops_full_regions=int(costs[-1]), flops_full_image=int(costs[-1]),
                             num_subnets=self.num_subnets)

    def _tiled(self, lq: torch.Tensor, subnet: int) -> tuple[torch.Tensor, int]:
        """A plain network on a large image: square pieces with a 16-pixel margin, the margins discarded."""
        _, _, h, w = lq.shape
        tile, margin, s = max(16, int(math.isqrt(self.options.max_pixels)) - 32), 16, self.scale
        out = None
        flops = 0
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                t0, l0 = max(0, top - margin), max(0, left - margin)
                t1, l1 = min(h, top + tile + margin), min(w, left + tile + margin)
                sr = self.run_subnet(lq[:, :, t0:t1, l0:l1], subnet)
                flops += int(self.costs((t1 - t0, l1 - l0))[subnet])
                if out is None:
                    out = sr.new_empty(1, sr.shape[1], h * s, w * s)
                bh, bw = min(tile, h - top), min(tile, w - left)
                out[:, :, top * s:(top + bh) * s, left * s:(left + bw) * s] = \
                    sr[:, :, (top - t0) * s:(top - t0 + bh) * s, (left - l0) * s:(left - l0 + bw) * s]
        return out, flops

    # ---- tiles: one seamless pass ----------------------------------------------------------------------
    def _run_tiles(self, lq: torch.Tensor, regions: Regions, subnets: np.ndarray, classes: np.ndarray,
                   costs: np.ndarray) -> RoutingResult:
        grid, limit = regions.grid, self.options.max_pixels
        run = self.net.forward_tiles(lq, subnets.reshape(grid.shape), grid=grid, max_pixels=limit)
        h, w = regions.image_hw
        if h * w <= limit:  # one band: the full network on every tile, nothing more (tests/test_tiles.py)
            full = int(costs[:, -1].sum())
        else:  # bands add margins: count the full network's run the same way
            key = (grid, limit)
            if key not in self._full_tile_flops:
                assign = np.full(grid.shape, self.num_subnets - 1)
                self._full_tile_flops[key] = self.net.tile_flops((h, w), assign, grid=grid, max_pixels=limit)
            full = self._full_tile_flops[key]
        return self._result(run.output, regions, subnets, classes, run.flops, full)

    # ---- patches: the papers' protocol ---------------------------------------------------------------
    def _run_patches(self, lq: torch.Tensor, regions: Regions, subnets: np.ndarray, classes: np.ndarray,
                     costs: np.ndarray) -> RoutingResult:
        patches = regions.crops(tuple(regions.boxes[0, 2:]), np.arange(len(regions)))
        output = self._merge(patches, subnets, regions)
        flops = costs[np.arange(len(subnets)), subnets].sum()
        return self._result(output, regions, subnets, classes, flops, costs[:, -1].sum())

    def _merge(self, patches: torch.Tensor, subnets: np.ndarray, regions: Regions) -> torch.Tensor:
        """Run each subnet on its patches in bounded batches; average the overlaps."""
        (h, w), s = regions.image_hw, self.scale
        ph, pw = patches.shape[2:]
        out = None
        offsets = None
        for subnet in np.unique(subnets):
            rows = np.flatnonzero(subnets == subnet)
            for start in range(0, len(rows), self.options.batch_size):
                chunk = rows[start:start + self.options.batch_size]
                sr = self.patch_sr(patches, chunk, int(subnet))
                if out is None:
                    out = sr.new_zeros(sr.shape[1], h * s * w * s)
                    yy, xx = torch.meshgrid(torch.arange(ph * s), torch.arange(pw * s), indexing='ij')
                    offsets = (yy * (w * s) + xx).flatten().to(sr.device)
                box = regions.boxes[chunk]
                base = torch.as_tensor(box[:, 0] * s * (w * s) + box[:, 1] * s, device=sr.device)
                index = (base[:, None] + offsets[None, :]).flatten()
                out.index_add_(1, index, sr.permute(1, 0, 2, 3).reshape(sr.shape[1], -1))
        count = torch.zeros(h, w)
        for top, left in regions.boxes[:, :2].tolist():
            count[top:top + ph, left:left + pw] += 1
        out = out.view(-1, h, s, w, s) / count.to(out).view(1, h, 1, w, 1)  # the HR count, never materialised
        return out.view(1, -1, h * s, w * s)
