"""Copy-free tile execution for inference: features kept per tile, only the halos exchanged.

:mod:`wbsr_arch.tiles` keeps every feature in a map of the whole image; each convolution first copies its tiles
out of the map together with their one-pixel halo, and writes its output back. At 64 channels that copy costs
about a tenth of the convolution itself. Here the features live where the convolutions read them:

- a *store* per group of tiles (one tile shape, one width): ``(K, h + 2, w + 2, C)``, contiguous, i.e. each tile
  with its halo ring, channels-last. A convolution reads the first ``k`` tiles of a store as they are (no copy,
  no padding) and writes its output, through the epilogue, into their interiors;
- in the trunk, the tiles of a store are ordered by depth, deepest first, so that the tiles still running at
  residual block ``b`` are always a prefix of the store;
- before a convolution reads a store, the halo rings of the tiles that run are refreshed from their neighbours
  (:class:`Exchange`): every tile's outermost interior pixels are copied into one buffer, and every ring is
  filled from that buffer. Per 32-pixel tile that moves 124 + 132 pixels, where copying the tile out with its
  halo and back moves 1156 + 1024.

The halo holds what :mod:`wbsr_arch.tiles` documents: the buffer keeps zeros beyond a narrow tile's width, a tile
that stopped leaves its last features there, and the inner activation of a tile that stopped is cleared once.
So the output is the same as the map executor's, up to float rounding (tests/test_tiles.py). :class:`StoreExecutor`
runs a supernet's layer sequence (:mod:`wbsr_arch.executor`) on stores and does all of this bookkeeping itself.
Used only without autograd; training keeps the map executor, whose gather and write have an indexed backward.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .executor import Feature, PostHook
from .tiles import MAX_CALL_PIXELS, PLAIN, Epilogue, FlopCount, TileExecutor, TilePlan, gather, new_map, scatter


class StoreLayout:
    """The tiles of a plan in stores: one per group of :meth:`TilePlan.groups` (a tile shape and a width).

    Args:
        plan: The tile plan.
        by_depth: Order every store's tiles deepest first (the trunk); otherwise in segment order (the order of
            :func:`~wbsr_arch.tiles.gather` and :func:`~wbsr_arch.tiles.scatter`, used by the upsampler).
    """

    def __init__(self, plan: TilePlan, by_depth: bool) -> None:
        self.plan, self.by_depth = plan, by_depth
        self.groups = plan.groups()
        n_tiles = (plan.batch, *plan.grid.shape)
        self.owner_store = np.full(n_tiles, -1, dtype=np.int64)
        self.owner_pos = np.full(n_tiles, -1, dtype=np.int64)
        self.tiles: list[np.ndarray] = []  # (K, 3) sample, tile row, tile column, in store order
        self.order: list[Optional[torch.Tensor]] = []  # store position -> position in segment order
        self.depths: list[np.ndarray] = []  # in store order
        for g, group in enumerate(self.groups):
            cells = []
            for seg in group.segments:
                a, b = np.meshgrid(np.arange(seg.a0, seg.a1), np.arange(seg.b0, seg.b1), indexing='ij')
                cells.append(np.stack([np.full(a.size, seg.n), group.row_run.first + a.ravel(),
                                       group.col_run.first + b.ravel()], axis=1))
            cells = np.concatenate(cells)
            depth = plan.depths[cells[:, 0], cells[:, 1], cells[:, 2]]
            order = np.argsort(-depth, kind='stable') if by_depth else np.arange(len(cells))
            cells, depth = cells[order], depth[order]
            self.tiles.append(cells)
            self.depths.append(depth)
            self.order.append(torch.as_tensor(order) if by_depth else None)
            self.owner_store[cells[:, 0], cells[:, 1], cells[:, 2]] = g
            self.owner_pos[cells[:, 0], cells[:, 1], cells[:, 2]] = np.arange(len(cells))
        if (self.owner_store < 0).any():
            raise RuntimeError('the plan\'s groups do not cover every tile')

    def __len__(self) -> int:
        return len(self.groups)

    def sizes(self) -> list[int]:
        return [len(t) for t in self.tiles]

    def active(self, block: int) -> list[int]:
        """Tiles of every store that run residual block ``block`` (a prefix, when ordered by depth)."""
        return [int((d > block).sum()) for d in self.depths]

    def tile_shape(self, g: int, scale: int) -> tuple[int, int]:
        group = self.groups[g]
        return group.row_run.size * scale, group.col_run.size * scale

    def gather(self, fmap: torch.Tensor, scale: int, channels: Callable[[int], int]) -> list[torch.Tensor]:
        """Stores of the tiles of a padded map with their halo (one copy), ``channels(width)`` channels each."""
        stores = []
        for g, group in enumerate(self.groups):
            tiles = gather(self.plan, fmap, group, group.segments, scale, channels(group.width), 1)
            if self.order[g] is not None:
                tiles = tiles.index_select(0, self.order[g].to(tiles.device))
            stores.append(tiles.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))
        return stores

    def scatter(self, stores: Sequence[torch.Tensor], fmap: torch.Tensor, scale: int) -> None:
        """Write the interiors of the stores' tiles into a padded map."""
        for g, group in enumerate(self.groups):
            tiles = stores[g][:, :, 1:-1, 1:-1]
            if self.order[g] is not None:
                tiles = tiles.index_select(0, torch.argsort(self.order[g]).to(tiles.device))
            scatter(self.plan, fmap, group, group.segments, scale, tiles)

    def new_stores(self, scale: int, channels: Callable[[int], int], like: torch.Tensor) -> list[torch.Tensor]:
        """Uninitialised stores ``(K, C, h + 2, w + 2)``, channels-last, at ``scale``."""
        stores = []
        for g, group in enumerate(self.groups):
            th, tw = self.tile_shape(g, scale)
            stores.append(like.new_empty(len(self.tiles[g]), th + 2, tw + 2, channels(group.width))
                          .permute(0, 3, 1, 2))
        return stores


