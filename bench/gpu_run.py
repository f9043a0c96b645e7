"""The steps of the GPU run (``bench/gpu_run.sh``), one subcommand each; every one writes under one output folder.

    python bench/gpu_run.py prepare --data DIR [--data DIR] --out DATASETS   # or --synth DIR (dry run)
    python bench/gpu_run.py train   --datasets DATASETS --out TRAIN --seconds 300 [--amp] [--dry-run]
    python bench/gpu_run.py bench   --datasets DATASETS --model CKPT [--reference CKPT] --out BENCH [--dry-run]
    python bench/gpu_run.py summary --out OUT

``--data`` folders have the layout of the benchmark images beside the checkout (``train/T91``, ``train/BSD200``,
``test/B100/HR``, ``test/Urban100/HR``, any of them, PNG or lossless WebP as ``bench/gpu_pack.py`` writes them);
``prepare`` makes ``train291``, ``B100`` and ``Urban100`` from them with ``wbsr-make-lr``'s code, in parallel.

``train`` runs the reference recipe (``options/train_wbsr_srresnet_x4_train291.yml``) through BasicSR's training
pipeline for as many iterations as fit in ``--seconds``: a short calibration run of the same pipeline measures the
seconds per iteration (from the timestamps of BasicSR's log lines, after a warm-up) and the fixed costs; the real
run then gets the iteration count that fits, so that its cosine schedule runs to the end. A hard time limit stops
it if the estimate was wrong; then the newest saved checkpoint is used and the summary says so.

``bench`` evaluates the new checkpoint and the reference one on the same images (PSNR-Y / SSIM-Y, computed in
worker processes while the GPU routes the next images, and FLOPs) and times the new one (wall time with CUDA
synchronisation, :func:`wbsr_models.evaluation.time_modes`: warmed, interleaved, medians; images/s), for the
full network, every fixed subnet, tiles Eq. 15 and budgets, and patches Eq. 15.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Sequence

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_OPTIONS = os.path.join(REPO, 'options', 'train_wbsr_srresnet_x4_train291.yml')
REFERENCE_CHECKPOINT = os.path.join(REPO, 'checkpoints', 'wbsr_srresnet_x4_train291.pth')
SCALE = 4
#: Raw folders (relative to a ``--data`` folder) -> the dataset ``prepare`` makes of them.
SOURCES = (('train/T91', 'train291'), ('train/BSD200', 'train291'), ('test/B100/HR', 'B100'),
           ('test/Urban100/HR', 'Urban100'))
TEST_SETS = ('B100', 'Urban100')
#: The dry run's network: the test suite's tiny supernet.
TINY_NETWORK = {'type': 'WBSRSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 4,
                'upscale': SCALE, 'widths': [8, 12, 16], 'depths': [1, 2, 4]}
LOG_LINE = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO: \[.*?iter:\s*([\d,]+)')


def save_json(path: str, obj) -> None:
    from wbsr_data.fileio import save_json as atomic_json
    atomic_json(path, obj)


# ---- synth: the dry run's data -----------------------------------------------------------------------------
def synth(out: str) -> None:
    """Small crops of scikit-image's bundled photographs in the shared layout: 3 + 3 training, 2 + 2 test images."""
    import cv2
    import skimage.data
    plan = {'train/T91': [('astronaut', 96, 96), ('brick', 96, 128), ('gravel', 128, 96)],
            'train/BSD200': [('coffee', 96, 128), ('rocket', 128, 96), ('camera', 96, 96)],
            'test/B100/HR': [('chelsea', 64, 96), ('coins', 96, 64)],
            'test/Urban100/HR': [('page', 128, 160), ('moon', 160, 128)]}
    for folder, images in plan.items():
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        for name, h, w in images:
            img = getattr(skimage.data, name)()
            img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
            top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
            crop = cv2.cvtColor(np.ascontiguousarray(img[top:top + h, left:left + w]), cv2.COLOR_RGB2BGR)
            cv2.imwrite(os.path.join(out, folder, f'{name}.png'), crop)


