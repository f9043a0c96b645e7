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
import copy
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
from tqdm import tqdm

from wbsr_models.baselines import build_arm_table, oracle_subnets, patch_outputs, patch_psnr_table
from wbsr_models.evaluation import TestImage, bicubic_summary, evaluate, load_test_set, run_timed
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions

SETS = ('Set5', 'Set14', 'B100', 'Urban100')
BUDGETS = (0.5, 0.6, 0.7)
CURVE_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ARM_ETAS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
ORACLE_TOLERANCES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)


class CachedPatchRouter(Router):
    """A router that takes each patch's SR from outputs computed once per image (``store``).

    Every patch-based routing of one image (fixed subnets on patches, ``arm``, ``wbsr``, budgets, oracle)
    then costs a selection and a merge instead of a network run; the merge is the router's own. Seconds
    measured on it mean nothing: wall time is measured on the real router (``wall_time_rows``).
    """

    def __init__(self, *args, store: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.store = store

    def _run_patches(self, patches: torch.Tensor, rows: np.ndarray, subnet: int) -> torch.Tensor:
        return self.store['outputs'][subnet][torch.as_tensor(rows)]


def gt_tensor(image: TestImage) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.gt[..., ::-1].transpose(2, 0, 1))).float()[None] / 255.


def set_modes(net, scale, projection, arm_table, store: dict, alternative=None) -> dict[str, tuple]:
    """``key -> (router, assign_for_or_None)`` for every row of the table and every curve point."""
    cached = lambda **o: CachedPatchRouter(net, RoutingOptions(**o), scale, projection, arm_table,  # noqa: E731
                                           store=store)
    fixed = lambda i: (lambda image: (lambda patches, classes, costs: np.full(len(patches), i)))  # noqa: E731
    oracle = lambda tol: (lambda image: (  # noqa: E731
        lambda patches, classes, costs: oracle_subnets(store['table'], tol)))
    modes: dict[str, tuple] = {'full': (Router(net, RoutingOptions(mode='full'), scale, projection), None)}
    base = cached(mode='wbsr')
    for i, (w, d) in enumerate(net.subnets):
        modes[f'fixed {i} (w{w} d{d})'] = (base, fixed(i))
    modes['arm (eta 1.0)'] = (cached(mode='arm', arm_eta=1.0), None)
    modes['wbsr (Eq. 15)'] = (base, None)
    if alternative is not None:
        kind, other = alternative
        modes[f'wbsr (Eq. 15), {kind} projection'] = (CachedPatchRouter(
            net, RoutingOptions(mode='wbsr'), scale, other, store=store), None)
    for b in sorted(set(BUDGETS) | set(CURVE_BUDGETS)):
        modes[f'wbsr budget {b}'] = (cached(mode='budget', budget=b), None)
    for eta in ARM_ETAS:
        modes[f'arm eta {eta}'] = (cached(mode='arm', arm_eta=eta), None)
    for tol in ORACLE_TOLERANCES:
        modes[f'oracle ({tol} dB)'] = (base, oracle(tol))
    return modes


