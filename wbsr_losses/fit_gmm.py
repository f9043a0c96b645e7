"""Fit the BDLoss label GMM for a BasicSR option file: ``python -m wbsr_losses.fit_gmm -opt <file>``.

The data come from ``datasets.train`` (its ``dataroot_gt``), the GMM options from ``train.pixel_opt``
(which must be a BDLoss); ``--label-space`` and ``--components`` override them. The file is written to
``--out``, else to the options' ``gmm_path``, else to ``bd_gmm_<label_space>.npz`` in the current folder.
Also installed as ``wbsr-fit-gmm``.

Before the fit: the BDLoss options are checked by type and range, the output file for writing, and (``detail`` label
space) every GT image's size from its header, so that an image too small for the blur is refused by name.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import yaml

from basicsr.utils.options import ordered_yaml
from wbsr_data.fileio import ensure_writable_file
from wbsr_losses.gmm import LABEL_SPACES, fit_gmm, gaussian_kernel1d, gmm_fit_options, list_gt_images, save_gmm


class OptionError(ValueError):
    """The option file cannot be used; the message names it and the option."""


def read_options(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(BDLoss options, training dataset options)`` of a BasicSR option file."""
    if not os.path.isfile(path):
        raise OptionError(f'{path}: no such option file')
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except yaml.YAMLError as exc:
        raise OptionError(f'{path}: not valid YAML ({str(exc).splitlines()[0]})') from None
    if not isinstance(opt, dict):
        raise OptionError(f'{path}: not a BasicSR option file (no mapping at the top level)')
    dataset_opt = (opt.get('datasets') or {}).get('train')
    if not isinstance(dataset_opt, dict) or not dataset_opt.get('dataroot_gt'):
        raise OptionError(f'{path}: datasets.train.dataroot_gt is not set')
    loss_opt = (opt.get('train') or {}).get('pixel_opt')
    if not isinstance(loss_opt, dict) or loss_opt.get('type') != 'BDLoss':
        raise OptionError(f'{path}: train.pixel_opt must be of type BDLoss, got '
                          f'{loss_opt.get("type") if isinstance(loss_opt, dict) else loss_opt!r}')
    from wbsr_models.checks import BDLOSS_OPTIONS, check_table
    try:
        check_table(loss_opt, BDLOSS_OPTIONS, 'train.pixel_opt')
    except ValueError as exc:
        raise OptionError(f'{path}: {exc}') from None
    return dict(loss_opt), dict(dataset_opt)


def check_image_sizes(dataset_opt: Mapping[str, Any], label_space: str, blur_sigma: float) -> None:
    """Refuse, by name and before the fit, a GT image that is empty, padded or multi-frame
    (:func:`~wbsr_data.pairs.check_image_file`), or too small for the ``detail`` label space's blur (reflect padding
    needs more pixels a side than the blur radius). Sizes come from the headers; only disk folders are scanned."""
    if dict(dataset_opt.get('io_backend') or {}).get('type', 'disk') != 'disk':
        return
    from wbsr_data.pairs import check_image_file
    radius = gaussian_kernel1d(float(blur_sigma)).numel() // 2
    for path in list_gt_images(dataset_opt):
        size = check_image_file(path)  # None: a format PIL does not know, reported by the fit itself if unreadable
        if label_space != 'detail' or size is None:
            continue
        width, height = size
        if min(width, height) <= radius:
            raise ValueError(f'{path}: {width}x{height} is too small for the detail label space (blur_sigma='
                             f'{blur_sigma:g} needs more than {radius} pixels a side); remove it or use label_space: '
                             'rgb')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='wbsr-fit-gmm', description=__doc__.split('\n')[0])
    parser.add_argument('-opt', required=True, help='BasicSR option file (datasets.train, train.pixel_opt)')
    parser.add_argument('--out', help='GMM file to write (default: gmm_path of the options, else '
                        'bd_gmm_<label_space>.npz here)')
    parser.add_argument('--label-space', choices=LABEL_SPACES, help='override pixel_opt.label_space')
    parser.add_argument('--components', type=int, help='override pixel_opt.num_components')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns 0 on success, 2 on bad input (one-line error on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage line
        return int(exc.code or 0)
    try:
        loss_opt, dataset_opt = read_options(args.opt)
        if args.label_space:
            loss_opt['label_space'] = args.label_space
        if args.components is not None:
            if args.components < 1:
                raise OptionError(f'--components must be >= 1, got {args.components}')
            loss_opt['num_components'] = args.components
        fit_opt = gmm_fit_options(loss_opt)
        out = args.out or loss_opt.get('gmm_path') or f'bd_gmm_{fit_opt["label_space"]}.npz'
        ensure_writable_file(out, '--out' if args.out else 'train.pixel_opt.gmm_path' if loss_opt.get('gmm_path')
                             else 'the GMM file')
        check_image_sizes(dataset_opt, fit_opt['label_space'], fit_opt['blur_sigma'])
        print(f'Fitting a {fit_opt["label_space"]} GMM ({fit_opt["num_components"]} {fit_opt["covariance_type"]} '
              f'components) on up to {fit_opt["num_pixels"]} pixels of {dataset_opt["dataroot_gt"]}')
        gmm = fit_gmm(dataset_opt, **fit_opt)
        save_gmm(out, gmm)
    except (OSError, ValueError, TypeError) as exc:
        message = str(exc).replace('\n', ' ')
        print(f'wbsr-fit-gmm: error: {message}', file=sys.stderr)
        return 2
    info = gmm.provenance
    print(f'{gmm.label_space} GMM, {gmm.num_components} {gmm.covariance_type} components, fitted on '
          f'{info["num_pixels"]} pixels of {info["num_images"]} images in {info["fit_seconds"]:.1f} s '
          f'(EM {"converged" if info["converged"] else "NOT converged"} after {info["em_iterations"]} iterations)')
    print('component  weight  mean (R, G, B)')
    with np.printoptions(precision=4, suppress=True):
        for i, (weight, mean) in enumerate(zip(gmm.weights, gmm.means)):
            print(f'{i:9d}  {weight:.4f}  {mean}')
    print(f'written to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
