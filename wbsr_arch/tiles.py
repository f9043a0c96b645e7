"""Seamless tiled execution: one pass over the whole image, every tile at its own subnet.

The LR image is cut into a grid of non-overlapping rectangular tiles (:class:`TileGrid`) and every tile is
given a subnet. The network then runs once over the image, but every layer does only the work that each
tile's subnet needs: a tile of width ``w`` computes only its first ``w`` channels, a tile of depth ``d``
only the first ``d`` residual blocks. The tiles of one shape and one width that are active at a layer
run as one batched convolution (:class:`TilePlan`, :func:`conv_tiles`).

At its border, each convolution reads the neighbouring tiles' current features (a one-pixel halo, taken
from the feature map of the whole image), never zero padding and never a recomputed overlap, so there is
nothing to average. Features live in full-width maps that every tile writes only within its own width; a
tile's outermost pixels, which its neighbours' halos read, are zero beyond its width (nothing reads the rest
of a tile beyond its width, which stays uninitialised). So where neighbours differ the halo holds:

- from a *narrower* neighbour, its ``w`` channels and zeros beyond them: exactly what a width-``w``
  subnet has (it has no channels beyond ``w``);
- from a *wider* neighbour, its first channels only (a narrow tile's filters read no more);
- from a neighbour that *skipped* a residual block, its features from before the block (for it the block
  is the identity), and zeros for the block's inner activation, which it did not compute.

``subnet_sampling: tiles`` in training builds these situations, so the network learns them.

With every tile on subnet ``k`` the output is ``net(x, subnet=k)`` on the whole image (up to float
rounding), for any tile size (for RCAN, whose channel attention pools over each tile, with one tile).

:class:`MapExecutor` runs a supernet's layer sequence (:mod:`wbsr_arch.executor`) on such maps; it, not the
architecture, zeroes what the halo rule says must read as zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .executor import Executor, Feature, PostHook, sliced_conv

#: Largest number of output pixels (at the layer's own resolution) one batched convolution produces; bounds the
#: temporary gather and output buffers on large images.
MAX_CALL_PIXELS = 1 << 19
#: Beyond this many segments (rectangles of tiles), a batched call gathers and writes its tiles with one indexed
#: copy instead of one strided copy per segment.
SEGMENT_LOOP_LIMIT = 32


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping tiles covering an LR image of ``H x W``, given by their row and column boundaries.

    Attributes:
        rows: ``0 = rows[0] < rows[1] < ... < rows[-1] = H``; tile row ``i`` spans ``rows[i]:rows[i + 1]``.
        cols: the same for columns.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, bounds in (('rows', self.rows), ('cols', self.cols)):
            if len(bounds) < 2 or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f'tile {name} boundaries must start at 0 and strictly increase, got {bounds}')

    @classmethod
    def regular(cls, h: int, w: int, tile_size: int) -> 'TileGrid':
        """``tile_size`` squares from the top left; the last row and column are smaller where needed."""
        if tile_size < 1:
            raise ValueError(f'tile_size must be >= 1, got {tile_size}')
        if h < 1 or w < 1:
            raise ValueError(f'image size must be positive, got {h}x{w}')
        return cls(tuple(range(0, h, tile_size)) + (h, ), tuple(range(0, w, tile_size)) + (w, ))

    @property
    def shape(self) -> tuple[int, int]:
        """Tile rows and columns."""
        return len(self.rows) - 1, len(self.cols) - 1

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return self.rows[-1], self.cols[-1]

    def __len__(self) -> int:
        return self.shape[0] * self.shape[1]

    def boxes(self) -> np.ndarray:
        """``(n, 4)`` int array of ``(top, left, height, width)`` per tile, row-major."""
        rows, cols = np.asarray(self.rows), np.asarray(self.cols)
        top, left = np.meshgrid(rows[:-1], cols[:-1], indexing='ij')
        height, width = np.meshgrid(np.diff(rows), np.diff(cols), indexing='ij')
        return np.stack([top.ravel(), left.ravel(), height.ravel(), width.ravel()], axis=1)

    def band(self, top: int, bottom: int) -> tuple['TileGrid', np.ndarray]:
        """The grid cut to LR rows ``top:bottom``: local grid, and the tile row of each local row."""
        h = self.rows[-1]
        if not 0 <= top < bottom <= h:
            raise ValueError(f'band {top}:{bottom} is not inside 0:{h}')
        inner = [r for r in self.rows if top < r < bottom]
        bounds = (0, *(r - top for r in inner), bottom - top)
        first = int(np.searchsorted(self.rows, top, side='right')) - 1
        return TileGrid(bounds, self.cols), np.arange(first, first + len(bounds) - 1)


class _Run(NamedTuple):
    """Consecutive tile rows (or columns) of one size: local indices ``first .. first + count - 1``."""

    first: int
    count: int
    start: int
    size: int


def _runs(bounds: Sequence[int]) -> list[_Run]:
    sizes = np.diff(np.asarray(bounds))
    runs: list[_Run] = []
    for i, size in enumerate(sizes.tolist()):
        if runs and runs[-1].size == size:
            runs[-1] = runs[-1]._replace(count=runs[-1].count + 1)
        else:
            runs.append(_Run(i, 1, int(bounds[i]), size))
    return runs


class Segment(NamedTuple):
    """A rectangle of tiles of one run class: sample ``n``, rows ``a0:a1`` and columns ``b0:b1`` within the run."""

    n: int
    a0: int
    a1: int
    b0: int
    b1: int

    @property
    def count(self) -> int:
        return (self.a1 - self.a0) * (self.b1 - self.b0)


class TileGroup(NamedTuple):
    """Tiles of one shape and one width: they run as one batched call, in the order of their segments."""

    row_run: _Run
    col_run: _Run
    width: int
    segments: tuple[Segment, ...]

    @property
    def count(self) -> int:
        return sum(seg.count for seg in self.segments)


def _rectangles(mask: np.ndarray) -> list[Segment]:
    """Cover the true cells of ``mask`` (N, rows, cols) with rectangles: row runs, merged down while identical."""
    segments: list[Segment] = []
    for n in range(mask.shape[0]):
        open_runs: dict[tuple[int, int], int] = {}  # (b0, b1) -> first row
        for a in range(mask.shape[1] + 1):
            runs = set()
            if a < mask.shape[1]:
                row = np.concatenate([[False], mask[n, a], [False]])
                edges = np.flatnonzero(row[1:] != row[:-1])
                runs = set(zip(edges[::2].tolist(), edges[1::2].tolist()))
            for run in [r for r in open_runs if r not in runs]:
                segments.append(Segment(n, open_runs.pop(run), a, *run))
            for run in runs:
                open_runs.setdefault(run, a)
    return sorted(segments)


class TilePlan:
    """Which tile runs which width and how deep, for a batch sharing one grid, grouped for batched calls.

    Args:
        grid: The tile grid.
        widths: ``(N, rows, cols)`` width of every tile of every sample.
        depths: ``(N, rows, cols)`` depth (residual blocks, or blocks per group) of every tile.
    """

    def __init__(self, grid: TileGrid, widths: np.ndarray, depths: np.ndarray) -> None:
        widths, depths = np.asarray(widths, dtype=np.int64), np.asarray(depths, dtype=np.int64)
        if widths.ndim != 3 or widths.shape[1:] != grid.shape or depths.shape != widths.shape:
            raise ValueError(f'widths and depths must be (N, {grid.shape[0]}, {grid.shape[1]}), got '
                             f'{widths.shape} and {depths.shape}')
        self.grid, self.widths, self.depths = grid, widths, depths
        self.row_runs, self.col_runs = _runs(grid.rows), _runs(grid.cols)
        self._cache: dict[tuple, list[TileGroup]] = {}
        self.pixel_cache: dict[tuple, torch.Tensor] = {}

    @property
    def batch(self) -> int:
        return self.widths.shape[0]

    def groups(self, min_depth: int = 0, max_depth: Optional[int] = None) -> list[TileGroup]:
        """Groups of the tiles deeper than ``min_depth`` (and at most ``max_depth`` deep)."""
        key = (min_depth, max_depth)
        if key not in self._cache:
            mask = self.depths > min_depth
            if max_depth is not None:
                mask &= self.depths <= max_depth
            groups = []
            for rr in self.row_runs:
                for cr in self.col_runs:
                    cells = (slice(None), slice(rr.first, rr.first + rr.count), slice(cr.first, cr.first + cr.count))
                    sub_mask, sub_width = mask[cells], self.widths[cells]
                    for width in np.unique(sub_width[sub_mask]).tolist():
                        segments = _rectangles(sub_mask & (sub_width == width))
                        groups.append(TileGroup(rr, cr, int(width), tuple(segments)))
            self._cache[key] = groups
        return self._cache[key]


def new_map(plan: TilePlan, channels: int, scale: int, like: torch.Tensor) -> torch.Tensor:
    """A feature map ``(N, channels, H*scale + 2, W*scale + 2)`` (the image at ``scale`` with a border), channels-last:
    tiles are gathered and written as runs of whole pixels, and CPU convolutions run faster.

    What no tile writes and a convolution reads is zero: the one-pixel border, and each tile's channels beyond its
    width on the tile's outermost pixels (what a wider neighbour's halo reads; nothing reads them inside the tile).
    The rest is left uninitialised, for the layer that fills it (every tile writes its own width's channels at every
    layer).
    """
    h, w = plan.grid.size
    fmap = like.new_empty(plan.batch, h * scale + 2, w * scale + 2, channels).permute(0, 3, 1, 2)
    _zero_ring(fmap[:, :, None, None])
    for group in plan.groups():
        if group.width < channels:
            windows = _windows(fmap, group, scale, 0)
            for seg in group.segments:
                _zero_ring(windows[seg.n, group.width:, seg.a0:seg.a1, seg.b0:seg.b1])
    return fmap


def _zero_ring(tiles: torch.Tensor) -> None:
    """Zero the outermost rows and columns of every tile of a ``(..., h, w)`` view."""
    for edge in (tiles[..., 0, :], tiles[..., -1, :], tiles[..., :, 0], tiles[..., :, -1]):
        edge.zero_()


def pad_input(x: torch.Tensor) -> torch.Tensor:
    """The input image as a feature map (one-pixel zero border, channels-last)."""
    return F.pad(x, (1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)


def _windows(fmap: torch.Tensor, group: TileGroup, scale: int, halo: int) -> torch.Tensor:
    """View ``(N, C, row tiles, col tiles, h + 2 halo, w + 2 halo)`` of a group's run of tiles in a padded map."""
    rr, cr = group.row_run, group.col_run
    th, tw = rr.size * scale, cr.size * scale
    top, left = rr.start * scale + 1 - halo, cr.start * scale + 1 - halo
    band = fmap[:, :, top:top + rr.count * th + 2 * halo, left:left + cr.count * tw + 2 * halo]
    return band.unfold(2, th + 2 * halo, th).unfold(3, tw + 2 * halo, tw)


