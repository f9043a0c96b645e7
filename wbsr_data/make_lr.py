"""Make a BasicSR test/training folder from HR images: ``wbsr-make-lr --hr HR_DIR --out DATASET --scales 2 4``.

Writes ``DATASET/HR/`` (every image mod-cropped to a multiple of the least common multiple of the
scales, so one HR folder serves every scale) and ``DATASET/LR_bicubic/X{s}/`` (MATLAB-compatible bicubic
downsampling with antialiasing, ``basicsr.utils.matlab_functions.imresize``, rounded to 8 bits): the
protocol behind every published SR table (spec section 9). Several ``--hr`` folders are merged (T91 and
BSD200 into one training pool, say). Grayscale and RGBA files become 3-channel images, as BasicSR reads
them. Files are written atomically; an unreadable input is reported and skipped.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.utils.matlab_functions import imresize  # noqa: E402

from .fileio import atomic_path  # noqa: E402
from .pairs import ImageFileError, decode_image  # noqa: E402

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """uint8 LR of a float [0, 1] HR image (already mod-cropped), MATLAB bicubic."""
    lr = imresize(hr, 1 / scale)
    return (np.clip(lr, 0, 1) * 255.).round().astype(np.uint8)


def write_png(path: str, img: np.ndarray) -> None:
    ok, buf = cv2.imencode('.png', img)
    if not ok:
        raise OSError(f'{path}: PNG encoding failed')
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(buf.tobytes())


def make_dataset(hr_dirs: Sequence[str], out: str, scales: Sequence[int], quiet: bool = False) -> dict[str, int]:
    """Fill ``out/HR`` and ``out/LR_bicubic/X{s}``; returns counts of written and skipped images."""
    scales = sorted({int(s) for s in scales})
    if not scales or scales[0] < 1:
        raise ValueError(f'scales must be positive integers, got {scales}')
    mod = math.lcm(*scales)
    files = []
    for folder in hr_dirs:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'--hr {folder}: not a folder')
        files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f'no images in {", ".join(hr_dirs)}')
    written = skipped = 0
    for path in tqdm(files, desc=f'making LR x{"/".join(map(str, scales))}', unit='img', disable=quiet or None):
        name = os.path.splitext(os.path.basename(path))[0] + '.png'
        try:
            with open(path, 'rb') as f:
                hr = decode_image(f.read(), path)
        except (OSError, ImageFileError) as exc:
            print(f'wbsr-make-lr: skipped {exc}', file=sys.stderr)
            skipped += 1
            continue
        h, w = hr.shape[0] - hr.shape[0] % mod, hr.shape[1] - hr.shape[1] % mod
        if h == 0 or w == 0:
            print(f'wbsr-make-lr: skipped {path}: smaller than {mod} pixels', file=sys.stderr)
            skipped += 1
            continue
        hr = hr[:h, :w]
        write_png(os.path.join(out, 'HR', name), (hr * 255.).round().astype(np.uint8))
        for s in scales:
            write_png(os.path.join(out, 'LR_bicubic', f'X{s}', name), bicubic_lr(hr, s))
        written += 1
    return {'written': written, 'skipped': skipped}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--hr', action='append', required=True, help='folder of HR images (repeatable)')
    parser.add_argument('--out', required=True, help='dataset folder to write HR/ and LR_bicubic/X*/ into')
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 4], help='scales (default: 2 4)')
    args = parser.parse_args(argv)
    try:
        counts = make_dataset(args.hr, args.out, args.scales)
    except (OSError, ValueError) as exc:
        print(f'wbsr-make-lr: {exc}', file=sys.stderr)
        return 2
    print(f"wbsr-make-lr: {counts['written']} images written to {args.out}, {counts['skipped']} skipped")
    return 0 if counts['written'] else 2


if __name__ == '__main__':
    sys.exit(main())
