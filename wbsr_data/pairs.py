"""Listing and decoding LR/GT image pairs the way BasicSR's ``PairedImageDataset`` does, with clear errors.

The path listing is BasicSR's own (``paired_paths_from_folder`` / ``_from_lmdb`` /
``_from_meta_info_file``); what this module adds is the checks BasicSR leaves to assertions or to a
crash deep inside OpenCV: an empty folder, an unreadable file, a missing lmdb key, an LR/GT pair whose
sizes do not match the scale. Grayscale, RGBA and 16-bit files are converted to 3-channel float32 BGR
in [0, 1] with a logged note.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import cv2
import numpy as np

from basicsr.data.data_util import (paired_paths_from_folder, paired_paths_from_lmdb,
                                    paired_paths_from_meta_info_file)
from basicsr.utils import FileClient, get_root_logger


class ImageFileError(ValueError):
    """An image (or lmdb key) of a dataset cannot be used; the message names it."""


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


def decode_image(content: Optional[bytes], name: str) -> np.ndarray:
    """Decode image bytes to float32 BGR HWC in [0, 1], 3 channels; ``name`` is used in errors and notes."""
    if content is None:
        raise ImageFileError(f'{name}: not found')
    buf = np.frombuffer(content, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise ImageFileError(f'{name}: not a readable image')
    if img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.
    elif img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.
    else:
        raise ImageFileError(f'{name}: unsupported pixel type {img.dtype}')
    if img.ndim == 2:
        _note_once(f'{name}: grayscale, converted to 3 channels')
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 4:
        _note_once(f'{name}: RGBA, alpha channel dropped')
        img = img[..., :3]
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] != 3:
        raise ImageFileError(f'{name}: {img.shape[2]} channels, expected 1, 3 or 4')
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