def _split(group: TileGroup, scale: int) -> Iterator[tuple[Segment, ...]]:
    """The group's segments in chunks of at most :data:`MAX_CALL_PIXELS` output pixels; a segment too large for one
    chunk is cut into rectangles of whole rows (or of one row's columns), each a chunk of its own."""
    per_tile = group.row_run.size * group.col_run.size * scale * scale
    step = max(1, MAX_CALL_PIXELS // per_tile)
    chunk: list[Segment] = []
    size = 0
    for seg in group.segments:
        pieces = [seg]
        cols = seg.b1 - seg.b0
        if seg.count > step and cols <= step:  # bands of whole rows
            rows = step // cols
            pieces = [Segment(seg.n, a, min(a + rows, seg.a1), seg.b0, seg.b1) for a in range(seg.a0, seg.a1, rows)]
        elif seg.count > step:  # rows, cut into column pieces
            pieces = [Segment(seg.n, a, a + 1, b, min(b + step, seg.b1)) for a in range(seg.a0, seg.a1)
                      for b in range(seg.b0, seg.b1, step)]
        for piece in pieces:
            if size + piece.count > step and chunk:
                yield tuple(chunk)
                chunk, size = [], 0
            chunk.append(piece)
            size += piece.count
    if chunk:
        yield tuple(chunk)


def _pixels(plan: TilePlan, fmap: torch.Tensor, group: TileGroup, segments: tuple[Segment, ...], scale: int,
            halo: int) -> torch.Tensor:
    """Flat pixel index ``(n * (h + 2 halo) * (w + 2 halo),)`` of the segments' tiles in ``fmap`` viewed as
    ``(N * Hp * Wp, C)`` rows (channels-last), in segment order; cached on the plan for its forward."""
    key = (id(group), segments, scale, halo, tuple(fmap.shape), fmap.device)
    if key not in plan.pixel_cache:
        _, _, hp, wp = fmap.shape
        rr, cr = group.row_run, group.col_run
        th, tw = rr.size * scale, cr.size * scale
        ii, jj = np.meshgrid(np.arange(th + 2 * halo), np.arange(tw + 2 * halo), indexing='ij')
        offsets = (ii * wp + jj).ravel()
        starts = []
        for seg in segments:
            a, b = np.meshgrid(np.arange(seg.a0, seg.a1), np.arange(seg.b0, seg.b1), indexing='ij')
            top = rr.start * scale + 1 - halo + a.ravel() * th
            left = cr.start * scale + 1 - halo + b.ravel() * tw
            starts.append(seg.n * hp * wp + top * wp + left)
        index = (np.concatenate(starts)[:, None] + offsets[None, :]).ravel()
        plan.pixel_cache[key] = torch.as_tensor(index, dtype=torch.long, device=fmap.device)
    return plan.pixel_cache[key]


def _rows(fmap: torch.Tensor) -> torch.Tensor:
    """A channels-last map ``(N, C, Hp, Wp)`` as its ``(N * Hp * Wp, C)`` pixel rows (a view)."""
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])