# ---- prepare: HR/LR datasets ---------------------------------------------------------------------------------
def _make_one(hr_dir: str, out: str) -> tuple[str, int, int]:
    from wbsr_data.make_lr import make_dataset
    counts = make_dataset([hr_dir], out, [SCALE], quiet=True)
    return hr_dir, counts['written'], counts['skipped']


def prepare(data_dirs: Sequence[str], out: str, jobs: int) -> dict:
    """``train291``, ``B100`` and ``Urban100`` under ``out`` (x4 only) from every source folder found."""
    tasks = [(os.path.join(d, src), os.path.join(out, dst)) for d in data_dirs for src, dst in SOURCES
             if os.path.isdir(os.path.join(d, src))]
    if not tasks:
        raise SystemExit(f'gpu_run prepare: no {", ".join(s for s, _ in SOURCES)} under {", ".join(data_dirs)}')
    if jobs > 1:
        with ProcessPoolExecutor(min(jobs, len(tasks))) as pool:
            done = list(pool.map(_make_one, *zip(*tasks)))
    else:
        done = [_make_one(*task) for task in tasks]
    report = {'sources': [{'folder': f, 'written': w, 'skipped': s} for f, w, s in done],
              'datasets': {name: len(os.listdir(os.path.join(out, name, 'HR')))
                           for name in sorted({dst for _, dst in SOURCES}) if os.path.isdir(os.path.join(out, name))}}
    for line in report['sources']:
        print(f"prepare: {line['folder']}: {line['written']} images, {line['skipped']} skipped")
    return report


# ---- train: the reference recipe within a time budget --------------------------------------------------------
def train_options(datasets: str, work: str, *, name: str, iters: int, amp: bool, workers: int, dry_run: bool,
                  print_freq: int, save_freq: int, gmm_path: Optional[str] = None) -> dict:
    """The reference run's option file, with this run's data, iterations, data workers and AMP; no validation
    during training (the benchmark step evaluates the checkpoint)."""
    from wbsr_models.infer import read_option_file
    opt = json.loads(json.dumps(read_option_file(REFERENCE_OPTIONS)))  # plain dicts, for yaml.safe_dump
    opt['name'] = name
    train_set = opt['datasets']['train']
    train_set.update(dataroot_gt=os.path.join(datasets, 'train291', 'HR'),
                     dataroot_lq=os.path.join(datasets, 'train291', 'LR_bicubic', f'X{SCALE}'),
                     index_cache=os.path.join(work, 'hes_cache'), cache_images=True, num_worker_per_gpu=workers,
                     persistent_workers=workers > 0)
    opt['datasets'] = {'train': train_set}
    opt.pop('val', None)
    opt['train']['total_iter'] = iters
    opt['train']['scheduler']['periods'] = [iters]
    opt['train'].setdefault('wbsr', {})['amp'] = amp
    if gmm_path:
        opt['train']['pixel_opt']['gmm_path'] = gmm_path
    opt['logger'].update(print_freq=print_freq, save_checkpoint_freq=save_freq, use_tb_logger=False)
    if dry_run:
        opt['network_g'] = dict(TINY_NETWORK)
        train_set.update(gt_size=32, batch_size_per_gpu=4, patch_stride=16)
        opt['train']['pixel_opt']['gmm_pixels'] = 20000
    return opt


def log_iterations(text: str) -> list[tuple[float, int]]:
    """``(seconds, iteration)`` of every BasicSR training log line, in order (timestamps to the millisecond)."""
    points = []
    for line in text.splitlines():
        found = LOG_LINE.match(line)
        if found:
            stamp = datetime.datetime.strptime(found.group(1), '%Y-%m-%d %H:%M:%S,%f').timestamp()
            points.append((stamp, int(found.group(2).replace(',', ''))))
    return points


def seconds_per_iteration(points: Sequence[tuple[float, int]], skip: int) -> Optional[float]:
    """Seconds per iteration between the first logged iteration >= ``skip`` (past the warm-up) and the last."""
    steady = [(t, it) for t, it in points if it >= skip]
    if len(steady) < 2 or steady[-1][1] == steady[0][1]:
        return None
    return (steady[-1][0] - steady[0][0]) / (steady[-1][1] - steady[0][1])


