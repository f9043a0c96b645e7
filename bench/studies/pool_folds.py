"""Two routing questions answered on the training pool by 5-fold cross-validation (no test set is looked at).

    python bench/studies/pool_folds.py --model checkpoints/wbsr_srresnet_x4_train291.pth [--data datasets/train291]
        [--maps pool_maps.npz] [--folds 5] [--fractions 0.125 0.25 0.5 1] [--out bench/results]

Every subnet runs once on each whole pool image (``wbsr-calibrate``'s error maps; ``--maps`` keeps them in a file
and reads them from it the next time). Each fold of images (index mod ``--folds``) is scored with what is fitted on
the other folds. Scores are the benchmark's: the mean over images of the PSNR loss against the full network (plain,
and with the lowest and highest 10% of the images left out), and the mean over images of each image's FLOPs as a
share of the whole-image full network's; a curve's point is the FLOPs share where its loss first reaches 0.05 dB.

1. **A budget per image or one slope for the set.** The calibrated allocation (class errors from the other folds) and
   the per-tile oracle (each tile's own errors), each once under a budget per image (``calibrated_subnets``) and once
   at one slope for all images (``slope_subnets``, ``val.routing.slope``).
2. **Would more training images help the learned mode?** The error predictor (``fit_predictor``, the reference
   options) and the class table are fitted on the first ``fraction`` of the other folds' images (a fixed random
   order per fold, the optimiser steps held equal), and scored on the fold under a budget per image: the 0.05-dB
   point, Spearman's rho of predicted and measured gain of the full network over the smallest subnet, and the rms
   error of every subnet's log error ratio to the full network (tiles weighted by their share of their image's
   error).

Writes ``pool_folds.md`` and ``pool_folds.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr, trim_mean

from wbsr_models.calibrate import class_table, transformed_maps
from wbsr_models.evaluation import load_test_set
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions
from wbsr_models.routing.allocation import calibrated_subnets, slope_subnets, tradeoff_subnets
from wbsr_models.routing.predictor import QUALITY_TRIM, ErrorMaps, FitOptions, fit_predictor, region_mse

BUDGETS = tuple(np.round(np.arange(0.25, 0.951, 0.025), 3))
SLOPES = tuple(np.geomspace(1e-4, 0.3, 100))
TARGET_DB = 0.05


def pool_maps(router: Router, data: str, cache: str | None) -> list[ErrorMaps]:
    """Every pool image's error maps (transform 0), from ``cache`` when it holds them, else measured (and written)."""
    if cache and os.path.isfile(cache):
        with np.load(cache, allow_pickle=False) as z:
            count = int(z['count'])
            return [ErrorMaps(n, 0, z[f'lq_{n}'], z[f'err_{n}']) for n in range(count)]
    images = load_test_set(data, router.scale)
    maps = transformed_maps(router, images, [0])
    if cache:
        tmp = cache + '.tmp.npz'
        np.savez(tmp, count=len(maps), **{f'lq_{m.image}': m.lq for m in maps},
                 **{f'err_{m.image}': m.errors for m in maps})
        os.replace(tmp, cache)
    return maps


def tile_table(router: Router, maps: list[ErrorMaps]) -> list[dict]:
    """Per image: its routing tiles' areas, costs, classes, positions and measured mean squared errors."""
    out = []
    for m in maps:
        lq = torch.from_numpy(m.lq)[None].float() / 255.
        regions = router.regions(lq)
        classes, position, _ = router.classify(regions)
        boxes = regions.boxes
        out.append({'lq': lq, 'boxes': boxes, 'area': (boxes[:, 2] * boxes[:, 3]).astype(np.float64),
                    'costs': regions.costs(router.costs).astype(np.float64), 'classes': classes, 'position': position,
                    'mse': region_mse(m.errors, boxes), 'whole': float(router.costs(lq.shape[-2:])[-1])})
    return out


def pooled_table(tiles: list[dict], num_classes: int) -> np.ndarray:
    """The class errors (``wbsr-calibrate``'s table) of the tiles of ``tiles``' images."""
    return class_table(np.concatenate([t['classes'] for t in tiles]), np.concatenate([t['area'] for t in tiles]),
                       np.concatenate([t['mse'] for t in tiles]), num_classes)


def score(tiles: list[dict], chosen: list[np.ndarray], extra: list[float] | None = None) -> tuple[float, float, float]:
    """(mean FLOPs share, trimmed mean loss, plain mean loss) of an allocation of every image's tiles."""
    shares, losses = [], []
    for n, (t, c) in enumerate(zip(tiles, chosen)):
        rows = np.arange(len(c))
        shares.append((t['costs'][rows, c].sum() + (extra[n] if extra else 0.)) / t['whole'])
        losses.append(10 * np.log10((t['area'] * t['mse'][rows, c]).sum() / (t['area'] * t['mse'][:, -1]).sum()))
    return float(np.mean(shares)), float(trim_mean(losses, QUALITY_TRIM)), float(np.mean(losses))


