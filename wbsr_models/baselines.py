"""Routing baselines run on the same supernet: ARM's edge lookup table and the ground-truth oracle.

ARM (Chen et al., ECCV 2022) scores an LR patch by its edge strength (mean absolute Laplacian of the
luminance), maps the score to each subnet's expected PSNR with a lookup table measured on a validation
set, and picks ``argmax_m eta * PSNR_m - C_m / C_full``. The oracle picks, per patch, the cheapest subnet
whose patch PSNR is within a tolerance of the full subnet's, using the ground truth: the limit any
router over these subnets can reach.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch.nn import functional as F

from wbsr_data.difficulty import extract_patches, grid_starts, luminance
from wbsr_data.fileio import CorruptFileError, load_npz, save_npz

from .router import Router

_LAPLACIAN = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]]).view(1, 1, 3, 3)


def edge_scores(patches: torch.Tensor) -> np.ndarray:
    """ARM's edge score of each patch ``(N, C, H, W)``: mean absolute Laplacian of the luminance."""
    y = luminance(patches)
    if y.shape[2] < 3 or y.shape[3] < 3:
        return np.zeros(len(y))
    return F.conv2d(y, _LAPLACIAN.to(y)).abs().mean(dim=(1, 2, 3)).cpu().numpy().astype(np.float64)


def patch_outputs(router: Router, lq: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[int], list[int]]:
    """Every subnet's SR of every routing patch of one image, cut exactly as ``router`` cuts them.

    Returns the LR patches ``(n, C, ph, pw)``, one ``(n, C, ph*s, pw*s)`` tensor per subnet (unclamped, as
    the router merges them), and the patch grid ``tops``, ``lefts``.
    """
    opts = router.options
    lq = router._prepare(lq)
    _, _, h, w = lq.shape
    ph, pw = min(opts.patch_size, h), min(opts.patch_size, w)
    tops, lefts = grid_starts(h, ph, opts.step, True), grid_starts(w, pw, opts.step, True)
    patches = extract_patches(lq[0], tops, lefts, ph, pw)
    outputs = []
    with torch.no_grad():
        for m in range(router.num_subnets):
            outputs.append(torch.cat([router._run(patches[start:start + opts.batch_size], m)
                                      for start in range(0, len(patches), opts.batch_size)]))
    return patches, outputs, tops, lefts


def patch_psnr_table(router: Router, lq: torch.Tensor, gt: torch.Tensor,
                     cut: Optional[tuple] = None) -> tuple[np.ndarray, torch.Tensor]:
    """PSNR (Y channel, dB) of every subnet on every routing patch of one image: ``(M, n)``, and the patches.

    Patches are cut exactly as ``router`` cuts them and each subnet runs on each patch once; ``cut``, the
    result of :func:`patch_outputs` for this image, is reused instead of running the subnets again.
    """
    patches, outputs, tops, lefts = cut if cut is not None else patch_outputs(router, lq)
    s = router.scale
    _, _, h, w = lq.shape
    ph, pw = patches.shape[2], patches.shape[3]
    gt_patches = extract_patches(gt[0, :, :h * s, :w * s], [t * s for t in tops], [lf * s for lf in lefts], ph * s,
                                 pw * s)
    gt_y = luminance(gt_patches.clamp(0, 1))
    table = np.zeros((len(outputs), len(patches)))
    for m, sr in enumerate(outputs):
        mse = (luminance(sr.clamp(0, 1)) - gt_y).pow(2).mean(dim=(1, 2, 3))
        table[m] = (10 * torch.log10(1. / mse.clamp_min(1e-10))).cpu().numpy()
    return table, patches


def oracle_subnets(psnr_table: np.ndarray, tolerance: float = 0.05) -> np.ndarray:
    """Per patch, the cheapest subnet whose PSNR is within ``tolerance`` dB of the full subnet's."""
    ok = psnr_table >= psnr_table[-1:] - tolerance
    return ok.argmax(axis=0)


@dataclass
class ArmTable:
    """ARM's Edge-to-PSNR lookup table: ``psnr[b, m]`` = mean PSNR of subnet m on patches of edge bin b."""

    edges: np.ndarray  # (B + 1,) bin edges of the edge score
    psnr: np.ndarray  # (B, M)
    meta: dict[str, Any] = field(default_factory=dict)

    def select(self, patches: torch.Tensor, costs: np.ndarray, eta: float) -> np.ndarray:
        costs = np.asarray(costs, dtype=np.float64)
        if self.psnr.shape[1] != len(costs):
            raise ValueError(f'ARM table made for {self.psnr.shape[1]} subnets, the network has {len(costs)}')
        bins = np.clip(np.searchsorted(self.edges, edge_scores(patches), side='right') - 1, 0, len(self.psnr) - 1)
        return (eta * self.psnr[bins] - costs[None, :] / costs[-1]).argmax(axis=1)

    def save(self, path: str) -> None:
        save_npz(path, {'edges': self.edges, 'psnr': self.psnr}, dict(self.meta, kind='arm_table'))

    @classmethod
    def load(cls, path: str) -> 'ArmTable':
        arrays, meta = load_npz(path, required=('edges', 'psnr'))
        if meta.get('kind') != 'arm_table' or arrays['psnr'].ndim != 2 or \
                len(arrays['edges']) != len(arrays['psnr']) + 1:
            raise CorruptFileError(path, 'not an ARM lookup table')
        return cls(edges=arrays['edges'], psnr=arrays['psnr'], meta=meta)


def build_arm_table(router: Router, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], num_bins: int = 20,
                    source: Optional[str] = None) -> ArmTable:
    """Measure ARM's table on ``(lq, gt)`` pairs: equal-count edge bins, mean PSNR per bin and subnet."""
    scores, tables = [], []
    for lq, gt in pairs:
        table, patches = patch_psnr_table(router, lq, gt)
        scores.append(edge_scores(patches))
        tables.append(table)
    if not scores:
        raise ValueError('cannot build an ARM table from zero images')
    score = np.concatenate(scores)
    table = np.concatenate(tables, axis=1)
    edges = np.unique(np.quantile(score, np.linspace(0, 1, num_bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    bins = np.clip(np.searchsorted(edges, score, side='right') - 1, 0, len(edges) - 2)
    filled = np.flatnonzero(np.bincount(bins, minlength=len(edges) - 1))
    psnr = np.stack([table[:, bins == filled[np.abs(filled - b).argmin()]].mean(axis=1)  # empty bin: nearest filled
                     for b in range(len(edges) - 1)])
    return ArmTable(edges=edges, psnr=psnr, meta={'patches': int(len(score)), 'source': source or '',
                                                  'patch_size': router.options.patch_size,
                                                  'step': router.options.step, 'scale': router.scale})