def plan_iterations(seconds: float, overhead: float, per_iter: float, *, margin: float = 0.9, multiple: int = 100,
                    minimum: int = 100, maximum: Optional[int] = None) -> int:
    """Iterations that fit ``seconds`` after the fixed ``overhead``, with a ``margin``, in whole ``multiple``s."""
    fit = int(max(0.0, seconds * margin - overhead) / per_iter) // multiple * multiple
    fit = max(minimum, fit)
    return min(fit, maximum) if maximum is not None else fit


def run_training(option_file: str, cwd: str, log_path: str, limit: float) -> tuple[int, float, bool]:
    """BasicSR's training pipeline on ``option_file`` in a new process group, stopped after ``limit`` seconds.

    Returns the exit status, the wall time and whether the limit stopped it.
    """
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, '-m', 'wbsr_models.train', '-opt', option_file], cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout=limit)
            stopped = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status, stopped = proc.returncode, True
    return status, time.perf_counter() - start, stopped


def newest_checkpoint(models: str) -> tuple[Optional[str], Optional[int]]:
    """``net_g_latest.pth`` (a finished run) or the highest ``net_g_<iter>.pth`` (a stopped one)."""
    if not os.path.isdir(models):
        return None, None
    iters = sorted(int(m.group(1)) for m in (re.fullmatch(r'net_g_(\d+)\.pth', f) for f in os.listdir(models)) if m)
    if os.path.isfile(os.path.join(models, 'net_g_latest.pth')):
        return os.path.join(models, 'net_g_latest.pth'), None
    if iters:
        return os.path.join(models, f'net_g_{iters[-1]}.pth'), iters[-1]
    return None, None


def last_losses(text: str) -> dict:
    found = [line for line in text.splitlines() if LOG_LINE.match(line)]
    return {k: float(v) for k, v in re.findall(r'(l_\w+|noise_sigma|hes_phase): ([-\d.e+]+)', found[-1])} \
        if found else {}


