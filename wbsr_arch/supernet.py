"""The supernet contract: what a WBSR architecture provides, and everything built on it.

A supernet holds ``len(widths) x len(depths)`` subnets that share one set of weights. A subnet of width ``w`` and
depth ``d`` uses the first ``w`` channels of every hidden layer (slimmable/ARM slicing, ``weight[:w_out, :w_in]``)
and the first ``d`` residual blocks (of every group, for RCAN). The largest subnet is the original BasicSR network:
same state_dict keys, same output.

An architecture is a subclass of :class:`SupernetMixin` and of the BasicSR network (``class WBSRSRResNet(
SupernetMixin, MSRResNet)``) that states its layer sequence once, against :class:`~wbsr_arch.executor.Executor`
(:meth:`SupernetMixin.trunk`, :meth:`SupernetMixin.head`); the plain forward, the two tile executors, the FLOPs
count and the band margins all run that one sequence. docs/architectures.md walks through adding one.

Subnets are indexed in ascending order of measured FLOPs, which is not the (width, depth) order: for SRResNet x4,
w64/d4 costs 3.38G and w52/d16 3.44G on a 32x32 input.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from numbers import Integral
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .executor import BandMargin, Executor, Feature, WholeImage
from .flops import count_flops
from .tile_store import StoreExecutor
from .tiles import FlopCount, MapExecutor, TileGrid, TilePlan, pad_input, row_bands

#: Default tile side (LR pixels) of the seamless tile scheme.
DEFAULT_TILE_SIZE = 32
#: Default largest LR area whose high-resolution stage (upsampler) runs at once in :meth:`forward_tiles`; the
#: trunk runs on up to 16 times as much.
DEFAULT_TILE_MAX_PIXELS = 1 << 16


@dataclass(frozen=True)
class TileAssignment:
    """One subnet per tile of a regular grid: a subnet spec for :meth:`SupernetMixin.set_subnet` and ``forward``.

    Attributes:
        subnets: ``(rows, cols)`` indices into ``net.subnets``, shared by the batch, or ``(N, rows, cols)``.
        tile_size: Tile side in LR pixels (the last row and column may be smaller).
        grid: The tile grid, when it is not regular (then ``tile_size`` is not used).
        max_pixels: See :meth:`SupernetMixin.forward_tiles`.
    """

    subnets: Any
    tile_size: int = DEFAULT_TILE_SIZE
    grid: Optional[TileGrid] = None
    max_pixels: Optional[int] = None


class TileRun(NamedTuple):
    """Output of :meth:`SupernetMixin.forward_tiles` and the FLOPs its convolutions did."""

    output: torch.Tensor
    flops: int


SubnetSpec = Union[None, int, Sequence[int], torch.Tensor, TileAssignment]

#: LR size at which subnets are ordered by FLOPs (the ClassSR/ARM/WBSR patch size).
ORDERING_LR_SIZE = (32, 32)
#: Second size at which subnets are counted, to get the affine FLOPs model of :meth:`subnet_flops`.
AFFINE_LR_SIZE = (16, 16)


def check_choices(name: str, values: Sequence[int], maximum: int, maximum_name: str) -> list[int]:
    """Validate a ``widths``/``depths`` option: non-empty, strictly ascending, ending at the full size."""
    values = [int(v) for v in values] if values is not None else []
    if not values:
        raise ValueError(f'{name} must be a non-empty list, got {values!r}')
    if any(v < 1 for v in values):
        raise ValueError(f'{name} must be positive, got {values}')
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f'{name} must be strictly ascending, got {values}')
    if values[-1] > maximum:
        raise ValueError(f'{name} {values} has an entry above {maximum_name}={maximum}')
    if values[-1] != maximum:
        raise ValueError(f'the largest entry of {name} {values} must equal {maximum_name}={maximum}, so that the '
                         'largest subnet is the original network')
    return values


def upsample_layers(ex: Executor, feat: Feature, upsample: nn.Sequential) -> Feature:
    """BasicSR's ``Upsample`` (3x3 convolutions to ``r * r`` times the channels, each followed by ``PixelShuffle(r)``)
    on ``ex``: the upsampler of RCAN and EDSR."""
    layers = list(upsample)
    for conv, shuffle in zip(layers[::2], layers[1::2]):
        feat = ex.conv(conv, feat, shuffle=shuffle.upscale_factor)
    return feat


#: Values of :attr:`SupernetMixin.tile_executor`.
TILE_EXECUTORS = ('auto', 'maps', 'stores')


class SupernetMixin(metaclass=ABCMeta):
    """The contract of a WBSR supernet, and the abilities every supernet gets from it.

    A subclass also subclasses the BasicSR network it slims (first in the bases: ``class WBSRSRResNet(SupernetMixin,
    MSRResNet)``), so that its modules, state_dict keys and constructor vocabulary are BasicSR's.

    Attributes a subclass sets (:meth:`_init_supernet` sets and checks them):
        num_in_ch: Input channels.
        num_out_ch: Output channels.
        num_feat: Hidden channels of the full network (the largest width).
        num_block: Residual blocks of the full network (per group, for RCAN; the largest depth).
        upscale: Scale factor.
        widths: Subnet widths, strictly ascending, the last ``num_feat``.
        depths: Subnet depths, strictly ascending, the last ``num_block``.
        tile_executor: ``'auto'``, ``'maps'`` or ``'stores'`` (settable; see :meth:`forward_tiles`).

    Hooks a subclass implements (abstract: a class without them cannot be instantiated):
        trunk(ex, x): the LR layers, stem and residual blocks, from the input feature to the upsampler's input.
        head(ex, feat): the upsampler, from the trunk's output to the ``num_out_ch`` output channels at ``upscale``.
        plain_network(width, depth): the plain BasicSR network of a subnet's size (:meth:`export_subnet`).
        tiny_options(): constructor keywords of a small supernet with 3 widths x 3 depths (tests; classmethod).

    Class attributes: :attr:`supported_scales` (required), :attr:`pools_over_tiles`, :attr:`trunk_margin_cap`.

    Hooks a subclass may override: :meth:`preprocess` (before the trunk, e.g. mean and range) and
    :meth:`postprocess` (after the head, e.g. SRResNet's bilinear skip).

    ``trunk`` and ``head`` run on every executor (:mod:`wbsr_arch.executor`): they may call only the executor's
    methods (``conv``, ``copy``, ``blocks``) on its features, nothing that depends on how features are kept.
    """

    #: Scale factors the architecture supports (the constructor refuses others).
    supported_scales: ClassVar[tuple[int, ...]]
    #: Whether a layer pools over its region (channel attention): a tile's output then depends on where the tile
    #: ends, and with every tile on one subnet the output is the whole-image subnet's only with one tile.
    pools_over_tiles: ClassVar[bool] = False
    #: Largest trunk margin (LR rows) of a band of :meth:`forward_tiles`; None: the exact receptive field.
    trunk_margin_cap: ClassVar[Optional[int]] = None

    num_in_ch: int
    num_out_ch: int
    num_feat: int
    num_block: int
    upscale: int
    widths: list[int]
    depths: list[int]
    _active: Union[None, int, torch.Tensor] = None

    def _init_supernet(self, *, num_in_ch: int, num_out_ch: int, num_feat: int, num_block: int, upscale: int,
                       widths: Sequence[int], depths: Sequence[int], tile_executor: str) -> None:
        """Set and check the contract's attributes (after the BasicSR network's ``__init__``; the constructor checks
        ``upscale`` against :attr:`supported_scales` before it, where BasicSR's own error would be less clear)."""
        self.num_in_ch, self.num_out_ch, self.num_feat, self.num_block = num_in_ch, num_out_ch, num_feat, num_block
        self.upscale = upscale
        self.widths = check_choices('widths', widths, num_feat, 'num_feat')
        self.depths = check_choices('depths', depths, num_block, 'num_block')
        self.tile_executor = tile_executor

    # ---- the hooks -------------------------------------------------------------------------------------------
    @abstractmethod
    def trunk(self, ex: Executor, x: Feature) -> Feature:
        """The LR layers on ``ex``, from the input feature ``x`` (after :meth:`preprocess`)."""

    @abstractmethod
    def head(self, ex: Executor, feat: Feature) -> Feature:
        """The upsampler on ``ex``, from the trunk's output to the output (before :meth:`postprocess`)."""

    @abstractmethod
    def plain_network(self, width: int, depth: int) -> nn.Module:
        """The plain BasicSR network of this width and depth, every other option as this supernet's."""

    @classmethod
    @abstractmethod
    def tiny_options(cls) -> dict[str, Any]:
        """Constructor keywords of a small supernet (3 widths x 3 depths) whose forward takes milliseconds."""

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's input from the LR image. Default: the image."""
        return x

    def postprocess(self, x: torch.Tensor, y: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """The network's output for LR rows ``top:bottom`` of ``x`` from the head's output ``y`` of those rows (band
        by band, so that no whole-image temporary of the output's size is made). Default: ``y``."""
        return y

    # ---- the interface used by the model, the scripts and users -------------------------------------
    @property
    def tile_executor(self) -> str:
        """How :meth:`forward_tiles` keeps features: ``'stores'`` (per-tile stores, :mod:`wbsr_arch.tile_store`;
        no autograd), ``'maps'`` (whole-image maps, :mod:`wbsr_arch.tiles`; autograd) or ``'auto'`` (stores where
        nothing needs a gradient, maps otherwise). Both give the same output and the same FLOPs."""
        return self._tile_executor

    @tile_executor.setter
    def tile_executor(self, value: str) -> None:
        if value not in TILE_EXECUTORS:
            raise ValueError(f"tile_executor must be 'auto', 'maps' or 'stores', got {value!r}")
        self._tile_executor = value

    @cached_property
    def subnets(self) -> list[tuple[int, int]]:
        """All ``(width, depth)`` pairs, in ascending order of FLOPs (ties: narrower first)."""
        cost = self._pair_flops(ORDERING_LR_SIZE)
        return sorted(cost, key=lambda pair: (cost[pair], pair))

    @property
    def num_subnets(self) -> int:
        return len(self.widths) * len(self.depths)

    @property
    def active_subnet(self) -> Union[int, torch.Tensor]:
        """What the next plain ``forward(x)`` uses: a subnet index, or one index per sample."""
        return self.num_subnets - 1 if self._active is None else self._active

    def set_subnet(self, index: SubnetSpec) -> None:
        """Use subnet ``index`` (into :attr:`subnets`) for following forwards; ``None`` = the largest.

        A sequence or 1-D tensor gives one subnet per sample of the following batches (what the model's
        ``sandwich`` and ``routed`` training use, so that one plain ``forward`` call trains several
        subnets and DDP sees a single forward/backward pair); a :class:`TileAssignment` gives one subnet per
        tile (the seamless tile scheme, :meth:`forward_tiles`).
        """
        if index is None or isinstance(index, Integral):
            self._active = None if index is None else self._check_index(index)
            return
        if isinstance(index, TileAssignment):
            self._subnet_array(index.subnets)
            self._active = index
            return
        assign = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
        for value in torch.unique(assign).tolist():
            self._check_index(value)
        self._active = assign

    def subnet_flops(self, lr_hw: Sequence[int]) -> list[int]:
        """FLOPs of one forward of each subnet (in :attr:`subnets` order) on an LR input of ``lr_hw``.

        Convolution FLOPs of these networks are exactly affine in H x W (the constant part is channel
        attention on pooled 1x1 maps), so each subnet is counted at two sizes once and any size follows.
        """
        h, w = (int(v) for v in lr_hw)
        if h < 1 or w < 1:
            raise ValueError(f'lr_hw must be positive, got {tuple(lr_hw)}')
        (h1, w1), (h2, w2) = ORDERING_LR_SIZE, AFFINE_LR_SIZE
        at1 = self._pair_flops((h1, w1))
        if (h, w) == (h1, w1):
            return [at1[pair] for pair in self.subnets]
        at2 = self._pair_flops((h2, w2))
        flops = []
        for pair in self.subnets:
            slope, rest = divmod(at1[pair] - at2[pair], h1 * w1 - h2 * w2)
            if rest:
                raise RuntimeError(f'FLOPs of subnet {pair} are not affine in the input area')
            flops.append(at1[pair] + slope * (h * w - h1 * w1))
        return flops

    def _pair_flops(self, lr_hw: tuple[int, int]) -> dict[tuple[int, int], int]:
        cache = self.__dict__.setdefault('_pair_flops_cache', {})
        if lr_hw not in cache:
            shape = (1, self.num_in_ch, *lr_hw)
            cache[lr_hw] = {(w, d): count_flops(self, shape, subnet=(w, d)) for w in self.widths for d in self.depths}
        return cache[lr_hw]

    def export_subnet(self, index: int) -> nn.Module:
        """A plain BasicSR network of subnet ``index``'s width and depth, holding the sliced weights."""
        width, depth = self.subnets[self._check_index(index)]
        like = next(self.parameters())
        plain = self.plain_network(width, depth).to(device=like.device, dtype=like.dtype)
        own = self.state_dict()
        sliced = {}
        for key, target in plain.state_dict().items():
            sliced[key] = own[key][tuple(slice(0, n) for n in target.shape)].clone()
        plain.load_state_dict(sliced, strict=True)
        return plain

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, subnet: SubnetSpec = None) -> torch.Tensor:
        """Super-resolve ``x`` with one subnet, or with one subnet per sample.

        Args:
            x: LR batch (N, C, H, W).
            subnet: ``None`` for the active subnet (:meth:`set_subnet`), an index into :attr:`subnets`, a
                ``(width, depth)`` tuple, or a sequence/1-D tensor of N indices (one per sample; samples
                that share a subnet run as one batch, and outputs come back in input order).
        """
        if subnet is None:
            subnet = self.active_subnet
        if isinstance(subnet, TileAssignment):
            return self.forward_tiles(x, subnet.subnets, tile_size=subnet.tile_size, grid=subnet.grid,
                                      max_pixels=subnet.max_pixels).output
        if isinstance(subnet, tuple):
            width, depth = subnet
            if width not in self.widths or depth not in self.depths:
                raise ValueError(f'subnet {subnet} is not among widths {self.widths} x depths {self.depths}')
            return self._forward_subnet(x, width, depth)
        if isinstance(subnet, Integral):
            return self._forward_subnet(x, *self.subnets[self._check_index(subnet)])
        assign = torch.as_tensor(subnet, dtype=torch.long).flatten().cpu()
        if assign.numel() != x.shape[0]:
            raise ValueError(f'subnet has {assign.numel()} entries for a batch of {x.shape[0]}')
        order = torch.argsort(assign, stable=True)
        outputs = []
        for index in torch.unique(assign).tolist():
            rows = order[assign[order] == index].to(x.device)
            outputs.append(self._forward_subnet(x.index_select(0, rows), *self.subnets[self._check_index(index)]))
        inverse = torch.argsort(order).to(x.device)
        return torch.cat(outputs, 0).index_select(0, inverse)

    def _forward_subnet(self, x: torch.Tensor, width: int, depth: int) -> torch.Tensor:
        ex = WholeImage(width, depth)
        y = ex.result(self.head(ex, self.trunk(ex, ex.input(self.preprocess(x), slim=False))))
        return self.postprocess(x, y, 0, x.shape[2])

    # ---- the seamless tile scheme (wbsr_arch.tiles) --------------------------------------------------------
    def forward_tiles(self, x: torch.Tensor, subnets: Any, *, tile_size: int = DEFAULT_TILE_SIZE,
                      grid: Optional[TileGrid] = None, max_pixels: Optional[int] = None) -> TileRun:
        """Super-resolve ``x`` in one seamless pass with one subnet per tile (see :mod:`wbsr_arch.tiles`).

        Runs on the executor :attr:`tile_executor` chooses: per-tile stores (:mod:`wbsr_arch.tile_store`) where
        nothing needs a gradient, whole-image maps otherwise (``'auto'``); ``'stores'`` refuses to run where a
        gradient is needed.

        Args:
            x: LR batch ``(N, C, H, W)``.
            subnets: ``(rows, cols)`` subnet indices of the tiles (row-major, shared by the batch) or
                ``(N, rows, cols)``.
            tile_size: Side of the regular tiles, when ``grid`` is not given. Default: 32.
            grid: The tile grid (default: :meth:`TileGrid.regular` of ``tile_size``).
            max_pixels: Largest LR area whose upsampler runs at once (rows of tiles at a time; the upsampler's margin,
                one LR row for the shipped architectures, is computed at each band border); the trunk runs on up to
                16 times as much, with a margin of its receptive field at each border. Bounds memory on large images;
                the extra work is in ``flops``. Default: 65536.

        Returns:
            The SR batch and the FLOPs of every convolution run (what ``FlopCounterMode`` counts around the call).
        """
        n, _, h, w = x.shape
        grid = grid or TileGrid.regular(h, w, tile_size)
        if grid.size != (h, w):
            raise ValueError(f'the tile grid covers {grid.size[0]}x{grid.size[1]} pixels, the input is {h}x{w}')
        sub = self._subnet_array(subnets)
        if sub.ndim == 2:
            sub = np.broadcast_to(sub, (n, *sub.shape))
        if sub.shape != (n, *grid.shape):
            raise ValueError(f'subnets must be {grid.shape} or ({n}, {grid.shape[0]}, {grid.shape[1]}) for this grid, '
                             f'got {sub.shape}')
        table = np.asarray(self.subnets, dtype=np.int64)
        widths, depths = table[sub, 0], table[sub, 1]
        limit = int(max_pixels or DEFAULT_TILE_MAX_PIXELS)
        stores = self._tile_stores(x)
        counter = FlopCount()
        xmap = pad_input(self.preprocess(x))
        out = x.new_zeros(n, self.num_out_ch, h * self.upscale, w * self.upscale)
        s, head_margin = self.upscale, self._band_margins(1)[1]
        for a, b in row_bands(grid.rows, 0, h, max(1, 16 * limit // w)):
            # A margin of whole tile rows (channel attention pools over whole tiles) that covers the trunk's
            # spoiled rows, the upsampler's margin and its halo makes the band's output exact.
            trunk_margin = self._band_margins(int(depths.max()))[0]
            margin = 0 if (a, b) == (0, h) else trunk_margin + head_margin + 1
            ta = max([r for r in grid.rows if r <= max(0, a - margin)])
            tb = min([r for r in grid.rows if r >= min(h, b + margin)])
            tgrid, rows = grid.band(ta, tb)
            ex = self._tile_run(TilePlan(tgrid, widths[:, rows], depths[:, rows]), counter, x, stores, True)
            feat = ex.result(self.trunk(ex, ex.input(xmap[:, :, ta:tb + 2], slim=False)))
            for c, d in row_bands(grid.rows, a, b, max(1, limit // w)):
                ha, hb = max(0, c - head_margin), min(h, d + head_margin)
                hgrid, rows = grid.band(ha, hb)
                ex = self._tile_run(TilePlan(hgrid, widths[:, rows], depths[:, rows]), counter, x, stores, False)
                y = ex.result(self.head(ex, ex.input(feat[:, :, ha - ta:hb - ta + 2], slim=True)))
                out[:, :, c * s:d * s] = self.postprocess(x, y[:, :, 1 + (c - ha) * s:1 + (d - ha) * s, 1:-1], c, d)
        return TileRun(out, counter.total)

    def tile_flops(self, lr_hw: Sequence[int], subnets: Any, *, tile_size: int = DEFAULT_TILE_SIZE,
                   grid: Optional[TileGrid] = None, max_pixels: Optional[int] = None) -> int:
        """FLOPs of :meth:`forward_tiles` on one LR image of ``lr_hw`` with this assignment, without running it."""
        spec = TileAssignment(subnets, tile_size, grid, max_pixels)
        return count_flops(self, (1, self.num_in_ch, *lr_hw), subnet=spec)

    def _tile_stores(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_tiles` runs on stores (see :attr:`tile_executor`)."""
        if self.tile_executor == 'maps':
            return False
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if self.tile_executor == 'stores' and grad:
            raise RuntimeError("tile_executor='stores' runs without autograd: use torch.no_grad() or 'auto'")
        return not grad

    @staticmethod
    def _tile_run(plan: TilePlan, counter: FlopCount, like: torch.Tensor, stores: bool, trunk: bool) -> Executor:
        if stores:
            return StoreExecutor(plan, counter, like, by_depth=trunk)
        return MapExecutor(plan, counter, like)

    def _band_margins(self, depth: int) -> tuple[int, int]:
        """LR rows that a band's trunk of this depth (capped by :attr:`trunk_margin_cap`) and its head get wrong at
        a cut edge (:class:`~wbsr_arch.executor.BandMargin`)."""
        cache = self.__dict__.setdefault('_band_margin_cache', {})
        if depth not in cache:
            ex = BandMargin(depth)
            trunk = ex.result(self.trunk(ex, ex.input(slim=False)))
            if self.trunk_margin_cap is not None:
                trunk = min(trunk, self.trunk_margin_cap)
            cache[depth] = trunk, ex.result(self.head(ex, ex.input(slim=True)))
        return cache[depth]

    def _subnet_array(self, subnets: Any) -> np.ndarray:
        sub = subnets.detach().cpu().numpy() if isinstance(subnets, torch.Tensor) else np.asarray(subnets)
        if sub.ndim not in (2, 3) or sub.size == 0 or not np.issubdtype(sub.dtype, np.integer):
            raise ValueError(f'a tile assignment is a non-empty (rows, cols) or (N, rows, cols) integer array, got '
                             f'shape {sub.shape} of {sub.dtype}')
        if sub.min() < 0 or sub.max() >= self.num_subnets:
            raise IndexError(f'tile subnet indices must be in 0..{self.num_subnets - 1}, got {sub.min()}..{sub.max()}')
        return sub.astype(np.int64)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_subnets:
            raise IndexError(f'subnet index {index} out of range 0..{self.num_subnets - 1}')
        return index
