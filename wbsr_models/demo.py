"""``wbsr-demo``: the method end to end on photographs that ship with scikit-image, in minutes on a CPU.

1. Writes a training set (11 photographs) and a test set (4 others) from ``skimage.data`` with the
   protocol of spec section 9 (mod-crop, MATLAB bicubic x4).
2. Trains a small WBSR supernet (HES sampling, BDLoss, 3 widths x 3 depths) through BasicSR's training
   pipeline (``python -m wbsr_models.train``), on the GPU when there is one.
3. Tests the checkpoint with gradient-projection dynamic inference and with the full network, and
   prints the table: PSNR/SSIM (Y channel), FLOPs against the full network (on the same patches, and run
   once on the whole image), seconds per image.
4. Writes the subnet allocation maps, the SR images and a PSNR-vs-FLOPs curve (PNG), and the table as
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

from .evaluation import bicubic_summary, evaluate, load_test_set  # noqa: E402
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


def train(option_file: str, cwd: str, iters: int) -> str:
    """Run BasicSR's training pipeline in a subprocess, with a progress bar fed from its log."""
    cmd = [sys.executable, '-m', 'wbsr_models.train', '-opt', option_file]
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            tqdm(total=iters, desc='training (BasicSR train pipeline)', unit='it', disable=None) as bar:
        for line in proc.stdout:
            tail.append(line)
            found = re.search(r'iter:\s+([\d,]+)', line)
            if found:
                bar.update(int(found.group(1).replace(',', '')) - bar.n)
    if proc.returncode != 0:
        raise RuntimeError('training failed:\n' + ''.join(tail))
    return os.path.join(cwd, 'experiments', 'wbsr_demo', 'models', 'net_g_latest.pth')


def evaluate_demo(checkpoint: str, test_dir: str, out: str, device: str, repeats: int) -> list[dict]:
    """The table's rows: full network, Eq. 15 routing, a budget sweep and every fixed subnet."""
    net, scale, projection = load_model(checkpoint, device=device)
    modes = [('full', {'mode': 'full'}), ('wbsr (Eq. 15)', {'mode': 'wbsr'})]
    modes += [(f'budget {b}', {'mode': 'budget', 'budget': b}) for b in (0.8, 0.65, 0.5)]
    modes += [(f'fixed {w}/{d}', {'mode': 'fixed', 'subnet': i}) for i, (w, d) in enumerate(net.subnets)]
    images = load_test_set(test_dir, scale, device)

    def save(mode: str):
        def on_image(image, result, sr):
            stem = os.path.splitext(image.name)[0]
            imwrite(sr, os.path.join(out, 'sr', f'{stem}_{mode}.png'))
            if mode == 'wbsr':
                imwrite(allocation_map(tensor2img([image.lq[0].cpu()]), result, subnet_labels(net)),
                        os.path.join(out, 'maps', f'{stem}_alloc.png'))
        return on_image if mode in ('wbsr', 'full') else None

    # One untimed pass of the whole-image and the patch router first, so that the first timed mode does not
    # pay for thread-pool start-up and first allocations: the table compares times across modes.
    for options in ({'mode': 'full'}, {'mode': 'wbsr'}):
        router = Router(net, RoutingOptions(**options), scale, projection)
        for image in images:
            router(image.lq)
    rows = []
    for label, options in tqdm(modes, desc='testing (dynamic inference)', unit='mode', disable=None):
        router = Router(net, RoutingOptions(**options), scale, projection)
        rows.append({'mode': label, **evaluate(router, images, repeats, on_image=save(options['mode']))})
    for row in rows:
        row['time_vs_full'] = row['seconds'] / rows[0]['seconds']
    return [{'mode': 'bicubic (reference)', **bicubic_summary(images, scale)}] + rows


def table(rows: list[dict]) -> str:
    lines = ['| mode | PSNR-Y | SSIM-Y | GFLOPs | FLOPs % (vs full on patches) | FLOPs % (vs full on image) | '
             's / image | time vs full |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        if 'gflops' not in r:  # the bicubic reference row
            lines.append(f"| {r['mode']} | {r['psnr']:.2f} | {r['ssim']:.4f} | - | - | - | - | - |")
            continue
        lines.append(f"| {r['mode']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['gflops']:.2f} | "
                     f"{100 * r['ratio_patches']:.1f} | {100 * r['ratio_whole']:.1f} | {r['seconds']:.3f} | "
                     f"{r['time_vs_full']:.2f} |")
    return '\n'.join(lines)


def plot_curve(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.axhline(rows[0]['psnr'], color='#bbbbbb', lw=1, ls=':', label='bicubic')
    rows = rows[1:]
    fixed = [r for r in rows if r['mode'].startswith('fixed')]
    budget = sorted([r for r in rows if r['mode'].startswith('budget')], key=lambda r: r['ratio_whole'])
    ax.plot([100 * r['ratio_whole'] for r in fixed], [r['psnr'] for r in fixed], 'o', color='#888888',
            label='fixed subnets (whole image)')
    ax.plot([100 * r['ratio_whole'] for r in budget], [r['psnr'] for r in budget], '-s', color='#4c72b0',
            label='WBSR budget sweep')
    for r in rows:
        if r['mode'] in ('full', 'wbsr (Eq. 15)'):
            ax.plot(100 * r['ratio_whole'], r['psnr'], '*' if r['mode'] != 'full' else 'D', ms=11,
                    label=r['mode'])
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
    parser.add_argument('--iters', type=int, default=1000, help='training iterations (default: 1000)')
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
        checkpoint = train(option_file, out, args.iters)
    except RuntimeError as exc:
        print(f'wbsr-demo: {exc}', file=sys.stderr)
        return 1
    rows = evaluate_demo(checkpoint, os.path.join(data, 'test'), out, device, args.repeats)
    text = table(rows)
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
