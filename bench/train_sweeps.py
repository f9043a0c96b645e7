"""Training-time sweeps and the paper's Table-2 ablation, at CPU scale.

    python bench/train_sweeps.py --sweep loss [--iters 1500] [--jobs 2] [--out bench_out/sweeps]

Every row trains the same small supernet (SRResNet recipe, 32 channels, 8 blocks, widths 16/24/32, depths
2/4/8) on the 291-image pool at x4 with the same seed and iterations, through BasicSR's training pipeline
(``python -m wbsr_models.train``); one factor changes per sweep. Each checkpoint is evaluated on B100 and
Urban100 (x4, LR made by ``wbsr-make-lr``) with Eq. 15 routing and with the full subnet. Runs are cached
by the hash of their options, so rerunning a sweep only trains what changed. Writes
``<out>/<sweep>.md`` and ``<out>/<sweep>.json``.

Data: ``datasets/train291`` and ``datasets/{B100,Urban100}`` as the README's benchmark section makes them.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import yaml

from wbsr_models.evaluation import evaluate, load_test_set
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions

BD_LEARNT = {'type': 'BDLoss', 'label_space': 'rgb', 'init_noise_sigma': 0.05, 'learn_sigma': True}
BD_RGB_FIXED = {'type': 'BDLoss', 'label_space': 'rgb', 'init_noise_sigma': 0.01, 'learn_sigma': False}
BD_DETAIL_FIXED = {'type': 'BDLoss', 'label_space': 'detail', 'init_noise_sigma': 0.01, 'learn_sigma': False}
L1 = {'type': 'L1Loss', 'loss_weight': 1.0}

# The base row is the shipped defaults; each sweep was run after the previous one set its default.
BASE_LOSS, BASE_DELTA, BASE_SAMPLING = BD_DETAIL_FIXED, 0.9, 'routed'

SWEEPS = {
    'loss': [('L1', {'train.pixel_opt': L1}),
             ('BDLoss rgb, sigma learnt (spec)', {'train.pixel_opt': BD_LEARNT}),
             ('BDLoss rgb, sigma fixed 0.01', {'train.pixel_opt': BD_RGB_FIXED}),
             ('BDLoss detail, sigma fixed 0.01', {'train.pixel_opt': BD_DETAIL_FIXED})],
    'delta': [(f'delta {d}', {'datasets.train.delta': d}) for d in (1.0, 0.9, 0.8, 0.7)],
    'sampling': [(s, {'train.wbsr.subnet_sampling': s}) for s in ('flops_squared', 'sandwich', 'routed')],
    # Trained on the pool without its validation split (every 10th image), which decides the default; evaluated
    # under both schemes and on the test sets too.
    'tiles_sampling': [('routed', {'train.wbsr.subnet_sampling': 'routed', 'split': True}),
                       ('tiles', {'train.wbsr.subnet_sampling': 'tiles', 'split': True})],
    'ablation': [('uniform + L1', {'datasets.train.delta': 1.0, 'train.pixel_opt': L1}),
                 ('HES + L1', {'train.pixel_opt': L1}),
                 ('uniform + BDLoss', {'datasets.train.delta': 1.0}),
                 ('HES + BDLoss (WBSR)', {})],
    # in-place distillation at the same iterations and at about the same training time (it adds one forward of
    # the largest subnet per iteration), on the pool without its validation split
    'distill': [('routed', {'split': True}),
                ('routed + distill 1.0', {'split': True, 'train.wbsr.distill': 1.0}),
                ('routed + distill 1.0, 2/3 of the iterations', {'split': True, 'train.wbsr.distill': 1.0,
                                                                 'iters_share': 2 / 3})],
    # Tests whether 'distill' collapsed because of the loss scale (BDLoss is scaled like a squared error, whose
    # gradient near a good fit is far smaller than an L1 term's): the same distillation with an L1 pixel loss (equal
    # gradient scales, as in BigNAS) and with a 20x smaller weight under BDLoss. Both collapsed too (README).
    'distill_l1': [('routed, BDLoss', {'split': True}),
                   ('routed, L1', {'split': True, 'train.pixel_opt': L1}),
                   ('routed, BDLoss + distill 0.05', {'split': True, 'train.wbsr.distill': 0.05}),
                   ('routed, L1 + distill 1.0', {'split': True, 'train.pixel_opt': L1, 'train.wbsr.distill': 1.0})],
    # The L1 distillation term drifted the shared parameters (README); a squared-error term, at the same scale as BDLoss
    # (weight 1), at the same iterations and at about the same training time (2/3 of the iterations)
    'distill_mse': [('routed, BDLoss', {'split': True}),
                    ('routed, BDLoss + distill mse 1.0', {'split': True, 'train.wbsr.distill': 1.0,
                                                          'train.wbsr.distill_loss': 'mse'}),
                    ('routed, BDLoss + distill mse 1.0, 2/3 of the iterations',
                     {'split': True, 'train.wbsr.distill': 1.0, 'train.wbsr.distill_loss': 'mse',
                      'iters_share': 2 / 3})],
    # the ablation's two extreme rows, three times longer
    'ablation_long': [('uniform + L1, 3x iterations', {'datasets.train.delta': 1.0, 'train.pixel_opt': L1,
                                                       'iters_share': 3}),
                      ('HES + BDLoss (WBSR), 3x iterations', {'iters_share': 3})],
}


def base_options(data: str, iters: int) -> dict:
    return {
        'name': 'sweep', 'model_type': 'WBSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {
            'name': 'train291', 'type': 'HESPairedImageDataset', 'dataroot_gt': os.path.join(data, 'train291', 'HR'),
            'dataroot_lq': os.path.join(data, 'train291', 'LR_bicubic', 'X4'), 'io_backend': {'type': 'disk'},
            'gt_size': 64, 'use_hflip': True, 'use_rot': True, 'num_classes': 10, 'delta': BASE_DELTA,
            'switch_ratio': 0.7, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 16}},
        'network_g': {'type': 'WBSRSRResNet', 'num_feat': 32, 'num_block': 8, 'upscale': 4, 'widths': [16, 24, 32],
                      'depths': [2, 4, 8]},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3, 'weight_decay': 0, 'betas': [0.9, 0.999]},
                  'scheduler': {'type': 'CosineAnnealingRestartLR', 'periods': [iters], 'restart_weights': [1],
                                'eta_min': 1e-7},
                  'total_iter': iters, 'warmup_iter': -1, 'wbsr': {'subnet_sampling': BASE_SAMPLING},
                  'pixel_opt': dict(BASE_LOSS)},
        'logger': {'print_freq': 100, 'save_checkpoint_freq': iters, 'use_tb_logger': False},
    }


def split_pool(data: str) -> None:
    """The 291-image pool as ``train291_fit`` and ``val291`` (every 10th image by name): folders of symbolic
    links under ``data``. The validation split decides defaults, never the test sets."""
    names = sorted(os.listdir(os.path.join(data, 'train291', 'HR')))
    for part, chosen in (('train291_fit', [n for i, n in enumerate(names) if i % 10]), ('val291', names[::10])):
        for sub in ('HR', os.path.join('LR_bicubic', 'X4')):
            folder = os.path.join(data, part, sub)
            os.makedirs(folder, exist_ok=True)
            for name in chosen:
                if not os.path.lexists(os.path.join(folder, name)):
                    os.symlink(os.path.abspath(os.path.join(data, 'train291', sub, name)), os.path.join(folder, name))


def with_overrides(opt: dict, overrides: dict) -> dict:
    opt = copy.deepcopy(opt)
    overrides = dict(overrides)
    share = overrides.pop('iters_share', None)
    if share is not None:  # a multiple of the base iterations, with the schedule and the last checkpoint to match
        iters = int(round(opt['train']['total_iter'] * share))
        opt['train']['total_iter'] = iters
        opt['train']['scheduler']['periods'] = [iters]
        opt['logger']['save_checkpoint_freq'] = iters
    if overrides.pop('split', False):
        for key in ('dataroot_gt', 'dataroot_lq'):
            opt['datasets']['train'][key] = opt['datasets']['train'][key].replace('train291', 'train291_fit')
    for dotted, value in overrides.items():
        node, keys = opt, dotted.split('.')
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = copy.deepcopy(value)
    return opt


def run_key(opt: dict) -> str:
    return hashlib.sha1(json.dumps(opt, sort_keys=True).encode()).hexdigest()[:12]


def train(opt: dict, run_dir: str) -> tuple[str, float]:
    """Train one row (or reuse its finished checkpoint); returns the checkpoint and the training minutes."""
    checkpoint = os.path.join(run_dir, 'experiments', opt['name'], 'models', 'net_g_latest.pth')
    timing = os.path.join(run_dir, 'train_minutes.txt')
    if os.path.isfile(checkpoint) and os.path.isfile(timing):
        with open(timing) as f:
            return checkpoint, float(f.read())
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'opt.yml'), 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    with open(os.path.join(run_dir, 'train.log'), 'w') as log:
        done = subprocess.run([sys.executable, '-m', 'wbsr_models.train', '-opt', 'opt.yml'], cwd=run_dir, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f'training failed, see {run_dir}/train.log')
    minutes = (time.perf_counter() - start) / 60
    with open(timing, 'w') as f:
        f.write(f'{minutes:.2f}')
    return checkpoint, minutes


# What each sweep's checkpoints are evaluated on: (set, key, routing options). The earlier sweeps used the patch
# scheme (the only one then); 'tiles_sampling' compares sampling modes under both schemes, on the validation split
# first.
ABLATION_EVAL = (('full', {'mode': 'full'}), ('wbsr tiles', {'mode': 'wbsr', 'scheme': 'tiles'}),
                 ('classes', {'mode': 'wbsr', 'scheme': 'tiles'}))
FIXED_EVAL = tuple((f'fixed {i}', {'mode': 'fixed', 'subnet': i}) for i in range(9))
TILES_EVAL = (('full', {'mode': 'full'}), ('wbsr patches', {'mode': 'wbsr', 'scheme': 'patches'}),
              ('wbsr tiles', {'mode': 'wbsr', 'scheme': 'tiles'}),
              ('budget 0.5 tiles', {'mode': 'budget', 'budget': 0.5, 'scheme': 'tiles'}),
              ('budget 0.7 tiles', {'mode': 'budget', 'budget': 0.7, 'scheme': 'tiles'}))
EVALUATIONS = {
    'default': [(name, mode, {'mode': mode, 'scheme': 'patches'}) for name in ('B100', 'Urban100')
                for mode in ('wbsr', 'full')],
    'tiles_sampling': [(name, key, options) for name in ('val291', 'B100', 'Urban100') for key, options in TILES_EVAL],
    'distill': [(name, key, options) for name in ('val291', 'B100', 'Urban100')
                for key, options in TILES_EVAL + FIXED_EVAL],
    'distill_l1': [('val291', key, options) for key, options in TILES_EVAL + FIXED_EVAL]
    + [('B100', key, options) for key, options in TILES_EVAL],
    'distill_mse': [('val291', key, options) for key, options in TILES_EVAL + FIXED_EVAL]
    + [('B100', key, options) for key, options in TILES_EVAL + FIXED_EVAL],
    # per difficulty class: PSNR over the pixels of each class's tiles, Eq. 15 on tiles (see class_psnr)
    'ablation_long': [(name, key, options) for name in ('B100', 'Urban100') for key, options in ABLATION_EVAL],
    'ablation': [(name, key, options) for name in ('B100', 'Urban100') for key, options in ABLATION_EVAL],
}


def class_psnr(router: Router, images) -> dict:
    """PSNR-Y of the routed output over the pixels of each difficulty class's regions (pooled over the set, the
    scale-pixel border left out as in the tables), and the image-level mean PSNR-Y."""
    from wbsr_data.difficulty import luminance
    k = router.projection.num_classes
    se, count, psnr = np.zeros(k), np.zeros(k), []
    s = router.scale
    for image in images:
        result = router(image.lq)
        gt = torch.from_numpy(np.ascontiguousarray(image.gt[..., ::-1].transpose(2, 0, 1))).float()[None] / 255.
        err = (luminance(result.output.clamp(0, 1)) - luminance(gt)).pow(2)[0, 0]
        mask = torch.zeros_like(err, dtype=torch.bool)
        mask[s:-s, s:-s] = True
        for (top, left, h, w), c in zip(result.boxes.tolist(), result.classes.tolist()):
            region = (slice(top * s, (top + h) * s), slice(left * s, (left + w) * s))
            inside = mask[region]
            se[c - 1] += float(err[region][inside].sum())
            count[c - 1] += float(inside.sum())
        psnr.append(float(10 * torch.log10(1 / err[mask].mean())))
    per_class = [float(10 * np.log10(n / e)) if n else float('nan') for e, n in zip(se, count)]
    return {'psnr': float(np.mean(psnr)), 'class_psnr': per_class, 'class_pixels': count.tolist()}


def scheme_table(sweep: str, entries: list[dict], iters: int) -> list[str]:
    """PSNR-Y (FLOPs % of the whole-image full network) of every evaluation of every row, and, where measured, the
    PSNR-Y of each difficulty class's pixels (Eq. 15 on tiles)."""
    sets = list(dict.fromkeys(name for name, _, _ in EVALUATIONS[sweep]))
    keys = [key for key in dict.fromkeys(key for _, key, _ in EVALUATIONS[sweep]) if key != 'classes']
    lines = [f'{sweep}: {iters} iterations (unless the row says otherwise), batch 16, GT 64, seed 0, x4; PSNR-Y '
             '(FLOPs % of the full network on the whole image)', '',
             '| row | set | ' + ' | '.join(keys) + ' | train min |', '|---|---|' + '---|' * len(keys) + '---|']
    for e in entries:
        for name in sets:
            cells = [f"{e[f'{name}/{k}']['psnr']:.3f} ({100 * e[f'{name}/{k}']['ratio_whole']:.0f}%)"
                     if f'{name}/{k}' in e else '-' for k in keys]
            lines.append(f"| {e['row']} | {name} | " + ' | '.join(cells) + f" | {e['train_minutes']:.1f} |")
    if any(key == 'classes' for _, key, _ in EVALUATIONS[sweep]):
        num = len(entries[0][f'{sets[0]}/classes']['class_psnr'])
        lines += ['', 'PSNR-Y of the pixels of each difficulty class (1 = flattest), Eq. 15 on tiles, same thresholds '
                  'for every row:', '', '| row | set | ' + ' | '.join(f'class {c}' for c in range(1, num + 1)) + ' |',
                  '|---|---|' + '---|' * num]
        for e in entries:
            for name in sets:
                lines.append(f"| {e['row']} | {name} | " + ' | '.join(
                    f'{v:.3f}' for v in e[f'{name}/classes']['class_psnr']) + ' |')
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sweep', choices=sorted(SWEEPS), nargs='+', required=True)
    parser.add_argument('--iters', type=int, default=1500)
    parser.add_argument('--jobs', type=int, default=2, help='trainings in parallel, one thread each (default: 2)')
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--out', default='bench_out/sweeps')
    args = parser.parse_args()
    data, out = os.path.abspath(args.data), os.path.abspath(args.out)
    split_pool(data)
    base = base_options(data, args.iters)
    rows = [(sweep, label, with_overrides(base, overrides))
            for sweep in args.sweep for label, overrides in SWEEPS[sweep]]
    for _, _, opt in rows:
        opt['datasets']['train']['index_cache'] = os.path.join(out, 'hes_cache')
    with ThreadPoolExecutor(args.jobs) as pool:
        trained = list(pool.map(lambda r: train(r[2], os.path.join(out, 'runs', run_key(r[2]))), rows))
    torch.set_num_threads(2)
    sets: dict[str, list] = {}
    results: dict[str, list] = {}
    for (sweep, label, opt), (checkpoint, minutes) in zip(rows, trained):
        cache = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(checkpoint))), 'eval.json')
        scores = {}
        if os.path.isfile(cache):  # evaluations of this checkpoint made by any sweep
            with open(cache) as f:
                scores = json.load(f)
        missing = [e for e in EVALUATIONS.get(sweep, EVALUATIONS['default']) if f'{e[0]}/{e[1]}' not in scores]
        if missing:
            net, scale, projection, _ = load_model(checkpoint)
            for name, key, options in missing:
                if name not in sets:
                    sets[name] = load_test_set(os.path.join(data, name), 4)
                router = Router(net, RoutingOptions(**options), scale, projection)
                if key == 'classes':
                    scores[f'{name}/{key}'] = class_psnr(router, sets[name])
                    continue
                summary = evaluate(router, sets[name])
                scores[f'{name}/{key}'] = {k: summary[k] for k in ('psnr', 'ssim', 'ratio_regions', 'ratio_whole')}
            with open(cache, 'w') as f:
                json.dump(scores, f, indent=2)
        print(f'{sweep:9s} {label:34s}', '  '.join(f"{k} {v['psnr']:.3f}" for k, v in scores.items()), flush=True)
        results.setdefault(sweep, []).append({'row': label, 'run': run_key(opt), 'train_minutes': minutes, **scores})
    for sweep, entries in results.items():
        if sweep in EVALUATIONS:
            lines = scheme_table(sweep, entries, args.iters)
        else:
            lines = [f'{sweep}: {args.iters} iterations, batch 16, GT 64, seed 0, x4, 291-image pool', '',
                     '| row | B100 routed PSNR / SSIM (FLOPs %) | B100 full | Urban100 routed PSNR / SSIM (FLOPs %) '
                     '| Urban100 full | train min |', '|---|---|---|---|---|---|']
            for e in entries:
                cells = []
                for name in ('B100', 'Urban100'):
                    r, f = e[f'{name}/wbsr'], e[f'{name}/full']
                    cells += [f"{r['psnr']:.3f} / {r['ssim']:.4f} ({100 * r['ratio_regions']:.0f}%)",
                              f"{f['psnr']:.3f} / {f['ssim']:.4f}"]
                lines.append(f"| {e['row']} | " + ' | '.join(cells) + f" | {e['train_minutes']:.1f} |")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f'{sweep}.md'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        with open(os.path.join(out, f'{sweep}.json'), 'w') as f:
            json.dump(entries, f, indent=2)
        print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
