"""Make a BasicSR test/training folder from HR images: ``wbsr-make-lr --hr HR_DIR --out DATASET --scales 2 4``.

Writes ``DATASET/HR/`` (every image mod-cropped to a multiple of the least common multiple of the
scales, so one HR folder serves every scale) and ``DATASET/LR_bicubic/X{s}/`` (MATLAB-compatible bicubic
downsampling with antialiasing, ``basicsr.utils.matlab_functions.imresize``, rounded to 8 bits): the
protocol behind every published SR table (spec section 9). Several ``--hr`` folders are merged (T91 and
BSD200 into one training pool, say). Grayscale and RGBA files become 3-channel images, as BasicSR reads
them, and the EXIF orientation is applied as image viewers apply it (one line per converted image says so).

Nothing is ever written over an input: an output folder that is an ``--hr`` folder, or two inputs that
would be written under one name (``a.jpg`` and ``a.png``, or ``x.png`` in two ``--hr`` folders), are
refused before any work. An image that is unreadable, larger than ``--max-pixels`` (checked on its file size
before reading and on its header before decoding), an animation or a multi-page file, or too small for the scales is
reported and skipped; every image written has all its files (HR and each LR are computed first, then written
atomically together), and an output folder removed during the run stops it.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections import defaultdict
from numbers import Integral
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.utils.matlab_functions import imresize  # noqa: E402

from .fileio import atomic_path, ensure_writable_dir, first_line, write_files  # noqa: E402
from .pairs import FileTooLargeError, ImageFileError, ImageTooLargeError, read_image_file  # noqa: E402

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
# HR pixels. A 4096x4096 image peaked at 1680 MB resident, 713 MB above the bare process (measured); at this
# limit that is about 2.9 GB above it (extrapolated).
DEFAULT_MAX_PIXELS = 8192 * 8192
MIN_LR_SIDE = 2  # BasicSR's imresize fails on a 1-pixel output side


class OutputWriteError(OSError):
    """Writing an output file failed (disk full, folder removed); the run stops, earlier files stay."""


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """uint8 LR of a float [0, 1] HR image (already mod-cropped), MATLAB bicubic."""
    lr = imresize(hr, 1 / scale)
    return (np.clip(lr, 0, 1) * 255.).round().astype(np.uint8)


def encode_png(path: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode('.png', img)
    if not ok:
        raise OSError(f'{path}: PNG encoding failed')
    return buf.tobytes()


def write_png(path: str, img: np.ndarray) -> None:
    data = encode_png(path, img)
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def write_together(files: dict[str, bytes], create_folder: bool = True) -> None:
    """Write every ``path: bytes`` atomically, all or none (:func:`~wbsr_data.fileio.write_files`); a failure is an
    :class:`OutputWriteError` naming the file (and the folder, when it was removed during the run)."""
    try:
        write_files(files, create_folder=create_folder)
    except OSError as exc:
        path = exc.filename or next(iter(files))
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise OutputWriteError(f'cannot write {path} (its folder was removed during the run)') from None
        raise OutputWriteError(f'cannot write {path} ({exc.strerror or first_line(exc)})') from None


def list_images(folder: str) -> list[str]:
    """Image files (by extension) directly in ``folder``, sorted by name."""
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))]


def same_path(a: str, b: str) -> bool:
    """Whether two paths name the same existing file or folder (links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def output_collisions(inputs: Sequence[str], output_names: Callable[[str], Sequence[str]]) -> list[str]:
    """Messages for outputs that two inputs would both write (``a.jpg``/``a.png`` -> ``a.png``)."""
    writers: dict[str, list[str]] = defaultdict(list)
    for path in inputs:
        for name in output_names(path):
            writers[os.path.normcase(name)].append(path)
    return [f'{" and ".join(paths)} would both be written as {name}' for name, paths in writers.items()
            if len(paths) > 1]


def check_outputs(hr_dirs: Sequence[str], files: Sequence[str], out: str, scales: Sequence[int]) -> None:
    """Refuse, before any work, a run that would write over an input or write one name twice."""
    out_dirs = [os.path.join(out, 'HR')] + [os.path.join(out, 'LR_bicubic', f'X{s}') for s in scales]
    for folder in hr_dirs:
        for out_dir in out_dirs:
            if same_path(folder, out_dir):
                raise ValueError(f'--out {out} would write {out_dir}, which is the --hr folder {folder}: its images '
                                 'would be overwritten; choose another --out')
    clashes = output_collisions(files, lambda p: [os.path.splitext(os.path.basename(p))[0] + '.png'])
    if clashes:
        more = f' (and {len(clashes) - 3} more)' if len(clashes) > 3 else ''
        raise ValueError(f'{"; ".join(clashes[:3])}{more}: rename them; nothing was written')
    inputs = {(st.st_dev, st.st_ino) for st in map(os.stat, files)}
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0] + '.png'
        for out_dir in out_dirs:
            target = os.path.join(out_dir, name)
            if os.path.exists(target) and (os.stat(target).st_dev, os.stat(target).st_ino) in inputs:
                raise ValueError(f'{target} is one of the inputs (a link to it): it would be overwritten; choose '
                                 'another --out')