def evaluate_set(net, scale, projection, arm_table, images: list[TestImage],
                 alternative=None) -> tuple[list[dict], dict, float, dict]:
    """Routing table rows, curve points and the cache self-check (max |cached - real| of ``wbsr``) for a set.

    Per image, every subnet runs once on every patch; all patch-based modes reuse those outputs.
    """
    store: dict = {}
    rss: list[float] = []
    modes = set_modes(net, scale, projection, arm_table, store, alternative)
    probe = Router(net, RoutingOptions(mode='wbsr'), scale, projection)
    per_mode: dict[str, list[dict]] = {key: [] for key in modes}
    check = 0.0
    for n, image in enumerate(tqdm(images, desc='images', leave=False)):
        cut = patch_outputs(probe, image.lq)
        store['outputs'] = cut[1]
        store['table'] = patch_psnr_table(probe, image.lq, gt_tensor(image), cut=cut)[0]
        for key, (router, assign_for) in modes.items():
            per_mode[key].append(evaluate(router, [image], assign_for=assign_for))
        if n == 0:  # the cached merge must be the router's own output
            real, cached = probe(image.lq).output, modes['wbsr (Eq. 15)'][0](image.lq).output
            check = float((real - cached).abs().max())
        rss.append(rss_mb())
    summary = {}
    for key, rows in per_mode.items():
        summary[key] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != 'shares'}
        summary[key]['shares'] = np.mean([r['shares'] for r in rows], axis=0).tolist()
    table_keys = ['full'] + [k for k in modes if k.startswith('fixed')] + ['arm (eta 1.0)', 'wbsr (Eq. 15)']
    table_keys += [k for k in modes if k.endswith('projection')]
    table_keys += [f'wbsr budget {b}' for b in BUDGETS] + ['oracle (0.05 dB)']
    rows = [{'mode': key, **summary[key]} for key in table_keys]
    for row in rows[1:]:
        row['seconds'] = None  # patch outputs were reused: see the wall-time table
    points = {'wbsr': [(b, *_point(summary[f'wbsr budget {b}'])) for b in CURVE_BUDGETS],
              'arm': [(eta, *_point(summary[f'arm eta {eta}'])) for eta in ARM_ETAS],
              'oracle': [(tol, *_point(summary[f'oracle ({tol} dB)'])) for tol in ORACLE_TOLERANCES]}
    memory = {'rss_mb_first_image': rss[0], 'rss_mb_max_first_half': max(rss[:max(1, len(rss) // 2)]),
              'rss_mb_last_image': rss[-1], 'rss_mb_max': max(rss)}
    return rows, points, check, memory


def rss_mb() -> float:
    """Resident memory of this process now (Linux; NaN elsewhere)."""
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmRSS:'))
    except (OSError, StopIteration):
        return float('nan')


def _point(s: dict) -> tuple[float, float, float]:
    return s['ratio_patches'], s['ratio_whole'], s['psnr']


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
            label='fixed subnets (on the same patches)', ms=4)
    wbsr = next(r for r in rows if r['mode'] == 'wbsr (Eq. 15)')
    ax.plot(100 * wbsr['ratio_patches'], wbsr['psnr'], '*', color='#c44e52', ms=13, label='WBSR, Eq. 15')
    ax.set_xlabel('FLOPs, % of the full network on the same patches')
    ax.set_ylabel('PSNR-Y (dB)')
    ax.set_title(f'{name} x4: PSNR vs FLOPs on the same weights')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wall_time_rows(net, scale, projection, arm_table, images: list[TestImage], repeats: int,
                   budgets=BUDGETS, fixed_subnets: bool = False) -> list[dict]:
    """Real wall time (median of ``repeats`` runs per image, averaged over images) of the main modes."""
    rows = []
    modes = [('full', {'mode': 'full'}, None), ('full network on the patches', {'mode': 'wbsr'}, net.num_subnets - 1),
             ('arm (eta 1.0)', {'mode': 'arm', 'arm_eta': 1.0}, None), ('wbsr (Eq. 15)', {'mode': 'wbsr'}, None)]
    modes += [(f'wbsr budget {b}', {'mode': 'budget', 'budget': b}, None) for b in budgets]
    if fixed_subnets:  # each subnet on the whole image: how well the CPU runs each width and depth
        modes += [(f'fixed {i} (w{w} d{d})', {'mode': 'fixed', 'subnet': i}, None)
                  for i, (w, d) in enumerate(net.subnets)]
    for label, options, fixed in modes:
        router = Router(net, RoutingOptions(**options), scale, projection, arm_table)
        kwargs = {} if fixed is None else {'assign': lambda patches, classes, costs: np.full(len(patches), fixed)}
        seconds, ratios = [], []
        for image in tqdm(images, desc=label, leave=False):
            result, s = run_timed(router, image.lq, repeats, **kwargs)
            seconds.append(s)
            ratios.append(result.ratio_whole)
        rows.append({'mode': label, 'seconds': float(np.mean(seconds)), 'ratio_whole': float(np.mean(ratios))})
        print(f"  {label:28s} {rows[-1]['seconds']:.3f} s  {100 * rows[-1]['ratio_whole']:.1f}%", flush=True)
    for row in rows:
        row['time_vs_full'] = row['seconds'] / rows[0]['seconds']
    return rows


def train_options(data: str) -> dict:
    """The reference run's training set (options/train_wbsr_srresnet_x4_train291.yml)."""
    return {'name': 'train291', 'phase': 'train', 'scale': 4, 'gt_size': 128, 'use_hflip': True, 'use_rot': True,
            'io_backend': {'type': 'disk'}, 'dataroot_gt': os.path.join(data, 'train291', 'HR'),
            'dataroot_lq': os.path.join(data, 'train291', 'LR_bicubic', 'X4'), 'skip_small_images': True}


def alternative_projection(data: str, projection) -> Optional[tuple[str, object]]:
    """The other projection (spec section 1), fitted on the training index, for a test-time comparison."""
    if projection is None or not os.path.isdir(os.path.join(data, 'train291')):
        return None
    from wbsr_data.difficulty import DifficultyProjection
    from wbsr_data.patch_index import load_or_build_index
    index = load_or_build_index(train_options(data))
    kind = 'sum' if projection.kind == 'pca' else 'pca'
    return kind, DifficultyProjection.fit(index.vectors, projection.num_classes, kind)


def costs(data: str, repeats: int) -> dict:
    """Training-step time, HES overhead, index build, GMM fit, peak memory at 2048x2048."""
    from basicsr.data import build_dataset
    from basicsr.models.sr_model import SRModel
    from wbsr_data.patch_index import IndexOptions, build_index
    from wbsr_data.pairs import list_pairs
    from wbsr_losses.gmm import fit_gmm
    from wbsr_models.wbsr_model import WBSRModel
    result: dict = {}
    train = train_options(data)
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
        # one training step on the full MSRResNet, same batch: SRModel; WBSRModel training only the largest
        # subnet (the supernet's own overhead); WBSRModel with the default routed sampling
        items = [hes[(i * 7919) % len(hes)] for i in range(16)]
        batch = {key: torch.stack([item[key] for item in items]) for key in ('lq', 'gt')}  # real patches
        base = {'scale': 4, 'num_gpu': 0, 'dist': False, 'rank': 0, 'world_size': 1, 'is_train': True,
                'manual_seed': 0, 'datasets': {'train': opt},
                'path': {'pretrain_network_g': None, 'experiments_root': tmp},
                'train': {'optim_g': {'type': 'Adam', 'lr': 2e-4}, 'scheduler': {'type': 'MultiStepLR',
                                                                                 'milestones': [10**6]},
                          'total_iter': 100, 'pixel_opt': {'type': 'L1Loss'},
                          'wbsr': {'subnet_sampling': 'full'}}}
        for label, cls, net, sampling in (('sr_model_step_s', SRModel, {'type': 'MSRResNet'}, 'full'),
                                          ('wbsr_model_full_step_s', WBSRModel, {'type': 'WBSRSRResNet'}, 'full'),
                                          ('wbsr_model_routed_step_s', WBSRModel, {'type': 'WBSRSRResNet'},
                                           'routed')):
            train_opt = dict(copy.deepcopy(base['train']), wbsr={'subnet_sampling': sampling})  # BasicSR pops keys
            model = cls(dict(base, network_g=net, model_type=cls.__name__, train=train_opt))
            times = []
            for it in range(repeats + 1):
                model.feed_data(batch)
                start = time.perf_counter()
                model.optimize_parameters(it + 1)
                times.append(time.perf_counter() - start)
            result[label] = float(np.median(times[1:]))
    # Peak memory from VmHWM (kB), which starts afresh with the new process; getrusage's ru_maxrss would
    # carry this (large) parent's peak over the fork and exec.
    code = ('import torch, wbsr_arch\n'
            'from wbsr_models.router import Router, RoutingOptions\n'
            'def hwm():\n'
            '    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))\n'
            'net = wbsr_arch.WBSRSRResNet().eval()\n'
            'r = Router(net, RoutingOptions(mode="wbsr", batch_size=64), 4)\n'
            'x = torch.rand(1, 3, 2048, 2048)\n'
            'before = hwm()\n'
            'out = r(x).output\n'
            'print(out.shape[-1], before, hwm())\n')
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    size, before, after = done.stdout.split()
    result.update(peak_rss_2048_mb=int(after) / 1024, peak_rss_before_mb=int(before) / 1024,
                  output_side=int(size), seconds_2048=time.perf_counter() - start)
    return result


def fmt_rows(rows: list[dict]) -> list[str]:
    lines = ['| mode | PSNR-Y | SSIM-Y | GFLOPs | FLOPs % vs full on patches | FLOPs % vs full on image | '
             'full: s / image |', '|---|---|---|---|---|---|---|']
    for r in rows:
        seconds = '' if r['seconds'] is None else f"{r['seconds']:.3f}"
        lines.append(f"| {r['mode']} | {r['psnr']:.3f} | {r['ssim']:.4f} | {r['gflops']:.2f} | "
                     f"{100 * r['ratio_patches']:.1f} | {100 * r['ratio_whole']:.1f} | {seconds} |")
    return lines


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--out', default='bench_out/benchmark')
    parser.add_argument('--sets', nargs='*', default=list(SETS), help='test sets (none: timing and costs only)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--time-images', type=int, default=10, help='Urban100 images timed (0: no wall time)')
    parser.add_argument('--time-budgets', type=float, nargs='+', default=list(BUDGETS))
    parser.add_argument('--time-fixed', action='store_true', help='also time every subnet on the whole image')
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
    alternative = alternative_projection(args.data, projection)
    arm_table = build_arm_table(probe, ((im.lq, gt_tensor(im)) for im in lut_images), source='Set5+Set14')
    arm_table.save(os.path.join(args.out, 'arm_table.npz'))
    md = [f"# Routing benchmark\n\nModel: `{args.model}`; machine: {report['machine']}.\n",
          'Every patch-based row reuses one run of each subnet on each patch of the image (the merge is the '
          "router's own; the check below compares it with a real routed run); `full` is the largest subnet "
          'run once on the whole image. Wall times are in the last table.\n']
    for name in args.sets:
        print(f'{name}:', flush=True)
        images = load_test_set(os.path.join(args.data, name), scale)
        rows, points, check, memory = evaluate_set(net, scale, projection, arm_table, images, alternative)
        for row in rows:
            print(f"  {row['mode']:24s} {row['psnr']:.3f} dB  {100 * row['ratio_patches']:.1f}% / "
                  f"{100 * row['ratio_whole']:.1f}%", flush=True)
        plot_curve(name, rows, points, os.path.join(args.out, f'curve_{name}.png'))
        bicubic = bicubic_summary(images, scale)
        report['sets'][name] = {'rows': rows, 'curves': points, 'bicubic': bicubic, 'cache_check_max_abs': check,
                                'memory': memory}
        note = ' (ARM table in-sample)' if name in ('Set5', 'Set14') else ''
        md += [f'## {name} x4, {len(images)} images{note}\n', f"Bicubic (OpenCV): {bicubic['psnr']:.3f} dB / "
               f"{bicubic['ssim']:.4f}. Reused patch outputs vs a real routed run: max abs difference "
               f"{check:.1e}. Resident memory after the first image {memory['rss_mb_first_image']:.0f} MB, "
               f"largest over the first half {memory['rss_mb_max_first_half']:.0f} MB, after the last "
               f"{memory['rss_mb_last_image']:.0f} MB.\n"] + fmt_rows(rows) + ['', f'![{name}](curve_{name}.png)', '']
        with open(os.path.join(args.out, 'benchmark.json'), 'w') as f:
            json.dump(report, f, indent=1, default=float)
    if args.time_images > 0:
        print('wall time:', flush=True)
        timing_images = load_test_set(os.path.join(args.data, 'Urban100'), scale, limit=args.time_images)
        timing = wall_time_rows(net, scale, projection, arm_table, timing_images, args.repeats, args.time_budgets,
                                args.time_fixed)
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
