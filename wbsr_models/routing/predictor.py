"""A per-region error predictor learnt from the supernet's own errors (the ``learned`` routing mode).

:class:`ErrorPredictor` predicts, for every routing region (tile or patch) of an LR image, the mean squared error
per pixel (Y channel, [0, 1]) that each subnet would leave there. A small convolutional trunk (four 3x3
convolutions, strides 1, 2, 2, 2) runs once over the whole LR image, reflect-padded by :data:`CONTEXT` pixels, so
every region sees its neighbours; its cells (one per 8 x 8 LR pixels) are pooled per region (mean and max) and a
two-layer head gives the full network's log error and every other subnet's log error ratio to it. On the default
32 x 32 tile its cost is well under 1% of the full network's, and it is counted in every routed cost.

Labels come from :func:`error_maps`: every subnet run once on a whole training image (in each of the 8
flips/rotations asked for), its squared-error map summed per LR pixel. :func:`fit_predictor` cuts training
tiles from those maps at every grid offset (``stride``), and holds out every ``val_every``-th image for the
choices it reports (Spearman's rho of predicted and measured gains). Parameters are stored as tensors in the
checkpoint (:meth:`ErrorPredictor.to_dict`), never pickled objects.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: LR pixels of context around every region (reflect padding at the image border); the trunk's receptive field
#: reaches 15 pixels, so a region's cells are the same whether computed on a crop or on the whole image.
CONTEXT = 16
#: LR pixels per trunk cell (the trunk's total stride).
CELL = 8
PREDICTOR_FORMAT = 1
#: Fraction of the held-out images with the lowest, and of those with the highest, measured loss that
#: :func:`quality_map` leaves out of its mean at every threshold. A few images decide a plain mean: on one of the 29
#: held-out pool images the full network is 3.1 dB worse than the w52 d8 subnet (22.53 dB), routing there gains
#: 2.1-3.0 dB, and that one image moved the plain mean by -0.08 to -0.11 dB at every threshold from 0.04 dB up (the
#: requested 0.05 dB then gave 0.15-0.34 dB on the test sets).
QUALITY_TRIM = 0.1


class ErrorPredictor(nn.Module):
    """Predicts every subnet's mean squared error per pixel on each routing region of an LR image.

    Args:
        num_subnets: Subnets of the supernet (outputs per region).
        width: Channels of the first trunk layers (the last two have twice as many). Default: 32.
        hidden: Units of the head's hidden layer. Default: 64.
    """

    def __init__(self, *, num_subnets: int, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        if num_subnets < 1 or width < 1 or hidden < 1:
            raise ValueError(f'num_subnets, width and hidden must be >= 1, got {num_subnets}, {width}, {hidden}')
        self.num_subnets, self.width, self.hidden = int(num_subnets), int(width), int(hidden)
        w = self.width
        self.convs = nn.ModuleList([nn.Conv2d(3, w, 3, padding=1), nn.Conv2d(w, w, 3, stride=2, padding=1),
                                    nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
                                    nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)])
        self.fc1 = nn.Linear(4 * w, hidden)
        self.fc2 = nn.Linear(hidden, num_subnets)

    # ---- network ------------------------------------------------------------------------------------
    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Cells ``(N, 2w, ceil(H/8), ceil(W/8))`` of an RGB batch in [0, 1] (already padded by the caller)."""
        x = x - 0.5
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
        return x

    def head(self, cells: torch.Tensor) -> torch.Tensor:
        """Log errors ``(n, M)`` from each region's cells ``(n, 2w, rows, cols)``: column ``M - 1`` the full
        network's log mean squared error, column ``m < M - 1`` subnet m's log ratio to it."""
        pooled = torch.cat([cells.mean(dim=(2, 3)), cells.amax(dim=(2, 3))], 1)
        return self.fc2(F.leaky_relu(self.fc1(pooled), 0.1))

    @staticmethod
    def to_errors(logits: torch.Tensor) -> torch.Tensor:
        """Mean squared errors per pixel ``(n, M)`` from :meth:`head`'s output."""
        full = logits[:, -1:]
        ratios = torch.cat([logits[:, :-1], torch.zeros_like(full)], 1)
        return torch.exp(full + ratios)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Training form: crops ``(N, 3, h + 2 CONTEXT, w + 2 CONTEXT)``, each region in the middle; returns
        :meth:`head`'s log errors."""
        cells = self.trunk(crops)
        a = CONTEXT // CELL
        rows, cols = -(-(crops.shape[2] - 2 * CONTEXT) // CELL), -(-(crops.shape[3] - 2 * CONTEXT) // CELL)
        return self.head(cells[:, :, a:a + rows, a:a + cols])

    def cells(self, lq: torch.Tensor, max_pixels: int = 1 << 20) -> torch.Tensor:
        """The trunk's cells ``(C, rows, cols)`` of one LR image ``(1, 3, H, W)`` in [0, 1], padded by :data:`CONTEXT`.

        Large images run in bands of cell rows, each with :data:`CONTEXT` pixels of margin (the trunk's receptive
        field is 17 pixels, so a cell two cells away from a band's edge is exact): the same cells, in bounded memory
        (the first layer alone would take ``width`` floats per pixel)."""
        x = pad_context(lq.to(self.fc1.weight.dtype))
        height, width = x.shape[-2:]
        rows = -(-height // CELL)
        step = max(1, max_pixels // (width * CELL) - 2 * (CONTEXT // CELL))  # cell rows kept per band
        if step >= rows:
            return self.trunk(x)[0]
        margin = CONTEXT // CELL
        bands = []
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            a, b = max(0, r0 - margin), min(rows, r1 + margin)
            band = self.trunk(x[:, :, a * CELL:b * CELL])[0]
            bands.append(band[:, r0 - a:r0 - a + (r1 - r0)])
        return torch.cat(bands, 1)

    @torch.no_grad()
    def predict(self, lq: torch.Tensor, boxes: np.ndarray, max_pixels: int = 1 << 20) -> np.ndarray:
        """Predicted mean squared error per pixel ``(n, M)`` of every subnet on each region ``(top, left, height,
        width)`` (LR pixels) of one LR image ``(1, 3, H, W)`` in [0, 1] (``max_pixels``: see :meth:`cells`)."""
        cells = self.cells(lq, max_pixels)
        a = CONTEXT // CELL
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        r0, c0 = boxes[:, 0] // CELL, boxes[:, 1] // CELL
        r1, c1 = -(-(boxes[:, 0] + boxes[:, 2]) // CELL), -(-(boxes[:, 1] + boxes[:, 3]) // CELL)
        out = torch.empty(len(boxes), self.num_subnets, dtype=torch.float64)
        shapes = np.stack([r1 - r0, c1 - c0], 1)
        for nr, nc in np.unique(shapes, axis=0).tolist():  # regions of one cell shape: one gather, one head call
            sel = np.flatnonzero((shapes[:, 0] == nr) & (shapes[:, 1] == nc))
            rows = torch.as_tensor(a + r0[sel, None] + np.arange(nr)[None], device=cells.device)
            cols = torch.as_tensor(a + c0[sel, None] + np.arange(nc)[None], device=cells.device)
            windows = cells[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)  # (k, C, nr, nc)
            out[torch.as_tensor(sel)] = self.to_errors(self.head(windows)).double().cpu()
        return out.numpy()

    def _trunk_flops(self, h: int, w: int) -> int:
        total = 0
        for conv in self.convs:
            s = conv.stride[0]
            h, w = -(-h // s), -(-w // s)
            total += 2 * h * w * conv.out_channels * conv.in_channels * 9
        return total

    def flops(self, lr_hw: Sequence[int], num_regions: int, max_pixels: int = 1 << 20) -> int:
        """FLOPs of :meth:`predict` on an LR image of ``lr_hw`` with ``num_regions`` regions (2 x multiply-
        accumulates of the convolutions and linear layers, as ``FlopCounterMode`` counts them; the bands' margins
        of large images included)."""
        height, width = (int(v) + 2 * CONTEXT for v in lr_hw)
        rows = -(-height // CELL)
        step = max(1, max_pixels // (width * CELL) - 2 * (CONTEXT // CELL))
        if step >= rows:
            total = self._trunk_flops(height, width)
        else:
            margin, total = CONTEXT // CELL, 0
            for r0 in range(0, rows, step):
                a, b = max(0, r0 - margin), min(rows, min(rows, r0 + step) + margin)
                total += self._trunk_flops(min(height, b * CELL) - a * CELL, width)
        total += 2 * num_regions * (self.fc1.in_features * self.fc1.out_features +
                                    self.fc2.in_features * self.fc2.out_features)
        return int(total)

    # ---- storage ------------------------------------------------------------------------------------
    def to_dict(self, fit: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """The checkpoint form: sizes, the parameters as tensors, and how it was fitted (JSON-able)."""
        return {'format': PREDICTOR_FORMAT, 'num_subnets': self.num_subnets, 'width': self.width,
                'hidden': self.hidden, 'context': CONTEXT, 'cell': CELL,
                'state': {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
                'quality': {'requested': [float(v) for v in self.quality[0]],
                            'internal': [float(v) for v in self.quality[1]]},
                'fit': dict(fit or {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'ErrorPredictor':
        """The predictor stored by :meth:`to_dict`; a damaged entry raises ``ValueError`` saying what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError('the predictor entry is not a mapping')
        if data.get('format') != PREDICTOR_FORMAT:
            raise ValueError(f"predictor format {data.get('format')!r} is not {PREDICTOR_FORMAT}")
        if data.get('context') != CONTEXT or data.get('cell') != CELL:
            raise ValueError(f"the predictor was made for context {data.get('context')} and cell {data.get('cell')}, "
                             f'this version uses {CONTEXT} and {CELL}')
        sizes = {}
        for key in ('num_subnets', 'width', 'hidden'):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                raise ValueError(f'predictor {key} must be an integer in 1..4096, got {value!r}')
            sizes[key] = value
        state = data.get('state')
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError('the predictor has no state dict of tensors')
        predictor = cls(**sizes)
        expected = predictor.state_dict()
        if set(state) != set(expected) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items()):
            raise ValueError('the predictor\'s parameters do not match its sizes')
        if not all(torch.isfinite(v).all() for v in state.values()):
            raise ValueError('the predictor has parameters that are not finite')
        predictor.load_state_dict({k: v.float() for k, v in state.items()})
        predictor.fit_info = dict(data.get('fit') or {})
        quality = data.get('quality') or {}
        try:
            requested = tuple(float(v) for v in quality.get('requested', ()))
            internal = tuple(float(v) for v in quality.get('internal', ()))
        except (TypeError, ValueError, AttributeError):
            raise ValueError('the predictor\'s quality map is not two lists of numbers') from None
        if (len(requested) != len(internal) or not all(map(math.isfinite, requested + internal)) or
                any(b <= a for a, b in zip(requested, requested[1:])) or any(b < a for a, b in zip(internal,
                                                                                              internal[1:]))):
            raise ValueError('the predictor\'s quality map must be two finite lists of one length, ascending')
        predictor.quality = (requested, internal)
        return predictor.eval()

    fit_info: dict = {}
    #: ``(requested, internal)`` dB pairs, ascending: the predicted-loss threshold at which the held-out images lost,
    #: on average, the requested PSNR (:func:`quality_map`); empty: the requested loss is used as it is.
    quality: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())

    def quality_threshold(self, requested_db: float) -> float:
        """The predicted-loss threshold (dB) that gives ``requested_db`` of measured loss (see :attr:`quality`)."""
        requested, internal = self.quality
        if not requested:
            return float(requested_db)
        return float(np.interp(requested_db, requested, internal))

    def quality_estimate(self, predicted_db: float) -> float:
        """The loss (dB) the held-out images measured at a predicted loss of ``predicted_db``: the inverse of
        :meth:`quality_threshold`, what a routed image is expected to lose."""
        requested, internal = self.quality
        if not requested:
            return float(predicted_db)
        return float(np.interp(predicted_db, internal, requested))


def pad_context(lq: torch.Tensor) -> torch.Tensor:
    """An LR batch padded by :data:`CONTEXT` pixels: reflected, or repeated where the image is too small."""
    h, w = lq.shape[-2:]
    mode = 'reflect' if min(h, w) > CONTEXT else 'replicate'
    return F.pad(lq, (CONTEXT,) * 4, mode=mode)


# ---- labels -----------------------------------------------------------------------------------------------
def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the last two dimensions: ``k % 4`` quarter turns, then a flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


@dataclass
class ErrorMaps:
    """A training image (in one flip/rotation) and every subnet's squared error summed per LR pixel."""

    image: int  # index of the training image
    transform: int  # 0..7, :func:`dihedral`
    lq: np.ndarray  # (3, h, w) uint8 RGB
    errors: np.ndarray  # (M, h, w) float32: Y squared error ([0, 1] range), mean over each LR pixel's s x s block


def error_maps(run_subnet: Callable[[torch.Tensor, int], torch.Tensor], num_subnets: int, scale: int,
               lq: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """Every subnet's squared-error map (Y channel of the clamped output against ``gt``, [0, 1] range), averaged over
    each LR pixel's ``scale x scale`` output pixels: ``(M, h, w)`` float32, so that a region's mean squared error per
    output pixel is the mean of its map. ``run_subnet(x, m)`` is subnet m on the whole image."""
    from wbsr_data.difficulty import luminance
    _, _, h, w = lq.shape
    target = luminance(gt[:, :, :h * scale, :w * scale].clamp(0, 1))
    maps = np.empty((num_subnets, h, w), dtype=np.float32)
    with torch.no_grad():
        for m in range(num_subnets):
            err = (luminance(run_subnet(lq, m).clamp(0, 1)) - target).pow(2)[0, 0]
            maps[m] = err.view(h, scale, w, scale).double().mean(dim=(1, 3)).cpu().numpy()
    return maps


def region_mse(errors: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Every subnet's mean squared error per pixel on each region ``(top, left, height, width)`` (LR pixels) of an
    image's :func:`error_maps` ``(M, h, w)``: ``(n, M)`` float64."""
    return np.stack([errors[:, t:t + h, lf:lf + w].mean(axis=(1, 2), dtype=np.float64)
                     for t, lf, h, w in np.asarray(boxes).tolist()])


# ---- fitting ------------------------------------------------------------------------------------------------
@dataclass
class FitOptions:
    """How :func:`fit_predictor` trains (the defaults are what the reference checkpoint's predictor used).

    Attributes:
        width: Trunk width of the predictor.
        tile: Side of the training regions (LR pixels): the routing tile size, a multiple of 8.
        stride: Step between the training tiles of an image (LR pixels, a multiple of 8, so that tiles and cells align
            as at test time): every such offset of the tile grid is a training tile.
        epochs: Passes over the training images.
        images_per_step: Images whose losses are summed per optimiser step.
        lr: Adam's learning rate (cosine to zero).
        ratio_weight: Weight of the log-ratio outputs' loss against the full network's log error.
        augment: Also flip/rotate each training image at random (its error maps with it: labels of a flipped image
            taken as the flipped labels, an approximation; measured flips/rotations are exact).
        weighting: ``uniform`` (every tile alike) or ``error`` (each tile's loss weighed by its full-network error
            relative to its image's mean: the tiles that hold an image's error decide its allocation).
        val_every: Every ``val_every``-th image (0, val_every, ...) is held out for validation (0: none).
        seed: Seed of initialisation and shuffling.
        time_limit: Seconds after which training stops at the end of an epoch (the cosine schedule is then cut short).
    """

    width: int = 32
    tile: int = 32
    stride: int = 8
    epochs: int = 12
    images_per_step: int = 4
    lr: float = 2e-3
    ratio_weight: float = 1.0
    augment: bool = True
    weighting: str = 'error'
    val_every: int = 10
    seed: int = 0
    time_limit: Optional[float] = None

    def __post_init__(self) -> None:
        if self.tile % CELL or self.stride % CELL or self.tile < CELL or self.stride < CELL:
            raise ValueError(f'tile and stride must be positive multiples of {CELL}, got {self.tile} and {self.stride}')
        if self.weighting not in ('uniform', 'error'):
            raise ValueError(f"weighting must be 'uniform' or 'error', got {self.weighting!r}")


def log_targets(mse: torch.Tensor) -> torch.Tensor:
    """:meth:`ErrorPredictor.head`'s targets from mean squared errors ``(..., M)``: every subnet's log ratio to the full
    network, and the full network's log error in the last column."""
    log = torch.log(mse.clamp_min(1e-12)).float()
    return torch.cat([log[..., :-1] - log[..., -1:], log[..., -1:]], -1)


def image_tiles(predictor: ErrorPredictor, lq: torch.Tensor, errors: torch.Tensor, tile: int,
                stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-error predictions and targets ``(n, M)`` of every full ``tile`` at every ``stride`` offset of one image:
    the trunk runs once on the whole (padded) image, as in :meth:`ErrorPredictor.predict`. ``lq`` ``(1, 3, h, w)`` in
    [0, 1], ``errors`` ``(M, h, w)``."""
    h, w = lq.shape[-2:]
    rows, cols = (h - tile) // stride + 1, (w - tile) // stride + 1
    cells = predictor.trunk(pad_context(lq))
    a, k, s = CONTEXT // CELL, tile // CELL, stride // CELL
    cells = cells[:, :, a:a + (rows - 1) * s + k, a:a + (cols - 1) * s + k]
    pooled = torch.cat([F.avg_pool2d(cells, k, s), F.max_pool2d(cells, k, s)], 1)  # (1, 4w, rows, cols)
    logits = predictor.fc2(F.leaky_relu(predictor.fc1(pooled[0].flatten(1).t()), 0.1))
    mse = F.avg_pool2d(errors[None, :, :(rows - 1) * stride + tile, :(cols - 1) * stride + tile].float(), tile,
                       stride)[0]
    return logits, log_targets(mse.flatten(1).t())


def fit_predictor(maps: Sequence[ErrorMaps], num_subnets: int, options: FitOptions = FitOptions(),
                  progress: Optional[Callable[[str], None]] = None) -> tuple[ErrorPredictor, dict]:
    """Train an :class:`ErrorPredictor` on the training images' error maps; returns it and a JSON-able report
    (sizes, seconds, the loss per epoch, and Spearman's rho on the held-out images, see :func:`validation_report`).

    Every step runs the trunk once on each of ``images_per_step`` whole training images and fits every full tile at
    every ``stride`` offset (the smooth L1 loss of each output, scaled by its spread over the training tiles)."""
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    val = {m.image for m in maps if options.val_every and m.image % options.val_every == 0}
    train = [m for m in maps if m.image not in val and min(m.lq.shape[1:]) >= options.tile]
    if not train:
        raise ValueError(f'no training image: every image is held out or smaller than the tile size {options.tile}')
    images = [torch.from_numpy(m.lq)[None].float() / 255. for m in train]
    errors = [torch.from_numpy(m.errors) for m in train]
    # each output's spread over the training tiles (the full network's log error varies far more than the ratios)
    sample = torch.cat([log_targets(F.avg_pool2d(e[None].double(), options.tile, options.stride)[0].flatten(1).t())
                        for e in errors])
    mean, spread = sample.mean(0), sample.std(0).clamp_min(1e-6)
    predictor = ErrorPredictor(num_subnets=num_subnets, width=options.width)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=options.lr)
    steps = options.epochs * math.ceil(len(train) / options.images_per_step)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    weights = torch.full((num_subnets,), float(options.ratio_weight))
    weights[-1] = 1.0
    generator = torch.Generator().manual_seed(options.seed)
    losses = []
    for epoch in range(options.epochs):
        predictor.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total, count = 0., 0
        for i in range(0, len(order), options.images_per_step):
            optimizer.zero_grad()
            step_loss, step_tiles = 0., 0
            for j in order[i:i + options.images_per_step]:
                lq, err = images[j], errors[j]
                if options.augment:
                    k = int(torch.randint(8, (), generator=generator))
                    lq, err = dihedral(lq, k), dihedral(err, k)
                out, target = image_tiles(predictor, lq, err, options.tile, options.stride)
                loss = (weights * F.smooth_l1_loss((out - mean) / spread, (target - mean) / spread,
                                                   reduction='none')).sum(1) / weights.sum()
                if options.weighting == 'error':
                    full = torch.exp(target[:, -1].double())
                    loss = loss * (full / full.mean()).float()
                step_loss = step_loss + loss.sum()
                step_tiles += len(loss)
            (step_loss / step_tiles).backward()
            optimizer.step()
            schedule.step()
            total += float(step_loss.detach())
            count += step_tiles
        losses.append(total / count)
        if progress is not None:
            progress(f'epoch {epoch + 1}/{options.epochs}: loss {losses[-1]:.4f}')
        if options.time_limit is not None and time.perf_counter() - start > options.time_limit:
            break
    predictor.eval()
    report = {'train_images': len({m.image for m in train}), 'val_images': len(val), 'train_maps': len(train),
              'tiles_per_epoch': count, 'epochs': len(losses), 'losses': [round(v, 5) for v in losses],
              'seconds': round(time.perf_counter() - start, 1), 'options': dict(options.__dict__)}
    if val:
        report['validation'] = validation_report(predictor, [m for m in maps if m.image in val and m.transform == 0],
                                                 options.tile)
    return predictor, report


def validation_report(predictor: ErrorPredictor, maps: Sequence[ErrorMaps], tile: int) -> dict:
    """Spearman's rho, on the held-out images' tiles (the routing grid: tiles of ``tile`` from the top left), between
    predicted and measured gain of the full network over the smallest subnet (log error ratio), and the mean over
    subnets of the rho of every subnet's log error ratio to the full network."""
    from scipy.stats import spearmanr
    measured, predicted = [], []
    for item in maps:
        _, h, w = item.lq.shape
        boxes = _grid_boxes(h, w, tile)
        lq = torch.from_numpy(item.lq)[None].float() / 255.
        predicted.append(predictor.predict(lq, boxes))
        measured.append(region_mse(item.errors, boxes))
    measured, predicted = np.concatenate(measured), np.concatenate(predicted)
    log_m, log_p = np.log(np.maximum(measured, 1e-12)), np.log(np.maximum(predicted, 1e-12))
    rho_gain = spearmanr(log_p[:, 0] - log_p[:, -1], log_m[:, 0] - log_m[:, -1])[0]
    rhos = [spearmanr(log_p[:, m] - log_p[:, -1], log_m[:, m] - log_m[:, -1])[0] for m in range(measured.shape[1] - 1)]
    return {'tiles': int(len(measured)), 'spearman_gain': round(float(rho_gain), 4),
            'spearman_ratio_mean': round(float(np.mean(rhos)), 4)}


def _grid_boxes(h: int, w: int, tile: int) -> np.ndarray:
    return np.array([(t, lf, min(tile, h - t), min(tile, w - lf)) for t in range(0, h, tile)
                     for lf in range(0, w, tile)])


def quality_map(predictor: ErrorPredictor, maps: Sequence[ErrorMaps], tile: int, pixel_costs: Sequence[float],
                internal: Sequence[float] = tuple(np.round(np.arange(0.0, 0.601, 0.01), 2)),
                trim: float = QUALITY_TRIM) -> tuple[tuple, tuple]:
    """How the quality target is kept on the held-out images: for every threshold of predicted loss (dB) in
    ``internal``, the measured loss of the cheapest allocations within it (``max_loss``'s search, every image of
    ``maps`` on its routing grid, FLOPs priced by ``pixel_costs`` per LR pixel of each subnet), averaged over the
    images with the ``trim`` fraction of the lowest and of the highest losses left out (:data:`QUALITY_TRIM`);
    returned as the ``(requested, internal)`` pairs of :attr:`ErrorPredictor.quality` (the measured curve made
    increasing)."""
    from scipy.stats import trim_mean
    from .allocation import tradeoff_subnets
    if not 0 <= trim < 0.5:
        raise ValueError(f'trim must be in [0, 0.5), got {trim}')
    losses = np.zeros((max(1, len(maps)), len(internal)))
    for n, item in enumerate(maps):
        _, h, w = item.lq.shape
        boxes = _grid_boxes(h, w, tile)
        area = (boxes[:, 2] * boxes[:, 3]).astype(np.float64)
        predicted = predictor.predict(torch.from_numpy(item.lq)[None].float() / 255., boxes) * area[:, None]
        truth = region_mse(item.errors, boxes) * area[:, None]
        costs = np.outer(area, np.asarray(pixel_costs, dtype=np.float64))
        rows = np.arange(len(boxes))
        for j, db in enumerate(internal):
            chosen = tradeoff_subnets(predicted, costs, limit_error=predicted[:, -1].sum() * 10 ** (db / 10))
            losses[n, j] = 10 * np.log10(truth[rows, chosen].sum() / truth[:, -1].sum())
    return increasing_pairs(trim_mean(losses, trim, axis=0), internal)


def increasing_pairs(measured: Sequence[float], internal: Sequence[float]) -> tuple[tuple, tuple]:
    """``(requested, internal)`` pairs from the loss ``measured`` at each threshold of ``internal``: the measured
    curve made non-decreasing, rounded to 1e-6 dB, and only the first threshold kept of each rounded value, so that
    ``requested`` strictly ascends (as :meth:`ErrorPredictor.from_dict` requires)."""
    requested, kept = [], []
    for db, loss in zip(internal, np.maximum.accumulate(np.asarray(measured, dtype=np.float64))):
        value = round(float(loss), 6)
        if not requested or value > requested[-1]:
            requested.append(value)
            kept.append(float(db))
    return tuple(requested), tuple(kept)