def _ring_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h + 2, w + 2), dtype=bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def _edge_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h + 2, w + 2), dtype=bool)
    mask[1:-1, 1:-1] = _ring_mask(h - 2, w - 2) if h > 2 and w > 2 else True
    return mask


class Exchange:
    """Refreshes the halo rings of a layout's stores at one scale from the neighbouring tiles.

    Every tile's edge (its outermost interior pixels) has a fixed row in a buffer ``(1 + edges, C)``, whose row 0
    is the zero of the image border. :meth:`run` copies the edges of the tiles that changed into the buffer and
    fills the rings of the tiles that are about to run from it. A narrow tile writes only its own channels of
    its rows, so the buffer holds zeros beyond them (what a wider neighbour's halo must read).
    """

    def __init__(self, layout: StoreLayout, scale: int) -> None:
        self.layout = layout
        grid = layout.plan.grid
        rows, cols = np.asarray(grid.rows) * scale, np.asarray(grid.cols) * scale
        height, width = rows[-1], cols[-1]
        self.edge_rows: list[torch.Tensor] = []  # per store: its edges' rows in the store, tile-major
        self.edge_count: list[int] = []
        self.offset: list[int] = []
        lookup = []
        at = 1
        for g in range(len(layout)):
            th, tw = layout.tile_shape(g, scale)
            mask = _edge_mask(th, tw)
            flat = np.flatnonzero(mask)
            table = np.full(mask.shape, -1, dtype=np.int64)
            table[mask] = np.arange(flat.size)
            lookup.append(table)
            k = len(layout.tiles[g])
            self.edge_rows.append(torch.as_tensor((np.arange(k)[:, None] * mask.size + flat[None]).ravel()))
            self.edge_count.append(flat.size)
            self.offset.append(at)
            at += k * flat.size
        self.buffer_rows = at
        self.ring_rows: list[torch.Tensor] = []  # per store: its rings' rows in the store, tile-major
        self.ring_source: list[torch.Tensor] = []  # the buffer row each ring row reads
        self.ring_count: list[int] = []
        for g in range(len(layout)):
            th, tw = layout.tile_shape(g, scale)
            ly, lx = np.nonzero(_ring_mask(th, tw))
            tiles = layout.tiles[g]
            n = tiles[:, :1]
            y = rows[tiles[:, 1]][:, None] + ly[None] - 1
            x = cols[tiles[:, 2]][:, None] + lx[None] - 1
            inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
            yc, xc = np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)
            oi = np.searchsorted(rows, yc, side='right') - 1
            oj = np.searchsorted(cols, xc, side='right') - 1
            sample = np.broadcast_to(n, oi.shape)
            owner, pos = layout.owner_store[sample, oi, oj], layout.owner_pos[sample, oi, oj]
            source = np.zeros(y.shape, dtype=np.int64)
            for h in np.unique(owner[inside]).tolist():
                sel = inside & (owner == h)
                e = lookup[h][yc[sel] - rows[oi[sel]] + 1, xc[sel] - cols[oj[sel]] + 1]
                if (e < 0).any():
                    raise RuntimeError('a halo pixel is not on its owner tile\'s edge')
                source[sel] = self.offset[h] + pos[sel] * self.edge_count[h] + e
            size = (th + 2) * (tw + 2)
            self.ring_rows.append(torch.as_tensor((np.arange(len(tiles))[:, None] * size + ly * (tw + 2) + lx).ravel()))
            self.ring_source.append(torch.as_tensor(source.ravel()))
            self.ring_count.append(ly.size)
        self._device = torch.device('cpu')

    def _to(self, device: torch.device) -> None:
        if device != self._device:
            for lists in (self.edge_rows, self.ring_rows, self.ring_source):
                lists[:] = [t.to(device) for t in lists]
            self._device = device

    def buffer(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        """A zeroed edge buffer for stores of at most ``channels`` channels."""
        return like.new_zeros(self.buffer_rows, channels)

    def run(self, stores: Sequence[torch.Tensor], buffer: torch.Tensor, changed: Sequence[int],
            running: Sequence[int]) -> None:
        """Copy the edges of the first ``changed[g]`` tiles of every store into ``buffer``, then fill the rings of
        the first ``running[g]`` tiles from it."""
        self._to(buffer.device)
        for g, store in enumerate(stores):
            k = changed[g]
            if k:
                rows = _rows(store)
                e = self.edge_count[g]
                buffer[self.offset[g]:self.offset[g] + k * e, :rows.shape[1]] = \
                    rows.index_select(0, self.edge_rows[g][:k * e])
        for g, store in enumerate(stores):
            k = running[g]
            if k:
                rows = _rows(store)
                r = self.ring_count[g]
                rows.index_copy_(0, self.ring_rows[g][:k * r],
                                 buffer[:, :rows.shape[1]].index_select(0, self.ring_source[g][:k * r]))

    def clear(self, buffer: torch.Tensor, start: Sequence[int], stop: Sequence[int]) -> None:
        """Zero the buffer rows of tiles ``start[g]:stop[g]`` of every store (an activation they no longer compute)."""
        for g in range(len(self.layout)):
            if stop[g] > start[g]:
                e = self.edge_count[g]
                buffer[self.offset[g] + start[g] * e:self.offset[g] + stop[g] * e].zero_()


def _rows(store: torch.Tensor) -> torch.Tensor:
    """A store ``(K, C, h, w)`` (channels-last, contiguous) as its ``(K * h * w, C)`` pixel rows (a view)."""
    return store.permute(0, 2, 3, 1).view(-1, store.shape[1])


#: ``post(y, store, first, stop)``: transforms a convolution's output ``y`` of tiles ``first:stop`` of a store.
StorePost = Callable[[torch.Tensor, int, int, int], torch.Tensor]


def conv_stores(layout: StoreLayout, src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor], conv: nn.Conv2d,
                counter: FlopCount, count: Sequence[int], *, in_channels: Optional[Callable[[int], int]] = None,
                out_channels: Optional[Callable[[int], int]] = None, epilogue: Epilogue = PLAIN,
                post: Optional[StorePost] = None) -> None:
    """A 3x3 convolution over the first ``count[g]`` tiles of every store: read ``src`` with its halo, write the
    interiors of ``dst`` through ``post`` and ``epilogue``. Calls are cut to at most
    :data:`~wbsr_arch.tiles.MAX_CALL_PIXELS` output pixels."""
    in_channels = in_channels or (lambda w: w)
    out_channels = out_channels or (lambda w: w)
    for g, group in enumerate(layout.groups):
        k = count[g]
        if not k:
            continue
        cin, cout = in_channels(group.width), out_channels(group.width)
        weight = conv.weight[:cout, :cin]
        bias = None if conv.bias is None else conv.bias[:cout]
        h, w = src[g].shape[2] - 2, src[g].shape[3] - 2
        step = max(1, MAX_CALL_PIXELS // (h * w))
        for j in range(0, k, step):
            y = F.conv2d(src[g][j:min(k, j + step)], weight, bias)
            counter.conv(y, weight)
            if post is not None:
                y = post(y, g, j, min(k, j + step))
            if epilogue.shuffle > 1:
                y = F.pixel_shuffle(y, epilogue.shuffle)
            target = dst[g][j:min(k, j + step)]
            epilogue.write(y, target[:, :, 1:-1, 1:-1])



class _StoreState:
    """Bookkeeping of one feature on stores, per store (prefixes of its tiles, in store order)."""

    def __init__(self, written: list[int], rings: list[int]) -> None:
        self.written = written  # its first written[g] tiles hold the feature; the others read as zeros
        self.dirty = [0] * len(written)  # its first dirty[g] tiles changed since their edges were last copied
        self.rings = rings  # its first rings[g] tiles have current halo rings
        self.edges: Optional[torch.Tensor] = None  # the edge buffer (Exchange.buffer), made at the first exchange

    def copy(self) -> '_StoreState':
        other = _StoreState(list(self.written), list(self.rings))
        other.dirty = list(self.dirty)
        other.edges = None if self.edges is None else self.edges.clone()
        return other


class StoreExecutor(TileExecutor):
    """Every tile at its own subnet, on per-tile stores (module docstring); no autograd (inference).

    A feature's ``data`` is its list of stores. Before a convolution reads a feature, the rings of the tiles that
    run are refilled from the edges that changed (:meth:`Exchange.run`); when a convolution overwrites a feature
    with fewer tiles than wrote it before (a residual block's inner activation, from the block on which a tile
    stops), the edges of the tiles that no longer write it are cleared (:meth:`Exchange.clear`), so their
    neighbours read zeros.

    Args:
        plan: The tiles of the band and their widths and depths.
        counter: Where the convolutions' FLOPs are added.
        like: Dtype and device of the stores.
        by_depth: Order the stores deepest first (needed by :meth:`blocks`: the tiles that run a block are then a
            prefix of every store); otherwise in segment order, the cheaper to gather and scatter.
    """

    def __init__(self, plan: TilePlan, counter: FlopCount, like: torch.Tensor, *, by_depth: bool) -> None:
        super().__init__(plan, counter, like)
        self.layout = StoreLayout(plan, by_depth=by_depth)
        self.every = self.layout.sizes()
        self._exchanges: dict[int, Exchange] = {}
        self._running: dict[int, list[int]] = {}

    def max_depth(self) -> int:
        if not self.layout.by_depth:
            raise RuntimeError('residual blocks on stores need the stores ordered by depth (by_depth=True)')
        return super().max_depth()

    def input(self, fmap: torch.Tensor, *, slim: bool) -> Feature:
        """``fmap``: a padded map of the band; its tiles are copied into stores with their halo (current rings)."""
        channels = fmap.shape[1]
        stores = self.layout.gather(fmap, 1, (lambda w: min(w, channels)) if slim else (lambda w: channels))
        return Feature(1, channels, slim, stores, _StoreState(list(self.every), list(self.every)))

    def result(self, feature: Feature) -> torch.Tensor:
        """The feature as a padded map (:func:`~wbsr_arch.tiles.new_map`)."""
        fmap = new_map(self.plan, feature.channels, feature.scale, self.like)
        self.layout.scatter(feature.data, fmap, feature.scale)
        return fmap

    def copy(self, feature: Feature) -> Feature:
        return Feature(feature.scale, feature.channels, feature.slim, [store.clone() for store in feature.data],
                       feature.state.copy())

    def _running_tiles(self) -> list[int]:
        if self.block is None:
            return self.every
        if self.block not in self._running:
            self._running[self.block] = self.layout.active(self.block)
        return self._running[self.block]

    def _exchange(self, scale: int) -> Exchange:
        if scale not in self._exchanges:
            self._exchanges[scale] = Exchange(self.layout, scale)
        return self._exchanges[scale]

    def _refresh(self, feature: Feature, running: Sequence[int]) -> None:
        """Make the rings of the first ``running[g]`` tiles of every store current."""
        state = feature.state
        if not any(state.dirty) and all(r <= k for r, k in zip(running, state.rings)):
            return
        exchange = self._exchange(feature.scale)
        changed = state.dirty
        if state.edges is None:
            state.edges, changed = exchange.buffer(feature.channels, self.like), state.written
        exchange.run(feature.data, state.edges, changed, running)
        state.rings = list(running) if any(changed) else [max(r, k) for r, k in zip(running, state.rings)]
        state.dirty = [0] * len(running)

    def _conv(self, conv: nn.Conv2d, src: Feature, into: Optional[Feature], *, act: Optional[str], shuffle: int,
              slim: bool, post: Optional[PostHook], scale: float, add: Optional[Feature]) -> Feature:
        running = self._running_tiles()
        self._refresh(src, running)
        out_scale = src.scale * shuffle
        if into is None:
            channels = conv.out_channels // (shuffle * shuffle)
            stores = self.layout.new_stores(out_scale, (lambda w: min(w, channels)) if slim else (lambda w: channels),
                                            self.like)
            into = Feature(out_scale, channels, slim, stores, _StoreState([0] * len(running), [0] * len(running)))
        state = into.state
        if add is into:
            if any(r > k for r, k in zip(running, state.written)):
                raise RuntimeError('a residual add into tiles that hold no value of the feature')
            state.dirty = [max(r, k) for r, k in zip(running, state.dirty)]
        else:  # an overwrite: the tiles that no longer write it read as zeros from here on
            if state.edges is not None:
                self._exchange(out_scale).clear(state.edges, running, state.written)
            state.written, state.dirty = list(running), list(running)
        skip = add if add is not None and add is not into else None
        hook = None
        if post is not None or skip is not None:
            def hook(y: torch.Tensor, g: int, first: int, stop: int) -> torch.Tensor:
                if post is not None:
                    y = post(y, self._counted)
                if skip is not None:
                    y = (y if scale == 1 else y * scale) + skip.data[g][first:stop, :, 1:-1, 1:-1]
                return y
        epilogue = Epilogue(act=act, shuffle=shuffle, scale=1.0 if skip is not None else scale,
                            accumulate=add is into)
        out_channels = (lambda w: shuffle * shuffle * w) if slim else (lambda w: conv.out_channels)
        conv_stores(self.layout, src.data, into.data, conv, self.counter, running, in_channels=src.width_channels,
                    out_channels=out_channels, epilogue=epilogue, post=hook)
        return into
