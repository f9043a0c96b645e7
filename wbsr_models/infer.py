"""``wbsr-infer``: upscale an image or a folder with a WBSR checkpoint through the dynamic-inference router.

    wbsr-infer -i inputs -o results --model net_g_latest.pth --budget 0.6 --save-map

The network is rebuilt from the checkpoint's own ``'wbsr'`` entry (network options, scale, difficulty
thresholds); for a plain BasicSR checkpoint pass the option file it was trained with (``-opt``). One line
per image gives the FLOPs (against the full network on the same patches, and run once on the whole image)
and the seconds; unreadable files are reported and skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.archs import build_network  # noqa: E402
from basicsr.utils import imwrite, tensor2img  # noqa: E402
from basicsr.utils.options import ordered_yaml  # noqa: E402

import wbsr_models  # noqa: E402,F401  (registration)
from wbsr_data.difficulty import DifficultyProjection  # noqa: E402
from wbsr_data.fileio import CorruptFileError, torch_load  # noqa: E402
from wbsr_data.make_lr import IMAGE_EXTENSIONS  # noqa: E402
from wbsr_data.pairs import ImageFileError, decode_image  # noqa: E402

from .router import Router, RoutingOptions  # noqa: E402
from .visualize import allocation_map, subnet_labels  # noqa: E402


def load_model(checkpoint_path: str, option_file: Optional[str] = None, device: str = 'cpu'):
    """``(network, scale, difficulty projection or None)`` from a checkpoint (and optionally its option file)."""
    checkpoint = torch_load(checkpoint_path)
    if not isinstance(checkpoint, dict):
        raise CorruptFileError(checkpoint_path, 'not a BasicSR checkpoint')
    extras = checkpoint.get('wbsr') or {}
    network_opt, scale = extras.get('network'), extras.get('scale')
    if option_file:
        with open(option_file, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
        network_opt, scale = dict(opt['network_g']), int(opt['scale'])
    if not network_opt or not scale:
        raise ValueError(f'{checkpoint_path}: no network options inside (not written by WBSRModel); pass -opt with '
                         'the option file it was trained with')
    net = build_network(dict(network_opt))
    key = 'params_ema' if 'params_ema' in checkpoint else 'params'
    if key not in checkpoint:
        raise CorruptFileError(checkpoint_path, f"no 'params' entry (keys: {sorted(checkpoint)})")
    state = {k[7:] if k.startswith('module.') else k: v for k, v in checkpoint[key].items()}
    net.load_state_dict(state, strict=True)
    difficulty = extras.get('difficulty')
    projection = DifficultyProjection.from_dict(difficulty) if difficulty else None
    return net.eval().to(device), int(scale), projection


def list_inputs(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    raise FileNotFoundError(f'-i {path}: no such file or folder')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-i', '--input', required=True, help='an image or a folder of images')
    parser.add_argument('-o', '--output', default='results', help='output folder (default: results)')
    parser.add_argument('--model', required=True, help='checkpoint (.pth) written by WBSRModel')
    parser.add_argument('-opt', default=None, help='option file, for checkpoints without network options')
    parser.add_argument('--mode', default=None, choices=['wbsr', 'budget', 'alpha', 'full', 'fixed'],
                        help='routing mode (default: budget if --budget is given, else wbsr)')
    parser.add_argument('--budget', type=float, default=None, help='average cost <= budget x full network')
    parser.add_argument('--alpha', type=float, default=1.0, help='alpha mode trade-off (default: 1.0)')
    parser.add_argument('--subnet', type=int, default=None, help='fixed mode: subnet index')
    parser.add_argument('--patch-size', type=int, default=32)
    parser.add_argument('--step', type=int, default=28)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--save-map', action='store_true', help='also write the subnet allocation map')
    parser.add_argument('--suffix', default='', help='appended to output file names')
    parser.add_argument('--device', default='auto', help='cpu, cuda or auto (default)')
    args = parser.parse_args(argv)
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    mode = args.mode or ('budget' if args.budget is not None else 'wbsr')
    try:
        options = RoutingOptions(mode=mode, patch_size=args.patch_size, step=args.step, batch_size=args.batch_size,
                                 budget=args.budget, alpha=args.alpha, subnet=args.subnet)
        options.validate('options')
        net, scale, projection = load_model(args.model, args.opt, device)
        router = Router(net, options, scale, projection)
        files = list_inputs(args.input)
    except (OSError, ValueError, KeyError) as exc:
        print(f'wbsr-infer: {exc}', file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    failed = 0
    for path in tqdm(files, desc='wbsr-infer', unit='img', disable=None):
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            with open(path, 'rb') as f:
                img = decode_image(f.read(), path)
        except (OSError, ImageFileError) as exc:
            tqdm.write(f'{os.path.basename(path)}: skipped ({exc})')
            failed += 1
            continue
        lq = torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).unsqueeze(0).to(device)
        start = time.perf_counter()
        result = router(lq)
        seconds = time.perf_counter() - start
        imwrite(tensor2img([result.output[0].cpu()]), os.path.join(args.output, f'{name}{args.suffix}.png'))
        if args.save_map:
            lq_img = (img * 255).round().astype(np.uint8)
            imwrite(allocation_map(lq_img, result, subnet_labels(net)),
                    os.path.join(args.output, f'{name}{args.suffix}_alloc.png'))
        tqdm.write(f'{name}: {img.shape[1]}x{img.shape[0]} -> {img.shape[1] * scale}x{img.shape[0] * scale}  '
                   f'FLOPs {100 * result.ratio_regions:.1f}% of full on the same {result.scheme}, '
                   f'{100 * result.ratio_whole:.1f}% of full on the image, {result.flops / 1e9:.2f} G  '
                   f'{seconds:.2f} s')
    print(f'wbsr-infer: {len(files) - failed} of {len(files)} images written to {args.output}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
