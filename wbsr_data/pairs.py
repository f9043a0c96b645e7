"""Listing and decoding LR/GT image pairs the way BasicSR's ``PairedImageDataset`` does, with clear errors.

The path listing is BasicSR's own (``paired_paths_from_folder`` / ``_from_lmdb`` /
``_from_meta_info_file``); what this module adds is the checks BasicSR leaves to assertions or to a
crash deep inside OpenCV: an empty folder, an unreadable file, a missing lmdb key, an LR/GT pair whose
sizes do not match the scale. Grayscale, RGBA and 16-bit files are converted to 3-channel float32 BGR
in [0, 1] with a note; the EXIF orientation is applied as image viewers apply it; the size an image
declares in its header can be checked against a limit before anything is decoded, and a file on disk is read
only when its size is what such an image can take. Animations and multi-page files (WebP, TIFF, APNG, GIF with
more than one frame) are refused by name rather than read as their first frame.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from typing import Any, BinaryIO, Mapping, Optional, Union

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from basicsr.data.data_util import (paired_paths_from_folder, paired_paths_from_lmdb,
                                    paired_paths_from_meta_info_file)
from basicsr.utils import FileClient, get_root_logger


class ImageFileError(ValueError):
    """An image (or lmdb key) of a dataset cannot be used; the message names it."""


class ImageTooLargeError(ImageFileError):
    """An image declares more pixels than allowed; raised before it is decoded."""

    def __init__(self, name: str, pixels: int, max_pixels: int, size: Optional[tuple[int, int]] = None) -> None:
        self.name, self.pixels, self.max_pixels, self.size = name, pixels, max_pixels, size
        super().__init__(self.describe('the limit of'))

    def describe(self, limit: str) -> str:
        """The message with the limit named as ``limit`` (a command-line tool names its flag)."""
        size = f'{self.size[0]}x{self.size[1]} is {self.pixels} pixels' if self.size else None
        what = size or f'declares {self.pixels} pixels'
        return f'{self.name}: {what}, more than {limit} {self.max_pixels}'


class FileTooLargeError(ImageFileError):
    """An image file is larger than any image within the pixel limit (or its declared size) can be; not read."""

    def __init__(self, name: str, size: int, limit: int, max_pixels: int, declared: Optional[tuple[int, int]] = None):
        self.name, self.size, self.limit, self.max_pixels, self.declared = name, size, limit, max_pixels, declared
        super().__init__(self.describe('the limit of'))

    def describe(self, limit: str) -> str:
        """The message with the pixel limit named as ``limit`` (a command-line tool names its flag)."""
        if self.declared:
            within = f'its declared {self.declared[0]}x{self.declared[1]} pixels'
        else:
            within = f'an image of {limit} {self.max_pixels} pixels'
        return (f'{self.name}: the file is {_size(self.size)}, more than {within} can take ({_size(self.limit)}); '
                'not read')


def _size(n: int) -> str:
    return f'{n} bytes' if n < 1 << 20 else f'{n / (1 << 20):.1f} MiB'


#: Bytes per pixel no accepted image needs more than: 16-bit RGBA stored uncompressed is 8; twice that leaves room for
#: a second stored image (a JPEG's embedded preview) and container overhead.
MAX_BYTES_PER_PIXEL = 16
#: Bytes of metadata (ICC profiles, EXIF, XMP, text) allowed beyond the pixels.
METADATA_BYTES = 64 << 20
#: Formats whose extra frames are pages or animation frames (a JPEG's extra frames are previews: not counted).
MULTI_FRAME_FORMATS = ('PNG', 'WEBP', 'TIFF', 'GIF')


def max_file_bytes(pixels: int) -> int:
    """The largest file an image of ``pixels`` pixels can legitimately be (see :data:`MAX_BYTES_PER_PIXEL`)."""
    return int(pixels) * MAX_BYTES_PER_PIXEL + METADATA_BYTES


EXIF_ORIENTATION = 0x0112


_noted: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        get_root_logger().info(message)


def list_pairs(opt: Mapping[str, Any]) -> list[dict[str, str]]:
    """``[{'lq_path', 'gt_path'}, ...]`` for a BasicSR paired dataset option dict (not modified), sorted by key."""
    gt_folder, lq_folder = opt.get('dataroot_gt'), opt.get('dataroot_lq')
    if not gt_folder or not lq_folder:
        raise ValueError(f"dataset '{opt.get('name', '?')}': both dataroot_gt and dataroot_lq are required")
    backend = dict(opt.get('io_backend') or {'type': 'disk'}).get('type', 'disk')
    for folder, key in ((gt_folder, 'dataroot_gt'), (lq_folder, 'dataroot_lq')):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'{key}: {folder} is not a folder')
    try:
        if backend == 'lmdb':
            paths = paired_paths_from_lmdb([lq_folder, gt_folder], ['lq', 'gt'])
        elif opt.get('meta_info_file'):
            paths = paired_paths_from_meta_info_file([lq_folder, gt_folder], ['lq', 'gt'], opt['meta_info_file'],
                                                     opt.get('filename_tmpl', '{}'))
        else:
            paths = paired_paths_from_folder([lq_folder, gt_folder], ['lq', 'gt'], opt.get('filename_tmpl', '{}'))
    except AssertionError as exc:  # BasicSR reports pairing problems as assertions
        raise ValueError(f'cannot pair {lq_folder} with {gt_folder}: {exc}') from None
    if not paths:
        raise ValueError(f'no images in {gt_folder} (dataroot_gt) / {lq_folder} (dataroot_lq)')
    # Sorted by key, so the order (and every index built on it) does not depend on how the file system
    # lists a folder, and a folder and its lmdb copy line up.
    return sorted(paths, key=lambda p: os.path.splitext(os.path.basename(p['gt_path']))[0])


def make_file_client(opt: Mapping[str, Any]) -> FileClient:
    """A BasicSR FileClient for the dataset's ``io_backend`` (the option dict is not modified)."""
    backend = dict(opt.get('io_backend') or {'type': 'disk'})
    kind = backend.pop('type', 'disk')
    if kind == 'lmdb':
        backend['db_paths'] = [opt['dataroot_lq'], opt['dataroot_gt']]
        backend['client_keys'] = ['lq', 'gt']
    return FileClient(kind, **backend)