def skip_reason(path: str, exc: BaseException) -> str:
    """One line saying why an input was skipped, naming it (and ``--max-pixels`` for an oversized one)."""
    if isinstance(exc, (ImageTooLargeError, FileTooLargeError)):
        return exc.describe('--max-pixels')
    if isinstance(exc, ImageFileError):
        return str(exc)
    if isinstance(exc, MemoryError) or 'alloc' in str(exc).lower():
        return f'{path}: out of memory ({first_line(exc)}); a lower --max-pixels skips such images up front'
    return f'{path}: {first_line(exc)}'


def make_dataset(hr_dirs: Sequence[str], out: str, scales: Sequence[int], quiet: bool = False,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> dict[str, int]:
    """Fill ``out/HR`` and ``out/LR_bicubic/X{s}``; returns counts of written and skipped images.

    Raises ``ValueError`` / ``OSError`` before any work for bad arguments (see the module docstring), and
    :class:`OutputWriteError` when a write fails midway (the images written before it are complete).
    """
    if not scales or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in scales):
        raise ValueError(f'--scales must be positive integers, got {list(scales)}')
    scales = sorted({int(s) for s in scales})
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, Integral) or
                                   max_pixels < 1):
        raise ValueError(f'--max-pixels must be an integer >= 1, got {max_pixels}')
    mod = math.lcm(*scales)
    files = []
    for folder in hr_dirs:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'--hr {folder}: not a folder')
        files += list_images(folder)
    if not files:
        raise ValueError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {", ".join(hr_dirs)}')
    check_outputs(hr_dirs, files, out, scales)
    made = []  # the folders this call creates: removed again if no image is written into them
    parent = out
    while parent and not os.path.isdir(parent):  # --out and any parents ensure_writable_dir makes
        made.insert(0, parent)
        parent = os.path.dirname(parent.rstrip(os.sep))
    ensure_writable_dir(out, '--out')
    for folder in ['HR'] + [os.path.join('LR_bicubic', f'X{s}') for s in scales]:
        for part in (os.path.dirname(folder), folder):
            if part and not os.path.isdir(os.path.join(out, part)):
                made.append(os.path.join(out, part))
        os.makedirs(os.path.join(out, folder), exist_ok=True)  # made once: one removed later stops the run
    written = skipped = 0
    min_hr = max(mod, MIN_LR_SIDE * scales[-1])
    for path in tqdm(files, desc=f'making LR x{"/".join(map(str, scales))}', unit='img', disable=quiet or None):
        name = os.path.splitext(os.path.basename(path))[0] + '.png'
        notes: list[str] = []
        try:
            hr = read_image_file(path, max_pixels=max_pixels, notes=notes)
            h, w = hr.shape[0] - hr.shape[0] % mod, hr.shape[1] - hr.shape[1] % mod
            if min(h, w) < min_hr:
                raise ImageFileError(f'{path}: {hr.shape[1]}x{hr.shape[0]} is too small for x{scales[-1]} (the '
                                     f'mod-cropped HR must be at least {min_hr} pixels a side)')
            hr = hr[:h, :w]
            files_out = {os.path.join(out, 'HR', name): encode_png(name, (hr * 255.).round().astype(np.uint8))}
            for s in scales:
                files_out[os.path.join(out, 'LR_bicubic', f'X{s}', name)] = encode_png(name, bicubic_lr(hr, s))
        except (OSError, ImageFileError, RuntimeError, MemoryError) as exc:
            tqdm.write(f'wbsr-make-lr: skipped {skip_reason(path, exc)}', file=sys.stderr)
            skipped += 1
            continue
        del hr
        try:
            write_together(files_out, create_folder=False)
        except OutputWriteError as exc:
            raise OutputWriteError(f'{exc}; stopped, the {written} images written before are complete') from None
        for text in notes:
            tqdm.write(f'wbsr-make-lr: {path}: {text}', file=sys.stderr)
        written += 1
    if not written:  # every image refused: leave no empty dataset tree behind
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return {'written': written, 'skipped': skipped}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--hr', action='append', required=True, help='folder of HR images (repeatable)')
    parser.add_argument('--out', required=True, help='dataset folder to write HR/ and LR_bicubic/X*/ into')
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 4], help='scales (default: 2 4)')
    parser.add_argument('--max-pixels', type=int, default=DEFAULT_MAX_PIXELS,
                        help=f'skip HR images larger than this many pixels (default: {DEFAULT_MAX_PIXELS})')
    args = parser.parse_args(argv)
    try:
        counts = make_dataset(args.hr, args.out, args.scales, max_pixels=args.max_pixels)
    except (OSError, ValueError) as exc:
        print(f'wbsr-make-lr: {exc}', file=sys.stderr)
        return 2
    n = counts['written']
    print(f"wbsr-make-lr: {n} image{'' if n == 1 else 's'} written to {args.out}, {counts['skipped']} skipped")
    return 2 if not n else 1 if counts['skipped'] else 0  # as wbsr-infer: 1 when an image was skipped


if __name__ == '__main__':
    sys.exit(main())
