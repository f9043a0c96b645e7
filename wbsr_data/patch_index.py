"""The HES patch index (spec section 2): every candidate training patch, scored once and cached.

A candidate is a GT crop of ``gt_size`` on a grid of stride ``patch_stride`` (default ``gt_size / 2``)
over every training image, with the matching LR crop. For each one the index keeps its image, position,
the LR crop's gradient vector, score and class; for the dataset it keeps the fitted
:class:`~wbsr_data.difficulty.DifficultyProjection` (thresholds and projection), which the model stores
in its checkpoints so that routing at test time needs nothing else.

The index is cached as an ``.npz`` file keyed by the dataset's content, the scale, ``gt_size``, the
stride, the number of classes, the projection and the difficulty function's version: an unchanged
dataset reuses it, any change builds a new one, and a stale or corrupt cache file is rebuilt (with a
warning), never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

from basicsr.utils import get_root_logger

from .difficulty import DIFFICULTY_VERSION, PROJECTIONS, DifficultyProjection, extract_patches, gradient_vectors, grid_starts
from .fileio import CorruptFileError, load_npz, save_npz
from .pairs import ImageFileError, list_pairs, make_file_client, read_pair

INDEX_FORMAT = 1
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser(os.environ.get('XDG_CACHE_HOME', '~/.cache')), 'wbsr',
                                 'hes_index')


@dataclass(frozen=True)
class IndexOptions:
    """The options that define an index, read (never modified) from a BasicSR dataset option dict."""

    scale: int
    gt_size: int
    patch_stride: int
    num_classes: int
    projection: str
    skip_small_images: bool
    cache_dir: str

    @classmethod
    def from_dataset_opt(cls, opt: Mapping[str, Any]) -> 'IndexOptions':
        try:
            scale, gt_size = int(opt['scale']), int(opt['gt_size'])
        except KeyError as exc:
            raise ValueError(f"dataset '{opt.get('name', '?')}': option {exc.args[0]} is required") from None
        stride = int(opt.get('patch_stride') or max(scale, gt_size // 2 // scale * scale))
        num_classes = int(opt.get('num_classes', 10))
        projection = str(opt.get('projection', 'pca'))
        if scale < 1:
            raise ValueError(f'scale must be >= 1, got {scale}')
        if gt_size < scale or gt_size % scale:
            raise ValueError(f'gt_size ({gt_size}) must be a positive multiple of scale ({scale})')
        if stride < 1 or stride % scale:
            raise ValueError(f'patch_stride ({stride}) must be a positive multiple of scale ({scale})')
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        if projection not in PROJECTIONS:
            raise ValueError(f'projection must be one of {PROJECTIONS}, got {projection!r}')
        cache_dir = os.path.expanduser(str(opt.get('index_cache') or os.environ.get('WBSR_CACHE_DIR') or
                                           DEFAULT_CACHE_DIR))
        return cls(scale=scale, gt_size=gt_size, patch_stride=stride, num_classes=num_classes,
                   projection=projection, skip_small_images=bool(opt.get('skip_small_images', False)),
                   cache_dir=cache_dir)


@dataclass
class PatchIndex:
    """All candidates of one dataset. Arrays are aligned: entry ``i`` is candidate ``i``."""

    pairs: list[dict[str, str]]  # per image: {'lq_path', 'gt_path'}
    image: np.ndarray  # (N,) int32, into ``pairs``
    top: np.ndarray  # (N,) int32, GT row of the crop
    left: np.ndarray  # (N,) int32, GT column of the crop
    vectors: np.ndarray  # (N, 4) float32 gradient vectors of the LR crops
    scores: np.ndarray  # (N,) float64
    classes: np.ndarray  # (N,) int16, 1..K
    projection: DifficultyProjection
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image)

    def class_counts(self) -> np.ndarray:
        """Candidates per class, classes 1..K."""
        return np.bincount(self.classes, minlength=self.projection.num_classes + 1)[1:]


def _fingerprint(opt: Mapping[str, Any], pairs: list[dict[str, str]]) -> str:
    """Hash of the dataset's content: file bytes for folders; meta info and db size/mtime for lmdb."""
    digest = hashlib.blake2b(digest_size=16)
    backend = dict(opt.get('io_backend') or {}).get('type', 'disk')
    if backend == 'lmdb':
        for folder in (opt['dataroot_gt'], opt['dataroot_lq']):
            with open(os.path.join(folder, 'meta_info.txt'), 'rb') as f:
                digest.update(f.read())
            stat = os.stat(os.path.join(folder, 'data.mdb'))
            digest.update(f'{stat.st_size}:{stat.st_mtime_ns}'.encode())
        return digest.hexdigest()
    for pair in pairs:
        for key in ('gt_path', 'lq_path'):
            digest.update(os.path.basename(pair[key]).encode() + b'\0')
            try:
                with open(pair[key], 'rb') as f:
                    for chunk in iter(lambda: f.read(1 << 22), b''):
                        digest.update(chunk)
            except OSError as exc:
                raise ImageFileError(f'{pair[key]}: cannot read ({exc.strerror})') from None
    return digest.hexdigest()


def index_key(opt: Mapping[str, Any], options: IndexOptions, pairs: list[dict[str, str]]) -> str:
    material = {
        'format': INDEX_FORMAT,
        'difficulty_version': DIFFICULTY_VERSION,
        'scale': options.scale,
        'gt_size': options.gt_size,
        'patch_stride': options.patch_stride,
        'num_classes': options.num_classes,
        'projection': options.projection,
        'skip_small_images': options.skip_small_images,
        'content': _fingerprint(opt, pairs),
    }
    return hashlib.blake2b(json.dumps(material, sort_keys=True).encode(), digest_size=16).hexdigest()


