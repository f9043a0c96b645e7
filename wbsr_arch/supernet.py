"""What every WBSR supernet can do, whatever its backbone.

A supernet holds ``len(widths) x len(depths)`` subnets that share one set of weights. A subnet of
width ``w`` and depth ``d`` uses the first ``w`` channels of every hidden layer (slimmable/ARM slicing,
``weight[:w_out, :w_in]``) and the first ``d`` residual blocks (of every group, for RCAN). The largest
subnet is the original BasicSR network: same state_dict keys, same output.

Subnets are indexed in ascending order of measured FLOPs, which is not the (width, depth) order: for
SRResNet x4, w64/d4 costs 3.38G and w52/d16 3.44G on a 32x32 input.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from numbers import Integral
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .flops import count_flops
from .tiles import FlopCount, TileGrid, TilePlan, pad_input, row_bands

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


def sliced_conv(conv: nn.Conv2d, x: torch.Tensor, out_ch: Optional[int] = None) -> torch.Tensor:
    """``conv`` applied with its first ``out_ch`` filters over the first ``x.shape[1]`` input channels."""
    weight = conv.weight[:out_ch, :x.shape[1]]
    bias = None if conv.bias is None else conv.bias[:out_ch]
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


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


class SupernetMixin:
    """Subnet bookkeeping shared by :class:`WBSRSRResNet` and :class:`WBSRRCAN`.

    A subclass sets ``self.widths``/``self.depths`` (validated with :func:`check_choices`) and implements
    ``_forward_subnet(x, width, depth)`` and ``_plain_network(width, depth)``.
    """

    widths: list[int]
    depths: list[int]
    _active: Union[None, int, torch.Tensor] = None
    #: Executor of :meth:`forward_tiles`: ``'auto'`` runs on per-tile stores (:mod:`wbsr_arch.tile_store`) where the
    #: network has them and nothing needs a gradient, on whole-image maps (:mod:`wbsr_arch.tiles`) otherwise;
    #: ``'maps'`` always on maps. Both give the same output and the same FLOPs.
    tile_executor: str = 'auto'

    # ---- the interface used by the model, the scripts and users -------------------------------------
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
        plain = self._plain_network(width, depth).to(device=like.device, dtype=like.dtype)
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

    # ---- the seamless tile scheme (wbsr_arch.tiles) --------------------------------------------------------
    def forward_tiles(self, x: torch.Tensor, subnets: Any, *, tile_size: int = DEFAULT_TILE_SIZE,
                      grid: Optional[TileGrid] = None, max_pixels: Optional[int] = None) -> TileRun:
        """Super-resolve ``x`` in one seamless pass with one subnet per tile (see :mod:`wbsr_arch.tiles`).

        Args:
            x: LR batch ``(N, C, H, W)``.
            subnets: ``(rows, cols)`` subnet indices of the tiles (row-major, shared by the batch) or
                ``(N, rows, cols)``.
            tile_size: Side of the regular tiles, when ``grid`` is not given. Default: 32.
            grid: The tile grid (default: :meth:`TileGrid.regular` of ``tile_size``).
            max_pixels: Largest LR area whose upsampler runs at once (rows of tiles at a time; one extra LR row
                is computed at each band border); the trunk runs on up to 16 times as much, with a margin of its
                receptive field at each border. Bounds memory on large images; the extra work is in ``flops``.
                Default: 65536.

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
        counter = FlopCount()
        xin = self._tile_input(x)
        xmap = pad_input(xin)
        out = x.new_zeros(n, self.num_out_ch, h * self.upscale, w * self.upscale)
        s = self.upscale
        for a, b in row_bands(grid.rows, 0, h, max(1, 16 * limit // w)):
            # A margin of whole tile rows (channel attention pools over whole tiles) that covers the trunk's
            # receptive field and the upsampler's one-row margin with its halo makes the band's output exact.
            margin = 0 if (a, b) == (0, h) else self._tile_trunk_radius(int(depths.max())) + 2
            ta = max([r for r in grid.rows if r <= max(0, a - margin)])
            tb = min([r for r in grid.rows if r >= min(h, b + margin)])
            tgrid, rows = grid.band(ta, tb)
            plan = TilePlan(tgrid, widths[:, rows], depths[:, rows])
            feat = self._trunk_tiles(plan, xmap[:, :, ta:tb + 2], counter)
            for c, d in row_bands(grid.rows, a, b, max(1, limit // w)):
                ha, hb = max(0, c - 1), min(h, d + 1)  # one LR row of margin makes the upsampler's output exact
                hgrid, rows = grid.band(ha, hb)
                plan = TilePlan(hgrid, widths[:, rows], depths[:, rows])
                y = self._head_tiles(plan, feat[:, :, ha - ta:hb - ta + 2], counter)
                out[:, :, c * s:d * s] = self._tile_output(x, y[:, :, (c - ha) * s:(d - ha) * s], c, d)
        return TileRun(out, counter.total)

    def tile_flops(self, lr_hw: Sequence[int], subnets: Any, *, tile_size: int = DEFAULT_TILE_SIZE,
                   grid: Optional[TileGrid] = None, max_pixels: Optional[int] = None) -> int:
        """FLOPs of :meth:`forward_tiles` on one LR image of ``lr_hw`` with this assignment, without running it."""
        spec = TileAssignment(subnets, tile_size, grid, max_pixels)
        return count_flops(self, (1, self.num_in_ch, *lr_hw), subnet=spec)

    def _subnet_array(self, subnets: Any) -> np.ndarray:
        sub = subnets.detach().cpu().numpy() if isinstance(subnets, torch.Tensor) else np.asarray(subnets)
        if sub.ndim not in (2, 3) or sub.size == 0 or not np.issubdtype(sub.dtype, np.integer):
            raise ValueError(f'a tile assignment is a non-empty (rows, cols) or (N, rows, cols) integer array, got '
                             f'shape {sub.shape} of {sub.dtype}')
        if sub.min() < 0 or sub.max() >= self.num_subnets:
            raise IndexError(f'tile subnet indices must be in 0..{self.num_subnets - 1}, got {sub.min()}..{sub.max()}')
        return sub.astype(np.int64)

    def _tile_stores(self, like: torch.Tensor) -> bool:
        """Whether this forward runs on stores (see :attr:`tile_executor`)."""
        if self.tile_executor not in ('auto', 'maps'):
            raise ValueError(f"tile_executor must be 'auto' or 'maps', got {self.tile_executor!r}")
        if self.tile_executor == 'maps':
            return False
        if not torch.is_grad_enabled():
            return True
        return not like.requires_grad and not any(p.requires_grad for p in self.parameters())

    def _tile_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _tile_output(self, x: torch.Tensor, y: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """The network's output for LR rows ``a:b`` from the upsampler's output ``y`` of those rows (band by band,
        so that no whole-image temporary of the output's size is made)."""
        raise NotImplementedError

    def _tile_trunk_radius(self, depth: int) -> int:
        raise NotImplementedError

    def _trunk_tiles(self, plan: TilePlan, xmap: torch.Tensor, counter: FlopCount) -> torch.Tensor:
        raise NotImplementedError

    def _head_tiles(self, plan: TilePlan, feat: torch.Tensor, counter: FlopCount) -> torch.Tensor:
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_subnets:
            raise IndexError(f'subnet index {index} out of range 0..{self.num_subnets - 1}')
        return index

    def _forward_subnet(self, x: torch.Tensor, width: int, depth: int) -> torch.Tensor:
        raise NotImplementedError

    def _plain_network(self, width: int, depth: int) -> nn.Module:
        raise NotImplementedError
