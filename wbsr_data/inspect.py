"""Inspect the HES classes of a training set: ``python -m wbsr_data.inspect -opt <option file>``.

Prints the class counts, thresholds and sampling masses (before and after the switch), and writes two
PNGs: ``hes_scores.png``, the histogram of difficulty scores with the class thresholds, and
``hes_classes.png``, a contact sheet of example GT patches of every class, easiest at the top.

The option file's dataset options are checked by type and range and the output folder for writing before the index
is built; ``--per-class`` is a count in 1..:data:`MAX_PER_CLASS`, and the sheet is as wide as the largest class drawn.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import cv2
import numpy as np

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from .fileio import atomic_path, ensure_writable_dir, write_bytes  # noqa: E402
from .hes_dataset import class_masses  # noqa: E402
from .pairs import make_file_client, read_pair  # noqa: E402
from .patch_index import PatchIndex, load_or_build_index  # noqa: E402


#: Most example patches per class on the contact sheet (each is a 100-pixel column).
MAX_PER_CLASS = 256


def train_dataset_options(option_file: str) -> dict:
    """``datasets.train`` of a BasicSR option file, with the top-level ``scale`` as ``parse_options`` adds it.

    One-line errors naming the file: unreadable YAML, no ``datasets.train``, a dataset option of the wrong type or
    range (:mod:`wbsr_models.checks`).
    """
    from wbsr_models.checks import OptionFileError, check_dataset_options, read_option_file
    opt = read_option_file(option_file)
    try:
        dataset = dict(opt['datasets']['train'])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f'{option_file}: no datasets.train section') from None
    try:
        check_dataset_options(opt)
    except ValueError as exc:
        raise OptionFileError(option_file, str(exc)) from None
    if 'scale' in opt:
        dataset['scale'] = opt['scale']
    dataset.setdefault('phase', 'train')
    return dataset


def summary_table(index: PatchIndex, delta: float) -> str:
    counts = index.class_counts()
    uniform, balanced = counts / counts.sum(), class_masses(counts, delta)
    bounds = np.concatenate([[index.projection.score_range[0]], index.projection.thresholds,
                             [index.projection.score_range[1]]])
    lines = [f'{len(index)} candidates from {len(index.pairs)} images; projection {index.projection.kind}; '
             f"index built in {index.meta.get('build_seconds', float('nan')):.1f} s",
             'class  count  score range            mass before switch  mass after (delta=%g)' % delta]
    for k in range(len(counts)):
        lines.append(f'{k + 1:5d}  {counts[k]:5d}  ({bounds[k]:8.4f}, {bounds[k + 1]:8.4f}]  {uniform[k]:18.4f}  '
                     f'{balanced[k]:.4f}')
    return '\n'.join(lines)


def plot_scores(index: PatchIndex, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    ax.hist(index.scores, bins=100, color='#4c72b0')
    for t in index.projection.thresholds:
        ax.axvline(t, color='#c44e52', lw=0.8)
    ax.set_xlabel(f'difficulty score ({index.projection.kind} projection of the gradient vector)')
    ax.set_ylabel('candidate patches')
    ax.set_title(f'HES classes: {index.projection.num_classes} equal-count classes (red: thresholds)')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png')
    plt.close(fig)


def contact_sheet(index: PatchIndex, opt: dict, path: str, per_class: int = 8, tile: int = 96,
                  seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    client = make_file_client(opt)
    scale, gt_size = int(opt['scale']), int(opt['gt_size'])
    label_w, k_count = 90, index.projection.num_classes
    columns = max(1, min(per_class, int(index.class_counts().max(initial=0))))  # no empty columns
    sheet = np.full((k_count * (tile + 4) + 4, label_w + columns * (tile + 4) + 4, 3), 255, np.uint8)
    for k in range(1, k_count + 1):
        members = np.flatnonzero(index.classes == k)
        picks = rng.choice(members, size=min(per_class, len(members)), replace=False) if len(members) else []
        y = 4 + (k - 1) * (tile + 4)
        cv2.putText(sheet, f'class {k}', (6, y + tile // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
        for j, cand in enumerate(sorted(picks, key=lambda c: index.scores[c])):
            gt, _ = read_pair(client, index.pairs[int(index.image[cand])], scale)
            top, left = int(index.top[cand]), int(index.left[cand])
            crop = (gt[top:top + gt_size, left:left + gt_size] * 255).round().astype(np.uint8)
            x = label_w + j * (tile + 4)
            sheet[y:y + tile, x:x + tile] = cv2.resize(crop, (tile, tile), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode('.png', sheet)
    if not ok:
        raise OSError(f'{path}: PNG encoding failed')
    write_bytes(path, png.tobytes())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-opt', required=True, help='BasicSR option file with a datasets.train section')
    parser.add_argument('--out', default='hes_inspect', help='folder for the PNGs (default: hes_inspect)')
    parser.add_argument('--per-class', type=int, default=8, help='example patches per class (default: 8)')
    args = parser.parse_args(argv)
    created = not os.path.exists(args.out)
    try:
        if not 1 <= args.per_class <= MAX_PER_CLASS:
            raise ValueError(f'--per-class must be in 1..{MAX_PER_CLASS}, got {args.per_class}')
        opt = train_dataset_options(args.opt)
        ensure_writable_dir(args.out, '--out')
        index = load_or_build_index(opt)
    except (OSError, ValueError) as exc:
        print(f'wbsr-inspect: {exc}', file=sys.stderr)
        if created and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)  # made by the write check of this run: leave nothing behind
        return 2
    print(summary_table(index, float(opt.get('delta', 0.9))))
    try:
        plot_scores(index, os.path.join(args.out, 'hes_scores.png'))
        contact_sheet(index, opt, os.path.join(args.out, 'hes_classes.png'), per_class=args.per_class)
    except OSError as exc:  # a full disk, a folder removed meanwhile
        print(f'wbsr-inspect: cannot write into {args.out} ({exc.strerror or exc})', file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.out, 'hes_scores.png')} and {os.path.join(args.out, 'hes_classes.png')}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
