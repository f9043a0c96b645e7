"""``wbsr-demo``: the method end to end on photographs that ship with scikit-image, in minutes on a CPU.

1. Writes a training set (11 photographs) and a test set (4 others) from ``skimage.data`` with the
   protocol of spec section 9 (mod-crop, MATLAB bicubic x4).
2. Trains a small WBSR supernet (HES sampling, BDLoss, 3 widths x 3 depths) through BasicSR's training
   pipeline (``python -m wbsr_models.train``), on the GPU when there is one.
3. Measures every subnet on the training photographs and fits the learned mode's error predictor
   (``wbsr-calibrate --predictor``).
4. Tests the checkpoint with gradient-projection dynamic inference (the seamless ``tiles`` scheme, and the
   papers' ``patches`` for comparison), with the learned mode, the full network and every fixed subnet, and prints the
   table: PSNR/SSIM (Y channel), FLOPs against the full network run once on the whole image (and on the
   same patches), seconds per image measured under the same conditions for every row
   (:func:`~wbsr_models.evaluation.time_modes`), and a check that two runs of the same network time alike.
5. Writes the subnet allocation maps, the SR images and a PSNR-vs-FLOPs curve (PNG), and the table as
   Markdown and JSON, under ``--out`` (default ``wbsr_demo``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import yaml
from tqdm import tqdm

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.utils import imwrite, tensor2img  # noqa: E402

from wbsr_data.make_lr import make_dataset  # noqa: E402

from .evaluation import bicubic_summary, evaluate, keep_freed_memory, load_test_set, time_modes  # noqa: E402
from .infer import load_model  # noqa: E402
from .router import Router, RoutingOptions  # noqa: E402
from .visualize import allocation_map, subnet_labels  # noqa: E402

TRAIN_IMAGES = ('astronaut', 'coffee', 'rocket', 'hubble_deep_field', 'retina', 'immunohistochemistry', 'camera',
                'brick', 'grass', 'gravel', 'cell')
TEST_IMAGES = ('chelsea', 'coins', 'moon', 'page')
SCALE = 4


def write_photos(names: Sequence[str], folder: str) -> None:
    """Save scikit-image's bundled photographs as 3-channel PNGs (gray ones as gray RGB)."""
    import skimage.data
    os.makedirs(folder, exist_ok=True)
    for name in names:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        cv2.imwrite(os.path.join(folder, f'{name}.png'), cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2BGR))


def demo_options(data: str, iters: int) -> dict:
    """The demo's BasicSR option file: the shipped SRResNet recipe, scaled down to minutes on a CPU."""
    folders = {'dataroot_gt': os.path.join(data, 'train', 'HR'),
               'dataroot_lq': os.path.join(data, 'train', 'LR_bicubic', f'X{SCALE}')}
    return {
        'name': 'wbsr_demo', 'model_type': 'WBSRModel', 'scale': SCALE, 'num_gpu': 'auto', 'manual_seed': 0,
        'find_unused_parameters': True,
        'datasets': {'train': {
            'name': 'skimage_train', 'type': 'HESPairedImageDataset', **folders, 'io_backend': {'type': 'disk'},
            'gt_size': 64, 'use_hflip': True, 'use_rot': True, 'num_classes': 10, 'delta': 0.9, 'switch_ratio': 0.7,
            'index_cache': os.path.join(data, 'hes_cache'), 'cache_images': True, 'num_worker_per_gpu': 0,
            'batch_size_per_gpu': 16}},
        'network_g': {'type': 'WBSRSRResNet', 'num_feat': 32, 'num_block': 8, 'upscale': SCALE,
                      'widths': [16, 24, 32], 'depths': [2, 4, 8]},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3, 'weight_decay': 0, 'betas': [0.9, 0.999]},
                  'scheduler': {'type': 'CosineAnnealingRestartLR', 'periods': [iters], 'restart_weights': [1],
                                'eta_min': 1e-7},
                  'total_iter': iters, 'warmup_iter': -1,
                  'wbsr': {'subnet_sampling': 'routed'},
                  'pixel_opt': {'type': 'BDLoss', 'gmm_pixels': 100000}},
        'logger': {'print_freq': 10, 'save_checkpoint_freq': iters, 'use_tb_logger': False},
    }


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar that also shows in a log file or CI console (there, refreshed every 20 s instead of live)."""
    live = sys.stderr.isatty()
    return tqdm(disable=False, mininterval=0.1 if live else 20, dynamic_ncols=live, **kwargs)


def train(option_file: str, cwd: str, iters: int) -> str:
    """Run BasicSR's training pipeline in a subprocess, with a progress bar (iteration, loss, eta) fed from its
    log; the log's path is printed once."""
    cmd = [sys.executable, '-m', 'wbsr_models.train', '-opt', option_file]
    tail: deque[str] = deque(maxlen=40)
    log_dir = os.path.join(cwd, 'experiments', 'wbsr_demo')
    print(f'wbsr-demo: training log in {log_dir}/train_wbsr_demo_<time>.log', flush=True)
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            progress_bar(total=iters, desc='training', unit='it') as bar:
        for line in proc.stdout:
            tail.append(line)
            found = re.search(r'iter:\s+([\d,]+).*?\[eta: ([^,]+),.*?l_pix: ([-\d.e+]+)', line)
            if found:
                bar.set_postfix_str(f'loss {float(found.group(3)):.3e}, BasicSR eta {found.group(2)}', refresh=False)
                bar.update(int(found.group(1).replace(',', '')) - bar.n)
    if proc.returncode != 0:
        raise RuntimeError('training failed:\n' + ''.join(tail))
    return os.path.join(cwd, 'experiments', 'wbsr_demo', 'models', 'net_g_latest.pth')