def build_index(opt: Mapping[str, Any], options: IndexOptions, pairs: list[dict[str, str]]) -> PatchIndex:
    """Read every pair once, score every candidate, fit the projection and thresholds."""
    logger = get_root_logger()
    client = make_file_client(opt)
    scale, gt_size, stride = options.scale, options.gt_size, options.patch_stride
    lq_size, kept_pairs, skipped = gt_size // scale, [], []
    columns: dict[str, list[np.ndarray]] = {'image': [], 'top': [], 'left': [], 'vectors': []}
    start = time.perf_counter()
    for pair in tqdm(pairs, desc='HES index', unit='img', leave=False, disable=None):
        gt, lq = read_pair(client, pair, scale)
        if min(gt.shape[:2]) < gt_size:
            if not options.skip_small_images:
                raise ImageFileError(f"{pair['gt_path']} is {gt.shape[1]}x{gt.shape[0]}, smaller than gt_size "
                                     f'{gt_size} (set skip_small_images: true to leave such images out)')
            skipped.append(pair['gt_path'])
            continue
        tops = grid_starts(gt.shape[0], gt_size, stride, cover_end=False)
        lefts = grid_starts(gt.shape[1], gt_size, stride, cover_end=False)
        lq_rgb = torch.from_numpy(np.ascontiguousarray(lq[..., ::-1].transpose(2, 0, 1)))
        patches = extract_patches(lq_rgb, [t // scale for t in tops], [lf // scale for lf in lefts], lq_size, lq_size)
        grid_top, grid_left = np.meshgrid(tops, lefts, indexing='ij')
        columns['image'].append(np.full(grid_top.size, len(kept_pairs), np.int32))
        columns['top'].append(grid_top.ravel().astype(np.int32))
        columns['left'].append(grid_left.ravel().astype(np.int32))
        columns['vectors'].append(gradient_vectors(patches).numpy())
        kept_pairs.append(dict(pair))
    if not kept_pairs:
        raise ValueError(f"no image of {opt['dataroot_gt']} is at least gt_size={gt_size} pixels on both sides")
    arrays = {k: np.concatenate(v) for k, v in columns.items()}
    projection = DifficultyProjection.fit(arrays['vectors'], options.num_classes, options.projection)
    scores = projection.score(arrays['vectors'])
    seconds = time.perf_counter() - start
    if skipped:
        logger.warning(f'HES index: {len(skipped)} image(s) smaller than gt_size={gt_size} left out: '
                       + ', '.join(os.path.basename(p) for p in skipped))
    logger.info(f'HES index: {len(scores)} candidates from {len(kept_pairs)} images in {seconds:.1f} s')
    meta = {'build_seconds': seconds, 'skipped': skipped, 'dataroot_gt': str(opt['dataroot_gt'])}
    return PatchIndex(pairs=kept_pairs, image=arrays['image'], top=arrays['top'], left=arrays['left'],
                      vectors=arrays['vectors'].astype(np.float32), scores=scores,
                      classes=projection.classify(scores).astype(np.int16), projection=projection, meta=meta)


def _save(index: PatchIndex, path: str, key: str) -> None:
    arrays = {'image': index.image, 'top': index.top, 'left': index.left, 'vectors': index.vectors,
              'scores': index.scores, 'classes': index.classes}
    meta = dict(index.meta, key=key, format=INDEX_FORMAT, pairs=index.pairs, projection=index.projection.to_dict())
    save_npz(path, arrays, meta)


def _load(path: str, key: str) -> PatchIndex:
    arrays, meta = load_npz(path, required=('image', 'top', 'left', 'vectors', 'scores', 'classes'))
    if meta.get('key') != key or meta.get('format') != INDEX_FORMAT:
        raise CorruptFileError(path, 'stale: made for other data or options')
    n = len(arrays['image'])
    if any(len(arrays[k]) != n for k in arrays) or arrays['vectors'].shape != (n, 4):
        raise CorruptFileError(path, 'arrays of different lengths')
    pairs = meta.pop('pairs')
    if n and (arrays['image'].min() < 0 or arrays['image'].max() >= len(pairs)):
        raise CorruptFileError(path, 'image numbers out of range')
    try:
        projection = DifficultyProjection.from_dict(meta.pop('projection'))
    except ValueError as exc:
        raise CorruptFileError(path, str(exc)) from None
    return PatchIndex(pairs=pairs, projection=projection, meta=meta, **arrays)


def cache_path(options: IndexOptions, key: str) -> str:
    return os.path.join(options.cache_dir, f'hes_index_{key}.npz')


def load_or_build_index(opt: Mapping[str, Any]) -> PatchIndex:
    """The index of a BasicSR dataset option dict: from the cache when valid, else built and cached.

    Under ``torch.distributed``, rank 0 builds and writes the cache while the other ranks wait, then
    read it. Writes are atomic, so concurrent processes never see a half-written file.
    """
    logger = get_root_logger()
    options = IndexOptions.from_dataset_opt(opt)
    pairs = list_pairs(opt)
    key = index_key(opt, options, pairs)
    path = cache_path(options, key)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 builds first
    try:
        index = _load(path, key)
        logger.info(f'HES index: reusing {path} ({len(index)} candidates)')
    except FileNotFoundError:
        index = None
    except CorruptFileError as exc:
        logger.warning(f'HES index: rebuilding, the cache is unusable: {exc}')
        index = None
    if index is None:
        index = build_index(opt, options, pairs)
        _save(index, path, key)
        logger.info(f'HES index: cached at {path}')
    if distributed and torch.distributed.get_rank() == 0:
        torch.distributed.barrier()
    return index
