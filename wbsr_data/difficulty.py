"""Patch difficulty (spec section 1): one implementation for HES, the router and every plot.

A patch's *gradient vector* is ``g = (mean|gx|, std|gx|, mean|gy|, std|gy|)`` of the 3x3 Sobel
gradients of its luminance, taken at the patch's interior pixels (a "valid" convolution, so a patch's
vector depends on the patch alone, wherever it was cut from). The Sobel kernels are divided by 8, so a
luminance ramp of slope ``a`` per pixel has ``|gx| = a``. Patches thinner than 3 pixels have ``g = 0``.
Luminance is BT.601 Y of the RGB patch in [0, 1] (BasicSR's ``rgb2ycbcr_pt``, range [16, 235]/255);
a 1-channel patch is treated as gray RGB and a 4th channel is ignored.

A :class:`DifficultyProjection` turns ``g`` into a scalar score ``s`` (projection on the first principal
component of the training patches' ``g``, or the plain sum) and ``s`` into a class 1..K by the training
thresholds (Eq. 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from basicsr.utils.color_util import rgb2ycbcr_pt

#: Bumped whenever the numbers this module computes change; part of every cache key.
DIFFICULTY_VERSION = 1
PROJECTIONS = ('pca', 'sum')

_SOBEL_X = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]]) / 8.


def luminance(img: torch.Tensor) -> torch.Tensor:
    """Y (BT.601, [16, 235]/255) of an RGB(A) or gray batch ``(N, C, H, W)`` in [0, 1] -> ``(N, 1, H, W)``."""
    if img.dim() != 4:
        raise ValueError(f'expected a (N, C, H, W) batch, got shape {tuple(img.shape)}')
    channels = img.shape[1]
    if channels == 1:
        img = img.expand(-1, 3, -1, -1)
    elif channels in (3, 4):
        img = img[:, :3]
    else:
        raise ValueError(f'expected 1, 3 or 4 channels, got {channels}')
    return rgb2ycbcr_pt(img.float(), y_only=True)


def gradient_vectors(patches: torch.Tensor) -> torch.Tensor:
    """Gradient vectors ``(N, 4)`` (float32) of a batch of patches ``(N, C, H, W)`` in [0, 1]."""
    y = luminance(patches)
    n, _, h, w = y.shape
    if h < 3 or w < 3 or n == 0:
        return y.new_zeros(n, 4)
    kx = _SOBEL_X.to(y)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3): gx, gy
    grad = F.conv2d(y, kernels).abs().flatten(2)  # (N, 2, (H-2)(W-2))
    mean = grad.mean(dim=2)
    std = grad.std(dim=2, unbiased=False)
    return torch.stack([mean[:, 0], std[:, 0], mean[:, 1], std[:, 1]], dim=1)


def grid_starts(size: int, patch: int, step: int, cover_end: bool) -> list[int]:
    """Start offsets of patches on a 1-D grid; with ``cover_end`` the last patch is flush with the end.

    A size smaller than ``patch`` gives the single start 0 (the caller uses a ``size``-long patch).
    """
    if patch <= 0 or step <= 0:
        raise ValueError(f'patch ({patch}) and step ({step}) must be positive')
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, step))
    if cover_end and starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def extract_patches(img: torch.Tensor, tops: Sequence[int], lefts: Sequence[int], ph: int,
                    pw: int) -> torch.Tensor:
    """Patches ``(len(tops) * len(lefts), C, ph, pw)`` of ``img`` ``(C, H, W)`` at every (top, left), row-major."""
    if img.dim() != 3:
        raise ValueError(f'expected a (C, H, W) image, got shape {tuple(img.shape)}')
    windows = img.unfold(1, ph, 1).unfold(2, pw, 1)  # view (C, H-ph+1, W-pw+1, ph, pw)
    t = torch.as_tensor(list(tops), dtype=torch.long, device=img.device)
    lf = torch.as_tensor(list(lefts), dtype=torch.long, device=img.device)
    picked = windows[:, t[:, None], lf[None, :]]  # (C, nT, nL, ph, pw)
    return picked.permute(1, 2, 0, 3, 4).reshape(-1, img.shape[0], ph, pw)


@dataclass
class DifficultyProjection:
    """Gradient vector -> score -> class, as fitted on a set of training patches.

    Attributes:
        kind: ``'pca'`` (first principal component, sign so that larger = more texture) or ``'sum'``.
        mean: Centre subtracted before projecting (zeros for ``sum``).
        axis: Projection axis (ones for ``sum``).
        thresholds: ``t_1 .. t_(K-1)`` ascending; class k holds ``t_(k-1) < s <= t_k``.
        score_range: Smallest and largest training score, the ends of :meth:`position`'s scale.

    What routing measures on a trained network (class errors, an error predictor) is kept beside this, in
    :mod:`wbsr_models.routing.artefacts`.
    """

    kind: str
    mean: np.ndarray
    axis: np.ndarray
    thresholds: np.ndarray
    score_range: tuple[float, float]
    version: int = field(default=DIFFICULTY_VERSION)

    @property
    def num_classes(self) -> int:
        return len(self.thresholds) + 1

    @classmethod
    def fit(cls, vectors: np.ndarray, num_classes: int = 10, kind: str = 'pca') -> 'DifficultyProjection':
        """Fit the projection on training gradient vectors ``(N, 4)`` and cut K equal-count classes (Eq. 7).

        ``t_k`` is the ``ceil(k N / K)``-th smallest score. PCA needs at least two distinct vectors;
        with fewer, the ``sum`` projection is used.
        """
        if kind not in PROJECTIONS:
            raise ValueError(f'projection must be one of {PROJECTIONS}, got {kind!r}')
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        g = np.asarray(vectors, dtype=np.float64).reshape(-1, 4)
        if len(g) == 0:
            raise ValueError('cannot fit a difficulty projection on zero patches')
        mean, axis = np.zeros(4), np.ones(4)
        if kind == 'pca':
            if len(np.unique(g, axis=0)) >= 2:
                from sklearn.decomposition import PCA
                pca = PCA(n_components=1).fit(g)
                mean, axis = pca.mean_, pca.components_[0]
                if axis.sum() < 0:
                    axis = -axis
            else:
                kind = 'sum'
        scores = np.sort((g - mean) @ axis)
        n = len(scores)
        thresholds = np.array([scores[math.ceil(k * n / num_classes) - 1] for k in range(1, num_classes)])
        return cls(kind=kind, mean=mean, axis=axis, thresholds=thresholds,
                   score_range=(float(scores[0]), float(scores[-1])))

    def score(self, vectors: Any) -> np.ndarray:
        """Scores ``s`` of gradient vectors ``(..., 4)`` (array or tensor) as float64 numpy."""
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().cpu().numpy()
        return (np.asarray(vectors, dtype=np.float64) - self.mean) @ self.axis

    def classify(self, scores: Any) -> np.ndarray:
        """Classes 1..K of scores: class k holds ``t_(k-1) < s <= t_k``."""
        return np.searchsorted(self.thresholds, np.asarray(scores, dtype=np.float64), side='left') + 1

    def position(self, scores: Any) -> np.ndarray:
        """Continuous difficulty in [0, 1]: class boundaries at k/K, linear in between, clipped at the ends."""
        lo, hi = self.score_range
        knots = np.concatenate([[lo], self.thresholds, [hi]])
        levels = np.linspace(0., 1., len(knots))
        knots = np.maximum.accumulate(knots)  # np.interp needs non-decreasing knots
        return np.interp(np.asarray(scores, dtype=np.float64), knots, levels)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers: fits a JSON file and a ``weights_only`` checkpoint."""
        data = {
            'kind': self.kind,
            'mean': [float(v) for v in self.mean],
            'axis': [float(v) for v in self.axis],
            'thresholds': [float(v) for v in self.thresholds],
            'score_range': [float(v) for v in self.score_range],
            'version': int(self.version),
        }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'DifficultyProjection':
        """Inverse of :meth:`to_dict`, refusing malformed or other-version data with a ``ValueError``. (Class errors
        that older checkpoints keep in this entry are read by :mod:`wbsr_models.routing.artefacts`.)"""
        try:
            kind = str(data['kind'])
            mean = np.asarray(data['mean'], dtype=np.float64)
            axis = np.asarray(data['axis'], dtype=np.float64)
            thresholds = np.asarray(data['thresholds'], dtype=np.float64).reshape(-1)
            lo, hi = (float(v) for v in data['score_range'])
            version = int(data['version'])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f'malformed difficulty projection ({exc!r})') from None
        if version != DIFFICULTY_VERSION:
            raise ValueError(f'difficulty projection version {version}, this code computes version '
                             f'{DIFFICULTY_VERSION}: rebuild the index or retrain')
        if kind not in PROJECTIONS or mean.shape != (4, ) or axis.shape != (4, ):
            raise ValueError(f'malformed difficulty projection (kind={kind!r}, mean {mean.shape}, axis {axis.shape})')
        if not (np.all(np.isfinite(thresholds)) and np.all(np.diff(thresholds) >= 0)):
            raise ValueError('difficulty thresholds must be finite and ascending')
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(axis)) and np.any(axis != 0)):
            raise ValueError('the difficulty projection\'s mean and axis must be finite, the axis not zero')
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f'the difficulty score range must be finite and ordered, got ({lo}, {hi})')
        return cls(kind=kind, mean=mean, axis=axis, thresholds=thresholds, score_range=(lo, hi), version=version)
