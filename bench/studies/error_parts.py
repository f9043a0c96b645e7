"""Which part of the predicted errors costs the learned mode its FLOPs on the training pool: the level or the ratios.

    python bench/studies/error_parts.py --model checkpoints/wbsr_srresnet_x4_train291.pth [--data datasets/train291]
        [--maps pool_maps.npz] [--folds 5] [--seed 0] [--weighting error] [--out bench/results]

A region's mean squared error under subnet ``m`` is its **level** (the full network's error there) times its **ratio**
(subnet ``m``'s error over the full network's). The allocation of an image's FLOPs depends on both: the level says
how much error a region holds, the ratios how much of it a larger subnet removes. Each factor is taken from one of
three sources:

- ``measured``: the region's own errors (both measured: the per-tile oracle);
- ``class table``: its class's mean errors, ``wbsr-calibrate``'s table fitted on the other folds (both: the
  calibrated allocation's errors);
- ``predictor``: the error predictor (``fit_predictor`` with the reference options) fitted on the other folds'
  images (both: the learned mode's errors).

Every pairing is allocated with the learned mode's rules (``tradeoff_subnets`` under a budget per image,
``slope_subnets`` at one slope for the set) and scored as in ``pool_folds.py``: the FLOPs share where the mean PSNR
loss against the full network first reaches 0.05 dB, with the lowest and highest 10% of the images left out. The
report also gives each source's error in the two factors: the rms of the log level within an image (each image's
mean log level removed, every region alike) and the rms of the log ratios (regions weighted by their share of their
image's error, as in ``pool_folds.py``).

Writes ``error_parts.md`` and ``error_parts.json`` under ``--out``.
"""
from __future__ import annotations

import time

import numpy as np

from pool_folds import (BUDGETS, SLOPES, load_pool, mean_of, pct, pool_parser, points, pooled_table,
                        write_report)
from wbsr_models.router import Router
from wbsr_models.routing.allocation import slope_subnets, tradeoff_subnets
from wbsr_models.routing.predictor import QUALITY_TRIM, FitOptions, fit_predictor

#: Where a factor comes from, and the key of a tile record that holds that source's ``(n, M)`` errors.
SOURCES = {'measured': 'mse', 'class table': 'table', 'predictor': 'predicted'}


def combined(tile: dict, level: str, ratio: str) -> np.ndarray:
    """``(n, M)`` errors: the level of source ``level`` times the ratios of source ``ratio``."""
    lv, rt = tile[SOURCES[level]], tile[SOURCES[ratio]]
    return lv[:, -1:] * rt / rt[:, -1:]


def score_parts(test: list[dict]) -> dict:
    """The trimmed 0.05-dB points of every (level, ratio) pairing on one fold's tile records."""
    out = {}
    for level in SOURCES:
        for ratio in SOURCES:
            def err(t):
                return combined(t, level, ratio) * t['area'][:, None]

            budget = points(test, lambda t, b: tradeoff_subnets(err(t), t['costs'],
                                                                limit_cost=b * t['costs'][:, -1].sum()), BUDGETS)
            slope = points(test, lambda t, v: slope_subnets(err(t), t['costs'], v), SLOPES)
            out[f'{level} x {ratio}'] = {'budget per image': budget['trimmed'], 'one slope': slope['trimmed']}
    return out


def factor_errors(test: list[dict]) -> dict:
    """Per source: rms of the log level within images, and the error-weighted rms of the log ratios."""
    out = {}
    for source, key in SOURCES.items():
        level, ratio, weight = [], [], []
        for t in test:
            true = np.log(np.maximum(t['mse'], 1e-12))
            est = np.log(np.maximum(t[key], 1e-12))
            d = est[:, -1] - true[:, -1]
            level.append(d - d.mean())
            ratio.append((est[:, :-1] - est[:, -1:]) - (true[:, :-1] - true[:, -1:]))
            share = t['area'] * t['mse'][:, -1]
            weight.append(share / share.sum() / len(test))
        ratio_all, weight_all = np.concatenate(ratio), np.concatenate(weight)
        out[source] = {'level_rms': float(np.sqrt(np.mean(np.concatenate(level) ** 2))),
                       'ratio_rms': float(np.sqrt((weight_all[:, None] * ratio_all ** 2).sum(0).mean()))}
    return out


