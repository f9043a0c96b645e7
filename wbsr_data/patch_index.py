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

At DIV2K scale (tens of thousands of sub-images, docs/scale.md) three things keep the start of a run short:

- the content hash of a folder dataset is remembered beside the cache, under a signature of every file's
  size, modification and change time and inode (one ``stat`` per file), so a run whose files did not
  change reads none of them before loading the index;
- the images are read and scored by ``index_workers`` processes (a ``torch`` DataLoader), hashing too;
- under ``torch.distributed`` only rank 0 looks at the files: it loads or builds the index and sends it to
  the other ranks over a gloo group of its own, whose long timeout lets a build outlast the collective
  timeout of the default group (10 minutes for NCCL), and which needs no file system shared between nodes.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from tqdm import tqdm

from basicsr.utils import get_root_logger

from .difficulty import (DIFFICULTY_VERSION, PROJECTIONS, DifficultyProjection, extract_patches, gradient_vectors,
                         grid_starts)
from .fileio import CorruptFileError, first_line, load_npz, save_json, save_npz
from .pairs import ImageFileError, list_pairs, make_file_client, read_pair

INDEX_FORMAT = 1
ARRAYS = ('image', 'top', 'left', 'vectors', 'scores', 'classes')
#: How long the other ranks wait for rank 0's index. Rank 0's failure ends the wait at once (its error is sent),
#: and torchrun stops every rank when one dies, so this only bounds a rank 0 that hangs.
RANK0_WAIT = datetime.timedelta(hours=24)
#: Default ``index_workers``: one reading process per this many images, at most one per usable CPU.
IMAGES_PER_WORKER = 64
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
    workers: Optional[int] = None  # None: one per IMAGES_PER_WORKER images, at most one per usable CPU

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
        workers = opt.get('index_workers')
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"dataset '{opt.get('name', '?')}': index_workers must be an integer >= 0 (0: read in "
                             f'the main process), got {workers!r}')
        cache_dir = os.path.expanduser(str(opt.get('index_cache') or os.environ.get('WBSR_CACHE_DIR') or
                                           DEFAULT_CACHE_DIR))
        return cls(scale=scale, gt_size=gt_size, patch_stride=stride, num_classes=num_classes,
                   projection=projection, skip_small_images=bool(opt.get('skip_small_images', False)),
                   cache_dir=cache_dir, workers=workers)

    def num_workers(self, num_images: int) -> int:
        """Reading processes for ``num_images`` images: ``workers`` if set, else one per ``IMAGES_PER_WORKER``
        images, at most one per CPU this process may use (0: in this process)."""
        if self.workers is not None:
            return self.workers
        return min(_usable_cpus(), num_images // IMAGES_PER_WORKER)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


def _backend(opt: Mapping[str, Any]) -> str:
    return dict(opt.get('io_backend') or {}).get('type', 'disk')


# ---- reading the images: in this process or in DataLoader workers --------------------------------------------
class _PairReader(torch.utils.data.Dataset):
    """Item ``i``: what the index needs of pair ``i`` (its candidates' gradient vectors, or its files' digests).

    A failure to read or decode is returned as ``{'error': message}`` rather than raised, so that the main
    process raises it as the one-line :class:`ImageFileError` it would raise reading the pair itself.
    """

    def __init__(self, opt: Mapping[str, Any], options: IndexOptions, pairs: list[dict[str, str]], task: str) -> None:
        self.opt, self.options, self.pairs, self.task = dict(opt), options, pairs, task
        self.client = None  # opened in the process that reads (an lmdb environment must not cross a fork)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.client is None:
            self.client = make_file_client(self.opt)
        try:
            return self.digests(i) if self.task == 'digest' else self.score(i)
        except ImageFileError as exc:
            return {'error': str(exc)}

    def digests(self, i: int) -> dict[str, Any]:
        out = {}
        for key in ('gt_path', 'lq_path'):
            path = self.pairs[i][key]
            digest = hashlib.blake2b(digest_size=16)
            try:
                with open(path, 'rb') as f:
                    for chunk in iter(lambda: f.read(1 << 22), b''):
                        digest.update(chunk)
            except OSError as exc:
                raise ImageFileError(f'{path}: cannot read ({exc.strerror})') from None
            out[key] = digest.hexdigest()
        return out

    def score(self, i: int) -> dict[str, Any]:
        options, pair = self.options, self.pairs[i]
        scale, gt_size, stride = options.scale, options.gt_size, options.patch_stride
        gt, lq = read_pair(self.client, pair, scale)
        if min(gt.shape[:2]) < gt_size:
            return {'small': np.array(gt.shape[:2])}
        tops = grid_starts(gt.shape[0], gt_size, stride, cover_end=False)
        lefts = grid_starts(gt.shape[1], gt_size, stride, cover_end=False)
        lq_rgb = torch.from_numpy(np.ascontiguousarray(lq[..., ::-1].transpose(2, 0, 1)))
        lq_size = gt_size // scale
        patches = extract_patches(lq_rgb, [t // scale for t in tops], [lf // scale for lf in lefts], lq_size, lq_size)
        grid_top, grid_left = np.meshgrid(tops, lefts, indexing='ij')
        return {'top': grid_top.ravel().astype(np.int32), 'left': grid_left.ravel().astype(np.int32),
                'vectors': gradient_vectors(patches).numpy()}


def _read_all(opt: Mapping[str, Any], options: IndexOptions, pairs: list[dict[str, str]], task: str,
              desc: str) -> Iterator[dict[str, Any]]:
    """Every pair's item of :class:`_PairReader`, in order, with a progress bar; in ``options.num_workers``
    DataLoader worker processes when that is above 0."""
    reader = _PairReader(opt, options, pairs, task)
    workers = options.num_workers(len(pairs))
    items: Any = reader
    if workers > 0:
        items = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers, prefetch_factor=8,
                                            collate_fn=_unchanged, worker_init_fn=_init_reader)
    for item in tqdm(items, total=len(pairs), desc=desc, unit='img', leave=False, disable=None):
        if 'error' in item:
            raise ImageFileError(item['error'])
        yield item


def _init_reader(worker_id: int) -> None:
    """A reading process keeps freed blocks for reuse, as HES's DataLoader workers do (fewer page faults)."""
    from wbsr_models.evaluation import keep_freed_memory
    keep_freed_memory(32 << 20)


def _unchanged(item: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate function: the item as the reader made it (numpy arrays and strings)."""
    return item


# ---- the cache key ---------------------------------------------------------------------------------------------
def _stat_signature(pairs: list[dict[str, str]]) -> str:
    """Hash of every file's path, size, modification and change times and inode: changes whenever a file does.

    The change time (ctime) is set by the kernel on every write and cannot be set back by ``touch`` or a copy
    tool, so a file rewritten with its old size and modification time still gets a new signature.
    """
    digest = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        for key in ('gt_path', 'lq_path'):
            try:
                st = os.stat(pair[key])
            except OSError as exc:
                raise ImageFileError(f'{pair[key]}: cannot read ({exc.strerror})') from None
            digest.update(f'{pair[key]}\0{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\0'.encode())
    return digest.hexdigest()


def _memo_path(opt: Mapping[str, Any], options: IndexOptions) -> str:
    """Where the content hash of a folder dataset is remembered (one file per pair of folders and listing)."""
    where = json.dumps([os.path.realpath(opt['dataroot_gt']), os.path.realpath(opt['dataroot_lq']),
                        opt.get('meta_info_file'), opt.get('filename_tmpl', '{}')])
    return os.path.join(options.cache_dir, f"hes_content_{hashlib.blake2b(where.encode(), digest_size=8).hexdigest()}"
                        '.json')


def content_fingerprint(opt: Mapping[str, Any], options: IndexOptions, pairs: list[dict[str, str]]) -> str:
    """Hash of the dataset's content: file names and bytes for folders; meta info and db size/mtime for lmdb.

    A folder dataset's hash is remembered beside the cache under :func:`_stat_signature`: while no file
    changes, it is not computed again (its files are not read).
    """
    digest = hashlib.blake2b(digest_size=16)
    if _backend(opt) == 'lmdb':
        for folder in (opt['dataroot_gt'], opt['dataroot_lq']):
            with open(os.path.join(folder, 'meta_info.txt'), 'rb') as f:
                digest.update(f.read())
            stat = os.stat(os.path.join(folder, 'data.mdb'))
            digest.update(f'{stat.st_size}:{stat.st_mtime_ns}'.encode())
        return digest.hexdigest()
    signature, memo = _stat_signature(pairs), _memo_path(opt, options)
    try:
        with open(memo, encoding='utf-8') as f:
            known = json.load(f)
        if isinstance(known, dict) and known.get('signature') == signature and isinstance(known.get('content'), str):
            return known['content']
    except (OSError, ValueError):
        pass  # absent or unreadable: hashed again below and rewritten
    for pair, item in zip(pairs, _read_all(opt, options, pairs, 'digest', 'HES index: hashing')):
        for key in ('gt_path', 'lq_path'):
            digest.update(os.path.basename(pair[key]).encode() + b'\0' + item[key].encode())
    content = digest.hexdigest()
    try:
        save_json(memo, {'signature': signature, 'content': content, 'files': 2 * len(pairs)})
    except OSError as exc:  # a read-only cache folder: the index is still usable, the next run hashes again
        get_root_logger().warning(f'HES index: cannot write {memo} ({first_line(exc)})')
    return content


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
        'content': content_fingerprint(opt, options, pairs),
    }
    return hashlib.blake2b(json.dumps(material, sort_keys=True).encode(), digest_size=16).hexdigest()


# ---- building ----------------------------------------------------------------------------------------------------
def build_index(opt: Mapping[str, Any], options: IndexOptions, pairs: list[dict[str, str]]) -> PatchIndex:
    """Read every pair once, score every candidate, fit the projection and thresholds."""
    logger = get_root_logger()
    gt_size, kept_pairs, skipped = options.gt_size, [], []
    columns: dict[str, list[np.ndarray]] = {'image': [], 'top': [], 'left': [], 'vectors': []}
    start = time.perf_counter()
    workers = options.num_workers(len(pairs))
    for pair, item in zip(pairs, _read_all(opt, options, pairs, 'score', 'HES index')):
        if 'small' in item:
            if not options.skip_small_images:
                h, w = (int(v) for v in item['small'])
                raise ImageFileError(f"{pair['gt_path']} is {w}x{h}, smaller than gt_size "
                                     f'{gt_size} (set skip_small_images: true to leave such images out)')
            skipped.append(pair['gt_path'])
            continue
        columns['image'].append(np.full(len(item['top']), len(kept_pairs), np.int32))
        for key in ('top', 'left', 'vectors'):
            columns[key].append(item[key])
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
    readers = f', {workers} reading processes' if workers else ''
    logger.info(f'HES index: {len(scores)} candidates from {len(kept_pairs)} images in {seconds:.1f} s{readers}')
    meta = {'build_seconds': seconds, 'skipped': skipped, 'dataroot_gt': str(opt['dataroot_gt'])}
    return PatchIndex(pairs=kept_pairs, image=arrays['image'], top=arrays['top'], left=arrays['left'],
                      vectors=arrays['vectors'].astype(np.float32), scores=scores,
                      classes=projection.classify(scores).astype(np.int16), projection=projection, meta=meta)


# ---- the cache file --------------------------------------------------------------------------------------------
def _meta(index: PatchIndex, key: str) -> dict[str, Any]:
    return dict(index.meta, key=key, format=INDEX_FORMAT, pairs=index.pairs, projection=index.projection.to_dict())


def _save(index: PatchIndex, path: str, key: str) -> None:
    save_npz(path, {name: getattr(index, name) for name in ARRAYS}, _meta(index, key))


def _from_parts(arrays: dict[str, np.ndarray], meta: dict[str, Any], where: str) -> PatchIndex:
    """A :class:`PatchIndex` from its arrays and metadata, checked; a problem is a CorruptFileError on ``where``."""
    n = len(arrays['image'])
    if any(len(arrays[k]) != n for k in arrays) or arrays['vectors'].shape != (n, 4):
        raise CorruptFileError(where, 'arrays of different lengths')
    pairs = meta.pop('pairs')
    if n and (arrays['image'].min() < 0 or arrays['image'].max() >= len(pairs)):
        raise CorruptFileError(where, 'image numbers out of range')
    try:
        projection = DifficultyProjection.from_dict(meta.pop('projection'))
    except ValueError as exc:
        raise CorruptFileError(where, str(exc)) from None
    return PatchIndex(pairs=pairs, projection=projection, meta=meta, **arrays)


def _load(path: str, key: str) -> PatchIndex:
    arrays, meta = load_npz(path, required=ARRAYS)
    if meta.get('key') != key or meta.get('format') != INDEX_FORMAT:
        raise CorruptFileError(path, 'stale: made for other data or options')
    return _from_parts({name: arrays[name] for name in ARRAYS}, meta, path)


def cache_path(options: IndexOptions, key: str) -> str:
    return os.path.join(options.cache_dir, f'hes_index_{key}.npz')


def _load_or_build(opt: Mapping[str, Any], options: IndexOptions) -> tuple[PatchIndex, str]:
    """``(index, key)``: from the cache when valid, else built and cached (one process)."""
    logger = get_root_logger()
    pairs = list_pairs(opt)
    key = index_key(opt, options, pairs)
    path = cache_path(options, key)
    try:
        index = _load(path, key)
        logger.info(f'HES index: reusing {path} ({len(index)} candidates)')
        return index, key
    except FileNotFoundError:
        pass
    except CorruptFileError as exc:
        logger.warning(f'HES index: rebuilding, the cache is unusable: {exc}')
    index = build_index(opt, options, pairs)
    _save(index, path, key)
    logger.info(f'HES index: cached at {path}')
    return index, key


# ---- several ranks ---------------------------------------------------------------------------------------------
class RankZeroIndexError(RuntimeError):
    """Raised on the other ranks when rank 0 could not load or build the index; the message is rank 0's."""


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _send_index(index: Optional[PatchIndex], key: str, error: Optional[BaseException], group: Any) -> None:
    """Rank 0: the index (or the error) to every other rank of ``group``."""
    dist = torch.distributed
    if error is not None:
        text = f'{type(error).__name__}: {first_line(error)}'.encode()
        dist.broadcast(torch.tensor([-1, len(text)], dtype=torch.int64), src=0, group=group)
        dist.broadcast(torch.frombuffer(bytearray(text), dtype=torch.uint8), src=0, group=group)
        return
    meta = json.dumps(_meta(index, key)).encode()
    dist.broadcast(torch.tensor([len(index), len(meta)], dtype=torch.int64), src=0, group=group)
    dist.broadcast(torch.frombuffer(bytearray(meta), dtype=torch.uint8), src=0, group=group)
    for name in ARRAYS:
        array = getattr(index, name)
        wire = array.astype(np.int32) if array.dtype == np.int16 else np.ascontiguousarray(array)  # gloo has no int16
        dist.broadcast(torch.from_numpy(wire), src=0, group=group)


def _receive_index(group: Any) -> PatchIndex:
    """Another rank: rank 0's index, or its error raised as :class:`RankZeroIndexError`."""
    dist = torch.distributed
    header = torch.empty(2, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    n, size = (int(v) for v in header)
    text = torch.empty(size, dtype=torch.uint8)
    dist.broadcast(text, src=0, group=group)
    if n < 0:
        raise RankZeroIndexError(f'HES index: rank 0 could not load or build it: {bytes(text.numpy()).decode()}')
    meta = json.loads(bytes(text.numpy()).decode())
    shapes = {'vectors': (n, 4)}
    dtypes = {'image': torch.int32, 'top': torch.int32, 'left': torch.int32, 'vectors': torch.float32,
              'scores': torch.float64, 'classes': torch.int32}
    arrays = {}
    for name in ARRAYS:
        tensor = torch.empty(shapes.get(name, (n, )), dtype=dtypes[name])
        dist.broadcast(tensor, src=0, group=group)
        arrays[name] = tensor.numpy()
    arrays['classes'] = arrays['classes'].astype(np.int16)
    meta.pop('key', None)
    meta.pop('format', None)
    index = _from_parts(arrays, meta, 'the index received from rank 0')
    get_root_logger().info(f'HES index: received from rank 0 ({len(index)} candidates)')
    return index


def load_or_build_index(opt: Mapping[str, Any]) -> PatchIndex:
    """The index of a BasicSR dataset option dict: from the cache when valid, else built and cached.

    Under ``torch.distributed`` every rank must call it (BasicSR builds the training set on every rank):
    rank 0 loads or builds the index and sends it to the others over a gloo group of its own (created here,
    with a :data:`RANK0_WAIT` timeout), so the files are read, hashed and scored by rank 0 alone and every
    rank gets the same index. If rank 0 fails, every rank raises: rank 0 its own error, the others
    :class:`RankZeroIndexError` with rank 0's message. Cache writes are atomic, so concurrent runs never see
    a half-written file.
    """
    options = IndexOptions.from_dataset_opt(opt)
    if not _distributed():
        return _load_or_build(opt, options)[0]
    dist = torch.distributed
    group = dist.new_group(backend='gloo', timeout=RANK0_WAIT)
    try:
        if dist.get_rank() != 0:
            return _receive_index(group)
        try:
            index, key = _load_or_build(opt, options)
        except Exception as exc:
            _send_index(None, '', exc, group)
            raise
        _send_index(index, key, None, group)
        return index
    finally:
        dist.destroy_process_group(group)
