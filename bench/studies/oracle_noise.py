"""How much of the per-tile oracle's lead any router could reach: the oracle choosing on half of each tile's pixels.

    python bench/studies/oracle_noise.py --model checkpoints/wbsr_srresnet_x4_train291.pth [--data datasets] [--out DIR]

The oracle of ``bench/studies/oracle_gap.py`` picks each tile's subnet from that tile's own errors and is scored on
the same pixels, so part of its lead is selection on the errors' noise: no predictor, however good, can know which
subnet happens to land closer to the ground truth on these very pixels. Here every tile's pixels are split into two
interleaved halves (a checkerboard of 8x8 HR blocks): an allocation that uses errors chooses on one half and is scored
on the other (both ways, the two PSNRs averaged), beside the oracle that chooses and is scored on the same half. The
rules are those of ``bench/studies/oracle_gap.py`` on the 291-image training pool (never the test sets), at the same
budgets, per image: the budget rule, the calibrated allocation (class errors from the choosing half), and the per-tile
oracle.

Writes ``oracle_noise.md`` and ``oracle_noise.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from wbsr_data.difficulty import gradient_vectors, luminance
from wbsr_models.calibrate import RegionRecords
from wbsr_models.evaluation import gt_tensor
from wbsr_models.evaluation import load_test_set
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions, budget_subnets, calibrated_subnets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_gap import BUDGETS, SHOWN, WITHIN_DB, flops_at, image_psnr, oracle_for_budget, per_image  # noqa: E402

BLOCK = 8  # HR pixels per side of the checkerboard's squares


def half_errors(router: Router, images) -> dict[str, np.ndarray]:
    """Per tile (the router's tiles, row-major, images in order): summed squared error (Y, [0, 1]) of every subnet
    on each half of its HR pixels, the halves' pixel counts, the tile's image, LR area, score and FLOPs per subnet."""
    net, s = router.net, router.scale
    out: dict[str, list] = {k: [] for k in ('image', 'area', 'scores', 'costs', 'sum_a', 'sum_b', 'n_a', 'n_b')}
    for n, image in enumerate(tqdm(images, desc='subnets on pool images', unit='img', disable=None)):
        lq = router.prepare(image.lq)
        regions = router.regions(lq)
        gt_y = luminance(gt_tensor(image).clamp(0, 1))
        h, w = lq.shape[2] * s, lq.shape[3] * s
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
        half_a = ((ii // BLOCK + jj // BLOCK) % 2 == 0).double()
        sums = np.zeros((2, len(regions.boxes), net.num_subnets))
        with torch.no_grad():
            for k in range(net.num_subnets):
                err = (luminance(net(lq, subnet=k).clamp(0, 1)) - gt_y[..., :h, :w]).pow(2)[0, 0].double()
                for i, (top, left, bh, bw) in enumerate(regions.boxes.tolist()):
                    box = (slice(top * s, (top + bh) * s), slice(left * s, (left + bw) * s))
                    total, in_a = float(err[box].sum()), float((err[box] * half_a[box]).sum())
                    sums[:, i, k] = in_a, total - in_a
        counts = np.array([[float(half_a[top * s:(top + bh) * s, left * s:(left + bw) * s].sum()), bh * bw * s * s]
                           for top, left, bh, bw in regions.boxes.tolist()])
        out['image'].append(np.full(len(regions.boxes), n))
        out['area'].append((regions.boxes[:, 2] * regions.boxes[:, 3]).astype(np.float64))
        out['scores'].append(router.projection.score(
            regions.per_region(lambda crops: gradient_vectors(crops).cpu().numpy())))
        out['costs'].append(regions.costs(router.costs))
        out['sum_a'].append(sums[0])
        out['sum_b'].append(sums[1])
        out['n_a'].append(counts[:, 0])
        out['n_b'].append(counts[:, 1] - counts[:, 0])
    return {k: np.concatenate(v) for k, v in out.items()}


def half_records(data: dict, half: str, classes: np.ndarray) -> RegionRecords:
    """The tiles as :class:`RegionRecords` whose errors and areas are those of one half of their pixels."""
    count = data[f'n_{half}']
    return RegionRecords(image=data['image'], area=count, vectors=np.zeros((len(count), 4)), scores=data['scores'],
                         classes=classes, mse=data[f'sum_{half}'] / count[:, None])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--out', default='bench_out/oracle_noise')
    parser.add_argument('--images', type=int, default=None, help='first N pool images only (a quick look)')
    parser.add_argument('--tile-size', type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    os.makedirs(args.out, exist_ok=True)
    net, scale, projection, _ = load_model(args.model)
    router = Router(net, RoutingOptions(scheme='tiles', tile_size=args.tile_size), scale, projection)
    cache = os.path.join(args.out, 'halves.npz')
    if os.path.isfile(cache):
        with np.load(cache) as f:
            data = {k: f[k] for k in f.files}
    else:
        data = half_errors(router, load_test_set(os.path.join(args.data, 'train291'), scale, limit=args.images))
        np.savez(cache, **data)
    # a tile at the image's edge that lies inside one checkerboard square has no pixel in the other half: left out
    both = (data['n_a'] > 0) & (data['n_b'] > 0)
    left_out = {'tiles': int((~both).sum()), 'lr_pixels': float(data['area'][~both].sum())}
    data = {k: v[both] for k, v in data.items()}
    k, costs = projection.num_classes, data['costs']
    classes, position = projection.classify(data['scores']), projection.position(data['scores'])
    halves = {h: half_records(data, h, classes) for h in ('a', 'b')}
    flops = lambda chosen: float(costs[np.arange(len(chosen)), chosen].sum() / costs[:, -1].sum())  # noqa: E731

    def choose(rule: str, on: RegionRecords, budget: float) -> np.ndarray:
        if rule == 'budget rule (positions)':
            return per_image(on, costs, lambda r: budget_subnets(position[r], costs[r], budget))
        if rule == 'calibrated (class errors of the choosing half)':
            table = on.class_mse(k)
            return per_image(on, costs, lambda r: calibrated_subnets(classes[r], position[r], costs[r], table,
                                                                      on.area[r], budget))
        return oracle_for_budget(on, costs, budget)

    rows = {'budget rule (positions)': 'other', 'calibrated (class errors of the choosing half)': 'other',
            'oracle, chooses on the other half': 'other', 'oracle, chooses on the scored half (in-sample)': 'same'}
    table: dict = {}
    for name, which in rows.items():
        rule = 'oracle' if name.startswith('oracle') else name
        table[name] = {}
        for b in BUDGETS:
            psnrs, shares = [], []
            for chooser, scored in (('a', 'b'), ('b', 'a')):
                chosen = choose(rule, halves[chooser if which == 'other' else scored], b)
                psnrs.append(image_psnr(halves[scored], chosen))
                shares.append(flops(chosen))
            table[name][b] = {'flops': float(np.mean(shares)), 'psnr_val': float(np.mean(psnrs))}
        print(name, {b: round(v['psnr_val'], 3) for b, v in table[name].items()}, flush=True)
    full = np.full(len(classes), net.num_subnets - 1)
    full_psnr = float(np.mean([image_psnr(halves[h], full) for h in ('a', 'b')]))
    target = full_psnr - WITHIN_DB
    point = {name: flops_at(table[name], target) for name in rows}
    report = {'images': int(len(np.unique(data['image']))), 'tiles': int(len(classes)), 'left_out': left_out,
              'block': BLOCK, 'full_psnr': full_psnr, 'allocations': table, f'flops_within_{WITHIN_DB}dB': point}
    honest = point['oracle, chooses on the other half']
    in_sample = point['oracle, chooses on the scored half (in-sample)']
    calibrated = point['calibrated (class errors of the choosing half)']
    lines = [f"# How much of the oracle's lead is reachable\n\nModel `{args.model}`, {report['images']} pool images, "
             f"{report['tiles']} tiles of {args.tile_size}x{args.tile_size} LR (left out: {left_out['tiles']} edge "
             f"tiles of {left_out['lr_pixels']:.0f} LR pixels in all, inside one square); each tile's HR pixels split "
             f'into two halves (checkerboard of {BLOCK}x{BLOCK} squares). PSNR (dB) on the scored half, tile errors '
             f'summed per image, mean of the two directions (full network {full_psnr:.3f}), at each budget (FLOPs '
             f'share of the full network), and the FLOPs needed to come within {WITHIN_DB} dB of the full network '
             '(interpolated):', '',
             '| allocation | ' + ' | '.join(f'budget {b}' for b in SHOWN) + f' | FLOPs at -{WITHIN_DB} dB |',
             '|---|' + '---|' * (len(SHOWN) + 1)]
    for name in rows:
        cells = ' | '.join(f"{table[name][b]['psnr_val']:.3f} ({100 * table[name][b]['flops']:.0f}%)" for b in SHOWN)
        lines.append(f'| {name} | {cells} | {100 * point[name]:.1f}% |')
    lead = calibrated - in_sample
    lines += ['', f'The in-sample oracle needs {100 * lead:.1f} points of FLOPs fewer than the calibrated allocation; '
              f'choosing on the other half it keeps {100 * (calibrated - honest):.1f} of them '
              f"({100 * (calibrated - honest) / max(lead, 1e-9):.0f}%): the rest is selection on the errors' noise, "
              'which no router can reach.']
    with open(os.path.join(args.out, 'oracle_noise.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(args.out, 'oracle_noise.json'), 'w') as f:
        json.dump(report, f, indent=1)
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
