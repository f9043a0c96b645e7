"""Gradient-projection dynamic inference (spec section 5), and the modes it is compared with.

The LR image is chopped into ``patch_size`` patches with ``step`` (default 32/28, the ClassSR/ARM/PCSR
protocol; the last row and column are flush with the border), each patch gets a difficulty class from
the stored thresholds, each subnet runs on its patches in batches of at most ``batch_size``, and the
overlaps are merged by averaging. Modes:

- ``wbsr``: Eq. 15, subnet ``m = ceil(k * M / K)``.
- ``budget``: the average cost of the image stays at or below ``budget`` x the full network's, and the
  allocation stays monotone in difficulty: each patch's continuous difficulty position ``u`` in [0, 1]
  (class k ends at k/K) is shifted by one image-wide ``lam`` and ``m = ceil((u + lam) * M)``; ``lam`` is
  the largest shift that fits the budget (``lam = 0`` is Eq. 15 up to rounding inside a class).
- ``alpha``: per patch, the subnet whose cost is nearest ``alpha * (k / K) * C_full`` (Eq. 16 read as a
  per-patch target; larger alpha = more quality).
- ``arm``: ARM's edge-score lookup table (:mod:`wbsr_models.baselines`).
- ``full`` / ``fixed``: the largest / one named subnet on the whole image (in tiles of at most
  ``max_pixels`` LR pixels with a margin when the image is larger, so memory stays bounded).

FLOPs are reported three ways: executed, the full network on the same patches (the papers'
convention), and the full network run once on the whole image (includes the chopping overlap).
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
from wbsr_data.difficulty import DifficultyProjection, extract_patches, gradient_vectors, grid_starts

MODES = ('wbsr', 'budget', 'alpha', 'arm', 'full', 'fixed')
PATCH_MODES = ('wbsr', 'budget', 'alpha', 'arm')


@dataclass(frozen=True)
class RoutingOptions:
    """The ``val: routing:`` block of an option file.

    Attributes:
        mode: One of :data:`MODES`. Default: ``wbsr``.
        patch_size: LR patch size. Default: 32.
        step: LR step between patches (<= patch_size). Default: 28.
        batch_size: Largest number of patches run at once. Default: 64.
        budget: Target average cost, a fraction in (0, 1] of the full network (``budget`` mode).
        alpha: Quality/cost trade-off of ``alpha`` mode. Default: 1.0.
        subnet: Subnet index for ``fixed`` mode.
        arm_lut: ARM lookup-table file (``arm`` mode); built in-sample from the validation set if absent.
        arm_eta: ARM's trade-off: a subnet maximises ``eta * PSNR - cost share``. Default: 1.0.
        max_pixels: Largest LR area run as one piece in ``full``/``fixed`` modes. Default: 512 * 512.
        num_classes: K used when a checkpoint has no thresholds. Default: 10.
    """

    mode: str = 'wbsr'
    patch_size: int = 32
    step: int = 28
    batch_size: int = 64
    budget: Optional[float] = None
    alpha: float = 1.0
    subnet: Optional[int] = None
    arm_lut: Optional[str] = None
    arm_eta: float = 1.0
    max_pixels: int = 512 * 512
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
        if self.patch_size < 1 or not 1 <= self.step <= self.patch_size:
            raise ValueError(f'{where}: need patch_size >= 1 and 1 <= step <= patch_size, got patch_size='
                             f'{self.patch_size}, step={self.step}')
        if self.batch_size < 1:
            raise ValueError(f'{where}.batch_size must be >= 1, got {self.batch_size}')
        if self.mode == 'budget' and (self.budget is None or not 0. < float(self.budget) <= 1.):
            raise ValueError(f'{where}.budget must be in (0, 1] for budget mode, got {self.budget}')
        if self.mode == 'alpha' and not self.alpha > 0:
            raise ValueError(f'{where}.alpha must be > 0, got {self.alpha}')
        if self.mode == 'fixed' and self.subnet is None:
            raise ValueError(f'{where}.subnet is required for fixed mode')
        if self.max_pixels < 1 or self.num_classes < 1:
            raise ValueError(f'{where}: max_pixels and num_classes must be >= 1')


@dataclass
class RoutingResult:
    """One routed image: the SR output and what it cost."""

    output: torch.Tensor  # (1, C, sH, sW)
    subnets: np.ndarray  # per patch (row-major over tops x lefts), index into net.subnets
    tops: list[int]
    lefts: list[int]
    patch_hw: tuple[int, int]
    classes: Optional[np.ndarray]  # per patch 1..K, None for full/fixed
    flops: int  # executed
    flops_full_patches: int  # the full network on the same patches
    flops_full_image: int  # the full network once on the whole image
    num_subnets: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio_patches(self) -> float:
        return self.flops / self.flops_full_patches

    @property
    def ratio_whole(self) -> float:
        return self.flops / self.flops_full_image

    def shares(self) -> np.ndarray:
        """Fraction of patches per subnet (in net.subnets order)."""
        counts = np.bincount(self.subnets, minlength=self.num_subnets).astype(np.float64)
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
    """Monotone allocation with average cost <= ``budget * costs[-1]`` (the largest shift that fits)."""
    costs = np.asarray(costs, dtype=np.float64)
    limit = budget * costs[-1] * len(position) * (1 + 1e-12)
    m = len(costs)

    def total(lam: float) -> float:
        return costs[shifted_subnets(position, lam, m)].sum()

    lo, hi = -1.0, 1.0
    if total(lo) > limit:
        return shifted_subnets(position, lo, m)  # even all-smallest is over budget; caller warns
    if total(hi) <= limit:
        return shifted_subnets(position, hi, m)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= limit else (lo, mid)
    return shifted_subnets(position, lo, m)


def alpha_subnets(classes: np.ndarray, num_classes: int, costs: np.ndarray, alpha: float) -> np.ndarray:
    """Per patch, the subnet whose cost is nearest ``alpha * (k / K) * C_full``."""
    costs = np.asarray(costs, dtype=np.float64)
    target = alpha * np.asarray(classes, dtype=np.float64) / num_classes * costs[-1]
    return np.abs(costs[None, :] - target[:, None]).argmin(axis=1)


class Router:
    """Runs a (super)network on an LR image according to :class:`RoutingOptions`.

    Args:
        net: A WBSR supernet (``subnets``, ``subnet_flops``, ``forward(x, subnet=...)``) or any plain
            BasicSR network (treated as one subnet: routing becomes tiled inference).
        options: Routing options.
        scale: Upscaling factor of ``net``.
        projection: Difficulty thresholds and projection (from the checkpoint or the training index);
            ``None`` fits them on each test image's own patches, with a warning.
        arm_table: ARM lookup table (``arm`` mode), see :mod:`wbsr_models.baselines`.
    """

    def __init__(self, net: nn.Module, options: RoutingOptions, scale: int,
                 projection: Optional[DifficultyProjection] = None, arm_table: Any = None) -> None:
        self.net, self.options, self.scale = net, options, int(scale)
        self.projection, self.arm_table = projection, arm_table
        self.num_subnets = int(getattr(net, 'num_subnets', 1))
        self.num_in_ch = int(getattr(net, 'num_in_ch', 3))
        if options.mode == 'fixed' and not 0 <= options.subnet < self.num_subnets:
            raise ValueError(f'val.routing.subnet={options.subnet} out of range 0..{self.num_subnets - 1}')
        if options.mode == 'arm' and arm_table is None:
            raise ValueError('val.routing: arm mode needs an ARM lookup table')
        if options.mode == 'budget':
            cheapest = self.costs((options.patch_size, options.patch_size))
            share = cheapest[0] / cheapest[-1]
            if options.budget < share:
                raise ValueError(f'val.routing.budget={options.budget} is below the cheapest subnet\'s cost share '
                                 f'{share:.3f}; no allocation can meet it')
        self._warned: set[str] = set()
        self._plain_flops: dict[tuple[int, int], int] = {}

    # ---- costs ---------------------------------------------------------------------------------------
    def costs(self, lr_hw: tuple[int, int]) -> np.ndarray:
        """FLOPs of each subnet on an LR input of ``lr_hw`` (ascending)."""
        if hasattr(self.net, 'subnet_flops'):
            return np.asarray(self.net.subnet_flops(lr_hw), dtype=np.int64)
        if lr_hw not in self._plain_flops:
            self._plain_flops[lr_hw] = count_flops(self.net, (1, self.num_in_ch, *lr_hw))
        return np.asarray([self._plain_flops[lr_hw]], dtype=np.int64)

    # ---- running -------------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, subnet: int) -> torch.Tensor:
        if self.num_subnets == 1 and not hasattr(self.net, 'subnets'):
            return self.net(x)
        return self.net(x, subnet=int(subnet))

    def _run_patches(self, patches: torch.Tensor, rows: np.ndarray, subnet: int) -> torch.Tensor:
        """SR of ``patches[rows]`` with one subnet (the benchmark overrides this to reuse outputs)."""
        return self._run(patches[torch.as_tensor(rows)], subnet)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            get_root_logger().warning(message)

    def _prepare(self, lq: torch.Tensor) -> torch.Tensor:
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

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, assign: Optional[Callable[..., np.ndarray]] = None) -> RoutingResult:
        """Route one LR image ``(1, C, H, W)``.

        ``assign``, if given, replaces the mode's choice: it receives ``(patches, classes, costs)`` and
        returns one subnet index per patch (used by the benchmark's oracle).
        """
        lq = self._prepare(lq)
        if self.options.mode in ('full', 'fixed') and assign is None:
            subnet = self.num_subnets - 1 if self.options.mode == 'full' else int(self.options.subnet)
            return self._whole(lq, subnet)
        return self._patches(lq, assign)

    def _whole(self, lq: torch.Tensor, subnet: int) -> RoutingResult:
        _, _, h, w = lq.shape
        costs = self.costs((h, w))
        if h * w <= self.options.max_pixels:
            output, flops = self._run(lq, subnet), int(costs[subnet])
        else:
            output, flops = self._tiled(lq, subnet)
        return RoutingResult(output=output, subnets=np.array([subnet]), tops=[0], lefts=[0], patch_hw=(h, w),
                             classes=None, flops=flops, flops_full_patches=int(costs[-1]),
                             flops_full_image=int(costs[-1]), num_subnets=self.num_subnets)

    def _tiled(self, lq: torch.Tensor, subnet: int) -> tuple[torch.Tensor, int]:
        """Whole-image inference in square tiles with a 16-pixel margin; the margins are discarded."""
        _, _, h, w = lq.shape
        tile, margin, s = max(16, int(math.isqrt(self.options.max_pixels)) - 32), 16, self.scale
        out = None
        flops = 0
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                t0, l0 = max(0, top - margin), max(0, left - margin)
                t1, l1 = min(h, top + tile + margin), min(w, left + tile + margin)
                sr = self._run(lq[:, :, t0:t1, l0:l1], subnet)
                flops += int(self.costs((t1 - t0, l1 - l0))[subnet])
                if out is None:
                    out = sr.new_empty(1, sr.shape[1], h * s, w * s)
                bh, bw = min(tile, h - top), min(tile, w - left)
                out[:, :, top * s:(top + bh) * s, left * s:(left + bw) * s] = \
                    sr[:, :, (top - t0) * s:(top - t0 + bh) * s, (left - l0) * s:(left - l0 + bw) * s]
        return out, flops

    def _patches(self, lq: torch.Tensor, assign: Optional[Callable[..., np.ndarray]]) -> RoutingResult:
        opts = self.options
        _, c, h, w = lq.shape
        ph, pw = min(opts.patch_size, h), min(opts.patch_size, w)
        tops = grid_starts(h, ph, opts.step, cover_end=True)
        lefts = grid_starts(w, pw, opts.step, cover_end=True)
        patches = extract_patches(lq[0], tops, lefts, ph, pw)
        costs = self.costs((ph, pw))
        classes, position, num_classes = self._classes(patches)
        if assign is not None:
            subnets = np.asarray(assign(patches, classes, costs), dtype=np.int64)
        elif self.num_subnets == 1:
            subnets = np.zeros(len(patches), dtype=np.int64)
        elif opts.mode == 'wbsr':
            subnets = eq15_subnets(classes, num_classes, self.num_subnets)
        elif opts.mode == 'budget':
            subnets = budget_subnets(position, costs, float(opts.budget))
            if costs[subnets].mean() > opts.budget * costs[-1] * (1 + 1e-9):
                self._warn_once(f'budget {opts.budget} is below the cheapest subnet for {ph}x{pw} patches; '
                                'every patch uses the cheapest subnet')
        elif opts.mode == 'alpha':
            subnets = alpha_subnets(classes, num_classes, costs, opts.alpha)
        else:  # arm
            subnets = self.arm_table.select(patches, costs, opts.arm_eta)
        if subnets.shape != (len(patches), ) or subnets.min() < 0 or subnets.max() >= self.num_subnets:
            raise ValueError(f'subnet assignment must give one index in 0..{self.num_subnets - 1} per patch')
        output = self._merge(patches, subnets, tops, lefts, (ph, pw), (c, h, w))
        return RoutingResult(output=output, subnets=subnets, tops=tops, lefts=lefts, patch_hw=(ph, pw),
                             classes=classes, flops=int(costs[subnets].sum()),
                             flops_full_patches=int(costs[-1]) * len(patches),
                             flops_full_image=int(self.costs((h, w))[-1]), num_subnets=self.num_subnets)

    def _classes(self, patches: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
        vectors = gradient_vectors(patches)
        projection = self.projection
        if projection is None:
            self._warn_once('routing without stored difficulty thresholds (not a WBSR checkpoint): thresholds '
                            "are fitted on each test image's own patches")
            projection = DifficultyProjection.fit(vectors.cpu().numpy(), self.options.num_classes)
        scores = projection.score(vectors)
        return projection.classify(scores), projection.position(scores), projection.num_classes

    def _merge(self, patches: torch.Tensor, subnets: np.ndarray, tops: list[int], lefts: list[int],
               patch_hw: tuple[int, int], chw: tuple[int, int, int]) -> torch.Tensor:
        """Run each subnet on its patches in bounded batches; average the overlaps."""
        (ph, pw), (_, h, w), s = patch_hw, chw, self.scale
        grid_top = np.repeat(np.asarray(tops), len(lefts))
        grid_left = np.tile(np.asarray(lefts), len(tops))
        out = None
        offsets = None
        for subnet in np.unique(subnets):
            rows = np.flatnonzero(subnets == subnet)
            for start in range(0, len(rows), self.options.batch_size):
                chunk = rows[start:start + self.options.batch_size]
                sr = self._run_patches(patches, chunk, int(subnet))
                if out is None:
                    out = sr.new_zeros(sr.shape[1], h * s * w * s)
                    yy, xx = torch.meshgrid(torch.arange(ph * s), torch.arange(pw * s), indexing='ij')
                    offsets = (yy * (w * s) + xx).flatten().to(sr.device)
                base = torch.as_tensor(grid_top[chunk] * s * (w * s) + grid_left[chunk] * s, device=sr.device)
                index = (base[:, None] + offsets[None, :]).flatten()
                out.index_add_(1, index, sr.permute(1, 0, 2, 3).reshape(sr.shape[1], -1))
        count = torch.zeros(h, w)
        for top in tops:
            for left in lefts:
                count[top:top + ph, left:left + pw] += 1
        out = out.view(-1, h, s, w, s) / count.to(out).view(1, h, 1, w, 1)  # the HR count, never materialised
        return out.view(1, -1, h * s, w * s)
