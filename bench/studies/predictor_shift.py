"""Does the learned mode's error predictor see a test set as it sees the pool? Its log error ratios against measured ones.

    python bench/studies/predictor_shift.py --model net_pred.pth [--data datasets] [--sets Urban100] [--every 5]

A diagnosis, not a fit: nothing here is chosen or stored. For every 32x32 tile of the pool's held-out images (every
10th image of ``train291``, the images the predictor did not learn from) and of every ``--every``-th image of each
set in ``--sets``, every subnet runs once on the whole image (as ``wbsr-calibrate`` does), and its log error ratio
to the full network is compared with the predictor's. The quality target (``max_loss``) keeps the requested loss only
where those ratios are right on average: a predictor that expects the smaller subnets to lose less than they do
routes too many tiles to them. Beside it, the calibrated mode's class table (each tile's class's measured ratios)
as a predictor of the same ratios. Means are over images, each image's tiles weighted by their share of its
full-network squared error: the weight those tiles have in the image's PSNR, and every image counts alike, as in a
set's mean PSNR.

Writes ``predictor_shift.md`` and ``predictor_shift.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from wbsr_models.evaluation import gt_tensor, load_test_set
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions
from wbsr_models.routing.predictor import error_maps, region_mse


def log_ratios(router: Router, images) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per tile of ``images``: predicted, measured and class-table (the calibrated mode's class errors, where the
    checkpoint has them; else NaN) log error ratios ``(n, M - 1)`` of every subnet to the full network, and the tile's
    tile's share of its image's full-network squared error (its weight)."""
    predictor, table = router.predictor, router.class_errors
    predicted, measured, by_class, weight = [], [], [], []
    for image in tqdm(images, desc='images', unit='img', disable=None):
        lq = router.prepare(image.lq)
        regions = router.regions(lq)
        boxes = regions.boxes
        maps = error_maps(lambda x, m: router._whole(x, m).output, router.num_subnets, router.scale, lq,
                          gt_tensor(image))
        truth = region_mse(maps, boxes)
        guess = predictor.predict(lq, boxes)
        predicted.append(np.log(guess[:, :-1] / guess[:, -1:]))
        if table is not None:
            rows = np.asarray(table.class_mse)[router.classify(regions)[0] - 1]
            by_class.append(np.log(rows[:, :-1] / rows[:, -1:]))
        else:
            by_class.append(np.full_like(predicted[-1], np.nan))
        measured.append(np.log(truth[:, :-1] / truth[:, -1:]))
        sse = truth[:, -1] * boxes[:, 2] * boxes[:, 3]
        weight.append(sse / sse.sum())  # the tile's share of its image's error: every image counts alike
    return np.concatenate(predicted), np.concatenate(measured), np.concatenate(by_class), np.concatenate(weight)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True,
                        help='a checkpoint with an error predictor (wbsr-calibrate --predictor)')
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--sets', nargs='+', default=['Urban100'])
    parser.add_argument('--every', type=int, default=5, help='every N-th image of each set')
    parser.add_argument('--out', default='bench_out/predictor_shift')
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    os.makedirs(args.out, exist_ok=True)
    net, scale, projection, routing = load_model(args.model)
    if routing.predictor is None:
        raise SystemExit(f'--model {args.model}: the checkpoint has no error predictor')
    router = Router(net, RoutingOptions(mode='learned', budget=0.5), scale, projection, routing=routing)
    val_every = int((routing.predictor.fit_info.get('options') or {}).get('val_every', 10))
    groups = {'pool, held-out images': load_test_set(os.path.join(args.data, 'train291'), scale)[::val_every]}
    groups.update({name: load_test_set(os.path.join(args.data, name), scale)[::args.every] for name in args.sets})
    names = [f'w{w} d{d}' for w, d in net.subnets[:-1]]
    report, lines = {}, []
    for group, images in groups.items():
        predicted, measured, by_class, weight = log_ratios(router, images)
        w = weight / weight.sum()
        entry = {'images': len(images), 'tiles': int(len(w)),
                 'measured': (w @ measured).tolist(), 'predicted': (w @ predicted).tolist(),
                 'shortfall': (w @ (predicted - measured)).tolist(),
                 'rms': np.sqrt(w @ (predicted - measured) ** 2).tolist(),
                 'rms_class_table': np.sqrt(w @ (by_class - measured) ** 2).tolist()}
        report[group] = entry
        lines += [f"## {group}: {entry['images']} images, {entry['tiles']} tiles\n",
                  '| | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
        for key, label in (('measured', 'measured log ratio'), ('predicted', 'predicted log ratio'),
                           ('shortfall', 'predicted - measured'), ('rms', 'rms of predicted - measured'),
                           ('rms_class_table', 'rms of class table - measured')):
            lines.append(f'| {label} | ' + ' | '.join(f'{v:.3f}' for v in entry[key]) + ' |')
        lines.append('')
    text = (f'# The error predictor on the pool and on test sets\n\nModel `{args.model}`. Log ratio of each subnet\'s '
            'squared error to the full network\'s per 32x32 tile; mean over the images, each image\'s tiles weighted '
            'by their share of its full-network squared error.\n\n' + '\n'.join(lines))
    with open(os.path.join(args.out, 'predictor_shift.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(args.out, 'predictor_shift.json'), 'w') as f:
        json.dump(report, f, indent=1)
    print(text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