def train(datasets: str, out: str, seconds: float, *, amp: bool, workers: int, dry_run: bool) -> dict:
    """Calibrate, plan, train; the checkpoint is copied to ``out/net_g_gpu.pth``. Writes ``out/train.json``."""
    import torch
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    report: dict = {'seconds_budget': seconds, 'amp': amp, 'workers': workers, 'dry_run': dry_run,
                    'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
                    'torch': torch.__version__, 'options': REFERENCE_OPTIONS}
    cal_iters, cal_freq = (3, 1) if dry_run else (200, 25)
    common = {'amp': amp, 'workers': workers, 'dry_run': dry_run}

    def write(name: str, opt: dict) -> str:
        path = os.path.join(out, f'{name}.yml')
        with open(path, 'w', encoding='utf-8') as f:
            yaml.safe_dump(opt, f, sort_keys=False)
        return path

    cal_file = write('calibrate', train_options(datasets, out, name='gpu_calibrate', iters=cal_iters,
                                                print_freq=cal_freq, save_freq=10**9, **common))
    status, wall, stopped = run_training(cal_file, out, os.path.join(out, 'calibrate.log'), seconds * 0.5)
    with open(os.path.join(out, 'calibrate.log'), encoding='utf-8', errors='replace') as f:
        per_iter = seconds_per_iteration(log_iterations(f.read()), skip=cal_iters // 4)
    report['calibration'] = {'iterations': cal_iters, 'status': status, 'wall_s': wall, 'stopped': stopped,
                             'seconds_per_iteration': per_iter}
    if status != 0 or per_iter is None:
        save_json(os.path.join(out, 'train.json'), report)
        raise SystemExit(f'gpu_run train: the calibration run failed (status {status}); see {out}/calibrate.log')
    overhead = max(0.0, wall - per_iter * cal_iters)
    remaining = seconds - (time.perf_counter() - start)
    if dry_run:
        iters = 2 if remaining < overhead + 3 * per_iter else 3
    else:
        iters = plan_iterations(remaining, overhead, per_iter)
    report['calibration']['overhead_s'] = overhead
    report['planned_iterations'] = iters
    with open(cal_file, encoding='utf-8') as f:
        label_space = yaml.safe_load(f)['train']['pixel_opt'].get('label_space', 'detail')
    gmm = os.path.join(out, 'experiments', 'gpu_calibrate', f'bd_gmm_{label_space}.npz')  # fitted by calibration
    main_file = write('train', train_options(
        datasets, out, name='gpu_train291', iters=iters, print_freq=1 if dry_run else 100,
        save_freq=iters if dry_run else max(100, iters // 5 // 100 * 100),
        gmm_path=gmm if os.path.isfile(gmm) else None, **common))
    print(f'train: {per_iter:.4f} s/iteration, {overhead:.1f} s fixed cost (calibration, {cal_iters} iterations); '
          f'{iters} iterations planned for {remaining:.0f} s', flush=True)
    status, wall, stopped = run_training(main_file, out, os.path.join(out, 'train.log'),
                                         max(10.0, seconds - (time.perf_counter() - start)))
    with open(os.path.join(out, 'train.log'), encoding='utf-8', errors='replace') as f:
        text = f.read()
    points = log_iterations(text)
    checkpoint, at_iter = newest_checkpoint(os.path.join(out, 'experiments', 'gpu_train291', 'models'))
    report['run'] = {'status': status, 'wall_s': wall, 'stopped_by_time_limit': stopped,
                     'last_logged_iteration': points[-1][1] if points else 0,
                     'seconds_per_iteration': seconds_per_iteration(points, skip=min(iters // 4, 500)),
                     'final_losses': last_losses(text), 'checkpoint': checkpoint,
                     'checkpoint_iteration': iters if at_iter is None and checkpoint else at_iter}
    if checkpoint:
        shutil.copyfile(checkpoint, os.path.join(out, 'net_g_gpu.pth.tmp'))
        os.replace(os.path.join(out, 'net_g_gpu.pth.tmp'), os.path.join(out, 'net_g_gpu.pth'))
    report['total_s'] = time.perf_counter() - start
    save_json(os.path.join(out, 'train.json'), report)
    print(f"train: status {status}, {report['run']['last_logged_iteration']} of {iters} iterations logged in "
          f"{wall:.0f} s{' (stopped by the time limit)' if stopped else ''}; checkpoint {checkpoint}", flush=True)
    if not checkpoint:
        raise SystemExit(f'gpu_run train: no checkpoint was written; see {out}/train.log')
    return report


# ---- bench: routing on the GPU -------------------------------------------------------------------------------
def _metrics(sr: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    from basicsr.metrics import calculate_psnr, calculate_ssim
    return (calculate_psnr(sr, gt, crop_border=SCALE, test_y_channel=True),
            calculate_ssim(sr, gt, crop_border=SCALE, test_y_channel=True))


def bench_modes(net, projection, routing=None) -> dict:
    """``label -> RoutingOptions`` of every row: full, fixed subnets, patches Eq. 15, and under tiles the ``quick``
    points of every registered routing mode whose checkpoint artefacts are there."""
    from wbsr_models.router import RoutingOptions
    from wbsr_models.routing.modes import MODES
    modes = {'full': RoutingOptions(mode='full')}
    for i, (w, d) in enumerate(getattr(net, 'subnets', [])):
        modes[f'fixed {i} (w{w} d{d})'] = RoutingOptions(mode='fixed', subnet=i)
    have = {'class_errors': routing is not None and routing.class_errors is not None,
            'predictor': routing is not None and routing.predictor is not None, 'arm_table': False}
    for name, mode in MODES.items():
        if mode.whole_image or not all(have.get(need, True) for need in mode.needs):
            continue
        modes.update({f'tiles: {mode.label(point)}': RoutingOptions(mode=name, scheme='tiles', **point)
                      for point in mode.quick})
    modes['patches: Eq. 15'] = RoutingOptions(mode='wbsr', scheme='patches')
    return modes


def evaluate_modes(net, projection, images, modes: dict, pool, routing=None) -> dict:
    """Mean PSNR-Y, SSIM-Y, GFLOPs and FLOPs ratios of every mode; metrics computed by ``pool`` meanwhile."""
    from basicsr.utils import tensor2img
    from wbsr_models.router import Router
    pending: dict[str, list] = {}
    costs: dict[str, list] = {}
    for label, options in modes.items():
        router = Router(net, options, SCALE, projection, routing=routing)
        for image in images:
            result = router(image.lq)
            sr = tensor2img([result.output[0].detach().float().cpu()])
            pending.setdefault(label, []).append(pool.submit(_metrics, sr, image.gt))
            costs.setdefault(label, []).append((result.flops / 1e9, result.ratio_regions, result.ratio_whole))
    summary = {}
    for label in modes:
        scores = np.array([f.result() for f in pending[label]])
        c = np.array(costs[label])
        summary[label] = {'psnr': float(scores[:, 0].mean()), 'ssim': float(scores[:, 1].mean()),
                          'gflops': float(c[:, 0].mean()), 'ratio_regions': float(c[:, 1].mean()),
                          'ratio_whole': float(c[:, 2].mean()), 'images': len(images)}
    return summary


def time_rows(net, projection, images, modes: dict, repeats: int, routing=None) -> list[dict]:
    """Seconds per image (CUDA-synchronised, warmed, interleaved medians) and images/s of every mode."""
    from wbsr_models.evaluation import time_modes
    from wbsr_models.router import Router
    routers = {label: (Router(net, options, SCALE, projection, routing=routing), None)
               for label, options in modes.items()}
    seconds = time_modes(routers, images, repeats)
    return [{'mode': label, 'seconds': s, 'images_per_s': 1 / s, 'time_vs_full': s / seconds['full']}
            for label, s in seconds.items()]


def batched_throughput(net, images, batch: int, repeats: int) -> Optional[dict]:
    """Images/s of the full network on batches of up to ``batch`` same-size images (what batch 1 leaves unused)."""
    import torch
    groups: dict[tuple, list] = {}
    for image in images:
        groups.setdefault(tuple(image.lq.shape), []).append(image.lq)
    shape, members = max(groups.items(), key=lambda kv: len(kv[1]))
    x = torch.cat(members[:batch])
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        net(x)
        sync()
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            net(x)
            sync()
            times.append(time.perf_counter() - start)
    return {'batch': len(x), 'lr_shape': list(shape[-2:]), 'seconds': statistics.median(times),
            'images_per_s': len(x) / statistics.median(times)}


class Inline:
    """``submit`` that runs at once: the metric "pool" of a run without worker processes."""

    class Done:
        def __init__(self, value) -> None:
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, *args):
        return self.Done(fn(*args))

    def shutdown(self) -> None:
        pass


def _import_metrics(_) -> None:
    import basicsr.metrics  # noqa: F401


def bench(datasets: str, model: Optional[str], reference: Optional[str], out: str, *, time_images: int,
          repeats: int, jobs: int, seconds: float, dry_run: bool) -> dict:
    """Evaluate both checkpoints, then time the new one (the reference alone when there is none).

    ``out/gpu_benchmark.json`` and ``.md`` are rewritten after every part, so a run stopped by its time limit keeps
    what it measured. A set's timing is skipped, with a note, when its estimate (from the evaluation's seconds per
    routed image) does not fit what is left of ``seconds``.
    """
    start_all = time.perf_counter()
    if jobs > 0:
        # Metric workers, all forked now, before this process imports torch and starts CUDA and its threads; they
        # import BasicSR's metrics meanwhile (one task each: while none is idle, every submit forks a new one).
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('fork'))
        for _ in range(jobs):
            pool.submit(_import_metrics, None)
    else:
        pool = Inline()
    import torch
    from wbsr_models.evaluation import bicubic_summary, load_test_set
    from wbsr_models.infer import load_model
    os.makedirs(out, exist_ok=True)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    report: dict = {'device': torch.cuda.get_device_name(0) if device == 'cuda' else platform.processor() or 'cpu',
                    'torch': torch.__version__, 'dry_run': dry_run, 'time_images': time_images, 'repeats': repeats,
                    'cudnn_benchmark': torch.backends.cudnn.benchmark,
                    'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
                    'checkpoints': {}, 'sets': {}, 'timing': {}, 'batched': {}, 'notes': []}
    checkpoints = {k: v for k, v in (('new', model), ('reference', reference)) if v and os.path.isfile(v)}
    report['checkpoints'] = checkpoints
    sets = {name: load_test_set(os.path.join(datasets, name), SCALE, device) for name in TEST_SETS
            if os.path.isdir(os.path.join(datasets, name, 'HR'))}

    def write() -> None:
        report['verdict'] = verdict(report)
        save_json(os.path.join(out, 'gpu_benchmark.json'), report)
        with open(os.path.join(out, 'gpu_benchmark.md'), 'w', encoding='utf-8') as f:
            f.write(bench_markdown(report))

    for name, images in sets.items():
        report['sets'][name] = {'images': len(images), 'bicubic': bicubic_summary(images, SCALE)}
    per_call: dict[str, float] = {}
    for key, checkpoint in checkpoints.items():
        net, scale, projection, routing = load_model(checkpoint, device=device)
        modes = bench_modes(net, projection, routing)
        for name, images in sets.items():
            start = time.perf_counter()
            report['sets'][name][key] = evaluate_modes(net, projection, images, modes, pool, routing)
            per_call[f'{key}/{name}'] = (time.perf_counter() - start) / (len(modes) * len(images))
            print(f"bench: {key} {name}: {len(modes)} modes x {len(images)} images evaluated in "
                  f"{time.perf_counter() - start:.1f} s; full {report['sets'][name][key]['full']['psnr']:.3f} dB, "
                  f"tiles Eq. 15 {report['sets'][name][key]['tiles: Eq. 15']['psnr']:.3f} dB", flush=True)
            write()
    timed = 'new' if 'new' in checkpoints else 'reference'
    if timed in checkpoints:
        net, scale, projection, routing = load_model(checkpoints[timed], device=device)
        modes = bench_modes(net, projection, routing)
        for name, images in sets.items():
            images = images[:time_images]
            estimate = per_call[f'{timed}/{name}'] * len(modes) * len(images) * (repeats + 1)
            left = seconds - (time.perf_counter() - start_all)
            if estimate > left:
                report['notes'].append(f'{name}: timing skipped (estimated {estimate:.0f} s, {left:.0f} s left)')
                print(f"bench: {report['notes'][-1]}", flush=True)
                continue
            start = time.perf_counter()
            report['timing'].setdefault(name, {})[timed] = time_rows(net, projection, images, modes, repeats, routing)
            report['batched'].setdefault(name, {})[timed] = batched_throughput(net, sets[name], 16, repeats)
            print(f'bench: {timed} {name}: timed on {len(images)} images in {time.perf_counter() - start:.1f} s '
                  f'(estimated {estimate:.0f} s)', flush=True)
            write()
    if device == 'cuda':
        report['max_memory_allocated_mb'] = torch.cuda.max_memory_allocated() / 2**20
    write()
    pool.shutdown()
    return report


def verdict(report: dict) -> dict:
    """Whether the new checkpoint beats the reference: higher PSNR-Y for the full network and for tiles Eq. 15
    on every test set, on the same images."""
    rows = {}
    for name, entry in report['sets'].items():
        if 'new' in entry and 'reference' in entry:
            rows[name] = {label: entry['new'][label]['psnr'] - entry['reference'][label]['psnr']
                          for label in ('full', 'tiles: Eq. 15', 'patches: Eq. 15')}
    beats = bool(rows) and all(d['full'] > 0 and d['tiles: Eq. 15'] > 0 for d in rows.values())
    return {'psnr_gain_db': rows, 'beats_reference': beats}


def bench_markdown(report: dict) -> str:
    lines = [f"# GPU routing benchmark\n\nDevice: {report['device']}, torch {report['torch']}; checkpoints: "
             + ', '.join(f'{k} `{v}`' for k, v in report['checkpoints'].items()) + '.\n',
             'PSNR-Y / SSIM-Y (x4, 4-pixel border); FLOPs % against the full network run once on the whole image; '
             f"seconds per image on the first {report['time_images']} images of each set (batch 1, CUDA-synchronised, "
             f"every mode warmed on every image, modes interleaved, median of {report['repeats']}).\n"]
    for name, entry in report['sets'].items():
        bic = entry['bicubic']
        lines.append(f"## {name}, {entry['images']} images\n\nBicubic: {bic['psnr']:.3f} / {bic['ssim']:.4f}.\n")
        for key in ('new', 'reference'):
            if key not in entry:
                continue
            timing = {r['mode']: r for r in report['timing'].get(name, {}).get(key, [])}
            lines += [f'### {key}\n', '| mode | PSNR-Y | SSIM-Y | GFLOPs | FLOPs % | s / image | images / s | '
                      'time vs full |', '|---|---|---|---|---|---|---|---|']
            for label, r in entry[key].items():
                t = timing.get(label)
                cells = (f"{t['seconds']:.4f} | {t['images_per_s']:.1f} | {t['time_vs_full']:.2f}" if t
                         else '- | - | -')
                lines.append(f"| {label} | {r['psnr']:.3f} | {r['ssim']:.4f} | {r['gflops']:.2f} | "
                             f"{100 * r['ratio_whole']:.1f} | {cells} |")
            batched = report['batched'].get(name, {}).get(key)
            if batched:
                lines.append(f"\nFull network on a batch of {batched['batch']} LR images of "
                             f"{batched['lr_shape'][0]}x{batched['lr_shape'][1]}: {batched['images_per_s']:.1f} "
                             'images / s.\n')
            else:
                lines.append('')
    lines += [f'- {note}' for note in report.get('notes', [])]
    v = report.get('verdict', {})
    if v.get('psnr_gain_db'):
        lines.append('## New against reference (PSNR-Y gain, dB, same images)\n')
        lines += ['| set | full | tiles Eq. 15 | patches Eq. 15 |', '|---|---|---|---|']
        lines += [f"| {name} | {d['full']:+.3f} | {d['tiles: Eq. 15']:+.3f} | {d['patches: Eq. 15']:+.3f} |"
                  for name, d in v['psnr_gain_db'].items()]
        lines.append(f"\nBeats the reference (full and tiles Eq. 15 higher on every set): "
                     f"{'yes' if v['beats_reference'] else 'no'}.\n")
    return '\n'.join(lines) + '\n'


# ---- summary -------------------------------------------------------------------------------------------------
#: What the bundle leaves out: the data, the training folder's checkpoints and states (the final one is
#: net_g_gpu.pth), the HES cache and the bundle itself.
BUNDLE_SKIP = re.compile(r'^(data|datasets|carry)(/|$)|/(models|training_states|hes_cache)(/|$)|^results\.tar\.gz$|'
                         r'(^|/)net_g_gpu\.pth$')


def summary(out: str) -> str:
    """``out/README.md`` (steps, training, benchmark) and ``out/results.tar.gz`` (everything small)."""
    lines = ['# GPU run\n', '| step | status | seconds | limit |', '|---|---|---|---|']
    steps_file = os.path.join(out, 'steps.tsv')
    if os.path.isfile(steps_file):
        with open(steps_file, encoding='utf-8') as f:
            for row in f.read().splitlines()[1:]:
                lines.append('| ' + ' | '.join(row.split('\t')) + ' |')
    train_json = os.path.join(out, 'train', 'train.json')
    if os.path.isfile(train_json):
        with open(train_json, encoding='utf-8') as f:
            t = json.load(f)
        cal, run = t.get('calibration', {}), t.get('run', {})
        lines.append(f"\n## Training\n\nDevice {t['device']}, torch {t['torch']}, AMP {t['amp']}, {t['workers']} data "
                     f"workers, budget {t['seconds_budget']:.0f} s. Calibration: {cal.get('iterations')} iterations, "
                     f"{(cal.get('seconds_per_iteration') or 0):.4f} s/iteration, {cal.get('overhead_s', 0):.1f} s "
                     f"fixed cost. Planned {t.get('planned_iterations')} iterations.")
        if run:
            lines.append(f"Run: status {run['status']}, {run['wall_s']:.0f} s, last logged iteration "
                         f"{run['last_logged_iteration']}"
                         f"{', stopped by the time limit' if run['stopped_by_time_limit'] else ''}; checkpoint at "
                         f"iteration {run['checkpoint_iteration']}; last losses {run['final_losses']}.")
    bench_md = os.path.join(out, 'bench', 'gpu_benchmark.md')
    if os.path.isfile(bench_md):
        with open(bench_md, encoding='utf-8') as f:
            lines.append('\n' + re.sub(r'^(#+) ', r'#\1 ', f.read(), flags=re.M))  # one level down
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(out, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(text)
    bundle = os.path.join(out, 'results.tar.gz')
    with tarfile.open(bundle + '.tmp', 'w:gz') as tar:
        for folder, dirs, files in os.walk(out):
            rel_dir = os.path.relpath(folder, out)
            dirs[:] = [d for d in sorted(dirs) if not BUNDLE_SKIP.search(os.path.normpath(os.path.join(rel_dir, d)))]
            for name in sorted(files):
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if not BUNDLE_SKIP.search(rel) and not name.endswith('.tmp'):
                    tar.add(os.path.join(folder, name), arcname=os.path.join('gpu_run', rel))
    os.replace(bundle + '.tmp', bundle)
    print(text)
    return text


def dry_data(raw: str, carry: str) -> list[str]:
    """The dry run's data: synthetic images, packed as for a device call (lossless WebP, a 1 MiB budget)."""
    import gpu_pack
    synth(raw)
    manifest = gpu_pack.pack(raw, carry, 1 * gpu_pack.MIB, wheels=False, python=sys.executable, target_python='')
    print(f"dry run: {manifest['data_bytes']} bytes of images packed into {carry}, "
          f"{len(manifest['left_out'])} left out")
    return [os.path.join(carry, 'data')]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='step', required=True)
    p = sub.add_parser('prepare')
    p.add_argument('--data', action='append', default=[])
    p.add_argument('--synth', metavar='DIR', help='dry run: synthesise images in DIR/raw, pack them into DIR/carry')
    p.add_argument('--out', required=True)
    p.add_argument('--jobs', type=int, default=4)
    p = sub.add_parser('train')
    p.add_argument('--datasets', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--seconds', type=float, default=300)
    p.add_argument('--amp', action='store_true')
    p.add_argument('--workers', type=int, default=12)
    p.add_argument('--dry-run', action='store_true')
    p = sub.add_parser('bench')
    p.add_argument('--datasets', required=True)
    p.add_argument('--model')
    p.add_argument('--reference', default=REFERENCE_CHECKPOINT)
    p.add_argument('--out', required=True)
    p.add_argument('--time-images', type=int, default=20)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--jobs', type=int, default=max(1, (os.cpu_count() or 2) - 2), help='metric workers (0: none)')
    p.add_argument('--seconds', type=float, default=150, help='time budget; timing is skipped where it would not fit')
    p.add_argument('--dry-run', action='store_true')
    p = sub.add_parser('summary')
    p.add_argument('--out', required=True)
    args = parser.parse_args(argv)
    if args.step == 'prepare':
        data = args.data + (dry_data(os.path.join(args.synth, 'raw'), os.path.join(args.synth, 'carry'))
                            if args.synth else [])
        if not data:
            parser.error('prepare needs --data or --synth')
        save_json(os.path.join(args.out, 'prepare.json'), prepare(data, args.out, args.jobs))
    elif args.step == 'train':
        train(os.path.abspath(args.datasets), os.path.abspath(args.out), args.seconds, amp=args.amp,
              workers=args.workers, dry_run=args.dry_run)
    elif args.step == 'bench':
        bench(args.datasets, args.model, args.reference, args.out, time_images=args.time_images, repeats=args.repeats,
              jobs=args.jobs, seconds=args.seconds, dry_run=args.dry_run)
    else:
        summary(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
