"""Makes the stored reference of the shipped checkpoint (``tests/test_reference.py``).

    python tests/data/make_reference.py            # the values, from the committed images (prints the JSON)
    python tests/data/make_reference.py --write    # also writes tests/data/reference.json
    python tests/data/make_reference.py --images   # first (re)writes the two image pairs from scikit-image photos

The images are two crops of scikit-image photographs (public domain: ``astronaut``, NASA; ``rocket``, NASA),
HR cropped to 176 x 160 and its LR (40 x 44) made by BasicSR's MATLAB-compatible bicubic, as ``wbsr-make-lr`` does.
The values are what ``tests/test_reference.py`` recomputes: for each image and routing mode, the PSNR-Y against
the HR (BasicSR's ``calculate_psnr``, crop border 4), the SHA-256 of the subnet map and the FLOPs, with the
router's default options (tile size included). A new reference is made only on purpose: a change to the weights,
the routing or the executor that moves these numbers must show up in the diff of reference.json.

Before writing, it checks that the values cannot move between CPUs' float32 kernels: every tile's difficulty
score is at least 1e-4 (relative) away from a class threshold and the budget's allocation is the same when every
score moves by 1e-5 (relative).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHECKPOINT = REPO / 'checkpoints' / 'wbsr_srresnet_x4_train291.pth'
#: (name, scikit-image photograph, top, left) of the HR crops, 176 x 160 (x4: LR 44 x 40, a 2 x 2 grid of tiles of
#: 32 with a smaller last row and column).
CROPS = (('astronaut', 'astronaut', 40, 150), ('rocket', 'rocket', 180, 300))
HR_SIZE = (160, 176)
MODES = {'full': {'mode': 'full'}, 'wbsr': {'mode': 'wbsr'}, 'budget_0.7': {'mode': 'budget', 'budget': 0.7}}
SCALE = 4


def write_images() -> None:
    import skimage.data
    from basicsr.utils.matlab_functions import imresize
    for name, photo, top, left in CROPS:
        rgb = getattr(skimage.data, photo)()[top:top + HR_SIZE[0], left:left + HR_SIZE[1], :3]
        hr = np.ascontiguousarray(rgb[..., ::-1])
        lr = imresize(hr.astype(np.float64) / 255., 1 / SCALE)
        lr = (np.clip(lr, 0, 1) * 255).round().astype(np.uint8)
        cv2.imwrite(str(HERE / f'reference_{name}_hr.png'), hr)
        cv2.imwrite(str(HERE / f'reference_{name}_lr.png'), lr)


def subnet_map_hash(subnets: np.ndarray, grid_shape: tuple[int, int]) -> str:
    """SHA-256 of the allocation: the grid's shape and every region's subnet index (int64, row-major)."""
    data = np.asarray(grid_shape, dtype=np.int64).tobytes() + np.asarray(subnets, dtype=np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()


def float_psnr_y(output: torch.Tensor, hr: np.ndarray) -> float:
    """PSNR-Y (dB) of the float SR output, before it is rounded to 8 bits (BT.601 luma on [0, 255], crop border 4):
    it moves with the weights by far less than one 8-bit level."""
    sr = output[0].detach().double().clamp(0, 1) * 255.
    ref = torch.from_numpy(hr[..., ::-1].transpose(2, 0, 1).copy()).double()
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(3, 1, 1) / 255.
    y_sr, y_hr = (sr * weights).sum(0) + 16., (ref * weights).sum(0) + 16.
    b = SCALE
    mse = (y_sr - y_hr)[b:-b, b:-b].pow(2).mean().item()
    return 10 * np.log10(255. ** 2 / mse)


def load_pairs() -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """``(name, LR (1, 3, h, w) RGB in [0, 1], HR uint8 BGR)`` of the committed images."""
    pairs = []
    for name, *_ in CROPS:
        lr = cv2.imread(str(HERE / f'reference_{name}_lr.png'), cv2.IMREAD_COLOR)
        hr = cv2.imread(str(HERE / f'reference_{name}_hr.png'), cv2.IMREAD_COLOR)
        lq = torch.from_numpy(np.ascontiguousarray(lr[..., ::-1].transpose(2, 0, 1))).float()[None] / 255.
        pairs.append((name, lq, hr))
    return pairs


def compute(net: torch.nn.Module, projection, tile_size: int | None = None) -> dict:
    """The reference values of ``net`` on the committed images (``tile_size``: override the default)."""
    from basicsr.metrics import calculate_psnr
    from basicsr.utils import tensor2img
    from wbsr_models.router import Router, RoutingOptions
    values = {}
    for name, lq, hr in load_pairs():
        for label, extra in MODES.items():
            options = RoutingOptions(**extra)
            if tile_size is not None:
                options = replace(options, tile_size=tile_size)
            result = Router(net, options, SCALE, projection)(lq)
            sr = tensor2img([result.output[0]])
            grid = (1, 1) if result.scheme == 'whole' else Router(net, options, SCALE, projection).regions(lq).grid.shape
            values[f'{name}/{label}'] = {
                'psnr_y': round(float(calculate_psnr(sr, hr, crop_border=SCALE, test_y_channel=True)), 6),
                'psnr_y_float': round(float_psnr_y(result.output, hr), 7),
                'subnet_map_sha256': subnet_map_hash(result.subnets, grid),
                'flops': int(result.flops),
            }
    return values


def check_margins(net: torch.nn.Module, projection) -> list[str]:
    """Why these images' allocations could differ between CPUs' float32 kernels (empty: they cannot)."""
    from wbsr_data.difficulty import gradient_vectors
    from wbsr_models.router import Router, RoutingOptions, budget_subnets
    problems = []
    router = Router(net, RoutingOptions(), SCALE, projection)
    for name, lq, _ in load_pairs():
        regions = router.regions(router.prepare(lq))
        scores = projection.score(regions.per_region(lambda crops: gradient_vectors(crops).cpu().numpy()))
        thresholds = np.asarray(projection.thresholds)
        gap = np.abs(scores[:, None] - thresholds[None]).min(1) / np.maximum(np.abs(scores), 1e-12)
        if gap.min() < 1e-4:
            problems.append(f'{name}: a tile score is {gap.min():.2g} (relative) from a class threshold')
        costs = regions.costs(router.costs)
        chosen = budget_subnets(projection.position(scores), costs, MODES['budget_0.7']['budget'])
        for factor in (1 - 1e-5, 1 + 1e-5):
            if not np.array_equal(budget_subnets(projection.position(scores * factor), costs, 0.7), chosen):
                problems.append(f'{name}: the budget allocation changes when the scores move by 1e-5')
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', action='store_true', help='(re)write the image pairs first')
    parser.add_argument('--write', action='store_true', help='write tests/data/reference.json')
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from wbsr_models.infer import load_model
    if args.images:
        write_images()
    loaded = load_model(str(CHECKPOINT))
    net, scale, projection = loaded[0], loaded[1], loaded[2]
    assert scale == SCALE
    problems = check_margins(net, projection)
    if problems:
        print('\n'.join(problems), file=sys.stderr)
        return 1
    reference = {'checkpoint': CHECKPOINT.name, 'values': compute(net, projection)}
    text = json.dumps(reference, indent=1, sort_keys=True) + '\n'
    print(text, end='')
    if args.write:
        (HERE / 'reference.json').write_text(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
