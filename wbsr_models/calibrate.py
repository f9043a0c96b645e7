"""``wbsr-calibrate``: measure what each subnet does on training images, for the routing modes that learn from it.

    wbsr-calibrate --model net_g_latest.pth --data datasets/train291 --out net_g_calibrated.pth [--predictor]

Every subnet runs on each training image (a folder in ``wbsr-make-lr``'s layout: ``HR/`` and
``LR_bicubic/X{scale}/``) and its squared error (Y channel) is recorded per LR pixel. From that:

- the mean squared error per pixel of each subnet on each difficulty class (``val.routing.mode: calibrated``,
  :func:`wbsr_models.routing.allocation.calibrated_subnets`);
- with ``--predictor``, an error predictor (:mod:`wbsr_models.routing.predictor`) trained on the same maps, cut
  into tiles at every ``--stride`` offset, in each of the first ``--transforms`` flips/rotations of every image,
  with every 10th image held out for the report (``val.routing.mode: learned``).

Both are stored in the checkpoint's ``'wbsr'`` entry (``'routing'``), beside the thresholds; the weights are not
touched. Measure on training images, never on the images you report on.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from wbsr_data.fileio import CorruptFileError, ensure_writable_file, first_line, torch_load, torch_save  # noqa: E402

from .baselines import region_psnr_table  # noqa: E402
from .evaluation import TestImage, gt_tensor, load_test_set  # noqa: E402
from .router import Router, RoutingOptions  # noqa: E402
from .routing.artefacts import ClassErrors, DefaultRouting  # noqa: E402
from .routing.predictor import (QUALITY_TRIM, ErrorMaps, FitOptions, dihedral, error_maps,  # noqa: E402
                                fit_predictor, quality_map, region_mse)


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
        """``(K, M)`` area-weighted mean squared error per pixel of each subnet on each class (:func:`class_table`)."""
        return class_table(self.classes, self.area, self.mse, num_classes)


def class_table(classes: np.ndarray, area: np.ndarray, mse: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, M)`` area-weighted mean squared error per pixel of each subnet on each class 1..K of regions ``classes``
    ``(n,)`` with ``area`` ``(n,)`` and ``mse`` ``(n, M)``; an empty class takes the nearest filled class's."""
    table = np.full((num_classes, mse.shape[1]), np.nan)
    for k in range(1, num_classes + 1):
        rows = classes == k
        if rows.any():
            table[k - 1] = (area[rows, None] * mse[rows]).sum(0) / area[rows].sum()
    filled = np.flatnonzero(~np.isnan(table[:, 0]))
    if not len(filled):
        raise ValueError('no region to calibrate on')
    for k in np.flatnonzero(np.isnan(table[:, 0])):
        table[k] = table[filled[np.abs(filled - k).argmin()]]
    return table


def _records(router: Router, columns: dict) -> RegionRecords:
    arrays = {k: np.concatenate(v) for k, v in columns.items()}
    scores = router.projection.score(arrays['vectors'])
    return RegionRecords(image=arrays['image'], area=arrays['area'].astype(np.float64), vectors=arrays['vectors'],
                         scores=scores, classes=router.projection.classify(scores), mse=arrays['mse'])


