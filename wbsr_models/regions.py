"""How the router cuts an LR image into the regions that get a subnet each: patches or tiles.

- ``patches``: ``patch_size`` squares every ``step`` pixels, the last row and column flush with the border
  (the ClassSR/ARM/PCSR protocol, 32/28): regions overlap and every patch runs on its own.
- ``tiles``: a grid of non-overlapping ``tile_size`` squares (the last row and column may be smaller) that
  the supernet runs in one seamless pass (:meth:`wbsr_arch.supernet.SupernetMixin.forward_tiles`).

Every routing policy (Eq. 15, budget, alpha, ARM, the oracle, a user's ``assign``) sees the same
:class:`Regions` whatever the scheme, so each policy works with each scheme.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from wbsr_arch.tiles import TileGrid
from wbsr_data.difficulty import extract_patches, grid_starts

SCHEMES = ('tiles', 'patches')


@dataclass
class Regions:
    """The regions of one LR image, row-major, and their LR crops.

    Attributes:
        scheme: ``'patches'`` or ``'tiles'``.
        boxes: ``(n, 4)`` int array, ``(top, left, height, width)`` of each region in LR pixels.
        lq: The LR image ``(1, C, H, W)`` the regions are cut from.
        grid: The tile grid (``tiles`` only).
        tops, lefts: The patch grid (``patches`` only): region ``i * len(lefts) + j`` starts at
            ``(tops[i], lefts[j])``.
    """

    scheme: str
    boxes: np.ndarray
    lq: torch.Tensor
    grid: Optional[TileGrid] = None
    tops: list[int] = field(default_factory=list)
    lefts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.lq.shape[2]), int(self.lq.shape[3])

    def shapes(self) -> dict[tuple[int, int], np.ndarray]:
        """Region indices by ``(height, width)``: patches have one shape, tiles up to four."""
        keys = self.boxes[:, 2] * (1 << 20) + self.boxes[:, 3]
        return {(int(k) >> 20, int(k) & ((1 << 20) - 1)): np.flatnonzero(keys == k) for k in np.unique(keys)}

    def crops(self, shape: tuple[int, int], rows: np.ndarray) -> torch.Tensor:
        """LR crops ``(len(rows), C, h, w)`` of the regions ``rows``, all of ``shape``."""
        h, w = shape
        boxes = self.boxes[rows]
        if self.scheme == 'patches' and len(rows) == len(self):
            return extract_patches(self.lq[0], self.tops, self.lefts, h, w)
        windows = self.lq[0].unfold(1, h, 1).unfold(2, w, 1)  # (C, H-h+1, W-w+1, h, w) view
        top = torch.as_tensor(boxes[:, 0], device=self.lq.device)
        left = torch.as_tensor(boxes[:, 1], device=self.lq.device)
        return windows[:, top, left].permute(1, 0, 2, 3)

    def per_region(self, fn: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
        """``fn`` applied to the crops of each shape, results put back in region order (first axis)."""
        result: Optional[np.ndarray] = None
        for shape, rows in self.shapes().items():
            values = np.asarray(fn(self.crops(shape, rows)))
            if result is None:
                result = np.zeros((len(self), *values.shape[1:]), dtype=values.dtype)
            result[rows] = values
        return result

    def costs(self, subnet_costs: Callable[[tuple[int, int]], np.ndarray]) -> np.ndarray:
        """``(n, M)`` FLOPs of every subnet on every region, from ``subnet_costs(lr_hw)``."""
        out = None
        for shape, rows in self.shapes().items():
            values = np.asarray(subnet_costs(shape), dtype=np.int64)
            if out is None:
                out = np.zeros((len(self), len(values)), dtype=np.int64)
            out[rows] = values
        return out


def cut_patches(lq: torch.Tensor, patch_size: int, step: int) -> Regions:
    """``patch_size`` patches every ``step`` pixels; the last row and column are flush with the border."""
    _, _, h, w = lq.shape
    ph, pw = min(patch_size, h), min(patch_size, w)
    tops, lefts = grid_starts(h, ph, step, cover_end=True), grid_starts(w, pw, step, cover_end=True)
    top, left = np.meshgrid(tops, lefts, indexing='ij')
    boxes = np.stack([top.ravel(), left.ravel(), np.full(top.size, ph), np.full(top.size, pw)], axis=1)
    return Regions('patches', boxes.astype(np.int64), lq, tops=tops, lefts=lefts)


def cut_tiles(lq: torch.Tensor, tile_size: int) -> Regions:
    """Non-overlapping ``tile_size`` tiles from the top left; the last row and column may be smaller."""
    grid = TileGrid.regular(int(lq.shape[2]), int(lq.shape[3]), tile_size)
    return Regions('tiles', grid.boxes().astype(np.int64), lq, grid=grid)


def cut(lq: torch.Tensor, scheme: str, *, patch_size: int = 32, step: int = 28, tile_size: int = 32) -> Regions:
    """The regions of ``lq`` under ``scheme``."""
    if scheme == 'patches':
        return cut_patches(lq, patch_size, step)
    if scheme == 'tiles':
        return cut_tiles(lq, tile_size)
    raise ValueError(f'scheme must be one of {SCHEMES}, got {scheme!r}')
