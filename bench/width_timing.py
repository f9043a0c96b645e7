"""Wall time of each subnet against its FLOPs, for two width sets: the spec's 36/52/64 and 32/48/64.

    python bench/width_timing.py [--data datasets] [--images 6] [--repeats 3]

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

import numpy as np
import torch

import wbsr_arch
from wbsr_models.evaluation import load_test_set, run_timed
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

        def timed(options: dict) -> tuple[float, float]:
            router = Router(net, RoutingOptions(**options), 4, None)
            seconds, ratios = [], []
            for image in images:
                result, s = run_timed(router, image.lq, args.repeats)
                seconds.append(s)
                ratios.append(result.ratio_whole)
            return float(np.mean(seconds)), float(np.mean(ratios))

        timed({'mode': 'full'})  # untimed warm-up: the first pass over new shapes is slower
        rows = [(w, d, *timed({'mode': 'fixed', 'subnet': i})) for i, (w, d) in enumerate(net.subnets)]
        largest = rows[-1][2]
        lines += [f'| {"/".join(map(str, widths))} | w{w} d{d} | {100 * ratio:.1f} | {seconds / largest:.2f} |'
                  for w, d, seconds, ratio in rows]
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
