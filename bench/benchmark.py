"""The routing benchmark: every routing on the same weights, x4, in one process.

    python bench/benchmark.py --model checkpoints/wbsr_srresnet_x4_train291.pth [--out bench_out/benchmark]

1. Routing table per test set (Set5, Set14, B100, Urban100 under ``--data``, made by ``wbsr-make-lr``):
   ``full``; each ``fixed`` subnet; ``arm`` (ARM's edge lookup table, built on Set5 + Set14, so it is
   out-of-sample on B100 and Urban100 and in-sample on Set5/Set14); ``wbsr`` (Eq. 15); ``wbsr`` at budgets
   0.5 / 0.6 / 0.7; ``oracle`` (per patch the cheapest subnet within 0.05 dB of the full subnet's patch
   PSNR, chosen with the ground truth). PSNR-Y, SSIM-Y, FLOPs % against the full network on the same
   patches and run once on the whole image, seconds per image.
2. PSNR-vs-FLOPs curves per test set: ``wbsr`` budget sweep, ``arm`` eta sweep, ``oracle`` tolerance
   sweep, fixed subnets.
3. Wall time: median of ``--repeats`` runs per image on the first ``--time-images`` Urban100 images for
   ``full``, ``wbsr`` and the budgets, and the ratio of routed to full time next to the FLOPs ratio.
4. Costs: training iteration time of WBSRModel vs BasicSR's SRModel on the full MSRResNet (same batch),
   HES sampling overhead per batch, index-build and GMM-fit times, peak memory of routed inference on a
   2048x2048 LR input (in a fresh process).
Writes ``benchmark.md``, ``benchmark.json`` and ``curve_<set>.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from wbsr_models.baselines import build_arm_table, oracle_subnets, patch_psnr_table
from wbsr_models.evaluation import TestImage, bicubic_summary, evaluate, load_test_set, run_timed
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions

SETS = ('Set5', 'Set14', 'B100', 'Urban100')
BUDGETS = (0.5, 0.6, 0.7)
CURVE_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ARM_ETAS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
ORACLE_TOLERANCES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)


def oracle_assigner(router: Router, tolerance: float, tables: dict[str, np.ndarray]):
    """``assign_for(image)`` giving the oracle's subnets; per-patch PSNR tables are computed once per image."""
    def assign_for(image: TestImage):
        if image.name not in tables:
            gt = torch.from_numpy(np.ascontiguousarray(image.gt[..., ::-1].transpose(2, 0, 1))).float()[None] / 255.
            tables[image.name] = patch_psnr_table(router, image.lq, gt.to(image.lq.device))[0]
        chosen = oracle_subnets(tables[image.name], tolerance)
        return lambda patches, classes, costs: chosen
    return assign_for


def routing_rows(net, scale, projection, arm_table, images: list[TestImage], tables: dict) -> list[dict]:
    modes = [('full', {'mode': 'full'})]
    modes += [(f'fixed {i} (w{w} d{d})', {'mode': 'fixed', 'subnet': i}) for i, (w, d) in enumerate(net.subnets)]
    modes += [('arm (eta 1.0)', {'mode': 'arm', 'arm_eta': 1.0}), ('wbsr (Eq. 15)', {'mode': 'wbsr'})]
    modes += [(f'wbsr budget {b}', {'mode': 'budget', 'budget': b}) for b in BUDGETS]
    rows = []
    for label, options in modes:
        router = Router(net, RoutingOptions(**options), scale, projection, arm_table)
        rows.append({'mode': label, **evaluate(router, images)})
        print(f"  {label:24s} {rows[-1]['psnr']:.3f} dB  {100 * rows[-1]['ratio_patches']:.1f}% / "
              f"{100 * rows[-1]['ratio_whole']:.1f}%", flush=True)
    router = Router(net, RoutingOptions(mode='wbsr'), scale, projection)
    rows.append({'mode': 'oracle (0.05 dB)',
                 **evaluate(router, images, assign_for=oracle_assigner(router, 0.05, tables))})
    print(f"  {'oracle':24s} {rows[-1]['psnr']:.3f} dB  {100 * rows[-1]['ratio_patches']:.1f}%", flush=True)
    return rows


