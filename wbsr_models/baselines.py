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

from wbsr_data.difficulty import extract_patches, luminance
from wbsr_data.fileio import CorruptFileError, load_npz, save_npz

from .regions import Regions
from .router import Router

_LAPLACIAN = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]]).view(1, 1, 3, 3)


def edge_scores(patches: torch.Tensor) -> np.ndarray:
    """ARM's edge score of each patch ``(N, C, H, W)``: mean absolute Laplacian of the luminance."""
    y = luminance(patches)
    if y.shape[2] < 3 or y.shape[3] < 3:
        return np.zeros(len(y))
    return F.conv2d(y, _LAPLACIAN.to(y)).abs().mean(dim=(1, 2, 3)).cpu().numpy().astype(np.float64)


def region_outputs(router: Router, lq: torch.Tensor) -> tuple[Regions, list[torch.Tensor]]:
    """Every subnet's SR of one image, for the regions the router cuts.

    Returns the regions and one output per subnet: for ``patches``, ``(n, C, ph*s, pw*s)`` (every patch run
    alone, unclamped, as the router merges them); for ``tiles``, ``(1, C, H*s, W*s)`` (the subnet on the whole
    image, which is what the seamless scheme computes when every tile has that subnet).
    """
    lq = router.prepare(lq)
    regions = router.regions(lq)
    outputs = []
    with torch.no_grad():
        if regions.scheme == 'patches':
            patches = regions.crops(tuple(regions.boxes[0, 2:]), np.arange(len(regions)))
            for m in range(router.num_subnets):
                outputs.append(torch.cat([router.run_subnet(patches[start:start + router.options.batch_size], m)
                                          for start in range(0, len(patches), router.options.batch_size)]))
        else:
            outputs = [router._whole(lq, m).output for m in range(router.num_subnets)]
    return regions, outputs


def region_psnr_table(router: Router, lq: torch.Tensor, gt: torch.Tensor,
                      cut: Optional[tuple] = None) -> tuple[np.ndarray, Regions]:
    """PSNR (Y channel, dB) of every subnet on every routing region of one image: ``(M, n)``, and the regions.

    Regions are cut exactly as ``router`` cuts them and each subnet runs once; ``cut``, the result of
    :func:`region_outputs` for this image, is reused instead of running the subnets again.
    """
    regions, outputs = cut if cut is not None else region_outputs(router, lq)
    s = router.scale
    table = np.zeros((len(outputs), len(regions)))
    if regions.scheme == 'patches':
        ph, pw = (int(v) for v in regions.boxes[0, 2:])
        h, w = regions.image_hw
        gt_y = luminance(extract_patches(gt[0, :, :h * s, :w * s], [t * s for t in regions.tops],
                                         [lf * s for lf in regions.lefts], ph * s, pw * s).clamp(0, 1))
        for m, sr in enumerate(outputs):
            mse = (luminance(sr.clamp(0, 1)) - gt_y).pow(2).mean(dim=(1, 2, 3))
            table[m] = (10 * torch.log10(1. / mse.clamp_min(1e-10))).cpu().numpy()
        return table, regions
    gt_y = luminance(gt[:, :, :outputs[0].shape[2], :outputs[0].shape[3]].clamp(0, 1))
    for m, sr in enumerate(outputs):
        err = (luminance(sr.clamp(0, 1)) - gt_y).pow(2)[0, 0]
        for i, (top, left, bh, bw) in enumerate(regions.boxes.tolist()):
            mse = err[top * s:(top + bh) * s, left * s:(left + bw) * s].mean()
            table[m, i] = float(10 * torch.log10(1. / mse.clamp_min(1e-10)))
    return table, regions


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

    def select(self, regions: Regions, costs: np.ndarray, eta: float) -> np.ndarray:
        """ARM's choice per region: ``argmax_m eta * PSNR_m(edge bin) - C_m / C_full`` (``costs`` ``(n, M)``)."""
        costs = np.asarray(costs, dtype=np.float64)
        if self.psnr.shape[1] != costs.shape[1]:
            raise ValueError(f'ARM table made for {self.psnr.shape[1]} subnets, the network has {costs.shape[1]}')
        scores = regions.per_region(edge_scores)
        bins = np.clip(np.searchsorted(self.edges, scores, side='right') - 1, 0, len(self.psnr) - 1)
        return (eta * self.psnr[bins] - costs / costs[:, -1:]).argmax(axis=1)

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
    """Measure ARM's table on ``(lq, gt)`` pairs: equal-count edge bins, mean PSNR per bin and subnet.

    The regions are ``router``'s (ARM's own protocol is 32/28 patches).
    """
    scores, tables = [], []
    for lq, gt in pairs:
        table, regions = region_psnr_table(router, lq, gt)
        scores.append(regions.per_region(edge_scores))
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
                                                  'scheme': router.options.scheme,
                                                  'patch_size': router.options.patch_size,
                                                  'step': router.options.step, 'scale': router.scale})
