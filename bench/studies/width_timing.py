"""Wall time of each subnet against its FLOPs, for two width sets: the spec's 36/52/64 and 32/48/64.

    python bench/studies/width_timing.py [--data datasets] [--images 6] [--repeats 3]

Times every subnet of a freshly initialised x4 ``WBSRSRResNet`` (time does not depend on the weights) on
the whole image of the first ``--images`` Urban100 LR images, median of ``--repeats`` runs, relative to
the largest subnet timed in the same pass (after an untimed warm-up pass), and prints a Markdown table.
It shows how much of a FLOPs saving a CPU turns into time for channel counts that are, or are not,
multiples of 16.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

import wbsr_arch
from wbsr_models.evaluation import evaluate, load_test_set
from wbsr_models.router import Router, RoutingOptions

WIDTH_SETS = ([36, 52, 64], [32, 48, 64])


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--images', type=int, default=6)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    images = load_test_set(os.path.join(args.data, 'Urban100'), 4, limit=args.images)
    lines = ['| widths | subnet | FLOPs % vs largest | time vs largest |', '|---|---|---|---|']
    for widths in WIDTH_SETS:
        torch.manual_seed(0)
        net = wbsr_arch.WBSRSRResNet(widths=widths).eval()
        for image in images:  # untimed warm-up: the first pass over new shapes is slower
            Router(net, RoutingOptions(mode='full'), 4, None)(image.lq)
        rows = [evaluate(Router(net, RoutingOptions(mode='fixed', subnet=i), 4, None), images, args.repeats)
                for i in range(net.num_subnets)]
        largest = rows[-1]['seconds']
        lines += [f'| {"/".join(map(str, widths))} | w{w} d{d} | {100 * row["ratio_whole"]:.1f} | '
                  f'{row["seconds"] / largest:.2f} |' for (w, d), row in zip(net.subnets, rows)]
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
