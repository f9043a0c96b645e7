"""``wbsr-calibrate``: measure what each subnet buys on each difficulty class, on training images.

    wbsr-calibrate --model net_g_latest.pth --data datasets/train291 --out net_g_calibrated.pth

Every subnet runs on each training image (a folder in ``wbsr-make-lr``'s layout: ``HR/`` and
``LR_bicubic/X{scale}/``); the squared error (Y channel) of every routing region is recorded with the
region's difficulty class. The mean squared error per pixel of each subnet on each class is stored in the
checkpoint's ``'wbsr'`` entry, beside the thresholds; ``val.routing.mode: calibrated`` allocates a FLOPs
budget by it (:func:`wbsr_models.router.calibrated_subnets`). Measure on training images, never on the
images you report on.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from wbsr_data.fileio import CorruptFileError, torch_load, torch_save  # noqa: E402

from .baselines import region_psnr_table  # noqa: E402
from .evaluation import TestImage, load_test_set  # noqa: E402
from .router import Router, RoutingOptions  # noqa: E402


@dataclass
class RegionRecords:
    """Every routing region of a set of images: where it is from, its difficulty and every subnet's error."""

    image: np.ndarray  # (n,) index of the image
    area: np.ndarray  # (n,) LR pixels
    vectors: np.ndarray  # (n, 4) gradient vectors
    scores: np.ndarray  # (n,) difficulty scores
    classes: np.ndarray  # (n,) 1..K
    mse: np.ndarray  # (n, M) mean squared error per pixel of each subnet (Y channel, [0, 1])

    def class_mse(self, num_classes: int) -> np.ndarray:
        """``(K, M)`` area-weighted mean squared error per pixel of each subnet on each class; an empty class takes
        the nearest filled class's."""
        table = np.full((num_classes, self.mse.shape[1]), np.nan)
        for k in range(1, num_classes + 1):
            rows = self.classes == k
            if rows.any():
                table[k - 1] = (self.area[rows, None] * self.mse[rows]).sum(0) / self.area[rows].sum()
        filled = np.flatnonzero(~np.isnan(table[:, 0]))
        if not len(filled):
            raise ValueError('no region to calibrate on')
        for k in np.flatnonzero(np.isnan(table[:, 0])):
            table[k] = table[filled[np.abs(filled - k).argmin()]]
        return table


def gt_tensor(image: TestImage) -> torch.Tensor:
    """The HR image of ``image`` as a ``(1, 3, H, W)`` RGB tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.gt[..., ::-1].transpose(2, 0, 1))).float()[None] / 255.


def measure_regions(router: Router, images: Iterable[TestImage], progress: bool = True) -> RegionRecords:
    """Every subnet's error on every region of ``images``, cut as ``router`` cuts them (each subnet runs once per
    image: on the whole image for ``tiles``, on every patch for ``patches``)."""
    from wbsr_data.difficulty import gradient_vectors
    columns: dict[str, list] = {k: [] for k in ('image', 'area', 'vectors', 'mse')}
    images = list(images)
    for n, image in enumerate(tqdm(images, desc='calibrating', unit='img', disable=None if progress else True)):
        table, regions = region_psnr_table(router, image.lq, gt_tensor(image).to(image.lq.device))
        columns['image'].append(np.full(len(regions), n))
        columns['area'].append(regions.boxes[:, 2] * regions.boxes[:, 3])
        columns['vectors'].append(regions.per_region(lambda crops: gradient_vectors(crops).cpu().numpy()))
        columns['mse'].append(10 ** (-table.T / 10))
    arrays = {k: np.concatenate(v) for k, v in columns.items()}
    projection = router.projection
    scores = projection.score(arrays['vectors'])
    return RegionRecords(image=arrays['image'], area=arrays['area'].astype(np.float64), vectors=arrays['vectors'],
                         scores=scores, classes=projection.classify(scores), mse=arrays['mse'])


def gains_db(class_mse: np.ndarray) -> np.ndarray:
    """PSNR gain (dB) of every subnet over the smallest, per class."""
    return 10 * np.log10(class_mse[:, :1] / class_mse)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .infer import UsageError, load_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True, help='checkpoint written by WBSRModel (with difficulty thresholds)')
    parser.add_argument('--data', required=True, help='training images: a folder with HR/ and LR_bicubic/X<scale>/')
    parser.add_argument('--out', required=True, help='the calibrated checkpoint to write (not --model)')
    parser.add_argument('--images', type=int, default=None, help='use only the first N images')
    parser.add_argument('--scheme', default='tiles', choices=['tiles', 'patches'], help='regions measured on')
    parser.add_argument('--tile-size', type=int, default=32)
    args = parser.parse_args(argv)
    try:
        if os.path.abspath(args.out) == os.path.abspath(args.model):
            raise UsageError(f'--out {args.out} is --model: write the calibrated checkpoint to another file')
        net, scale, projection = load_model(args.model)
        if projection is None:
            raise UsageError(f'--model {args.model} has no difficulty thresholds (not written by WBSRModel)')
        images = load_test_set(args.data, scale, limit=args.images)
    except (OSError, ValueError) as exc:
        print(f'wbsr-calibrate: {exc}', file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    router = Router(net, RoutingOptions(scheme=args.scheme, tile_size=args.tile_size), scale, projection)
    records = measure_regions(router, images)
    class_mse = records.class_mse(projection.num_classes)
    checkpoint = torch_load(args.model)
    projection.class_mse = class_mse
    # the data folder as given (a relative path stays relative: no machine's absolute paths in a shared file)
    projection.calibration = {'scheme': args.scheme, 'tile_size': args.tile_size, 'images': len(images),
                              'regions': int(len(records.classes)), 'data': os.path.normpath(args.data)}
    if not isinstance(checkpoint.get('wbsr'), dict):
        raise CorruptFileError(args.model, "no 'wbsr' entry")
    checkpoint['wbsr']['difficulty'] = projection.to_dict()
    torch_save(checkpoint, args.out)
    gains = gains_db(class_mse)
    print('class | regions | PSNR gain (dB) of each subnet over the smallest')
    for k in range(projection.num_classes):
        print(f'{k + 1:5d} | {int((records.classes == k + 1).sum()):7d} | ' + ' '.join(f'{g:5.2f}' for g in gains[k]))
    print(f'wbsr-calibrate: {len(images)} images, {len(records.classes)} regions; calibrated checkpoint written to '
          f'{args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
