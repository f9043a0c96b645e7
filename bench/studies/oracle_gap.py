"""Where the oracle gap goes: how well the difficulty signal predicts what a larger subnet buys, on training images.

    python bench/studies/oracle_gap.py --model checkpoints/wbsr_srresnet_x4_train291.pth [--predictor net_pred.pth]
        [--data datasets] [--out DIR]

Everything here is measured on the 291-image training pool (``datasets/train291``), never on the test sets:

1. Every subnet runs on every pool image (the seamless tile scheme: each subnet on the whole image) and every
   32x32 tile's squared error is recorded with its difficulty score and class (:mod:`wbsr_models.calibrate`).
2. Diagnosis: Spearman's rho between the score and the PSNR gain of the largest subnet over the smallest; the
   mean gain per class and subnet; a plot of gain vs score.
3. Allocation at equal FLOPs, from the tiles' measured errors (the image's squared error is the sum of its tiles'
   errors under the subnets they get: seams between tiles of different subnets are left out here, the routing
   benchmark measures them): Eq. 15; the budget rule (positions); the class-calibrated greedy
   (``mode: calibrated``); signals from LR pixels (multi-scale gradient statistics, variance, Laplacian energy)
   as parameter-free scores and through a small learned predictor of each subnet's error (ridge regression on the
   features, fitted on the pool minus its validation split, evaluated on the validation split); with
   ``--predictor``, the learned mode's error predictor (its FLOPs included); and the per-tile oracle. Each at the
   same budgets: mean PSNR over the images, the share of the gap between the budget rule and the oracle that it
   closes, and the FLOPs at -0.05 dB read through the trimmed mean of the per-image losses (:func:`trimmed_loss`).

Writes ``oracle_gap.md``, ``oracle_gap.json`` and ``gain_vs_score.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn import functional as F

from wbsr_data.difficulty import gradient_vectors, luminance
from wbsr_models.calibrate import RegionRecords, gains_db, measure_regions
from wbsr_models.evaluation import load_test_set
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions, budget_subnets, calibrated_subnets, eq15_subnets
from wbsr_models.routing.allocation import tradeoff_subnets
from wbsr_models.routing.predictor import QUALITY_TRIM

BUDGETS = tuple(round(b, 2) for b in np.arange(0.25, 1.001, 0.05))
SHOWN = (0.4, 0.5, 0.6, 0.7, 0.8)
WITHIN_DB = 0.05


def tile_features(router: Router, images) -> np.ndarray:
    """Cheap LR features per tile, in the order of :func:`measure_regions`: the paper's gradient vector, the same
    at half resolution, the luminance variance and the mean absolute Laplacian (ARM's edge score)."""
    from wbsr_models.baselines import edge_scores
    rows = []
    for image in images:
        regions = router.regions(router.prepare(image.lq))

        def features(crops: torch.Tensor) -> np.ndarray:
            g1 = gradient_vectors(crops)
            g2 = gradient_vectors(F.avg_pool2d(crops, 2)) if min(crops.shape[2:]) >= 6 else torch.zeros_like(g1)
            y = luminance(crops)
            var = y.flatten(1).var(dim=1, unbiased=False)[:, None]
            lap = torch.as_tensor(edge_scores(crops), dtype=g1.dtype)[:, None]
            return torch.cat([g1, g2, var, lap], 1).cpu().numpy()
        rows.append(regions.per_region(features))
    return np.concatenate(rows)


def image_psnrs(records: RegionRecords, chosen: np.ndarray) -> np.ndarray:
    """Per image (in order of its index), the PSNR of the tiles' summed squared error under the chosen subnets."""
    err = records.area * records.mse[np.arange(len(chosen)), chosen]
    return np.array([10 * np.log10(records.area[records.image == n].sum() / err[records.image == n].sum())
                     for n in np.unique(records.image)])


def image_psnr(records: RegionRecords, chosen: np.ndarray) -> float:
    """Mean over images of the PSNR of the tiles' summed squared error under the chosen subnets."""
    return float(np.mean(image_psnrs(records, chosen)))


def trimmed_loss(records: RegionRecords, chosen: np.ndarray) -> float:
    """Per image, the PSNR lost against the full network (tile errors summed), averaged over the images with the
    lowest and the highest :data:`QUALITY_TRIM` share left out: one pool image where the full network is 3.1 dB
    worse than a smaller subnet moves the plain mean of the 29-image validation split by up to 0.1 dB."""
    from scipy.stats import trim_mean
    full = np.full(len(chosen), records.mse.shape[1] - 1)
    return float(trim_mean(image_psnrs(records, full) - image_psnrs(records, chosen), QUALITY_TRIM))


def per_image(records: RegionRecords, costs: np.ndarray, rule: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply an allocation ``rule(rows)`` image by image (budgets are per image)."""
    chosen = np.zeros(len(records.image), dtype=np.int64)
    for n in np.unique(records.image):
        rows = np.flatnonzero(records.image == n)
        chosen[rows] = rule(rows)
    return chosen


def oracle_for_budget(records: RegionRecords, costs: np.ndarray, budget: float) -> np.ndarray:
    """Per image, the allocation that removes the most squared error for the budget, knowing every tile's error
    (the greedy of :func:`calibrated_subnets` with each tile's own errors as its 'class')."""
    def rule(rows):
        mse = records.mse[rows]
        return calibrated_subnets(np.arange(1, len(rows) + 1), np.zeros(len(rows)), costs[rows], mse,
                                  records.area[rows], budget)
    return per_image(records, costs, rule)


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression with standardised inputs; returns (mean, scale, weights incl. bias)."""
    from sklearn.linear_model import Ridge
    mean, scale = x.mean(0), x.std(0) + 1e-12
    model = Ridge(alpha=alpha).fit((x - mean) / scale, y)
    return mean, scale, np.vstack([model.coef_.T, model.intercept_[None]])


def boosted_errors(logx: np.ndarray, mse: np.ndarray, train: np.ndarray, return_models: bool = False):
    """Each subnet's error predicted from the log features by gradient-boosted trees fitted on ``train`` rows: the
    smallest subnet's log error, and every other subnet's log error ratio to it (or the fitted models)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    logm = np.log(np.maximum(mse, 1e-12))
    models = [HistGradientBoostingRegressor(max_iter=200, random_state=0).fit(logx[train], logm[train, 0])]
    for j in range(1, mse.shape[1]):
        models.append(HistGradientBoostingRegressor(max_iter=200, random_state=0).fit(
            logx[train], logm[train, j] - logm[train, 0]))
    return models if return_models else boosted_predict(models, logx)


def boosted_predict(models: list, logx: np.ndarray) -> np.ndarray:
    base = models[0].predict(logx)
    return np.exp(np.stack([base] + [base + model.predict(logx) for model in models[1:]], axis=1))


def ridge_predict(params, x: np.ndarray) -> np.ndarray:
    mean, scale, weights = params
    return np.hstack([(x - mean) / scale, np.ones((len(x), 1))]) @ weights


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--out', default='bench_out/oracle_gap')
    parser.add_argument('--images', type=int, default=None, help='first N pool images only (a quick look)')
    parser.add_argument('--tile-size', type=int, default=32)
    parser.add_argument('--predictor', default=None,
                        help='a checkpoint of the same network with an error predictor (wbsr-calibrate --predictor, '
                        'fitted with every 10th pool image held out): its allocation is one more row')
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    os.makedirs(args.out, exist_ok=True)
    net, scale, projection, _ = load_model(args.model)
    images = load_test_set(os.path.join(args.data, 'train291'), scale, limit=args.images)
    router = Router(net, RoutingOptions(scheme='tiles', tile_size=args.tile_size), scale, projection)
    cache = os.path.join(args.out, 'records.npz')
    m = net.num_subnets
    if os.path.isfile(cache):  # the network runs are the slow part: reuse them
        with np.load(cache) as data:
            records = RegionRecords(**{k: data[k] for k in ('image', 'area', 'vectors', 'scores', 'classes', 'mse')})
            feats, costs = data['features'], data['costs']
    else:
        records = measure_regions(router, images)
        feats = tile_features(router, images)
        costs = np.zeros((len(records.image), m))
        for n, image in enumerate(images):
            regions = router.regions(router.prepare(image.lq))
            costs[records.image == n] = regions.costs(router.costs)
        np.savez(cache, features=feats, costs=costs, **records.__dict__)
    gain = 10 * np.log10(records.mse[:, :1] / np.maximum(records.mse, 1e-12))  # dB over the smallest, per tile
    from scipy.stats import spearmanr
    report: dict = {'images': len(images), 'tiles': int(len(gain)), 'tile_size': args.tile_size}
    rho = spearmanr(records.scores, gain[:, -1])
    report['spearman_score_vs_gain_largest'] = float(rho.statistic)
    report['spearman_features'] = {name: float(spearmanr(feats[:, i], gain[:, -1]).statistic) for i, name in enumerate(
        ['mean|gx|', 'std|gx|', 'mean|gy|', 'std|gy|', 'mean|gx| /2', 'std|gx| /2', 'mean|gy| /2', 'std|gy| /2',
         'variance', 'laplacian'])}
    k = projection.num_classes
    class_mse = records.class_mse(k)
    report['class_gain_db'] = gains_db(class_mse).tolist()
    report['class_tiles'] = [int((records.classes == c).sum()) for c in range(1, k + 1)]

    # allocations at equal budgets
    val = np.isin(records.image, np.arange(len(images))[::10])  # the validation split's images
    train = ~val
    position = projection.position(records.scores)
    train_class_mse = _subset(records, train).class_mse(k)  # measured without the validation split's tiles
    rules: dict[str, Callable[[float], np.ndarray]] = {
        'budget rule (positions)': lambda b: per_image(
            records, costs, lambda r: budget_subnets(position[r], costs[r], b)),
        'calibrated (class errors)': lambda b: per_image(records, costs, lambda r: calibrated_subnets(
            records.classes[r], position[r], costs[r], train_class_mse, records.area[r], b)),
        'oracle (every tile\'s error)': lambda b: oracle_for_budget(records, costs, b),
    }
    # signals: parameter-free scores (rank tiles; budget rule on their within-pool quantile position) ...
    for i, name in ((9, 'laplacian'), (8, 'variance')):
        ranks = np.searchsorted(np.sort(feats[train, i]), feats[:, i]) / max(1, train.sum())
        rules[f'budget rule on {name}'] = (lambda b, ranks=ranks: per_image(
            records, costs, lambda r: budget_subnets(ranks[r], costs[r], b)))
    # ... and a learned predictor of each subnet's log error from all features, fitted on the training part
    logx = np.log(np.maximum(feats, 1e-8))
    params = ridge_fit(logx[train], np.log(np.maximum(records.mse[train], 1e-12)))
    predicted = np.exp(ridge_predict(params, logx))
    rules['learned (ridge on 10 features)'] = lambda b: per_image(records, costs, lambda r: calibrated_subnets(
        np.arange(1, len(r) + 1), position[r], costs[r], predicted[r], records.area[r], b))
    # meant as an upper bound of what LR-only routing reaches: gradient-boosted trees per subnet (not shippable: a tree
    # ensemble cannot be stored without pickle, so it is measured, not offered)
    boosted = boosted_errors(logx, records.mse, train)
    rules['learned (boosted trees)'] = lambda b: per_image(records, costs, lambda r: calibrated_subnets(
        np.arange(1, len(r) + 1), position[r], costs[r], boosted[r], records.area[r], b))
    paid: dict[str, float] = {}  # FLOPs a rule spends beyond its subnets'
    if args.predictor:  # the learned mode's allocation, its predictor's FLOPs paid from the budget as the router does
        predictor = load_model(args.predictor).routing.predictor
        if predictor is None:
            raise SystemExit(f'--predictor {args.predictor}: the checkpoint has no error predictor')
        errors = np.zeros_like(records.mse)
        overhead = np.zeros(len(records.image))  # the predictor's FLOPs per tile (its share of the image's)
        for n, image in enumerate(images):
            lq = router.prepare(image.lq)
            boxes = router.regions(lq).boxes
            rows = records.image == n
            errors[rows] = predictor.predict(lq, boxes)
            overhead[rows] = predictor.flops(lq.shape[-2:], len(boxes)) / len(boxes)
        paid['learned (error predictor)'] = float(overhead.sum())
        rules['learned (error predictor)'] = lambda b: per_image(records, costs, lambda r: tradeoff_subnets(
            records.area[r, None] * errors[r], costs[r], limit_cost=b * costs[r, -1].sum() - overhead[r].sum()))
    eq15 = eq15_subnets(records.classes, k, m)
    table = {'Eq. 15': {'flops': float(costs[np.arange(len(eq15)), eq15].sum() / costs[:, -1].sum()),
                        'psnr_val': image_psnr(_subset(records, val), eq15[val]),
                        'loss_val_trimmed': trimmed_loss(_subset(records, val), eq15[val]),
                        'psnr_all': image_psnr(records, eq15)}}
    for name, rule in rules.items():
        table[name] = {}
        for b in BUDGETS:
            chosen = rule(b)
            spent = costs[np.arange(len(chosen)), chosen].sum() + paid.get(name, 0.)
            table[name][b] = {'flops': float(spent / costs[:, -1].sum()),
                              'psnr_val': image_psnr(_subset(records, val), chosen[val]),
                              'loss_val_trimmed': trimmed_loss(_subset(records, val), chosen[val]),
                              'psnr_all': image_psnr(records, chosen)}
        print(name, {b: round(v['psnr_val'], 3) for b, v in table[name].items()}, flush=True)
    report['allocations'] = table
    full = np.full(len(eq15), m - 1)
    report['full_psnr'] = {'val': image_psnr(_subset(records, val), full[val]), 'all': image_psnr(records, full)}
    lines = [f"# Where the oracle gap goes\n\nModel `{args.model}`, {len(images)} pool images, {len(gain)} tiles of "
             f"{args.tile_size}x{args.tile_size} LR. Spearman's rho between the difficulty score and the PSNR gain "
             f"of the largest subnet over the smallest: {report['spearman_score_vs_gain_largest']:.3f}.\n",
             '| feature | rho with the gain |', '|---|---|']
    lines += [f'| {n} | {v:.3f} |' for n, v in report['spearman_features'].items()]
    lines += ['', '| class | tiles | ' + ' | '.join(f'{w}/{d}' for w, d in net.subnets) + ' |',
              '|---|---|' + '---|' * m]
    for c in range(k):
        lines.append(f"| {c + 1} | {report['class_tiles'][c]} | " + ' | '.join(
            f'{g:.2f}' for g in report['class_gain_db'][c]) + ' |')
    target = report['full_psnr']['val'] - WITHIN_DB
    point = {name: flops_at(table[name], target) for name in rules}
    report[f'flops_within_{WITHIN_DB}dB_val'] = point
    trimmed = {name: flops_at(table[name], -WITHIN_DB, 'loss_val_trimmed', sign=-1) for name in rules}
    report[f'flops_within_{WITHIN_DB}dB_val_trimmed'] = trimmed
    base, best = point['budget rule (positions)'], point["oracle (every tile's error)"]
    lines += ['', 'Validation split (every 10th pool image; the class errors and the learned predictors are fitted on '
              f"the others): PSNR "
              f"(dB, tile errors summed per image; full network {report['full_psnr']['val']:.3f}) at each budget "
              f"(FLOPs share of the full network), and the FLOPs needed to come within {WITHIN_DB} dB of the full "
              'network (interpolated along each curve):', '',
              '| allocation | ' + ' | '.join(f'budget {b}' for b in SHOWN) + f' | FLOPs at -{WITHIN_DB} dB | '
              'share of the gap to the oracle closed | FLOPs at -0.05 dB, trimmed mean of the per-image losses |',
              '|---|' + '---|' * (len(SHOWN) + 3)]
    for name in rules:
        closed = (base - point[name]) / max(1e-9, base - best)
        cells = ' | '.join(f"{table[name][b]['psnr_val']:.3f} ({100 * table[name][b]['flops']:.0f}%)" for b in SHOWN)
        lines.append(f'| {name} | {cells} | {100 * point[name]:.1f}% | {100 * closed:.0f}% | '
                     f'{100 * trimmed[name]:.1f}% |')
    lines.append(f"| Eq. 15 | {table['Eq. 15']['psnr_val']:.3f} ({100 * table['Eq. 15']['flops']:.0f}%) |")
    with open(os.path.join(args.out, 'oracle_gap.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(args.out, 'oracle_gap.json'), 'w') as f:
        json.dump(report, f, indent=1)
    plot(records.scores, gain, os.path.join(args.out, 'gain_vs_score.png'), net.subnets)
    print('\n'.join(lines))
    return 0


def flops_at(curve: dict, target: float, key: str = 'psnr_val', sign: float = 1.0) -> float:
    """FLOPs share at which a (budget -> flops, value) curve first reaches ``target`` of ``sign * value`` (PSNR; with
    ``sign=-1`` a loss) (interpolated; 1 if never)."""
    points = sorted((v['flops'], sign * v[key]) for v in curve.values())
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if p0 >= target:
            return f0
        if p1 >= target:
            return f0 + (f1 - f0) * (target - p0) / max(1e-12, p1 - p0)
    return points[-1][0] if points[-1][1] >= target else 1.0


def _subset(records: RegionRecords, rows: np.ndarray) -> RegionRecords:
    return RegionRecords(image=records.image[rows], area=records.area[rows], vectors=records.vectors[rows],
                         scores=records.scores[rows], classes=records.classes[rows], mse=records.mse[rows])


def plot(scores: np.ndarray, gain: np.ndarray, path: str, subnets) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ax.scatter(scores, gain[:, -1], s=2, alpha=0.25, color='#4c72b0', label='largest subnet, per tile')
    order = np.argsort(scores)
    bins = np.array_split(order, 20)
    ax.plot([scores[b].mean() for b in bins], [gain[b, -1].mean() for b in bins], '-o', color='#c44e52', ms=4,
            label='mean in 20 equal-count bins')
    w, d = subnets[len(subnets) // 2]
    ax.plot([scores[b].mean() for b in bins], [gain[b, len(subnets) // 2].mean() for b in bins], '-s',
            color='#55a868', ms=4, label=f'middle subnet (w{w} d{d}), bin means')
    ax.set_xlabel('difficulty score (gradient projection)')
    ax.set_ylabel('PSNR gain over the smallest subnet (dB)')
    ax.set_ylim(-0.5, max(3.0, float(np.percentile(gain[:, -1], 99))))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title('What a larger subnet buys, per 32x32 LR tile of the training pool')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