def curve_points(net, scale, projection, arm_table, images, tables) -> dict[str, list]:
    points: dict[str, list] = {'wbsr': [], 'arm': [], 'oracle': []}
    for b in CURVE_BUDGETS:
        s = evaluate(Router(net, RoutingOptions(mode='budget', budget=b), scale, projection), images)
        points['wbsr'].append((b, s['ratio_patches'], s['ratio_whole'], s['psnr']))
    for eta in ARM_ETAS:
        s = evaluate(Router(net, RoutingOptions(mode='arm', arm_eta=eta), scale, projection, arm_table), images)
        points['arm'].append((eta, s['ratio_patches'], s['ratio_whole'], s['psnr']))
    router = Router(net, RoutingOptions(mode='wbsr'), scale, projection)
    for tol in ORACLE_TOLERANCES:
        s = evaluate(router, images, assign_for=oracle_assigner(router, tol, tables))
        points['oracle'].append((tol, s['ratio_patches'], s['ratio_whole'], s['psnr']))
    return points


def plot_curve(name: str, rows: list[dict], points: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    styles = {'wbsr': ('-o', '#c44e52', 'WBSR, budget sweep'), 'arm': ('-s', '#55a868', 'ARM, eta sweep'),
              'oracle': ('--^', '#8172b2', 'oracle, tolerance sweep')}
    for key, (fmt, color, label) in styles.items():
        pts = sorted(points[key], key=lambda p: p[1])
        ax.plot([100 * p[1] for p in pts], [p[3] for p in pts], fmt, color=color, label=label, ms=4)
    fixed = [r for r in rows if r['mode'].startswith('fixed')]
    ax.plot([100 * r['ratio_patches'] for r in fixed], [r['psnr'] for r in fixed], 'D', color='#777777',
            label='fixed subnets (whole image)', ms=4)
    wbsr = next(r for r in rows if r['mode'] == 'wbsr (Eq. 15)')
    ax.plot(100 * wbsr['ratio_patches'], wbsr['psnr'], '*', color='#c44e52', ms=13, label='WBSR, Eq. 15')
    ax.set_xlabel('FLOPs, % of the full network on the same patches (fixed subnets: on the whole image)')
    ax.set_ylabel('PSNR-Y (dB)')
    ax.set_title(f'{name} x4: PSNR vs FLOPs on the same weights')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wall_time_rows(net, scale, projection, images: list[TestImage], repeats: int) -> list[dict]:
    rows = []
    modes = [('full', {'mode': 'full'}), ('wbsr (Eq. 15)', {'mode': 'wbsr'})]
    modes += [(f'wbsr budget {b}', {'mode': 'budget', 'budget': b}) for b in BUDGETS]
    for label, options in modes:
        router = Router(net, RoutingOptions(**options), scale, projection)
        seconds, ratios = [], []
        for image in images:
            result, s = run_timed(router, image.lq, repeats)
            seconds.append(s)
            ratios.append(result.ratio_whole)
        rows.append({'mode': label, 'seconds': float(np.mean(seconds)), 'ratio_whole': float(np.mean(ratios))})
    for row in rows:
        row['time_vs_full'] = row['seconds'] / rows[0]['seconds']
    return rows


def costs(data: str, repeats: int) -> dict:
    """Training-step time, HES overhead, index build, GMM fit, peak memory at 2048x2048."""
    from basicsr.data import build_dataset
    from basicsr.models.sr_model import SRModel
    from wbsr_data.patch_index import IndexOptions, build_index
    from wbsr_data.pairs import list_pairs
    from wbsr_losses.gmm import fit_gmm
    from wbsr_models.wbsr_model import WBSRModel
    result: dict = {}
    train = {'name': 'train291', 'phase': 'train', 'scale': 4, 'gt_size': 128, 'use_hflip': True, 'use_rot': True,
             'io_backend': {'type': 'disk'}, 'dataroot_gt': os.path.join(data, 'train291', 'HR'),
             'dataroot_lq': os.path.join(data, 'train291', 'LR_bicubic', 'X4'), 'skip_small_images': True}
    with tempfile.TemporaryDirectory() as tmp:
        opt = dict(train, index_cache=tmp)
        start = time.perf_counter()
        build_index(opt, IndexOptions.from_dataset_opt(opt), list_pairs(opt))
        result['index_build_s'] = time.perf_counter() - start
        start = time.perf_counter()
        fit_gmm(train, label_space='rgb', progress=False)
        result['gmm_fit_rgb_s'] = time.perf_counter() - start
        # HES vs BasicSR's PairedImageDataset: seconds to make one batch of 16
        hes = build_dataset(dict(opt, type='HESPairedImageDataset'))
        paired = build_dataset(dict(train, type='PairedImageDataset'))
        kept = {p['gt_path'] for p in hes.index.pairs}  # PairedImageDataset refuses images under gt_size
        usable = [i for i, p in enumerate(paired.paths) if p['gt_path'] in kept]
        for name, ds, indices in (('hes_batch_s', hes, range(len(hes))), ('paired_batch_s', paired, usable)):
            start = time.perf_counter()
            for i in range(16 * repeats):
                ds[indices[(i * 7919) % len(indices)]]
            result[name] = (time.perf_counter() - start) / repeats
        # one training step on the full MSRResNet, same batch, SRModel vs WBSRModel (supernet, flops_squared)
        batch = {'lq': torch.rand(16, 3, 32, 32), 'gt': torch.rand(16, 3, 128, 128)}
        base = {'scale': 4, 'num_gpu': 0, 'dist': False, 'rank': 0, 'world_size': 1, 'is_train': True,
                'manual_seed': 0, 'datasets': {'train': opt},
                'path': {'pretrain_network_g': None, 'experiments_root': tmp},
                'train': {'optim_g': {'type': 'Adam', 'lr': 2e-4}, 'scheduler': {'type': 'MultiStepLR',
                                                                                 'milestones': [10**6]},
                          'total_iter': 100, 'pixel_opt': {'type': 'L1Loss'},
                          'wbsr': {'subnet_sampling': 'full'}}}
        for label, cls, net in (('sr_model_step_s', SRModel, {'type': 'MSRResNet'}),
                                ('wbsr_model_step_s', WBSRModel, {'type': 'WBSRSRResNet'})):
            model = cls(dict(base, network_g=net, model_type=cls.__name__))
            times = []
            for it in range(repeats + 1):
                model.feed_data(batch)
                start = time.perf_counter()
                model.optimize_parameters(it + 1)
                times.append(time.perf_counter() - start)
            result[label] = float(np.median(times[1:]))
    code = ('import resource, torch, wbsr_arch\n'
            'from wbsr_models.router import Router, RoutingOptions\n'
            'net = wbsr_arch.WBSRSRResNet().eval()\n'
            'r = Router(net, RoutingOptions(mode="wbsr", batch_size=64), 4)\n'
            'before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
            'out = r(torch.rand(1, 3, 2048, 2048)).output\n'
            'print(out.shape[-1], before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n')
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    size, before, after = done.stdout.split()
    result.update(peak_rss_2048_mb=int(after) / 1024, rss_before_mb=int(before) / 1024,
                  output_side=int(size), seconds_2048=time.perf_counter() - start)
    return result


def fmt_rows(rows: list[dict], full_seconds: float) -> list[str]:
    lines = ['| mode | PSNR-Y | SSIM-Y | GFLOPs | FLOPs % vs full on patches | FLOPs % vs full on image | '
             's / image | time vs full |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['mode']} | {r['psnr']:.3f} | {r['ssim']:.4f} | {r['gflops']:.2f} | "
                     f"{100 * r['ratio_patches']:.1f} | {100 * r['ratio_whole']:.1f} | {r['seconds']:.3f} | "
                     f"{r['seconds'] / full_seconds:.2f} |")
    return lines


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--out', default='bench_out/benchmark')
    parser.add_argument('--sets', nargs='+', default=list(SETS))
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--time-images', type=int, default=10)
    parser.add_argument('--skip-costs', action='store_true')
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    os.makedirs(args.out, exist_ok=True)
    net, scale, projection = load_model(args.model)
    report: dict = {'model': args.model, 'machine': f'{platform.processor() or platform.machine()}, '
                    f'{torch.get_num_threads()} threads, torch {torch.__version__}', 'sets': {}}
    probe = Router(net, RoutingOptions(mode='wbsr'), scale, projection)
    lut_images = load_test_set(os.path.join(args.data, 'Set5'), scale) + load_test_set(
        os.path.join(args.data, 'Set14'), scale)
    to_pair = lambda im: (im.lq, torch.from_numpy(np.ascontiguousarray(im.gt[..., ::-1].transpose(2, 0, 1))).float()[
        None] / 255.)  # noqa: E731
    arm_table = build_arm_table(probe, (to_pair(im) for im in lut_images), source='Set5+Set14')
    arm_table.save(os.path.join(args.out, 'arm_table.npz'))
    md = [f"# Routing benchmark\n\nModel: `{args.model}`; machine: {report['machine']}.\n"]
    for name in args.sets:
        print(f'{name}:', flush=True)
        images = load_test_set(os.path.join(args.data, name), scale)
        tables: dict = {}
        rows = routing_rows(net, scale, projection, arm_table, images, tables)
        points = curve_points(net, scale, projection, arm_table, images, tables)
        plot_curve(name, rows, points, os.path.join(args.out, f'curve_{name}.png'))
        report['sets'][name] = {'rows': rows, 'curves': points}
        note = ' (ARM table in-sample)' if name in ('Set5', 'Set14') else ''
        bicubic = bicubic_summary(images, scale)
        report['sets'][name]['bicubic'] = bicubic
        md += [f'## {name} x4, {len(images)} images{note}\n', f"Bicubic (OpenCV): {bicubic['psnr']:.3f} dB / "
               f"{bicubic['ssim']:.4f}.\n"] + fmt_rows(rows, rows[0]['seconds']) + ['']
        with open(os.path.join(args.out, 'benchmark.json'), 'w') as f:
            json.dump(report, f, indent=1, default=float)
    timing_images = load_test_set(os.path.join(args.data, 'Urban100'), scale, limit=args.time_images)
    timing = wall_time_rows(net, scale, projection, timing_images, args.repeats)
    report['wall_time'] = timing
    md += [f'## Wall time, Urban100 first {len(timing_images)} images, median of {args.repeats} runs\n',
           '| mode | s / image | time vs full | FLOPs % vs full on image |', '|---|---|---|---|']
    md += [f"| {r['mode']} | {r['seconds']:.3f} | {r['time_vs_full']:.2f} | {100 * r['ratio_whole']:.1f} |"
           for r in timing] + ['']
    if not args.skip_costs:
        report['costs'] = costs(args.data, args.repeats)
        md += ['## Costs\n', '| what | value |', '|---|---|']
        md += [f'| {k} | {v:.3f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in report['costs'].items()]
    with open(os.path.join(args.out, 'benchmark.json'), 'w') as f:
        json.dump(report, f, indent=1, default=float)
    with open(os.path.join(args.out, 'benchmark.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    print('\n'.join(md))
    return 0


if __name__ == '__main__':
    sys.exit(main())