def run_folds(router: Router, maps, tiles: list[dict], folds: int, num_classes: int, options: FitOptions,
              log) -> list[dict]:
    rows = []
    for fold in range(folds):
        train = {n for n in range(len(tiles)) if n % folds != fold}
        start = time.perf_counter()
        predictor, _ = fit_predictor([m for m in maps if m.image in train], router.num_subnets, options)
        fit_s = time.perf_counter() - start
        table = pooled_table([tiles[n] for n in sorted(train)], num_classes)
        test = [dict(tiles[n], table=table[tiles[n]['classes'] - 1],
                     predicted=predictor.predict(tiles[n]['lq'], tiles[n]['boxes']))
                for n in range(len(tiles)) if n % folds == fold]
        row = {'fold': fold, 'fit_s': round(fit_s, 1), 'points': score_parts(test), 'factors': factor_errors(test)}
        rows.append(row)
        log(f"fold {fold}: {row['points']}")
    return rows


def report(rows: list[dict], folds: int, images: int) -> list[str]:
    md = ['# Error parts: which factor of the predicted errors costs FLOPs', '',
          f'{images} pool images, {folds} folds (image index mod {folds}); each fold scored with the class table and '
          'the error predictor fitted on the other folds. A region\'s errors = level (the full network\'s error) x '
          'ratios (each subnet\'s error over the full network\'s), each factor from one source. FLOPs share where the '
          f'mean loss first reaches 0.05 dB, the lowest and highest {int(100 * QUALITY_TRIM)}% of the images left '
          'out, mean over the folds; allocated like the learned mode (`tradeoff_subnets` per image, `slope_subnets` '
          'for one slope).', '',
          '| level from | ratios from | budget per image | one slope |', '|---|---|---|---|']
    for name in rows[0]['points']:
        level, ratio = name.split(' x ')
        md.append(f'| {level} | {ratio} | ' + ' | '.join(
            pct(mean_of(r['points'][name][k] for r in rows)) for k in ('budget per image', 'one slope')) + ' |')
    md += ['', '| source | log level rms within an image | log-ratio rms (error-weighted) |', '|---|---|---|']
    for source in SOURCES:
        md.append(f'| {source} | ' + ' | '.join(
            f"{np.mean([r['factors'][source][k] for r in rows]):.3f}" for k in ('level_rms', 'ratio_rms')) + ' |')
    return md + ['']


def main(argv=None) -> int:
    parser = pool_parser(__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=FitOptions.epochs, help='the predictor\'s passes over its images')
    parser.add_argument('--seed', type=int, default=FitOptions.seed, help='the predictor\'s initialisation and order')
    parser.add_argument('--weighting', choices=('error', 'uniform'), default=FitOptions.weighting,
                        help='the predictor\'s tile weights (FitOptions.weighting)')
    args = parser.parse_args(argv)
    if args.folds < 2 or args.epochs < 1:
        parser.error('--folds must be >= 2 and --epochs >= 1')
    router, maps, tiles, num_classes = load_pool(parser, args)
    options = FitOptions(epochs=args.epochs, val_every=0, seed=args.seed, weighting=args.weighting)
    rows = run_folds(router, maps, tiles, args.folds, num_classes, options, print)
    write_report(args.out, 'error_parts', {'images': len(tiles), 'folds': args.folds, 'rows': rows},
                 report(rows, args.folds, len(tiles)), argv)
    return 0

if __name__ == '__main__':
    raise SystemExit(main())