def _header(content: Union[bytes, BinaryIO], name: str,
            max_pixels: Optional[int]) -> Optional[tuple[int, int, int]]:
    """``(width, height, EXIF orientation)`` read from the image header alone (of the bytes, or of an open file),
    or ``None`` for a format PIL does not know (OpenCV then decodes it, under its own 2^30-pixel limit).

    Raises :class:`ImageTooLargeError` for more than ``max_pixels`` before anything else is read: PIL's
    ``open`` parses the header only, and the EXIF block is read without decoding pixels (``Image.getexif``
    of the base class: PNG's own would decode the whole image to look for an eXIf chunk after the data).
    An animation or a multi-page file is an :class:`ImageFileError` naming its frame count.
    """
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(content) if isinstance(content, (bytes, bytearray)) else content)
        except Image.DecompressionBombError as exc:  # over PIL's own limit (about 179 M pixels), size not given
            found = re.search(r'\((\d+) pixels\)', str(exc))
            pixels = int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
            if max_pixels is not None and pixels > max_pixels:
                raise ImageTooLargeError(name, pixels, max_pixels) from None
            return None  # allowed by the caller: OpenCV decodes it (without the orientation)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(name, width * height, max_pixels, (width, height))
        try:
            orientation = int(Image.Image.getexif(img).get(EXIF_ORIENTATION) or 1)
        except Exception:  # noqa: BLE001  (a damaged EXIF block: shown as stored, as viewers do)
            orientation = 1
        frames = _frames(img)
    if frames > 1:
        raise ImageFileError(f'{name}: {frames} frames (an animation or a multi-page {img.format} file); only '
                             'single-frame images are read, not the first frame of several')
    return width, height, orientation if 1 <= orientation <= 8 else 1


def _frames(img: Image.Image) -> int:
    """Frames of an animation or pages of a multi-page file; 1 where PIL cannot count them."""
    if img.format not in MULTI_FRAME_FORMATS:
        return 1
    try:
        return max(1, int(getattr(img, 'n_frames', 1)))
    except Exception:  # noqa: BLE001  (a damaged frame table: OpenCV reads what it can, as before)
        return 1


def image_size(path: str) -> Optional[tuple[int, int]]:
    """``(width, height)`` of an image file as viewers show it (EXIF orientation applied), from its header alone;
    ``None`` where PIL cannot read the header (an error for whoever decodes it later)."""
    try:
        with open(path, 'rb') as f:
            header = _header(f, path, None)
    except (OSError, ImageFileError):
        return None
    if header is None:
        return None
    width, height, orientation = header
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def check_image_file(path: str, max_pixels: Optional[int] = None,
                     name: Optional[str] = None) -> Optional[tuple[int, int]]:
    """Refuse, from the file's size and header alone, what :func:`read_image_file` would refuse before decoding;
    return the ``(width, height)`` the header declares (as stored), or ``None`` for a format PIL does not know.

    A file larger than any image of ``max_pixels`` pixels (when given) or than its own declared size can be is a
    :class:`FileTooLargeError`; more pixels than ``max_pixels`` an :class:`ImageTooLargeError`; an empty file, an
    animation or a multi-page file an :class:`ImageFileError`. Nothing beyond the header is read.
    """
    name = name or path
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ImageFileError(f'{name}: empty file, not an image')
        if max_pixels is not None and size > max_file_bytes(max_pixels):
            raise FileTooLargeError(name, size, max_file_bytes(max_pixels), max_pixels)
        with open(path, 'rb') as f:
            header = _header(f, name, max_pixels)
    except OSError as exc:
        raise ImageFileError(f'{name}: cannot read ({exc.strerror or exc})') from None
    if header is None:
        return None
    if size > max_file_bytes(header[0] * header[1]):
        raise FileTooLargeError(name, size, max_file_bytes(header[0] * header[1]), max_pixels, declared=header[:2])
    return header[0], header[1]


