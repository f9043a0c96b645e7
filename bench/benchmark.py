"""The routing benchmark: every routing on the same weights, x4, under both execution schemes, in one process.

    python bench/benchmark.py --model checkpoints/wbsr_srresnet_x4_train291.pth [--out bench_out/benchmark]

1. Per test set (Set5, Set14, B100, Urban100 under ``--data``, made by ``wbsr-make-lr``), PSNR-Y, SSIM-Y and FLOPs
   (% of the full network run once on the whole image, and % of the full network on the same regions) of:
   - whole image: ``full`` and every ``fixed`` subnet;
   - ``patches`` (the papers' 32/28 protocol): the full network on the patches, Eq. 15, the budget sweep, ARM
     (eta sweep), the oracle (tolerance sweep). Every patch row reuses one run of each subnet on each patch of
     the image (checked against a real routed run on the first image of each set);
   - ``tiles`` (one seamless pass): Eq. 15, the budget sweep, ARM and the oracle, each a real run.
   ARM's lookup table is built on Set5 + Set14 (in-sample there, out-of-sample on B100 and Urban100). The
   oracle gives each region the cheapest subnet within a tolerance of the largest one's PSNR on that region,
   chosen with the ground truth: the limit of any router over these subnets.
2. One PSNR-vs-FLOPs plot per set with both schemes' curves, and per scheme the lowest budget that stays within
   0.05 dB of the whole-image full network.
3. Wall time on the first ``--time-images`` Urban100 images (:func:`wbsr_models.evaluation.time_modes`: every
   mode warmed on every image, modes interleaved, medians of ``--repeats``), with the full network timed twice
   as a check of the timing itself.
4. Costs: training-step time of WBSRModel vs BasicSR's SRModel on the full MSRResNet (same batch), HES sampling
   overhead per batch, index-build and GMM-fit times, peak memory of routed inference on a 2048x2048 LR input
   in a fresh process, for each scheme.

Writes ``benchmark.md``, ``benchmark.json`` and ``curve_<set>.png`` under ``--out``. ``--tile-sizes`` runs the
tile-size sweep instead (tiles scheme, Eq. 15 and the budget sweep per tile size) on ``--sets``.
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
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from wbsr_models.baselines import build_arm_table, oracle_subnets, region_outputs, region_psnr_table
from wbsr_models.evaluation import (TestImage, bicubic_summary, evaluate, gt_tensor, keep_freed_memory, load_test_set,
                                     time_modes)
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions
from wbsr_models.routing.modes import MODES

SETS = ('Set5', 'Set14', 'B100', 'Urban100')


def sweep_values(mode: str, key: str, scheme: str = 'tiles', **only) -> tuple:
    """The values of ``key`` along a registered mode's benchmark sweep under ``scheme``, of the points whose other
    options are as ``only`` says (None: not set)."""
    points = MODES[mode].patch_sweep if scheme == 'patches' else MODES[mode].sweep
    return tuple(p[key] for p in points if key in p and all(p.get(k) == v for k, v in only.items()))


PATCH_BUDGETS = sweep_values('budget', 'budget', 'patches')
TILE_BUDGETS = sweep_values('budget', 'budget')
PATCH_ETAS = sweep_values('arm', 'arm_eta', 'patches')
TILE_ETAS = sweep_values('arm', 'arm_eta')
PATCH_TOLERANCES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)
TILE_TOLERANCES = (0.02, 0.05, 0.2)
LEARNED_BUDGETS = sweep_values('learned', 'budget')
LEARNED_LOSSES = sweep_values('learned', 'max_loss')
CALIBRATED_BUDGETS = sweep_values('calibrated', 'budget')
CALIBRATED_SLOPES = sweep_values('calibrated', 'slope')
LEARNED_SLOPES = sweep_values('learned', 'slope', level=None)
LEARNED_CLASS_SLOPES = sweep_values('learned', 'slope', level='classes')
WITHIN_DB = 0.05
HEADER = ('FLOPs % vs full on image: against the full network run once on the whole image; vs full on the same '
          "regions: against the full network on the same patches (the papers' convention; for tiles and the whole "
          'image this is the whole image). Wall times are in the last tables.\n')


class CachedRouter(Router):
    """A router that takes every subnet's output from runs made once per image (``store``).

    ``store['patches'][m]`` holds subnet m's SR of every patch (the patch scheme then costs a selection and a
    merge, the router's own); ``store['whole'][m]`` its SR of the whole image (``full`` and ``fixed`` rows).
    Seconds measured on it mean nothing: wall time is measured on real routers.
    """

    def __init__(self, *args, store: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.store = store

    def patch_sr(self, patches: torch.Tensor, rows: np.ndarray, subnet: int) -> torch.Tensor:
        return self.store['patches'][subnet][torch.as_tensor(rows)]

    def run_subnet(self, x: torch.Tensor, subnet: int) -> torch.Tensor:
        whole = self.store['whole'][subnet]
        if whole.shape[-2:] != (x.shape[-2] * self.scale, x.shape[-1] * self.scale):
            raise RuntimeError('CachedRouter runs whole images only from the store')
        return whole


def fixed_assign(subnet: int) -> Callable:
    return lambda image: (lambda regions, classes, costs: np.full(len(regions), subnet))


def set_modes(net, scale: int, projection, arm_table, store: dict, routing=None, alternative=None,
              only: Optional[set] = None) -> dict[str, tuple[str, Router, Optional[Callable]]]:
    """``key -> (scheme, router, assign_for or None)`` of every row and curve point of a set, built from the registry
    of routing modes (every point of each mode's ``sweep`` under tiles and ``patch_sweep`` under patches), plus the
    whole-image rows (``full``, every ``fixed`` subnet), the full network on the patches and the oracle.

    ``only``: mode names to run (``full``, ``fixed``, ``patches`` (the full network on the patches), ``oracle``,
    ``default`` (the checkpoint's stored default routing, :func:`~wbsr_models.router.default_routing`) and registered
    modes), or ``mode:option`` for the points of a mode's sweeps that set that option (``learned:slope``);
    ``alternative``: the other
    difficulty projection, ``(kind, projection)``, for one more Eq. 15 row. A mode whose checkpoint artefact is
    missing (class errors, a predictor) is left out, with a line saying so."""
    def cached(**options) -> Router:
        return CachedRouter(net, RoutingOptions(**options), scale, projection, arm_table, routing, store=store)

    def real(**options) -> Router:
        return Router(net, RoutingOptions(**options), scale, projection, arm_table, routing)

    def oracle(key: str, tol: float) -> Callable:
        return lambda image: (lambda regions, classes, costs: oracle_subnets(store[key], tol))

    def wanted(name: str) -> bool:
        return only is None or name in only or any(entry.startswith(name + ':') for entry in only)

    def point_wanted(name: str, point: dict) -> bool:
        return only is None or name in only or any(f'{name}:{key}' in only for key in point)

    largest = net.num_subnets - 1
    modes = {}
    if wanted('full'):  # from every subnet's whole-image output where those are made anyway, else run alone
        reuse = wanted('fixed') or wanted('oracle')
        modes['full'] = ('whole', cached(mode='full') if reuse else real(mode='full'), None)
    if wanted('fixed'):
        for i, (w, d) in enumerate(net.subnets):
            modes[f'fixed {i} (w{w} d{d})'] = ('whole', cached(mode='fixed', subnet=i), None)
    patches = cached(mode='wbsr', scheme='patches')
    tiles = real(mode='wbsr', scheme='tiles')
    if wanted('patches'):
        modes['patches: full network'] = ('patches', patches, fixed_assign(largest))
    have = {'class_errors': routing is not None and routing.class_errors is not None,
            'predictor': routing is not None and routing.predictor is not None, 'arm_table': arm_table is not None}
    for name, mode in MODES.items():
        if mode.whole_image or not wanted(name):
            continue
        missing = [need for need in mode.needs if not have.get(need, True)]
        if missing:
            print(f'benchmark: {name} mode left out, the checkpoint has no {" and ".join(missing)}', flush=True)
            continue
        for scheme, points, make in (('patches', mode.patch_sweep, cached), ('tiles', mode.sweep, real)):
            for point in filter(lambda p: point_wanted(name, p), points):
                modes[f'{scheme}: {mode.label(point)}'] = (scheme, make(mode=name, scheme=scheme, **point), None)
    stored = routing.usable_default if routing is not None else None
    if stored is not None and wanted('default'):  # what the checkpoint runs when no mode is given
        point = {k: v for k, v in stored.options.items() if k != 'mode'}
        modes[f'tiles: default, {MODES[stored.options["mode"]].label(point)}'] = ('tiles', real(scheme='tiles'), None)
    if alternative is not None and wanted('wbsr'):
        kind, other = alternative
        modes[f'tiles: Eq. 15, {kind} projection'] = ('tiles', Router(net, RoutingOptions(), scale, other), None)
    if wanted('oracle'):
        modes.update({f'patches: oracle {t}': ('patches', patches, oracle('patch_table', t))
                      for t in PATCH_TOLERANCES})
        modes.update({f'tiles: oracle {t}': ('tiles', tiles, oracle('tile_table', t)) for t in TILE_TOLERANCES})
    return modes


def evaluate_set(net, scale: int, projection, arm_table, images: list[TestImage], routing=None, alternative=None,
                 only: Optional[set] = None) -> tuple[dict, float]:
    """Summary of every mode over a set, and the cache self-check (max |cached - real| of patches: Eq. 15)."""
    store: dict = {}
    modes = set_modes(net, scale, projection, arm_table, store, routing, alternative, only)
    probe_patches = Router(net, RoutingOptions(mode='wbsr', scheme='patches'), scale, projection)
    probe_tiles = Router(net, RoutingOptions(mode='wbsr', scheme='tiles'), scale, projection)
    per_mode: dict[str, list[dict]] = {key: [] for key in modes}
    check = 0.0
    # what the rows read from the store: every subnet on every patch (cached patch rows, the patch oracle), every
    # subnet on the whole image (whole-image rows, the tile oracle); a run of a few rows computes only what they read
    need_patches = any(scheme == 'patches' for scheme, _, _ in modes.values())
    need_whole = any((scheme == 'whole' and isinstance(router, CachedRouter)) or key.startswith('tiles: oracle')
                     for key, (scheme, router, _) in modes.items())
    for n, image in enumerate(tqdm(images, desc='images', leave=False)):
        gt = gt_tensor(image)
        if need_patches:
            cut = region_outputs(probe_patches, image.lq)
            store['patches'] = cut[1]
            store['patch_table'] = region_psnr_table(probe_patches, image.lq, gt, cut=cut)[0]
        if need_whole:
            cut = region_outputs(probe_tiles, image.lq)  # every subnet on the whole image
            store['whole'] = cut[1]
            store['tile_table'] = region_psnr_table(probe_tiles, image.lq, gt, cut=cut)[0]
        for key, (_, router, assign_for) in modes.items():
            per_mode[key].append(evaluate(router, [image], assign_for=assign_for))
        if n == 0 and 'patches: Eq. 15' in modes:  # the cached merge must be the router's own output
            check = float((probe_patches(image.lq).output - modes['patches: Eq. 15'][1](image.lq).output).abs().max())
    summary = {}
    for key, rows in per_mode.items():
        summary[key] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ('shares', 'images')}
        summary[key]['shares'] = np.mean([r['shares'] for r in rows], axis=0).tolist()
        summary[key]['scheme'] = modes[key][0]
        summary[key]['images'] = len(rows)
        if 'full' in per_mode:  # the loss against the whole-image full network, image by image, and its spread
            loss = np.array([f['psnr'] - r['psnr'] for f, r in zip(per_mode['full'], rows)])
            summary[key]['loss_db_sd'] = float(loss.std())
        if 'predicted_loss_db' in rows[0]:
            summary[key]['predicted_loss_db_sd'] = float(np.std([r['predicted_loss_db'] for r in rows]))
    return summary, check


def lowest_budget_within(summary: dict, prefix: str, budgets, reference: float) -> Optional[tuple[float, dict]]:
    """The lowest budget of the curve ``prefix`` (``'patches'`` or ``'tiles'``: their budget rule; or a full prefix
    such as ``'tiles: calibrated'``) whose PSNR is within :data:`WITHIN_DB` of ``reference``."""
    prefix = prefix if ':' in prefix else f'{prefix}: budget'
    for b in budgets:
        row = summary.get(f'{prefix} {b}')
        if row is None:  # a run of some rows only (--modes)
            return None
        if row['psnr'] >= reference - WITHIN_DB:
            return b, row
    return None


#: The curves of the table of FLOPs at the 0.05-dB point: ``label -> row-key prefix`` (``fixed``: the fixed subnets,
#: as their upper concave hull: the best that running one of two fixed subnets on each image reaches).
CURVES = {'tiles: budget rule': 'tiles: budget ', 'tiles: calibrated': 'tiles: calibrated 0',
          'tiles: calibrated (slope)': 'tiles: calibrated slope', 'tiles: learned (budget sweep)': 'tiles: learned 0',
          'tiles: learned (slope)': 'tiles: learned slope',
          'tiles: learned (slope, class level)': 'tiles: learned (class level) slope',
          'tiles: learned (quality target)': 'tiles: learned max_loss',
          'tiles: ARM': 'tiles: ARM eta', 'tiles: oracle': 'tiles: oracle', 'patches: budget rule': 'patches: budget ',
          'patches: oracle': 'patches: oracle', 'fixed subnets (upper concave hull)': 'fixed '}


def concave_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper concave hull of (FLOPs, PSNR) points, in order of FLOPs: what mixing them (image by image) reaches."""
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1]) -
                                  (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def flops_within(summary: dict, prefix: str, reference: float, within: float = WITHIN_DB,
                 hull: bool = False) -> Optional[float]:
    """FLOPs share (of the whole-image full network) at which the curve of the rows starting with ``prefix`` first
    comes within ``within`` dB of ``reference``, interpolated linearly between its points in order of FLOPs
    (the curve is first made its upper envelope, or with ``hull`` its upper concave hull); None if it never does,
    or has no rows."""
    points = sorted((r['ratio_whole'], r['psnr']) for k, r in summary.items() if k.startswith(prefix))
    if not points:
        return None
    if hull:
        points = concave_hull(points)
    target, best, previous = reference - within, -np.inf, None
    for flops, psnr in points:
        psnr = best = max(best, psnr)
        if psnr >= target:
            if previous is None or previous[1] >= target:
                return flops
            f0, p0 = previous
            return f0 + (flops - f0) * (target - p0) / (psnr - p0)
        previous = (flops, psnr)
    return None


def set_section(name: str, entry: dict, out: str) -> list[str]:
    """A set's markdown section and plot from its ``entry`` (summary, bicubic, cache check, images); adds the lowest
    budgets within :data:`WITHIN_DB` to ``entry``."""
    summary, bicubic, check = entry['summary'], entry['bicubic'], entry['cache_check_max_abs']
    plot_curve(name, summary, os.path.join(out, f'curve_{name}.png'))
    full = summary['full']['psnr']
    lowest = {scheme: lowest_budget_within(summary, scheme, budgets, full)
              for scheme, budgets in (('patches', PATCH_BUDGETS), ('tiles', TILE_BUDGETS))}
    for title, budgets in (('calibrated', CALIBRATED_BUDGETS), ('learned', LEARNED_BUDGETS)):
        if f'tiles: {title} {budgets[0]}' in summary:
            lowest[f'tiles {title}'] = lowest_budget_within(summary, f'tiles: {title}', budgets, full)
    entry['lowest_budget_within_0.05dB'] = {k: v and {'budget': v[0], **v[1]} for k, v in lowest.items()}
    entry['flops_within_0.05dB'] = {label: flops_within(summary, prefix, full, hull=prefix == 'fixed ')
                                    for label, prefix in CURVES.items() if any(k.startswith(prefix) for k in summary)}
    note = ' (ARM table in-sample)' if name in ('Set5', 'Set14') else ''
    parts = entry.get('parts') or []
    if parts and sum(1 / n for _, n in parts) < 1 - 1e-9:  # a subset of the set: say which
        note += ' (a subset: the images whose index is ' + ' or '.join(f'{k} mod {n}' for k, n in parts) + ')'
    md = [f"## {name} x4, {entry['images']} images{note}\n",
          f"Bicubic (OpenCV): {bicubic['psnr']:.3f} dB / {bicubic['ssim']:.4f}. Reused patch outputs vs a real "
          f"routed run: max abs difference {check:.1e}.\n"]
    for scheme, found in lowest.items():
        md.append(f'- {scheme}: lowest budget within {WITHIN_DB} dB of the whole-image full network '
                  f'({full:.3f} dB): ' + (f"{found[0]} ({found[1]['psnr']:.3f} dB at "
                                          f"{100 * found[1]['ratio_whole']:.1f}% of its FLOPs)"
                                          if found else 'none of the budgets'))
    md += ['', f'FLOPs (% of the whole-image full network) where each curve first comes within {WITHIN_DB} dB of it '
           '(linear interpolation between its points, along its upper envelope; - : never):', '',
           '| curve | FLOPs % |', '|---|---|']
    md += [f'| {label} | ' + ('-' if f is None else f'{100 * f:.1f}') + ' |'
           for label, f in entry['flops_within_0.05dB'].items()]
    quality = [(k, r) for k, r in summary.items() if 'max_loss' in k and 'predicted_loss_db' in r]
    if quality:
        md += ['', 'Quality target (learned mode, `max_loss`): loss against the whole-image full network, mean over '
               'the images and its spread (sd), measured and predicted:', '',
               '| row | measured loss (dB) | sd | predicted loss (dB) | sd | FLOPs % |', '|---|---|---|---|---|---|']
        md += [f"| {k} | {full - r['psnr']:.3f} | {r.get('loss_db_sd', float('nan')):.3f} | "
               f"{r['predicted_loss_db']:.3f} | {r.get('predicted_loss_db_sd', float('nan')):.3f} | "
               f"{100 * r['ratio_whole']:.1f} |" for k, r in quality]
    return md + [''] + table_rows(summary) + ['', f'![{name}](curve_{name}.png)', '']


def _residues(slices: Sequence[Sequence[int]], period: int) -> frozenset:
    """The image indices (mod ``period``) that parts ``K/N`` cover."""
    return frozenset(i for i in range(period) for k, n in slices if i % n == k)


def _rows_agree(a: dict, b: dict) -> bool:
    return abs(a['psnr'] - b['psnr']) <= 1e-4 and abs(a['ratio_whole'] - b['ratio_whole']) <= 1e-9


def merge_parts(folders: list[str], out: str) -> int:
    """Combine the ``benchmark.json`` of runs over parts of the sets (``--part``) and over different rows
    (``--modes``): every row is the mean of the runs that hold it, weighted by their numbers of images.

    A folder may hold an earlier merge (its sets list the parts they were made of). Each row must cover the same
    images as the set (every part that any run covers), exactly once: a row that two runs hold for overlapping images
    is refused, unless both hold it for the same images with the same values (the full network run again beside new
    rows), and a row that misses part of the images is refused."""
    parts = []
    for folder in folders:
        with open(os.path.join(folder, 'benchmark.json')) as f:
            parts.append(json.load(f))
    os.makedirs(out, exist_ok=True)
    report = {'model': parts[0]['model'], 'machine': parts[0]['machine'], 'sets': {}}
    md = [f"# Routing benchmark\n\nModel: `{report['model']}`; machine: {report['machine']} (each set's images "
          f"split between single-thread processes, `--part`).\n", HEADER]
    for name in dict.fromkeys(name for p in parts for name in p['sets']):
        having = [p for p in parts if name in p['sets']]
        if any(p['model'] != report['model'] for p in having):
            raise SystemExit(f'--merge: the parts of {name} are of different models')
        entries = [(tuple(map(tuple, p['sets'][name]['parts'] if 'parts' in p['sets'][name] else [p['part']])),
                    p['sets'][name]) for p in having]
        period = int(np.lcm.reduce([n for slices, _ in entries for _, n in slices]))
        covered = frozenset().union(*(_residues(slices, period) for slices, _ in entries))

        def holders(key: str, group: str = 'summary') -> list[tuple[tuple, dict]]:
            chosen: list[tuple[frozenset, tuple, dict]] = []
            for slices, entry in entries:
                if key not in entry[group]:
                    continue
                res = _residues(slices, period)
                clash = [c for c in chosen if c[0] & res]
                if clash:
                    if clash[0][0] != res or (group == 'summary' and not _rows_agree(clash[0][2][group][key],
                                                                                     entry[group][key])):
                        raise SystemExit(f'--merge: the parts of {name} overlap in {key!r}: '
                                         f'{sorted(clash[0][1])} and {sorted(slices)}')
                    continue
                chosen.append((res, slices, entry))
            if frozenset().union(*(c[0] for c in chosen)) != covered:
                raise SystemExit(f'--merge: {key!r} of {name} covers parts {sorted(s for c in chosen for s in c[1])}, '
                                 f'not all of {sorted(s for sl, _ in entries for s in sl)}')
            return [(c[1], c[2]) for c in chosen]

        def mean(rows: list[dict], weights: np.ndarray) -> dict:
            merged = {}
            for k, v in rows[0].items():
                if isinstance(v, (int, float)) and k != 'images':
                    merged[k] = float(np.dot(weights, [r[k] for r in rows]) / weights.sum())
                elif isinstance(v, list):
                    merged[k] = (weights @ np.array([r[k] for r in rows]) / weights.sum()).tolist()
                else:
                    merged[k] = v
            merged['images'] = int(weights.sum())
            return merged

        summary = {}
        for key in dict.fromkeys(k for _, e in entries for k in e['summary']):
            chosen = holders(key)
            summary[key] = mean([e['summary'][key] for _, e in chosen], np.array([e['images'] for _, e in chosen],
                                                                                 dtype=np.float64))
        reference = holders('full')
        weights = np.array([e['images'] for _, e in reference], dtype=np.float64)
        entry = {'summary': summary, 'bicubic': mean([e['bicubic'] for _, e in reference], weights),
                 'cache_check_max_abs': max(e['cache_check_max_abs'] for _, e in entries), 'images': int(weights.sum()),
                 'parts': sorted(s for sl, _ in reference for s in sl)}
        md += set_section(name, entry, out)
        report['sets'][name] = entry
    with open(os.path.join(out, 'benchmark.json'), 'w') as f:
        json.dump(report, f, indent=1, default=float)
    with open(os.path.join(out, 'benchmark.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    print('\n'.join(md))
    return 0


def plot_curve(name: str, summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    full = summary['full']['psnr']
    ax.axhline(full, color='#999999', lw=1, ls=':', label='full network, whole image')
    ax.axhspan(full - WITHIN_DB, full, color='#dddddd', alpha=0.5, lw=0, label=f'within {WITHIN_DB} dB of it')
    series = [('patches: budget', PATCH_BUDGETS, '-o', '#dd8452', 'patches (32/28), budget sweep'),
              ('tiles: budget', TILE_BUDGETS, '-o', '#c44e52', 'tiles (seamless), budget sweep'),
              ('tiles: calibrated', CALIBRATED_BUDGETS, '-v', '#1f77b4',
               'tiles, calibrated (class errors), budget sweep'),
              ('tiles: learned', LEARNED_BUDGETS, '-P', '#17becf', 'tiles, learned (error predictor), budget sweep'),
              ('tiles: learned max_loss', LEARNED_LOSSES, ':X', '#0b5563',
               'tiles, learned, quality target (max_loss dB)'),
              ('tiles: calibrated slope', CALIBRATED_SLOPES, '--v', '#bcbd22',
               'tiles, calibrated, one slope for the set (dB per 1% FLOPs)'),
              ('tiles: learned slope', LEARNED_SLOPES, '--P', '#2ca02c',
               'tiles, learned, one slope for the set (dB per 1% FLOPs)'),
              ('tiles: learned (class level) slope', LEARNED_CLASS_SLOPES, '--X', '#e377c2',
               'tiles, learned ratios x class errors, one slope for the set'),
              ('tiles: ARM eta', TILE_ETAS, '-s', '#55a868', 'tiles, ARM eta sweep'),
              ('tiles: oracle', TILE_TOLERANCES, '--^', '#8172b2', 'tiles, oracle tolerance sweep')]
    for prefix, values, fmt, color, label in series:
        if f'{prefix} {values[0]}' not in summary:
            continue
        pts = sorted((summary[f'{prefix} {v}'] for v in values), key=lambda r: r['ratio_whole'])
        ax.plot([100 * r['ratio_whole'] for r in pts], [r['psnr'] for r in pts], fmt, color=color, ms=4, label=label)
    fixed = [r for k, r in summary.items() if k.startswith('fixed')]
    ax.plot([100 * r['ratio_whole'] for r in fixed], [r['psnr'] for r in fixed], 'D', color='#777777', ms=4,
            label='fixed subnets, whole image')
    for key, marker, color in (('patches: Eq. 15', '*', '#dd8452'), ('tiles: Eq. 15', '*', '#c44e52')):
        if key not in summary:  # a run of some rows only (--modes)
            continue
        r = summary[key]
        ax.plot(100 * r['ratio_whole'], r['psnr'], marker, color=color, ms=13, label=key)
    ax.set_xlabel('FLOPs, % of the full network run once on the whole image')
    ax.set_ylabel('PSNR-Y (dB)')
    ax.set_title(f'{name} x4: PSNR vs FLOPs on the same weights')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table_rows(summary: dict) -> list[str]:
    lines = ['| scheme | mode | PSNR-Y | SSIM-Y | GFLOPs | FLOPs % vs full on image | '
             'FLOPs % vs full on the same regions |', '|---|---|---|---|---|---|---|']
    for key, r in summary.items():
        scheme, _, mode = key.partition(': ') if ': ' in key else ('whole', '', key)
        lines.append(f"| {scheme} | {mode or key} | {r['psnr']:.3f} | {r['ssim']:.4f} | {r['gflops']:.2f} | "
                     f"{100 * r['ratio_whole']:.1f} | {100 * r['ratio_regions']:.1f} |")
    return lines


def wall_time(net, scale: int, projection, arm_table, images: list[TestImage], repeats: int,
              budgets: dict[str, list[float]], fixed_subnets: bool, routing=None,
              learned: Sequence[dict] = (), calibrated: Sequence[dict] = ()) -> list[dict]:
    """Seconds per image of the main modes (:func:`time_modes`), with their FLOPs ratio, time ratio and PSNR on the
    timed images; ``learned``, ``calibrated``: more points of those modes to time (the learned mode's predictor's time
    included)."""
    def router(**options) -> Router:
        return Router(net, RoutingOptions(**options), scale, projection, arm_table, routing)

    modes = {'full': (router(mode='full'), None), 'full (timed again)': (router(mode='full'), None),
             f'fixed {net.num_subnets - 1} (the same network)': (router(mode='fixed', subnet=net.num_subnets - 1),
                                                                 None),
             'patches: full network': (router(mode='wbsr', scheme='patches'), fixed_assign(net.num_subnets - 1))}
    for scheme in ('patches', 'tiles'):
        modes[f'{scheme}: Eq. 15'] = (router(mode='wbsr', scheme=scheme), None)
        modes[f'{scheme}: ARM eta 1.0'] = (router(mode='arm', scheme=scheme), None)
        modes.update({f'{scheme}: budget {b}': (router(mode='budget', budget=b, scheme=scheme), None)
                      for b in budgets[scheme]})
    if routing is not None and routing.class_errors is not None:
        modes.update({f'tiles: calibrated {b}': (router(mode='calibrated', budget=b, scheme='tiles'), None)
                      for b in budgets['tiles']})
    for name, points in (('learned', learned), ('calibrated', calibrated)):
        modes.update({f'tiles: {MODES[name].label(point)}': (router(mode=name, **point), None) for point in points})
    if fixed_subnets:
        modes.update({f'fixed {i} (w{w} d{d})': (router(mode='fixed', subnet=i), None)
                      for i, (w, d) in enumerate(net.subnets[:-1])})
    with tqdm(total=len(images), desc='wall time', leave=False) as bar:
        seconds = time_modes(modes, images, repeats, progress=bar.update)
    summaries = {label: evaluate(r, images, assign_for=a) for label, (r, a) in modes.items()}
    rows = [{'mode': label, 'seconds': seconds[label], 'time_vs_full': seconds[label] / seconds['full'],
             'ratio_whole': summaries[label]['ratio_whole'], 'psnr': summaries[label]['psnr']} for label in modes]
    if fixed_subnets:
        # What a tiles mode would take if every tile ran at its subnet's whole-image speed (the subnets' shares of
        # the LR pixels times their measured time ratios): the gap to it is the executor's own cost (gathers,
        # scatters, halos, batching), the gap from it to the FLOPs ratio is how fast each width runs per FLOP.
        per_subnet = [seconds['full' if i == net.num_subnets - 1 else f'fixed {i} (w{w} d{d})'] / seconds['full']
                      for i, (w, d) in enumerate(net.subnets)]
        for row in rows:
            if row['mode'].startswith('tiles:'):
                row['ideal_executor'] = float(np.dot(summaries[row['mode']]['shares'], per_subnet))
    return rows


def parse_point(word: str) -> dict:
    """``budget=0.5,cost=seconds`` -> ``{'budget': 0.5, 'cost': 'seconds'}``."""
    point = {}
    for item in word.split(','):
        key, _, value = item.partition('=')
        try:
            point[key] = float(value)
        except ValueError:
            point[key] = value
    return point


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


PEAK_MEMORY_CODE = '''
import sys, torch, wbsr_arch
from wbsr_models.router import Router, RoutingOptions
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
net = wbsr_arch.WBSRSRResNet().eval()
r = Router(net, RoutingOptions(mode="wbsr", scheme=sys.argv[1]), 4)
x = torch.rand(1, 3, 2048, 2048)
before = hwm()
out = r(x).output
print(out.shape[-1], before, hwm())
'''


def costs(data: str, repeats: int) -> dict:
    """Training-step time, HES overhead, index build, GMM fit, peak memory at 2048x2048 per scheme."""
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
        # subnet (the supernet's own overhead); WBSRModel with routed and with tiles sampling
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
                                           'routed'),
                                          ('wbsr_model_tiles_step_s', WBSRModel, {'type': 'WBSRSRResNet'}, 'tiles')):
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
    for scheme in ('patches', 'tiles'):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, '-c', PEAK_MEMORY_CODE, scheme], capture_output=True, text=True,
                              check=True)
        size, before, after = done.stdout.split()
        result.update({f'peak_rss_2048_{scheme}_mb': int(after) / 1024, 'peak_rss_before_mb': int(before) / 1024,
                       'output_side': int(size), f'seconds_2048_{scheme}': time.perf_counter() - start})
    return result