def measure_regions(router: Router, images: Iterable[TestImage], progress: bool = True,
                    maps: Optional[list[ErrorMaps]] = None) -> RegionRecords:
    """Every subnet's error on every region of ``images``, cut as ``router`` cuts them (each subnet runs once per
    image: on the whole image for ``tiles``, on every patch for ``patches``). With ``maps`` (a list), the tiles
    scheme also appends every image's :class:`~wbsr_models.routing.predictor.ErrorMaps` to it."""
    from wbsr_data.difficulty import gradient_vectors
    columns: dict[str, list] = {k: [] for k in ('image', 'area', 'vectors', 'mse')}
    images = list(images)
    for n, image in enumerate(tqdm(images, desc='calibrating', unit='img', disable=None if progress else True)):
        lq = router.prepare(image.lq)
        regions = router.regions(lq)
        gt = gt_tensor(image).to(lq.device)
        if regions.scheme == 'tiles':
            errors = error_maps(lambda x, m: router._whole(x, m).output, router.num_subnets, router.scale, lq, gt)
            mse = region_mse(errors, regions.boxes)
            if maps is not None:
                maps.append(ErrorMaps(n, 0, (lq[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), errors))
        else:
            table, regions = region_psnr_table(router, lq, gt)
            mse = 10 ** (-table.T / 10)
        columns['image'].append(np.full(len(regions), n))
        columns['area'].append(regions.boxes[:, 2] * regions.boxes[:, 3])
        columns['vectors'].append(regions.per_region(lambda crops: gradient_vectors(crops).cpu().numpy()))
        columns['mse'].append(mse)
    return _records(router, columns)


def transformed_maps(router: Router, images: Sequence[TestImage], transforms: Sequence[int],
                     progress: bool = True) -> list[ErrorMaps]:
    """:class:`~wbsr_models.routing.predictor.ErrorMaps` of every image in each of ``transforms`` (flips/rotations)."""
    maps = []
    work = [(n, k) for k in transforms for n in range(len(images))]
    for n, k in tqdm(work, desc='error maps', unit='img', disable=None if progress else True):
        lq, gt = dihedral(router.prepare(images[n].lq), k), dihedral(gt_tensor(images[n]), k).to(images[n].lq.device)
        errors = error_maps(lambda x, m: router._whole(x, m).output, router.num_subnets, router.scale, lq, gt)
        maps.append(ErrorMaps(n, k, (lq[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), errors))
    return maps


def gains_db(class_mse: np.ndarray) -> np.ndarray:
    """PSNR gain (dB) of every subnet over the smallest, per class."""
    return 10 * np.log10(class_mse[:, :1] / class_mse)


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag by type and range, and the output file, before the model is loaded (``UsageError`` / ``OSError``
    naming the flag)."""
    from .checks import MIN_REGION_SIDE, UsageError
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise UsageError(f'--out {args.out} is --model: write the calibrated checkpoint to another file')
    if args.predictor and args.scheme != 'tiles':
        raise UsageError('--predictor learns from whole-image runs: use it with --scheme tiles')
    if args.quality_only and (args.predictor or args.scheme != 'tiles'):
        raise UsageError('--quality-only keeps the checkpoint\'s predictor: use it without --predictor, with --scheme '
                         'tiles')
    bounds = {'images': (1, None), 'tile_size': (MIN_REGION_SIDE, None), 'transforms': (1, 8), 'epochs': (1, None),
              'width': (1, 4096), 'stride': (1, None), 'seed': (0, None)}
    for name, (lo, hi) in bounds.items():
        value = getattr(args, name)
        if value is not None and not (lo <= value and (hi is None or value <= hi)):
            flag = '--' + name.replace('_', '-')
            within = f'in {lo}..{hi}' if hi is not None else f'>= {lo}'
            why = (f' (regions under {MIN_REGION_SIDE}x{MIN_REGION_SIDE} LR pixels have no gradient to classify them '
                   'by)') if name == 'tile_size' else ''
            raise UsageError(f'{flag} must be {within}, got {value}{why}')
    if not os.path.isdir(args.data):
        raise UsageError(f'--data {args.data}: not a folder (it needs HR/ and LR_bicubic/X<scale>/)')
    ensure_writable_file(args.out, '--out')


def fit_quality(predictor, held_out: Sequence[ErrorMaps], net, tile_size: int, report: dict) -> None:
    """The quality target's map (:func:`~wbsr_models.routing.predictor.quality_map`) of ``predictor`` on the held-out
    images' error maps, recorded in ``report`` too."""
    predictor.quality = quality_map(predictor, held_out, tile_size,
                                    np.asarray(net.subnet_flops((tile_size, tile_size))) / tile_size ** 2)
    report['quality'] = {'requested_db': list(predictor.quality[0]), 'threshold_db': list(predictor.quality[1]),
                         'images': len(held_out), 'trim': QUALITY_TRIM}


#: The default routing's target: the PSNR loss against the full network (dB; trimmed mean over the held-out images,
#: :data:`~wbsr_models.routing.predictor.QUALITY_TRIM`), the point every routing curve is compared at.
DEFAULT_LOSS_DB = 0.05
#: The slopes (dB per 1% of FLOPs) tried for the default routing: 40 per decade from 1e-4 to 0.1.
DEFAULT_SLOPES = tuple(float(v) for v in 10 ** np.linspace(-4, -1, 121))


def choose_default(router: Router, routing, held_out: Sequence[ErrorMaps]) -> Optional[DefaultRouting]:
    """The checkpoint's default routing, chosen on the held-out images' error maps: the learned mode with the class
    level (the pairing that needs the fewest FLOPs in ``bench/studies/error_parts.py``), at the largest slope of
    :data:`DEFAULT_SLOPES` up to which the trimmed mean loss stays within :data:`DEFAULT_LOSS_DB`, stored with 3
    significant digits; ``None`` where even the smallest slope loses more. ``router`` cuts and classifies the regions
    (any mode); ``routing`` holds the class errors and the predictor; every slope is routed by the learned mode itself
    (:meth:`Router.choose`)."""
    from scipy.stats import trim_mean
    images = []
    for item in held_out:
        lq = torch.from_numpy(item.lq)[None].float().div(255.).to(next(router.net.parameters()).device)
        regions = router.regions(lq)
        classes, position, num_classes = router.classify(regions)
        costs = regions.costs(router.costs)
        whole = float(router.costs(tuple(lq.shape[-2:]))[-1])
        area = (regions.boxes[:, 2] * regions.boxes[:, 3]).astype(np.float64)
        images.append((lq, regions, classes, position, num_classes, costs, whole,
                       region_mse(item.errors, regions.boxes) * area[:, None],
                       routing.predictor.flops(regions.image_hw, len(regions))))
    chosen = None
    for slope in DEFAULT_SLOPES:
        probe = Router(router.net, replace(router.options, mode='learned', level='classes', slope=slope),
                       router.scale, router.projection, routing=routing)
        losses, shares = [], []
        for lq, regions, classes, position, num_classes, costs, whole, errors, extra in images:
            subnets = probe.choose(regions, classes, position, num_classes, costs, lq=lq)
            rows = np.arange(len(subnets))
            losses.append(10 * np.log10(errors[rows, subnets].sum() / errors[:, -1].sum()))
            shares.append((costs[rows, subnets].sum() + extra) / whole)
        loss = float(trim_mean(losses, QUALITY_TRIM))
        if loss > DEFAULT_LOSS_DB:
            break
        chosen = (slope, loss, float(np.mean(shares)))
    if chosen is None:
        return None
    slope, loss, share = chosen
    return DefaultRouting({'mode': 'learned', 'level': 'classes', 'slope': float(f'{slope:.3g}')},
                          {'target_db': DEFAULT_LOSS_DB, 'images': len(held_out), 'trim': QUALITY_TRIM,
                           'loss_db': round(loss, 4), 'flops_share': round(share, 4)})


def fit_default(routing, router: Router, held_out: Sequence[ErrorMaps], report: dict) -> None:
    """``routing.default`` chosen on the held-out images (:func:`choose_default`), recorded in ``report`` too."""
    routing.default = choose_default(router, routing, held_out)
    report['default'] = routing.default.to_dict() if routing.default is not None else None


def default_line(routing) -> str:
    """What the command prints about the default routing it stored."""
    default = routing.default
    if default is None:
        return (f'default routing: Eq. 15 (on the held-out images the learned mode loses more than {DEFAULT_LOSS_DB} '
                'dB at every slope tried)')
    info = default.info
    return (f"default routing: {default.describe()}: on the {info['images']} held-out images {info['loss_db']:.3f} dB "
            f"below the full network (trimmed mean) at {100 * info['flops_share']:.1f}% of its FLOPs")


def write_routing(args: argparse.Namespace, projection, routing) -> bool:
    """``--model`` with its thresholds and routing artefacts replaced, written to ``--out`` (atomically); False, with
    the reason on stderr, where it cannot be written."""
    try:
        checkpoint = torch_load(args.model)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('wbsr'), dict):
            raise CorruptFileError(args.model, "no 'wbsr' entry (the file changed during the run)")
        checkpoint['wbsr']['difficulty'] = projection.to_dict()
        checkpoint['wbsr']['routing'] = routing.to_dict()
        torch_save(checkpoint, args.out)
    except (OSError, ValueError) as exc:  # a full disk at the end: nothing half-written (the write is atomic)
        print(f'wbsr-calibrate: cannot write {args.out} ({getattr(exc, "strerror", None) or first_line(exc)}); '
              'nothing was written', file=sys.stderr)
        return False
    return True


def refit_quality(args: argparse.Namespace, net, routing, router: Router, images: Sequence[TestImage],
                  start: float) -> int:
    """``--quality-only``: every subnet on the held-out images only (the predictor's ``val_every``-th), and the
    quality map of the checkpoint's predictor fitted again on them."""
    predictor = routing.predictor
    val_every = int((predictor.fit_info.get('options') or {}).get('val_every', FitOptions().val_every))
    held_out = [n for n in range(len(images)) if val_every and n % val_every == 0]
    maps = transformed_maps(router, [images[n] for n in held_out], [0])
    for item, n in zip(maps, held_out):
        item.image = n  # the image's index in --data, as a full calibration numbers it
    report = dict(predictor.fit_info)
    fit_quality(predictor, maps, net, args.tile_size, report)
    if routing.class_errors is not None:
        fit_default(routing, router, maps, report)
    predictor.fit_info = report
    if not write_routing(args, router.projection, routing):
        return 2
    if routing.class_errors is not None:
        print(default_line(routing))
    print(f'wbsr-calibrate: quality map fitted on {len(maps)} held-out images; requested 0.05 dB -> predicted-loss '
          f'threshold {predictor.quality_threshold(0.05):.3f} dB; checkpoint written to {args.out} '
          f'({time.perf_counter() - start:.0f} s)')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .infer import UsageError, load_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True, help='checkpoint written by WBSRModel (with difficulty thresholds)')
    parser.add_argument('--data', required=True, help='training images: a folder with HR/ and LR_bicubic/X<scale>/')
    parser.add_argument('--out', required=True, help='the calibrated checkpoint to write (not --model)')
    parser.add_argument('--images', type=int, default=None, help='use only the first N images')
    parser.add_argument('--scheme', default='tiles', choices=['tiles', 'patches'], help='regions measured on')
    parser.add_argument('--tile-size', type=int, default=32)
    parser.add_argument('--predictor', action='store_true', help='also fit an error predictor (the learned mode)')
    parser.add_argument('--quality-only', action='store_true',
                        help="fit only the quality target's map of --model's predictor again, on the held-out images "
                        '(every 10th); the predictor, the class errors and the weights are kept')
    defaults = FitOptions()
    parser.add_argument('--transforms', type=int, default=1,
                        help='predictor: flips/rotations of every image measured (1..8; default: 1, the image as it is; '
                        'training also flips/rotates every image with its labels)')
    parser.add_argument('--epochs', type=int, default=defaults.epochs, help='predictor: training epochs')
    parser.add_argument('--width', type=int, default=defaults.width, help='predictor: trunk width')
    parser.add_argument('--stride', type=int, default=defaults.stride, help='predictor: training tile offsets (LR px)')
    parser.add_argument('--seed', type=int, default=defaults.seed, help='predictor: seed')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        check_arguments(args)
        net, scale, projection, routing = load_model(
            args.model, no_options_hint='wbsr-calibrate needs a checkpoint written by WBSRModel (network options and '
            'difficulty thresholds)')
        if projection is None:
            raise UsageError(f'--model {args.model} has no difficulty thresholds (not written by WBSRModel)')
        if args.quality_only and routing.predictor is None:
            raise UsageError(f'--quality-only: --model {args.model} has no error predictor (fit one with --predictor)')
        images = load_test_set(args.data, scale, limit=args.images)
        router = Router(net, RoutingOptions(scheme=args.scheme, tile_size=args.tile_size), scale, projection)
    except (OSError, ValueError) as exc:
        print(f'wbsr-calibrate: {exc}', file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    if args.quality_only:
        return refit_quality(args, net, routing, router, images, start)
    maps: Optional[list] = [] if args.predictor else None
    records = measure_regions(router, images, maps=maps)
    class_mse = records.class_mse(projection.num_classes)
    # the data folder as given (a relative path stays relative: no machine's absolute paths in a shared file)
    routing.class_errors = ClassErrors(class_mse, {'scheme': args.scheme, 'tile_size': args.tile_size,
                                                   'images': len(images), 'regions': int(len(records.classes)),
                                                   'data': os.path.normpath(args.data)})
    report = None
    if args.predictor:
        maps += transformed_maps(router, images, range(1, args.transforms))
        options = FitOptions(width=args.width, tile=args.tile_size, stride=args.stride, epochs=args.epochs,
                             seed=args.seed)
        bar = tqdm(total=args.epochs, desc='fitting the predictor', unit='epoch', disable=None)
        predictor, report = fit_predictor(maps, net.num_subnets, options,
                                          progress=lambda text: (bar.set_postfix_str(text), bar.update(1)))
        bar.close()
        report['data'] = os.path.normpath(args.data)
        report['transforms'] = args.transforms
        held_out = [m for m in maps if m.image % options.val_every == 0 and m.transform == 0]
        routing.predictor = predictor
        if held_out:  # the quality target's threshold and the default routing, set on the held-out images (never on
            fit_quality(predictor, held_out, net, args.tile_size, report)  # a test set)
            fit_default(routing, router, held_out, report)
        predictor.fit_info = report
    if not write_routing(args, projection, routing):
        return 2
    gains = gains_db(class_mse)
    print('class | regions | PSNR gain (dB) of each subnet over the smallest')
    for k in range(projection.num_classes):
        print(f'{k + 1:5d} | {int((records.classes == k + 1).sum()):7d} | ' + ' '.join(f'{g:5.2f}' for g in gains[k]))
    if report is not None:
        val = report.get('validation', {})
        print(f"predictor: {report['tiles_per_epoch']} training tiles from {report['train_images']} images x "
              f"{args.transforms} flips/rotations, {report['epochs']} epochs in {report['seconds']:.0f} s; on the "
              f"{report['val_images']} held-out images Spearman's rho of predicted and measured gain "
              f"{val.get('spearman_gain', float('nan')):.3f} (largest over smallest), "
              f"{val.get('spearman_ratio_mean', float('nan')):.3f} (mean over subnets)")
        if 'default' in report:
            print(default_line(routing))
    print(f'wbsr-calibrate: {len(images)} images, {len(records.classes)} regions; calibrated checkpoint written to '
          f'{args.out} ({time.perf_counter() - start:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
