"""Why the L1 distillation term collapsed training: short runs with and without it, looked at as they train.

    python bench/studies/distill_diagnosis.py [--iters 500] [--data datasets] [--out bench_out/distill_diagnosis]

Trains the recipe of ``bench/train_sweeps.py`` (small supernet, pool without its validation split, ``routed``
sampling, BDLoss) for ``--iters`` iterations three times: without distillation, with the L1 term at weight 0.05,
and with the squared-error term at weight 1.0, saving every 100 iterations. For every checkpoint it prints the
largest and the smallest subnet's RGB PSNR on the first six val291 images, the same with the output
convolution's bias removed (the part of the loss that is a colour shift), and the bias itself; then, on the
checkpoints of the run without distillation, the size of the L1 distillation gradient of shared layers against
the L1 pixel loss's, on a batch of 16 val291 crops. Writes ``distill_diagnosis.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.nn import functional as F

from wbsr_models.evaluation import gt_tensor
from wbsr_models.evaluation import load_test_set
from wbsr_models.infer import load_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, for train_sweeps
from train_sweeps import base_options, run_key, split_pool, train, with_overrides  # noqa: E402

RUNS = {'no distillation': {'split': True},
        'L1 distill 0.05': {'split': True, 'train.wbsr.distill': 0.05, 'train.wbsr.distill_loss': 'l1'},
        'mse distill 1.0': {'split': True, 'train.wbsr.distill': 1.0, 'train.wbsr.distill_loss': 'mse'}}
LAYERS = ('conv_first.weight', 'body.0.conv2.weight', 'conv_hr.weight', 'conv_last.weight')


def iteration(path: str) -> int:
    """The iteration of a BasicSR checkpoint ``.../net_g_<iteration>.pth``."""
    return int(path.rsplit('_', 1)[1][:-4])


def psnr(sr: torch.Tensor, gt: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (sr.clamp(0, 1) - gt)[..., 4:-4, 4:-4].pow(2).mean()))


def look(checkpoint: str, images) -> dict:
    net, _, _, _ = load_model(checkpoint)
    bias = net.conv_last.bias.detach().view(1, 3, 1, 1)
    out = {'bias': bias.flatten().tolist()}
    with torch.no_grad():
        for k in (0, net.num_subnets - 1):
            plain, unbiased = [], []
            for image in images:
                gt = gt_tensor(image)
                sr = net(image.lq, subnet=k)
                plain.append(psnr(sr, gt[..., :sr.shape[2], :sr.shape[3]]))
                unbiased.append(psnr(sr - bias, gt[..., :sr.shape[2], :sr.shape[3]]))
            out[k] = (float(np.mean(plain)), float(np.mean(unbiased)))
    return out


def gradient_ratios(checkpoint: str, images) -> list[tuple[int, str, float]]:
    """``|grad of L1(student, teacher)| / |grad of L1(student, gt)|`` per student and shared layer."""
    net, _, _, _ = load_model(checkpoint)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for image in images[:16]:
        gt = gt_tensor(image)
        i, j = rng.integers(0, image.lq.shape[2] - 16), rng.integers(0, image.lq.shape[3] - 16)
        xs.append(image.lq[..., i:i + 16, j:j + 16])
        ys.append(gt[..., 4 * i:4 * i + 64, 4 * j:4 * j + 64])
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        teacher = net(x, subnet=net.num_subnets - 1)
    rows = []
    for k in (0, net.num_subnets // 2):
        grads = {}
        for name, target in (('gt', y), ('teacher', teacher)):
            net.zero_grad()
            F.l1_loss(net(x, subnet=k), target).backward()
            grads[name] = {n: p.grad.norm().item() for n, p in net.named_parameters() if n in LAYERS}
        rows += [(k, n, grads['teacher'][n] / grads['gt'][n]) for n in LAYERS]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=500)
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--out', default='bench_out/distill_diagnosis')
    args = parser.parse_args()
    data, out = os.path.abspath(args.data), os.path.abspath(args.out)
    split_pool(data)
    options = {}
    for label, overrides in RUNS.items():
        opt = with_overrides(base_options(data, 1500), overrides)  # the sweeps' schedule, stopped at --iters
        opt['train']['total_iter'] = args.iters
        opt['logger']['save_checkpoint_freq'] = 100
        opt['datasets']['train']['index_cache'] = os.path.join(out, 'hes_cache')
        options[label] = opt
    with ThreadPoolExecutor(len(options)) as pool:
        checkpoints = dict(zip(options, pool.map(
            lambda label: train(options[label], os.path.join(out, 'runs', run_key(options[label])))[0], options)))
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    images = load_test_set(os.path.join(data, 'val291'), 4)
    lines = [f'# Distillation diagnosis\n\n`python bench/studies/distill_diagnosis.py --iters {args.iters}`: '
             "the sweeps' recipe (BDLoss, `routed`), RGB PSNR (dB, 4-pixel border) on the first six val291 images.\n",
             '| run | iteration | largest subnet | largest, output bias removed | smallest subnet '
             '| output bias (RGB) |',
             '|---|---|---|---|---|---|']
    for label, checkpoint in checkpoints.items():
        folder = os.path.dirname(checkpoint)
        saved = sorted(glob.glob(os.path.join(folder, 'net_g_[0-9]*.pth')), key=iteration)
        for path in saved:
            seen = look(path, images[:6])
            last = max(k for k in seen if k != 'bias')
            lines.append(f"| {label} | {iteration(path)} | {seen[last][0]:.3f} | {seen[last][1]:.3f} | "
                         f"{seen[0][0]:.3f} | " + ', '.join(f'{b:+.4f}' for b in seen['bias']) + ' |')
            print(lines[-1], flush=True)
    lines += ['', 'Run without distillation: |gradient of L1(student, teacher)| / '
              '|gradient of L1(student, ground truth)| per shared layer, 16 val291 crops of 16 x 16 LR:', '',
              '| iteration | student | ' + ' | '.join(LAYERS) + ' |', '|---|---|' + '---|' * len(LAYERS)]
    folder = os.path.dirname(checkpoints['no distillation'])
    for at in (100, args.iters - args.iters % 100):
        path = os.path.join(folder, f'net_g_{at}.pth')
        if not os.path.isfile(path):
            continue
        rows = gradient_ratios(path, images)
        for k in dict.fromkeys(r[0] for r in rows):
            lines.append(f'| {at} | subnet {k} | ' + ' | '.join(f'{r[2]:.1f}' for r in rows if r[0] == k) + ' |')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'distill_diagnosis.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
