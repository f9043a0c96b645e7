"""Where the tile executor's wall time goes: convolutions, copies and the rest, against an ideal executor.

    python bench/executor_profile.py --model checkpoints/wbsr_srresnet_x4_train291.pth [--images 3] [--budgets 0.6 0.7]

On the first ``--images`` Urban100 LR images, PyTorch's profiler splits the CPU time of one pass (after an
untimed warm-up pass) into convolutions, copies (``copy_``, ``index_select``, ``index_copy_``: tiles gathered with
their halo by the map executor, halos exchanged by the store executor) and everything else (activations, pixel
shuffles, residual adds, writes, Python), for:

- every subnet run once on each whole image (``fixed``; the router's channels-last path);
- every tile on one subnet (``forward_tiles`` with a uniform assignment), for the smallest and the largest;
- the ``budget`` assignments of ``--budgets`` (seamless tiles);

the tile runs each on both executors of ``SupernetMixin.tile_executor`` (``maps``: whole-image feature maps;
``stores``: per-tile stores with a halo exchange, the default for inference).

The "ideal" of an assignment is what it would take if every tile ran at its subnet's whole-image speed (the
subnets' whole-image times weighted by their share of the LR pixels). Every time is a fraction of the full
network's whole-image time in the same process. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from wbsr_arch.tiles import TileGrid
from wbsr_models.evaluation import keep_freed_memory, load_test_set
from wbsr_models.infer import load_model
from wbsr_models.router import Router, RoutingOptions

EXECUTORS = {'maps': 'maps', 'auto': 'stores'}  # the two tile executors (SupernetMixin.tile_executor)
COPIES = ('aten::copy_', 'aten::index_select', 'aten::index_copy_')


def split(run: Callable[[], object]) -> tuple[float, float, float]:
    """Seconds of CPU time of ``run()`` (after one untimed call): total, convolutions, copies."""
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    conv = sum(e.self_cpu_time_total for e in events if 'convolution' in e.key) / 1e6
    copies = sum(e.self_cpu_time_total for e in events if e.key in COPIES) / 1e6
    return total, conv, copies


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--data', default='datasets')
    parser.add_argument('--images', type=int, default=3)
    parser.add_argument('--budgets', type=float, nargs='+', default=[0.6, 0.7])
    parser.add_argument('--tile-size', type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    keep_freed_memory()
    net, scale, projection, _ = load_model(args.model)
    net.eval()
    images = [image.lq for image in load_test_set(os.path.join(args.data, 'Urban100'), scale, limit=args.images)]
    grids = [TileGrid.regular(x.shape[2], x.shape[3], args.tile_size) for x in images]
    area = sum(x.shape[2] * x.shape[3] for x in images)
    flops = np.sum([net.subnet_flops(x.shape[-2:]) for x in images], axis=0, dtype=np.float64)
    flops_full = flops[-1]
    rows = []
    with torch.no_grad():
        whole = []
        for k in range(net.num_subnets):
            router = Router(net, RoutingOptions(mode='fixed', subnet=k), scale, projection)
            whole.append(split(lambda: [router(x) for x in images]))
        full = whole[-1][0]
        for k, (w, d) in enumerate(net.subnets):
            rows.append((f'whole image, w{w} d{d}', flops[k] / flops_full, whole[k], None))
        assignments = [(f'tiles, all w{net.subnets[k][0]} d{net.subnets[k][1]}', [np.full(g.shape, k) for g in grids])
                       for k in (0, net.num_subnets - 1)]
        for budget in args.budgets:
            router = Router(net, RoutingOptions(mode='budget', budget=budget, tile_size=args.tile_size), scale,
                            projection)
            assignments.append((f'tiles, budget {budget}', [router(x).subnets.reshape(g.shape)
                                                            for x, g in zip(images, grids)]))
        for name, subs in assignments:
            shares = np.zeros(net.num_subnets)
            for g, sub in zip(grids, subs):
                boxes = g.boxes()
                np.add.at(shares, sub.ravel(), boxes[:, 2] * boxes[:, 3] / area)
            ideal = tuple(float(np.dot(shares, [t[i] for t in whole])) for i in range(3))
            tile_flops = sum(net.tile_flops(x.shape[-2:], s, grid=g) for x, s, g in zip(images, subs, grids))
            for executor in ('maps', 'auto'):
                net.tile_executor = executor
                run = split(lambda: [net.forward_tiles(x, s, grid=g) for x, s, g in zip(images, subs, grids)])
                rows.append((f'{name}, {EXECUTORS[executor]}', tile_flops / flops_full, run, ideal))
    print(f'{args.images} Urban100 images, x4, {torch.get_num_threads()} threads; times as fractions of the full '
          f'network on the whole image ({full:.3f} s of CPU time); ideal: every tile at its subnet\'s whole-image '
          'speed\n')
    print('| run | FLOPs | time | convolutions | copies | other | ideal time | ideal convolutions |')
    print('|---|---|---|---|---|---|---|---|')
    for name, f, (total, conv, copies), ideal in rows:
        cells = [f'{f:.3f}', f'{total / full:.3f}', f'{conv / full:.3f}', f'{copies / full:.3f}',
                 f'{(total - conv - copies) / full:.3f}']
        cells += ['', ''] if ideal is None else [f'{ideal[0] / full:.3f}', f'{ideal[1] / full:.3f}']
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