def point(curve: list[tuple[float, float]]) -> float | None:
    """FLOPs share where a (share, loss) curve, in order of share, first comes within :data:`TARGET_DB`."""
    curve = sorted(curve)
    if curve[0][1] <= TARGET_DB:
        return curve[0][0]
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l0 > TARGET_DB >= l1:
            return s0 + (l0 - TARGET_DB) / (l0 - l1) * (s1 - s0)
    return None


def points(tiles: list[dict], allocate, sweep, extra=None) -> dict:
    scored = [score(tiles, [allocate(t, v) for t in tiles], extra) for v in sweep]
    return {'trimmed': point([(s, t) for s, t, _ in scored]), 'plain': point([(s, p) for s, _, p in scored])}


def budget_vs_slope(tiles: list[dict], folds: int, num_classes: int) -> dict:
    results: dict = {}
    for fold in range(folds):
        test = [t for n, t in enumerate(tiles) if n % folds == fold]
        table = pooled_table([t for n, t in enumerate(tiles) if n % folds != fold], num_classes)
        errors = {'calibrated': lambda t: table[t['classes'] - 1], 'oracle': lambda t: t['mse']}
        for name, err in errors.items():
            per_image = points(test, lambda t, b: calibrated_subnets(np.arange(1, len(t['area']) + 1), t['position'],
                                                                     t['costs'], err(t), t['area'], b), BUDGETS)
            slope = points(test, lambda t, v: slope_subnets(err(t) * t['area'][:, None], t['costs'], v), SLOPES)
            results.setdefault(name, []).append({'fold': fold, 'budget per image': per_image, 'one slope': slope})
    return results


def learning_curve(router: Router, maps: list[ErrorMaps], tiles: list[dict], folds: int, fractions, num_classes: int,
                   oracle: list[dict], log) -> list[dict]:
    """``oracle``: :func:`budget_vs_slope`'s oracle rows (the per-image budget points of every fold)."""
    rows = []
    for fold in range(folds):
        test = [n for n in range(len(tiles)) if n % folds == fold]
        pool = np.random.default_rng(fold).permutation([n for n in range(len(tiles)) if n % folds != fold])
        log_m = np.log(np.maximum(np.concatenate([tiles[n]['mse'] for n in test]), 1e-12))
        weight = np.concatenate([tiles[n]['area'] * tiles[n]['mse'][:, -1] /
                                 (tiles[n]['area'] * tiles[n]['mse'][:, -1]).sum() for n in test]) / len(test)
        gain = log_m[:, 0] - log_m[:, -1]

        def ratio_rms(log_p: np.ndarray) -> float:
            diff = (log_p[:, :-1] - log_p[:, -1:]) - (log_m[:, :-1] - log_m[:, -1:])
            return float(np.sqrt((weight[:, None] * diff ** 2).sum(0).mean()))

        for fraction in fractions:
            subset = set(pool[:max(4, int(round(fraction * len(pool))))].tolist())
            start = time.perf_counter()
            options = FitOptions(epochs=max(12, int(round(12 / fraction))), val_every=0)
            predictor, _ = fit_predictor([m for m in maps if m.image in subset], router.num_subnets, options)
            fit_s = time.perf_counter() - start
            table = pooled_table([tiles[n] for n in sorted(subset)], num_classes)
            test_tiles = [dict(tiles[n], predicted=predictor.predict(tiles[n]['lq'], tiles[n]['boxes']),
                               overhead=predictor.flops(tiles[n]['lq'].shape[-2:], len(tiles[n]['boxes'])))
                          for n in test]
            predicted = [t['predicted'] for t in test_tiles]
            overhead = [t['overhead'] for t in test_tiles]

            def learned(t, b):
                return tradeoff_subnets(t['predicted'] * t['area'][:, None], t['costs'],
                                        limit_cost=b * t['costs'][:, -1].sum() - t['overhead'])

            calibrated = points(test_tiles, lambda t, b: calibrated_subnets(
                t['classes'], t['position'], t['costs'], table, t['area'], b), BUDGETS)
            log_p = np.log(np.concatenate(predicted))
            log_c = np.log(np.concatenate([table[t['classes'] - 1] for t in test_tiles]))
            row = {'fold': fold, 'fraction': fraction, 'images': len(subset), 'fit_s': round(fit_s, 1),
                   'learned': points(test_tiles, learned, BUDGETS, overhead), 'calibrated': calibrated,
                   'oracle': oracle[fold]['budget per image'],
                   'spearman_gain': {'learned': float(spearmanr(log_p[:, 0] - log_p[:, -1], gain)[0]),
                                     'calibrated': float(spearmanr(log_c[:, 0] - log_c[:, -1], gain)[0])},
                   'ratio_rms': {'learned': ratio_rms(log_p), 'calibrated': ratio_rms(log_c)}}
            rows.append(row)
            log(f"fold {fold}, {row['images']} images: learned {row['learned']}, calibrated {calibrated}")
    return rows


def mean_of(values) -> float | None:
    """The mean over the folds, or None where a fold's curve never reaches the target (the per-fold figures say so)."""
    values = list(values)
    return None if any(v is None for v in values) else float(np.mean(values))