def calibrate_demo(checkpoint: str, train_dir: str, out: str) -> str:
    """``wbsr-calibrate --predictor`` on the demo's training photographs: class errors and the error predictor of
    the learned mode, in a new checkpoint beside the trained one."""
    from .calibrate import main as calibrate_main
    target = os.path.join(out, 'net_g_calibrated.pth')
    print('wbsr-demo: measuring every subnet on the training photographs and fitting the error predictor', flush=True)
    if calibrate_main(['--model', checkpoint, '--data', train_dir, '--out', target, '--predictor']) != 0:
        raise RuntimeError('wbsr-calibrate failed')
    return target


def evaluate_demo(checkpoint: str, test_dir: str, out: str, device: str, repeats: int) -> list[dict]:
    """The table's rows: full network, Eq. 15, a budget sweep, the learned mode (budget and quality target) and the
    checkpoint's default routing (where wbsr-calibrate stored one) on seamless tiles, Eq. 15 on the papers' patches, and every fixed subnet; quality and FLOPs from one run each,
    seconds from :func:`time_modes`."""
    keep_freed_memory()
    net, scale, projection, routing = load_model(checkpoint, device=device)
    largest = len(net.subnets) - 1
    modes = [('full', {'mode': 'full'}), ('tiles: wbsr (Eq. 15)', {'mode': 'wbsr'})]
    modes += [(f'tiles: budget {b}', {'mode': 'budget', 'budget': b}) for b in (0.8, 0.65, 0.5)]
    if routing.predictor is not None:
        modes += [(f'tiles: learned {b}', {'mode': 'learned', 'budget': b}) for b in (0.65, 0.5)]
        modes += [('tiles: learned max_loss 0.05', {'mode': 'learned', 'max_loss': 0.05})]
        if routing.default is not None:  # what runs when no mode is given, chosen by wbsr-calibrate
            modes += [(f'tiles: default, {routing.default.describe()}', {})]
    modes += [('patches: wbsr (Eq. 15)', {'mode': 'wbsr', 'scheme': 'patches'})]
    modes += [(f'fixed {w}/{d}' + (' (= full)' if i == largest else ''), {'mode': 'fixed', 'subnet': i})
              for i, (w, d) in enumerate(net.subnets)]
    images = load_test_set(test_dir, scale, device)
    routers = {label: Router(net, RoutingOptions(**options), scale, projection, routing=routing)
               for label, options in modes}

    def save(label: str):
        def on_image(image, result, sr):
            stem = os.path.splitext(image.name)[0]
            tag = label.split(':')[0] if ':' in label else label
            imwrite(sr, os.path.join(out, 'sr', f'{stem}_{tag}.png'))
            if label.endswith('(Eq. 15)'):
                imwrite(allocation_map(tensor2img([image.lq[0].cpu()]), result, subnet_labels(net)),
                        os.path.join(out, 'maps', f'{stem}_alloc_{tag}.png'))
        return on_image if label == 'full' or label.endswith('(Eq. 15)') else None

    with progress_bar(total=len(modes) + len(images), desc='testing', unit='step') as bar:
        rows = []
        for label, _ in modes:
            rows.append({'mode': label, **evaluate(routers[label], images, on_image=save(label))})
            bar.update()
        seconds = time_modes({label: (router, None) for label, router in routers.items()}, images, repeats,
                             progress=bar.update)
    for row in rows:
        row['seconds'] = seconds[row['mode']]
        row['time_vs_full'] = row['seconds'] / seconds['full']
    return [{'mode': 'bicubic (reference)', **bicubic_summary(images, scale)}] + rows


def timing_check(rows: list[dict]) -> str:
    """The full network and the largest fixed subnet are the same network: their times must agree (10%)."""
    full = next(r for r in rows if r['mode'] == 'full')
    same = next(r for r in rows if r['mode'].endswith('(= full)'))
    gap = abs(same['seconds'] / full['seconds'] - 1)
    verdict = 'within 10%: the times compare' if gap <= 0.10 else 'MORE than 10% apart: the machine was busy'
    return (f"timing check: full {full['seconds']:.3f} s, {same['mode']} {same['seconds']:.3f} s per image, "
            f'{100 * gap:.1f}% apart ({verdict})')


