"""Gradient-projection dynamic inference (spec section 5), and the modes it is compared with.

Routing is two independent choices:

- *which subnet each region gets*, the mode: ``wbsr`` (Eq. 15, ``m = ceil(k * M / K)``), ``budget`` (the
  image's average cost stays at or below ``budget`` x the full network's and the allocation stays
  monotone in difficulty: each region's continuous difficulty position ``u`` in [0, 1] is shifted by one
  image-wide ``lam`` and ``m = ceil((u + lam) * M)``, ``lam`` the largest shift that fits), ``calibrated``
  (the same budget, spent where it buys the most PSNR per FLOP according to each class's measured error,
  :func:`calibrated_subnets`), ``alpha`` (per
  region, the subnet whose cost is nearest ``alpha * (k / K) * C_full``), ``arm`` (ARM's edge lookup
  table, :mod:`wbsr_models.baselines`), or any ``assign`` callback (the benchmark's oracle);
- *how the image is cut and run*, the scheme (:mod:`wbsr_models.regions`): ``tiles`` (default:
  non-overlapping tiles, one seamless pass of the supernet in which each tile runs only its subnet's
  layers and channels, :meth:`~wbsr_arch.supernet.SupernetMixin.forward_tiles`) or ``patches`` (the
  ClassSR/ARM/PCSR protocol: overlapping 32/28 patches run separately, overlaps averaged; kept so that
  numbers compare with the papers).

``full`` / ``fixed`` run the largest / one named subnet on the whole image (bounded memory on large
images). FLOPs are reported three ways: executed, the full network on the same regions (the papers'
convention for patches), and the full network run once on the whole image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
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

MODES = ('wbsr', 'budget', 'calibrated', 'alpha', 'arm', 'full', 'fixed')
#: Rows of the strips a large image runs in when one subnet covers it (the bands of bounded memory are whole strips).
BAND_STEP = 8
REGION_MODES = ('wbsr', 'budget', 'calibrated', 'alpha', 'arm')


@dataclass(frozen=True)
class RoutingOptions:
    """The ``val: routing:`` block of an option file.

    Attributes:
        mode: One of :data:`MODES`. Default: ``wbsr``.
        scheme: ``tiles`` (one seamless pass, non-overlapping tiles) or ``patches`` (overlapping patches run
            separately, the papers' protocol). Default: ``tiles``.
        tile_size: LR tile side of the ``tiles`` scheme. Default: 32.
        patch_size: LR patch size of the ``patches`` scheme. Default: 32.
        step: LR step between patches (<= patch_size). Default: 28.
        batch_size: Largest number of patches run at once (``patches``). Default: 64.
        budget: Target average cost, a fraction in (0, 1] of the full network (``budget`` mode).
        alpha: Quality/cost trade-off of ``alpha`` mode. Default: 1.0.
        subnet: Subnet index for ``fixed`` mode.
        arm_lut: ARM lookup-table file (``arm`` mode); built in-sample from the validation set if absent.
        arm_eta: ARM's trade-off: a subnet maximises ``eta * PSNR - cost share``. Default: 1.0.
        max_pixels: Memory bound: the largest LR area whose high-resolution stage runs at once (``tiles``, and
            ``full``/``fixed`` on larger images; the trunk takes up to 16x as much). Default: 65536.
        num_classes: K used when a checkpoint has no thresholds. Default: 10.
    """

    mode: str = 'wbsr'
    scheme: str = 'tiles'
    tile_size: int = DEFAULT_TILE_SIZE
    patch_size: int = 32
    step: int = 28
    batch_size: int = 64
    budget: Optional[float] = None
    alpha: float = 1.0
    subnet: Optional[int] = None
    arm_lut: Optional[str] = None
    arm_eta: float = 1.0
    max_pixels: int = DEFAULT_TILE_MAX_PIXELS
    num_classes: int = 10

    @classmethod
    def from_opt(cls, opt: Optional[Mapping[str, Any]], where: str = 'val.routing') -> 'RoutingOptions':
        opt = dict(opt or {})
        unknown = sorted(set(opt) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f'{where}: unknown option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}')
        options = cls(**opt)
        options.validate(where)
        return options

    def validate(self, where: str = 'val.routing') -> None:
        if self.mode not in MODES:
            raise ValueError(f'{where}.mode must be one of {MODES}, got {self.mode!r}')
        if self.scheme not in SCHEMES:
            raise ValueError(f'{where}.scheme must be one of {SCHEMES}, got {self.scheme!r}')
        if self.tile_size < 1:
            raise ValueError(f'{where}.tile_size must be >= 1, got {self.tile_size}')
        if self.patch_size < 1 or not 1 <= self.step <= self.patch_size:
            raise ValueError(f'{where}: need patch_size >= 1 and 1 <= step <= patch_size, got patch_size='
                             f'{self.patch_size}, step={self.step}')
        if self.batch_size < 1:
            raise ValueError(f'{where}.batch_size must be >= 1, got {self.batch_size}')
        if self.mode in ('budget', 'calibrated') and (self.budget is None or not 0. < float(self.budget) <= 1.):
            raise ValueError(f'{where}.budget must be in (0, 1] for {self.mode} mode, got {self.budget}')
        if self.mode == 'alpha' and not self.alpha > 0:
            raise ValueError(f'{where}.alpha must be > 0, got {self.alpha}')
        if self.mode == 'fixed' and self.subnet is None:
            raise ValueError(f'{where}.subnet is required for fixed mode')
        if self.max_pixels < 1 or self.num_classes < 1:
            raise ValueError(f'{where}: max_pixels and num_classes must be >= 1')


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


def eq15_subnets(classes: np.ndarray, num_classes: int, num_subnets: int) -> np.ndarray:
    """Eq. 15: 0-based subnet ``ceil(k * M / K) - 1`` of classes ``k`` in 1..K."""
    k = np.asarray(classes, dtype=np.int64)
    return np.clip(-((-k * num_subnets) // num_classes) - 1, 0, num_subnets - 1)


def shifted_subnets(position: np.ndarray, lam: float, num_subnets: int) -> np.ndarray:
    """0-based subnet ``ceil((u + lam) * M) - 1``, clipped: monotone in ``u`` and in ``lam``."""
    return np.clip(np.ceil((np.asarray(position) + lam) * num_subnets - 1e-9).astype(np.int64) - 1, 0,
                   num_subnets - 1)


def budget_subnets(position: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Monotone allocation whose total cost is <= ``budget`` x the full network's (the largest shift that fits).

    ``costs`` is ``(M,)`` (every region the same size) or ``(n, M)`` (per region).
    """
    costs = np.broadcast_to(np.asarray(costs, dtype=np.float64), (len(position), np.shape(costs)[-1]))
    limit = budget * costs[:, -1].sum() * (1 + 1e-12)
    m = costs.shape[1]
    rows = np.arange(len(position))

    def total(lam: float) -> float:
        return costs[rows, shifted_subnets(position, lam, m)].sum()

    lo, hi = -1.0, 1.0
    if total(lo) > limit:
        return shifted_subnets(position, lo, m)  # even all-smallest is over budget; caller warns
    if total(hi) <= limit:
        return shifted_subnets(position, hi, m)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= limit else (lo, mid)
    return shifted_subnets(position, lo, m)


def calibrated_subnets(classes: np.ndarray, position: np.ndarray, costs: np.ndarray, class_mse: np.ndarray,
                       area: np.ndarray, budget: float) -> np.ndarray:
    """Spend a FLOPs budget where it buys the most PSNR: greedy upgrades by marginal error removed per FLOP.

    An image's PSNR falls with its total squared error, so region ``i`` of class ``k`` is worth
    ``area_i * (class_mse[k - 1, 0] - class_mse[k - 1, m])`` (the squared error subnet ``m`` removes there,
    by the class's measured mean squared error per pixel) for ``costs[i, m]`` FLOPs. Every region starts on
    its cheapest subnet; then the upgrade with the largest gain per extra FLOP over all regions is taken, on the
    upper concave hull of each region's (cost, gain) points (so a subnet that buys less per FLOP than a larger
    one is skipped), until the next upgrade would exceed ``budget`` x the full network's total cost. Ties go to
    the harder region (larger ``position``), then to the earlier one. The allocation is deterministic, never
    exceeds the budget (unless all-cheapest already does) and grows with the budget: a larger budget takes a
    longer prefix of the same sequence of upgrades.
    """
    costs = np.asarray(costs, dtype=np.float64)
    n, m = costs.shape
    mse = np.asarray(class_mse, dtype=np.float64)[np.asarray(classes) - 1]
    value = np.asarray(area, dtype=np.float64)[:, None] * (mse[:, :1] - mse)
    steps = []  # (-ratio, -position, region, target subnet, extra cost)
    for i in range(n):
        hull, at = [], 0
        order = np.argsort(costs[i], kind='stable')
        at = order[0]
        while True:
            ahead = [j for j in order if costs[i, j] > costs[i, at]]
            if not ahead:
                break
            ratios = [(value[i, j] - value[i, at]) / (costs[i, j] - costs[i, at]) for j in ahead]
            best = int(np.argmax(ratios))
            if ratios[best] <= 0:
                break
            hull.append((ratios[best], ahead[best], costs[i, ahead[best]] - costs[i, at]))
            at = ahead[best]
        for ratio, target, extra in hull:
            steps.append((-ratio, -float(position[i]), i, int(target), float(extra)))
    chosen = np.array([int(np.argsort(costs[i], kind='stable')[0]) for i in range(n)], dtype=np.int64)
    spent = costs[np.arange(n), chosen].sum()
    limit = budget * costs[:, -1].sum() * (1 + 1e-12)
    # Each region's hull steps have falling ratios, so sorting all steps keeps every region's steps in order.
    for _, _, i, target, extra in sorted(steps):
        if spent + extra > limit:
            break
        chosen[i] = target
        spent += extra
    return chosen


def alpha_subnets(classes: np.ndarray, num_classes: int, costs: np.ndarray, alpha: float) -> np.ndarray:
    """Per region, the subnet whose cost is nearest ``alpha * (k / K) * C_full`` (``costs`` ``(M,)`` or ``(n, M)``)."""
    costs = np.broadcast_to(np.asarray(costs, dtype=np.float64), (len(classes), np.shape(costs)[-1]))
    target = alpha * np.asarray(classes, dtype=np.float64) / num_classes * costs[:, -1]
    return np.abs(costs - target[:, None]).argmin(axis=1)


class Router:
    """Runs a (super)network on an LR image according to :class:`RoutingOptions`.

    Args:
        net: A WBSR supernet (``subnets``, ``subnet_flops``, ``forward(x, subnet=...)``, ``forward_tiles``) or
            any plain BasicSR network (treated as one subnet: routing becomes whole-image or patch inference).
        options: Routing options.
        scale: Upscaling factor of ``net``.
        projection: Difficulty thresholds and projection (from the checkpoint or the training index);
            ``None`` fits them on each test image's own regions, with a warning.
        arm_table: ARM lookup table (``arm`` mode), see :mod:`wbsr_models.baselines`.
    """

    def __init__(self, net: nn.Module, options: RoutingOptions, scale: int,
                 projection: Optional[DifficultyProjection] = None, arm_table: Any = None) -> None:
        self.net, self.options, self.scale = net, options, int(scale)
        self.projection, self.arm_table = projection, arm_table
        self.num_subnets = int(getattr(net, 'num_subnets', 1))
        self.num_in_ch = int(getattr(net, 'num_in_ch', 3))
        self.seamless = hasattr(net, 'forward_tiles')
        if options.mode == 'fixed' and not 0 <= options.subnet < self.num_subnets:
            raise ValueError(f'val.routing.subnet={options.subnet} out of range 0..{self.num_subnets - 1}')
        if options.mode == 'arm' and arm_table is None:
            raise ValueError('val.routing: arm mode needs an ARM lookup table')
        if options.mode == 'calibrated':
            class_mse = None if projection is None else projection.class_mse
            if class_mse is None:
                raise ValueError('val.routing.mode calibrated needs the measured error of every subnet on every '
                                 'difficulty class in the checkpoint (run wbsr-calibrate on it)')
            if class_mse.shape[1] != self.num_subnets:
                raise ValueError(f'the calibration has {class_mse.shape[1]} subnets, the network has '
                                 f'{self.num_subnets}')
        if options.mode in ('budget', 'calibrated'):
            side = options.tile_size if options.scheme == 'tiles' else options.patch_size
            cheapest = self.costs((side, side))
            share = cheapest[0] / cheapest[-1]
            if options.budget < share:
                raise ValueError(f'val.routing.budget={options.budget} is below the cheapest subnet\'s cost share '
                                 f'{share:.3f}; no allocation can meet it')
        self._warned: set[str] = set()
        self._plain_flops: dict[tuple[int, int], int] = {}
        self._full_tile_flops: dict[tuple, int] = {}

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

    def _warn_once(self, message: str) -> None:
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
        if self.options.mode in ('full', 'fixed') and assign is None:
            subnet = self.num_subnets - 1 if self.options.mode == 'full' else int(self.options.subnet)
            return self._whole(lq, subnet)
        if self.options.scheme == 'tiles' and not self.seamless:  # a plain network: one pass is the whole image
            return self._whole(lq, 0)
        regions = self.regions(lq)
        costs = regions.costs(self.costs)
        classes, position, num_classes = self.classify(regions)
        subnets = self.choose(regions, classes, position, num_classes, costs, assign)
        if self.options.scheme == 'tiles':
            return self._run_tiles(lq, regions, subnets, classes, costs)
        return self._run_patches(lq, regions, subnets, classes, costs)

    def classify(self, regions: Regions) -> tuple[np.ndarray, np.ndarray, int]:
        """Difficulty classes 1..K, continuous positions in [0, 1] and K of every region."""
        vectors = regions.per_region(lambda crops: gradient_vectors(crops).cpu().numpy())
        projection = self.projection
        if projection is None:
            self._warn_once('routing without stored difficulty thresholds (not a WBSR checkpoint): thresholds '
                            "are fitted on each test image's own regions")
            projection = DifficultyProjection.fit(vectors, self.options.num_classes)
        scores = projection.score(vectors)
        return projection.classify(scores), projection.position(scores), projection.num_classes

    def choose(self, regions: Regions, classes: np.ndarray, position: np.ndarray, num_classes: int,
               costs: np.ndarray, assign: Optional[Callable[..., np.ndarray]] = None) -> np.ndarray:
        """One subnet per region: the mode's policy, or ``assign``'s."""
        opts = self.options
        if assign is not None:
            subnets = np.asarray(assign(regions, classes, costs), dtype=np.int64)
        elif self.num_subnets == 1:
            subnets = np.zeros(len(regions), dtype=np.int64)
        elif opts.mode == 'wbsr':
            subnets = eq15_subnets(classes, num_classes, self.num_subnets)
        elif opts.mode == 'budget':
            subnets = budget_subnets(position, costs, float(opts.budget))
            if costs[np.arange(len(subnets)), subnets].sum() > opts.budget * costs[:, -1].sum() * (1 + 1e-9):
                self._warn_once(f'budget {opts.budget} is below the cheapest subnet for this image\'s regions; every '
                                'region uses the cheapest subnet')
        elif opts.mode == 'calibrated':
            area = regions.boxes[:, 2] * regions.boxes[:, 3]
            subnets = calibrated_subnets(classes, position, costs, self.projection.class_mse, area,
                                         float(opts.budget))
        elif opts.mode == 'alpha':
            subnets = alpha_subnets(classes, num_classes, costs, opts.alpha)
        else:  # arm
            subnets = self.arm_table.select(regions, costs, opts.arm_eta)
        if subnets.shape != (len(regions), ) or subnets.min() < 0 or subnets.max() >= self.num_subnets:
            raise ValueError(f'subnet assignment must give one index in 0..{self.num_subnets - 1} per region')
        return subnets

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