def gather(plan: TilePlan, fmap: torch.Tensor, group: TileGroup, segments: Sequence[Segment], scale: int,
           channels: int, halo: int) -> torch.Tensor:
    """Tiles ``(n, channels, h + 2 halo, w + 2 halo)`` (channels-last) of a padded map, in segment order.

    Without autograd and with few segments, each rectangle of tiles is one strided copy; otherwise the tiles'
    pixels are taken with one ``index_select`` (whose backward is one ``index_add_``). The strided copies run at
    memory-copy speed; with the indexed gather and write everywhere, budget-0.7 routing of six Urban100 images
    took about 10% longer.
    """
    rr, cr = group.row_run, group.col_run
    th, tw = rr.size * scale + 2 * halo, cr.size * scale + 2 * halo
    if len(segments) <= SEGMENT_LOOP_LIMIT and not (torch.is_grad_enabled() and fmap.requires_grad):
        windows = _windows(fmap, group, scale, halo)[:, :channels]
        out = fmap.new_empty(sum(seg.count for seg in segments), th, tw, channels).permute(0, 3, 1, 2)
        at = 0
        for seg in segments:
            out[at:at + seg.count].view(seg.a1 - seg.a0, seg.b1 - seg.b0, channels, th, tw).copy_(
                windows[seg.n, :, seg.a0:seg.a1, seg.b0:seg.b1].permute(1, 2, 0, 3, 4))
            at += seg.count
        return out
    rows = _rows(fmap)[:, :channels].index_select(0, _pixels(plan, fmap, group, tuple(segments), scale, halo))
    return rows.view(-1, th, tw, channels).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class Epilogue:
    """What a convolution's output goes through on its way into the destination map.

    Attributes:
        act: ``'relu'``, ``'lrelu'`` (slope 0.1) or None.
        shuffle: Pixel-shuffle factor (1: none).
        scale: Multiplier (residual scaling).
        accumulate: Add into the map (a residual connection) instead of writing.
    """

    act: Optional[str] = None
    shuffle: int = 1
    scale: float = 1.0
    accumulate: bool = False

    def __post_init__(self) -> None:
        # the two write paths (fused per segment, indexed) agree only for a plain scaled residual add
        if self.accumulate and (self.act is not None or self.shuffle != 1):
            raise ValueError('an accumulating epilogue takes a scale only (no activation, no pixel shuffle)')

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The epilogue as tensor operations, everything but the write (or add)."""
        if self.act == 'relu':
            y = F.relu(y)
        elif self.act == 'lrelu':
            y = F.leaky_relu(y, 0.1)
        if self.shuffle > 1:
            y = F.pixel_shuffle(y, self.shuffle)
        return y if self.scale == 1 else y * self.scale

    def write(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """``target = epilogue(source)`` (or ``+=``) in one pass; ``source`` is laid out like ``target``."""
        if self.accumulate:
            target.add_(source, alpha=self.scale)
        elif self.act == 'relu':
            torch.clamp_min(source if self.scale == 1 else source * self.scale, 0, out=target)
        elif self.act == 'lrelu':
            torch._C._nn.leaky_relu(source if self.scale == 1 else source * self.scale, 0.1, out=target)
        elif self.scale != 1:
            torch.mul(source, self.scale, out=target)
        else:
            target.copy_(source)


PLAIN = Epilogue()


def scatter(plan: TilePlan, fmap: torch.Tensor, group: TileGroup, segments: Sequence[Segment], scale: int,
            values: torch.Tensor, epilogue: Epilogue = PLAIN) -> None:
    """Write tiles ``(n, c * r * r, h, w)`` (a convolution's output), in segment order, through ``epilogue`` into the
    first ``c`` channels of a padded map at ``scale`` (the output's resolution, after the pixel shuffle ``r``).

    Without autograd and with few segments, the pixel shuffle is PyTorch's kernel and each segment's activation and
    write (or residual add) are one fused pass into the map; otherwise the epilogue runs on the batch and one
    indexed copy writes it.
    """
    if not torch.is_grad_enabled() and len(segments) <= SEGMENT_LOOP_LIMIT:
        if epilogue.shuffle > 1:  # PyTorch's pixel-shuffle kernel, then one fused pass (faster than a 7-D view)
            values = F.pixel_shuffle(values, epilogue.shuffle)
        _, channels, h, w = values.shape
        windows = _windows(fmap, group, scale, 0)
        at = 0
        for seg in segments:
            target = windows[seg.n, :channels, seg.a0:seg.a1, seg.b0:seg.b1]
            source = values[at:at + seg.count].view(seg.a1 - seg.a0, seg.b1 - seg.b0, channels, h, w)
            epilogue.write(source.permute(2, 0, 1, 3, 4), target)
            at += seg.count
        return
    values = epilogue.apply(values)  # (the residual add is the indexed write below)
    channels = values.shape[1]
    index = _pixels(plan, fmap, group, tuple(segments), scale, 0)
    source = values.permute(0, 2, 3, 1).reshape(-1, channels)
    target = _rows(fmap)[:, :channels]
    if not epilogue.accumulate:
        target.index_copy_(0, index, source)
    elif torch.is_grad_enabled():
        target.index_add_(0, index, source)
    else:  # index_add_ into strided rows is slow: read, add, write back
        target.index_copy_(0, index, target.index_select(0, index).add_(source))


class FlopCount:
    """FLOPs of the convolutions run so far, counted as :class:`torch.utils.flop_counter.FlopCounterMode` does."""

    def __init__(self) -> None:
        self.total = 0

    def conv(self, out: torch.Tensor, weight: torch.Tensor) -> None:
        self.total += 2 * out.numel() * weight[0].numel()


PostFn = Callable[[torch.Tensor, TileGroup, Sequence[Segment]], torch.Tensor]


def conv_tiles(plan: TilePlan, src: torch.Tensor, dst: torch.Tensor, conv: nn.Conv2d, counter: FlopCount, *,
               scale: int = 1, in_channels: Optional[Callable[[int], int]] = None,
               out_channels: Optional[Callable[[int], int]] = None, post: Optional[PostFn] = None,
               epilogue: Epilogue = PLAIN, groups: Optional[list[TileGroup]] = None) -> None:
    """One 3x3 convolution (stride 1, padding 1) of ``conv`` over the tiles of ``groups``, from ``src`` into ``dst``.

    Each tile reads its own region of ``src`` plus a one-pixel halo of its neighbours (the map's zero border
    at the image border) and runs with the filters of its width: ``weight[:out_channels(w), :in_channels(w)]``.
    ``post(y, group, segments)`` may transform the result (channel attention, a skip connection); the
    ``epilogue`` (activation, pixel shuffle, scaling, residual add) is fused with the write into ``dst``, at
    ``scale * epilogue.shuffle``.
    """
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
        raise ValueError(f'conv_tiles runs 3x3 convolutions with stride 1 and padding 1, got {conv}')
    in_channels = in_channels or (lambda w: w)
    out_channels = out_channels or (lambda w: w)
    out_scale = scale * epilogue.shuffle
    for group in plan.groups() if groups is None else groups:
        cin, cout = in_channels(group.width), out_channels(group.width)
        weight = conv.weight[:cout, :cin]
        bias = None if conv.bias is None else conv.bias[:cout]
        for segments in _split(group, scale):
            y = F.conv2d(gather(plan, src, group, segments, scale, cin, 1), weight, bias)
            counter.conv(y, weight)
            if post is not None:
                y = post(y, group, segments)
            scatter(plan, dst, group, segments, out_scale, y, epilogue)


def zero_tiles(plan: TilePlan, fmap: torch.Tensor, groups: list[TileGroup], scale: int = 1) -> None:
    """Set the tiles of ``groups`` to zero in ``fmap`` (every channel) where a neighbour's halo reads them: their
    outermost pixels (tiles that no longer run are not read inside)."""
    for group in groups:
        windows = _windows(fmap, group, scale, 0)
        for seg in group.segments:
            _zero_ring(windows[seg.n, :, seg.a0:seg.a1, seg.b0:seg.b1])


def row_bands(bounds: Sequence[int], start: int, stop: int, limit_rows: int) -> list[tuple[int, int]]:
    """Split LR rows ``start:stop`` (both tile boundaries in ``bounds``) into bands of whole tile rows, each at most
    ``limit_rows`` high where the tiles allow (a band holds at least one tile row)."""
    inner = [b for b in bounds if start <= b <= stop]
    if inner[0] != start or inner[-1] != stop:
        raise ValueError(f'rows {start}:{stop} do not fall on tile boundaries {list(bounds)}')
    bands, i = [], 0
    while i + 1 < len(inner):
        j = i + 1
        while j + 1 < len(inner) and inner[j + 1] - inner[i] <= limit_rows:
            j += 1
        bands.append((inner[i], inner[j]))
        i = j
    return bands


class TileExecutor(Executor):
    """What both tile executors share: the plan they run, where FLOPs are counted, and counted convolutions.

    Args:
        plan: The tiles of the band and their widths and depths.
        counter: Where the convolutions' FLOPs are added (as ``FlopCounterMode`` counts them).
        like: Dtype and device of the features.
    """

    def __init__(self, plan: TilePlan, counter: FlopCount, like: torch.Tensor) -> None:
        super().__init__()
        self.plan, self.counter, self.like = plan, counter, like

    def max_depth(self) -> int:
        return int(self.plan.depths.max())

    def _counted(self, conv: nn.Conv2d, x: torch.Tensor, out_ch: Optional[int] = None) -> torch.Tensor:
        """:func:`~wbsr_arch.executor.sliced_conv`, its FLOPs counted: what a ``post`` hook is given."""
        y = sliced_conv(conv, x, out_ch)
        self.counter.conv(y, conv.weight[:out_ch, :x.shape[1]])
        return y


class MapExecutor(TileExecutor):
    """Every tile at its own subnet, on whole-image maps (:func:`new_map`); autograd runs through it (training).

    A feature's ``data`` is its padded map; its ``state`` says which tiles wrote it last: those deeper than
    ``state`` (0: every tile). When a convolution overwrites a feature with fewer tiles than wrote it before (a
    residual block's inner activation, from the block on which a tile stops), the tiles that no longer write it get
    zero rings, what their neighbours' halos must read (the halo rule of this module's docstring).
    """

    def input(self, fmap: torch.Tensor, *, slim: bool) -> Feature:
        """``fmap``: a padded map of the band (its border rows real where the band was cut)."""
        return Feature(1, fmap.shape[1], slim, fmap, 0)

    def result(self, feature: Feature) -> torch.Tensor:
        """The feature's padded map."""
        return feature.data

    def copy(self, feature: Feature) -> Feature:
        return Feature(feature.scale, feature.channels, feature.slim, feature.data.clone(), feature.state)

    def _conv(self, conv: nn.Conv2d, src: Feature, into: Optional[Feature], *, act: Optional[str], shuffle: int,
              slim: bool, post: Optional[PostHook], scale: float, add: Optional[Feature]) -> Feature:
        plan, running = self.plan, 0 if self.block is None else self.block  # tiles deeper than `running` compute
        out_scale = src.scale * shuffle
        if into is None:
            channels = conv.out_channels // (shuffle * shuffle)
            into = Feature(out_scale, channels, slim, new_map(plan, channels, out_scale, self.like), 0)
        if add is not into:  # an overwrite: the tiles that no longer write it read as zeros from here on
            if running > into.state:
                zero_tiles(plan, into.data, plan.groups(into.state, running), out_scale)
            into.state = running
        skip = add if add is not None and add is not into else None
        hook = None
        if post is not None or skip is not None:
            def hook(y: torch.Tensor, group: TileGroup, segments: Sequence[Segment]) -> torch.Tensor:
                if post is not None:
                    y = post(y, self._counted)
                if skip is not None:
                    y = (y if scale == 1 else y * scale) + gather(plan, skip.data, group, segments, out_scale,
                                                                  y.shape[1], 0)
                return y
        epilogue = Epilogue(act=act, shuffle=shuffle, scale=1.0 if skip is not None else scale,
                            accumulate=add is into)
        out_channels = (lambda w: shuffle * shuffle * w) if slim else (lambda w: conv.out_channels)
        conv_tiles(plan, src.data, into.data, conv, self.counter, scale=src.scale, in_channels=src.width_channels,
                   out_channels=out_channels, post=hook, epilogue=epilogue, groups=plan.groups(running))
        return into