def table(rows: list[dict]) -> str:
    lines = ['| mode | PSNR-Y | SSIM-Y | GFLOPs | FLOPs % vs full on image | FLOPs % vs full on the same patches | '
             's / image | time vs full |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        if 'gflops' not in r:  # the bicubic reference row
            lines.append(f"| {r['mode']} | {r['psnr']:.2f} | {r['ssim']:.4f} | - | - | - | - | - |")
            continue
        patches = f"{100 * r['ratio_regions']:.1f}" if r['mode'].startswith('patches') else '-'
        lines.append(f"| {r['mode']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['gflops']:.2f} | "
                     f"{100 * r['ratio_whole']:.1f} | {patches} | {r['seconds']:.3f} | {r['time_vs_full']:.2f} |")
    return '\n'.join(lines)


def plot_curve(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.axhline(rows[0]['psnr'], color='#bbbbbb', lw=1, ls=':', label='bicubic')
    rows = rows[1:]
    fixed = [r for r in rows if r['mode'].startswith('fixed')]
    budget = sorted([r for r in rows if r['mode'].startswith('tiles: budget')], key=lambda r: r['ratio_whole'])
    ax.plot([100 * r['ratio_whole'] for r in fixed], [r['psnr'] for r in fixed], 'o', color='#888888',
            label='fixed subnets (whole image)')
    ax.plot([100 * r['ratio_whole'] for r in budget], [r['psnr'] for r in budget], '-s', color='#4c72b0',
            label='WBSR budget sweep (tiles)')
    learned = sorted([r for r in rows if r['mode'].startswith('tiles: learned')], key=lambda r: r['ratio_whole'])
    if learned:
        ax.plot([100 * r['ratio_whole'] for r in learned], [r['psnr'] for r in learned], '-P', color='#17becf',
                label='learned mode (tiles)')
    for r in rows:
        if r['mode'] == 'full' or r['mode'].endswith('(Eq. 15)'):
            ax.plot(100 * r['ratio_whole'], r['psnr'], 'D' if r['mode'] == 'full' else '*', ms=11, label=r['mode'])
    ax.set_xlabel('FLOPs, % of the full network run once on the whole image')
    ax.set_ylabel('PSNR-Y (dB)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='wbsr_demo', help='output folder (default: wbsr_demo)')
    parser.add_argument('--iters', type=int, default=2500, help='training iterations (default: 2500)')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per image, median kept (default: 3)')
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    start = time.perf_counter()
    data = os.path.join(out, 'data')
    print(f'wbsr-demo: writing the scikit-image photographs to {data} (x{SCALE}, MATLAB bicubic)')
    write_photos(TRAIN_IMAGES, os.path.join(data, 'photos', 'train'))
    write_photos(TEST_IMAGES, os.path.join(data, 'photos', 'test'))
    make_dataset([os.path.join(data, 'photos', 'train')], os.path.join(data, 'train'), [SCALE], quiet=True)
    make_dataset([os.path.join(data, 'photos', 'test')], os.path.join(data, 'test'), [SCALE], quiet=True)
    option_file = os.path.join(out, 'train_wbsr_demo.yml')
    with open(option_file, 'w', encoding='utf-8') as f:
        yaml.safe_dump(demo_options(data, args.iters), f, sort_keys=False)
    try:
        checkpoint = calibrate_demo(train(option_file, out, args.iters), os.path.join(data, 'train'), out)
    except RuntimeError as exc:
        print(f'wbsr-demo: {exc}', file=sys.stderr)
        return 1
    rows = evaluate_demo(checkpoint, os.path.join(data, 'test'), out, device, args.repeats)
    text = table(rows) + '\n\n' + timing_check(rows[1:])
    minutes = (time.perf_counter() - start) / 60
    header = (f'WBSR demo: {len(TRAIN_IMAGES)} training photographs, {args.iters} iterations, x{SCALE}, '
              f'{len(TEST_IMAGES)} test photographs ({", ".join(TEST_IMAGES)}), {device}, {minutes:.1f} min')
    print('\n' + header + '\n\n' + text + '\n')
    with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
        f.write(f'{header}\n\n{text}\n')
    with open(os.path.join(out, 'results.json'), 'w', encoding='utf-8') as f:
        json.dump({'header': header, 'rows': rows}, f, indent=2)
    plot_curve(rows, os.path.join(out, 'psnr_vs_flops.png'), f'WBSR demo (x{SCALE}, scikit-image photographs)')
    print(f"wbsr-demo: table in {os.path.join(out, 'results.md')}, curve in "
          f"{os.path.join(out, 'psnr_vs_flops.png')}, allocation maps in {os.path.join(out, 'maps')}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