def pct(value) -> str:
    return '-' if value is None else f'{100 * value:.1f}%'


def report(first: dict, second: list[dict], folds: int, fractions, images: int) -> list[str]:
    md = ['# Pool folds: a budget per image or one slope; the learned mode against the training-pool size', '',
          f'{images} pool images, {folds} folds (image index mod {folds}); each fold scored with what is fitted on the '
          'others. FLOPs: mean over images of the share of the whole-image full network; the point where the mean '
          f'loss first reaches {TARGET_DB} dB (trimmed: the lowest and highest {int(100 * QUALITY_TRIM)}% of the '
          'images left out). Mean over the folds.', '',
          '## A budget per image or one slope for the set', '',
          '| errors | budget per image, trimmed | one slope, trimmed | budget per image, plain | one slope, plain |',
          '|---|---|---|---|---|']
    for name, rows in first.items():
        cells = [pct(mean_of(r[k][m] for r in rows)) for m in ('trimmed', 'plain')
                 for k in ('budget per image', 'one slope')]
        md.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    md += ['', 'Per fold (trimmed): ' + '; '.join(
        f"{name} " + ', '.join(f"{pct(r['budget per image']['trimmed'])} -> {pct(r['one slope']['trimmed'])}"
                               for r in rows) for name, rows in first.items()), '',
           '## The learned mode against the training-pool size (budget per image)', '',
           '| training images | learned, trimmed | calibrated, trimmed | oracle, trimmed | learned, plain | '
           'calibrated, plain | rho of gain, learned / class table | log-ratio rms, learned / class table |',
           '|---|---|---|---|---|---|---|---|']
    for fraction in fractions:
        rows = [r for r in second if r['fraction'] == fraction]
        md.append(f"| {np.mean([r['images'] for r in rows]):.0f} | " + ' | '.join(
            pct(mean_of(r[k][m] for r in rows)) for m, k in (('trimmed', 'learned'), ('trimmed', 'calibrated'),
                                                              ('trimmed', 'oracle'), ('plain', 'learned'),
                                                              ('plain', 'calibrated'))) +
            f" | {np.mean([r['spearman_gain']['learned'] for r in rows]):.3f} / "
            f"{np.mean([r['spearman_gain']['calibrated'] for r in rows]):.3f} | "
            f"{np.mean([r['ratio_rms']['learned'] for r in rows]):.4f} / "
            f"{np.mean([r['ratio_rms']['calibrated'] for r in rows]):.4f} |")
    return md + ['']


def write_report(out: str, name: str, data: dict, md: list[str], argv) -> None:
    """``<name>.json`` and ``<name>.md`` under ``out`` (the report with the study's command line); prints the report."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f'{name}.json'), 'w') as f:
        json.dump(data, f, indent=1)
    md = md[:1] + ['', f'Command: `python bench/studies/{name}.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
                   + '`'] + md[1:]
    with open(os.path.join(out, f'{name}.md'), 'w') as f:
        f.write('\n'.join(md))
    print('\n'.join(md))


def pool_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every pool study takes: the checkpoint, the pool, the error-map cache, the folds, the output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--model', required=True, help='a WBSR checkpoint with difficulty thresholds')
    parser.add_argument('--data', default='datasets/train291', help='the training pool (HR/ and LR_bicubic/X4/)')
    parser.add_argument('--maps', default=None, help='an .npz file that keeps the pool\'s error maps between runs')
    parser.add_argument('--folds', type=int, default=5)
    parser.add_argument('--out', default='bench/results')
    return parser


def load_pool(parser: argparse.ArgumentParser, args) -> tuple[Router, list[ErrorMaps], list[dict], int]:
    """The router of ``--model``, the pool's error maps and tile records, and the number of difficulty classes."""
    loaded = load_model(args.model)
    if loaded.projection is None:
        parser.error(f'--model {args.model} has no difficulty thresholds')
    router = Router(loaded.net, RoutingOptions(), loaded.scale, loaded.projection)
    maps = pool_maps(router, args.data, args.maps)
    return router, maps, tile_table(router, maps), loaded.projection.num_classes


def main(argv=None) -> int:
    parser = pool_parser(__doc__.splitlines()[0])
    parser.add_argument('--fractions', type=float, nargs='+', default=[0.125, 0.25, 0.5, 1.0])
    args = parser.parse_args(argv)
    if args.folds < 2 or not all(0 < f <= 1 for f in args.fractions):
        parser.error('--folds must be >= 2 and every --fractions value in (0, 1]')
    router, maps, tiles, num_classes = load_pool(parser, args)
    first = budget_vs_slope(tiles, args.folds, num_classes)
    second = learning_curve(router, maps, tiles, args.folds, args.fractions, num_classes, first['oracle'], print)
    md = report(first, second, args.folds, args.fractions, len(tiles))
    write_report(args.out, 'pool_folds', {'images': len(tiles), 'folds': args.folds, 'budget_vs_slope': first,
                                          'learning_curve': second}, md, argv)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