def read_image_file(path: str, max_pixels: Optional[int] = None, notes: Optional[list[str]] = None,
                    name: Optional[str] = None) -> np.ndarray:
    """:func:`decode_image` of a file, whose reads are bounded before they happen (:func:`check_image_file`).

    A file larger than its own declared size can be (and, with ``max_pixels``, larger than any image of that many
    pixels can be) is refused after reading its header only: :class:`FileTooLargeError`, nothing else read (a small
    PNG padded to gigabytes is never loaded).
    """
    name = name or path
    check_image_file(path, max_pixels, name)
    try:
        with open(path, 'rb') as f:
            content = f.read()
    except OSError as exc:
        raise ImageFileError(f'{name}: cannot read ({exc.strerror or exc})') from None
    return decode_image(content, name, max_pixels=max_pixels, notes=notes)


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an image as stored into the image as shown, for an EXIF orientation tag 1..8 (PIL's
    ``ImageOps.exif_transpose``, on arrays of any dtype and channel count)."""
    ops = {
        2: lambda a: a[:, ::-1],  # mirrored
        3: lambda a: a[::-1, ::-1],  # upside down
        4: lambda a: a[::-1],  # mirrored and upside down
        5: lambda a: a.swapaxes(0, 1),  # transposed
        6: lambda a: a.swapaxes(0, 1)[:, ::-1],  # rotated 90 degrees clockwise to be shown
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transverse
        8: lambda a: a.swapaxes(0, 1)[::-1],  # rotated 90 degrees counter-clockwise to be shown
    }
    return np.ascontiguousarray(ops[orientation](img)) if orientation in ops else img


def decode_image(content: Optional[bytes], name: str, max_pixels: Optional[int] = None,
                 notes: Optional[list[str]] = None) -> np.ndarray:
    """Decode image bytes to float32 BGR HWC in [0, 1], 3 channels, in the orientation viewers show.

    Args:
        content: The file's bytes.
        name: Used in errors and notes.
        max_pixels: If given, an image whose header declares more pixels is refused with
            :class:`ImageTooLargeError` before it is decoded (a 74-byte PNG can declare 100000x100000).
        notes: If given, what was converted (grayscale, alpha, 16-bit, EXIF orientation) is appended here,
            for a command-line tool to print; otherwise grayscale and alpha are logged once per message.
    """
    if content is None:
        raise ImageFileError(f'{name}: not found')
    if not content:
        raise ImageFileError(f'{name}: empty file, not an image')
    header = _header(content, name, max_pixels)
    orientation = header[2] if header is not None else 1
    buf = np.frombuffer(content, np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # never applies the EXIF orientation: done below
    except cv2.error as exc:
        raise ImageFileError(f'{name}: not a readable image ({str(exc).strip().splitlines()[-1]})') from None
    if img is None:
        raise ImageFileError(f'{name}: not a readable image')
    if max_pixels is not None and header is None and img.shape[0] * img.shape[1] > max_pixels:
        raise ImageTooLargeError(name, img.shape[0] * img.shape[1], max_pixels, (img.shape[1], img.shape[0]))

    def note(text: str, log: bool = True) -> None:
        if notes is not None:
            notes.append(text)
        elif log:
            _note_once(f'{name}: {text}')

    if img.dtype == np.uint16:
        note('16-bit, written as 8-bit', log=False)
        img = img.astype(np.float32) / 65535.
    elif img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.
    else:
        raise ImageFileError(f'{name}: unsupported pixel type {img.dtype}')
    if img.ndim == 2:
        note('grayscale, converted to 3 channels')
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 4:
        note('RGBA, alpha channel dropped')
        img = img[..., :3]
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] != 3:
        raise ImageFileError(f'{name}: {img.shape[2]} channels, expected 1, 3 or 4')
    if orientation != 1:
        note(f'EXIF orientation {orientation} applied', log=False)
        img = apply_orientation(img, orientation)
    return np.ascontiguousarray(img)


def read_pair(client: FileClient, pair: Mapping[str, str], scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one ``(gt, lq)`` pair, checking that GT is ``scale`` times LR (up to GT's mod-crop)."""
    images = []
    for key in ('gt', 'lq'):
        path = pair[f'{key}_path']
        try:
            content = client.get(path, key)
        except (OSError, KeyError) as exc:
            raise ImageFileError(f'{path}: cannot read ({exc})') from None
        images.append(decode_image(content, path))
    gt, lq = images
    h, w = lq.shape[:2]
    if gt.shape[0] // scale != h or gt.shape[1] // scale != w:
        raise ImageFileError(f"{pair['gt_path']} is {gt.shape[1]}x{gt.shape[0]} but its LR {pair['lq_path']} is "
                             f'{w}x{h}: not x{scale}')
    return gt[:h * scale, :w * scale], lq