def tile_size_sweep(net, scale: int, projection, data: str, sets: list[str], sizes: list[int],
                    time_images: int, repeats: int) -> list[str]:
    """Eq. 15 and the budget sweep of the tiles scheme for every tile size, on ``sets``; then the wall time of the
    full network and of budget 0.6 at every tile size on the first ``time_images`` images of the first set."""
    lines = ['| set | tile | ' + ' | '.join(['Eq. 15'] + [f'budget {b}' for b in TILE_BUDGETS]) + ' |',
             '|---|---|' + '---|' * (1 + len(TILE_BUDGETS))]
    report = {}
    for name in sets:
        images = load_test_set(os.path.join(data, name), scale)
        full = evaluate(Router(net, RoutingOptions(mode='full'), scale, projection), images)
        lines.append(f"| {name} | whole image, full network | {full['psnr']:.3f} (100%) |" + ' |' * len(TILE_BUDGETS))
        for size in sizes:
            cells = []
            options = [{'mode': 'wbsr'}] + [{'mode': 'budget', 'budget': b} for b in TILE_BUDGETS]
            for extra in options:
                r = evaluate(Router(net, RoutingOptions(scheme='tiles', tile_size=size, **extra), scale, projection),
                             images)
                report[f'{name}/{size}/{extra}'] = r
                cells.append(f"{r['psnr']:.3f} ({100 * r['ratio_whole']:.1f}%)")
            lines.append(f'| {name} | {size} | ' + ' | '.join(cells) + ' |')
            print(lines[-1], flush=True)
    if time_images > 0:
        images = load_test_set(os.path.join(data, sets[0]), scale, limit=time_images)
        modes = {'full': (Router(net, RoutingOptions(mode='full'), scale, projection), None)}
        for size in sizes:
            options = RoutingOptions(mode='budget', budget=0.6, tile_size=size)
            modes[f'tiles {size}, budget 0.6'] = (Router(net, options, scale, projection), None)
        seconds = time_modes(modes, images, repeats)
        lines += ['', f'Wall time, {sets[0]} first {len(images)} images, median of {repeats} interleaved runs:', '',
                  '| mode | s / image | time vs full | FLOPs % vs full |', '|---|---|---|---|']
        for label, (router, _) in modes.items():
            ratio = evaluate(router, images)['ratio_whole']
            lines.append(f'| {label} | {seconds[label]:.3f} | {seconds[label] / seconds["full"]:.2f} | '
                         f'{100 * ratio:.1f} |')
    return lines


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', help='the checkpoint (not needed with --merge)')
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--out', default='bench_out/benchmark')
    parser.add_argument('--sets', nargs='*', default=list(SETS), help='test sets (none: timing and costs only)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--time-images', type=int, default=6, help='Urban100 images timed (0: no wall time)')
    parser.add_argument('--time-budgets', type=float, nargs='*', default=None,
                        help='budgets timed (default: each scheme\'s lowest budget within 0.05 dB on Urban100)')
    parser.add_argument('--time-fixed', action='store_true', help='also time every subnet on the whole image')
    parser.add_argument('--time-learned', nargs='*', default=[], metavar='OPTION=VALUE',
                        help='points of the learned mode to time, e.g. budget=0.5 max_loss=0.05 cost=seconds (one '
                        'point per word; a word may join options with commas: budget=0.5,cost=seconds)')
    parser.add_argument('--time-calibrated', nargs='*', default=[], metavar='OPTION=VALUE',
                        help='points of the calibrated mode to time, e.g. slope=0.003 budget=0.5')
    parser.add_argument('--skip-costs', action='store_true')
    parser.add_argument('--modes', nargs='+', default=None,
                        help='evaluate only these: full, fixed, patches (the full network on the patches), oracle, '
                        'default (the checkpoint\'s stored default routing) and '
                        f'registered routing modes ({", ".join(MODES)}), or MODE:OPTION for the points of a mode that '
                        'set OPTION (e.g. learned:slope); the default is all of them')
    parser.add_argument('--other-projection', action='store_true',
                        help='also route Eq. 15 with the other difficulty projection (pca / sum), fitted on train291')
    parser.add_argument('--part', default=None, help='K/N: evaluate only images K, K+N, K+2N, ... of each set '
                        '(run N processes, one thread each, then --merge their --out folders)')
    parser.add_argument('--merge', nargs='+', default=None, help='--out folders of --part runs: write their '
                        'combined tables and plots under --out (no evaluation)')
    parser.add_argument('--tile-sizes', type=int, nargs='*', default=None,
                        help='run the tile-size sweep on --sets instead (e.g. --tile-sizes 64 32 16 8)')
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    keep_freed_memory()  # every mode alike: no page faults of fresh memory on every image
    if args.merge:
        return merge_parts(args.merge, args.out)
    if not args.model:
        parser.error('--model is required (except with --merge)')
    os.makedirs(args.out, exist_ok=True)
    net, scale, projection, routing = load_model(args.model)
    known = {'full', 'fixed', 'patches', 'oracle', 'default', *MODES,
             *(f'{n}:{o}' for n, m in MODES.items() for o in m.reads())}
    if args.modes is not None and set(args.modes) - known:
        parser.error(f'--modes: unknown {sorted(set(args.modes) - known)}; known: {sorted(known)}')
    only = set(args.modes) if args.modes is not None else None
    machine = (f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, '
               f'torch {torch.__version__}')
    if args.tile_sizes:
        lines = tile_size_sweep(net, scale, projection, args.data, args.sets, args.tile_sizes, args.time_images,
                                args.repeats)
        text = f'# Tile-size sweep\n\nModel: `{args.model}`; machine: {machine}.\n\n' + '\n'.join(lines) + '\n'
        with open(os.path.join(args.out, 'tile_sizes.md'), 'w') as f:
            f.write(text)
        print(text)
        return 0
    part = tuple(int(v) for v in args.part.split('/')) if args.part else (0, 1)
    report: dict = {'model': args.model, 'machine': machine, 'sets': {}, 'part': list(part)}
    probe = Router(net, RoutingOptions(mode='wbsr', scheme='patches'), scale, projection)
    lut_images = load_test_set(os.path.join(args.data, 'Set5'), scale) + load_test_set(
        os.path.join(args.data, 'Set14'), scale)
    arm_table = build_arm_table(probe, ((im.lq, gt_tensor(im)) for im in lut_images), source='Set5+Set14')
    arm_table.save(os.path.join(args.out, 'arm_table.npz'))
    alternative = alternative_projection(args.data, projection) if args.other_projection else None
    md = [f"# Routing benchmark\n\nModel: `{args.model}`; machine: {report['machine']}.\n",
          HEADER]
    for name in args.sets:
        print(f'{name}:', flush=True)
        images = load_test_set(os.path.join(args.data, name), scale)[part[0]::part[1]]
        summary, check = evaluate_set(net, scale, projection, arm_table, images, routing, alternative, only)
        bicubic = bicubic_summary(images, scale)
        report['sets'][name] = {'summary': summary, 'bicubic': bicubic, 'cache_check_max_abs': check,
                                'images': len(images)}
        with open(os.path.join(args.out, 'benchmark.json'), 'w') as f:  # kept even if the report below fails
            json.dump(report, f, indent=1, default=float)
        md += set_section(name, report['sets'][name], args.out)
    if args.time_images > 0:
        print('wall time:', flush=True)
        timing_images = load_test_set(os.path.join(args.data, 'Urban100'), scale, limit=args.time_images)
        found = report['sets'].get('Urban100', {}).get('lowest_budget_within_0.05dB', {})
        budgets = {scheme: args.time_budgets if args.time_budgets is not None else
                   ([found[scheme]['budget']] if found.get(scheme) else []) for scheme in ('patches', 'tiles')}
        learned = [parse_point(word) for word in args.time_learned]
        calibrated = [parse_point(word) for word in args.time_calibrated]
        timing = wall_time(net, scale, projection, arm_table, timing_images, args.repeats, budgets, args.time_fixed,
                           routing, learned, calibrated)
        report['wall_time'] = timing
        md += [f'## Wall time, Urban100 first {len(timing_images)} images, median of {args.repeats} interleaved runs\n',
               '| mode | s / image | time vs full | FLOPs % vs full on image | PSNR-Y on these images | time vs full '
               "if every tile ran at its subnet's whole-image speed |", '|---|---|---|---|---|---|']
        md += [f"| {r['mode']} | {r['seconds']:.3f} | {r['time_vs_full']:.2f} | {100 * r['ratio_whole']:.1f} | "
               f"{r['psnr']:.3f} | " + (f"{r['ideal_executor']:.2f} |" if 'ideal_executor' in r else ' |')
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
