"""HESPairedImageDataset: Hierarchical Equalization Sampling as a drop-in for ``PairedImageDataset``.

Item ``i`` of the dataset is candidate ``i`` of the patch index, so BasicSR's ``EnlargedSampler``
(which ``train.py`` fixes) draws candidates uniformly: the *sample-level* phase, P_i = 1/N. After the
switch, at ``switch_ratio`` of the training iterations, every item is instead drawn *class-level*: class
k with mass ``pi_k = delta^-(k-1) / sum_j delta^-(j-1)`` (renormalised over non-empty classes), then a
candidate uniformly inside the class, i.e. with probability ``pi_k / N_k``. Harder classes are drawn
more; ``delta = 1`` is uniform sampling.

The phase follows the real training iteration, under any BasicSR model. Importing this module makes
``BaseModel`` (so ``SRModel``, ``WBSRModel`` and the models of other projects built on it) report its
progress to every HES dataset of the process: at construction for training (iteration 0), in
``update_learning_rate(current_iter)`` (which BasicSR's training loop calls at the start of every
iteration, after that iteration's batch was loaded) and in ``resume_training``. The value lives in a
shared-memory tensor that every DataLoader worker, forked, spawned or persistent, reads when it makes a
sample; a sample is made for the iteration after the last one reported, so the switch is never early.
With ``num_worker_per_gpu: 0`` it is exact; with workers, samples are made ahead of time, so the first
class-level batch can arrive up to ``num_workers * prefetch_factor`` iterations late. The log says when
the first class-level sample is made.

With ``cache_images: true`` the decoded training images are kept in memory (up to
``cache_images_max_mb``), in the narrowest of uint8, uint16 and float32 that gives back the decoded values, so
samples are identical to reading from disk; forked DataLoader workers share the memory without copies.

In a DataLoader worker, the dataset keeps freed memory blocks up to 32 MB for reuse (glibc's allocator, that worker
process only), so that decoding a whole training image for every sample does not fault in fresh pages each time.

Random draws use Python's ``random`` like BasicSR's own augmentation, so they are seeded per rank and per
worker by BasicSR and a run is deterministic for a given seed.
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
import random
import weakref
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch.utils import data

from basicsr.data.transforms import augment
from basicsr.models.base_model import BaseModel
from basicsr.utils import bgr2ycbcr, get_root_logger, img2tensor
from torchvision.transforms.functional import normalize

from .patch_index import IndexOptions, PatchIndex, load_or_build_index
from .pairs import make_file_client, read_pair

SAMPLE_LEVEL, CLASS_LEVEL = 0, 1
_LIVE_DATASETS: 'weakref.WeakSet[HESPairedImageDataset]' = weakref.WeakSet()
#: In a DataLoader worker, freed blocks up to this size stay in the process's heap for the next sample (glibc).
#: Otherwise every decoded training image (2.8 MB as float32 for a 480x480 sub-image) is mapped and faulted in
#: afresh: in docs/scale.md a worker took 10.7-11.3 CPU ms per sample that way, 7.7 with the blocks kept.
WORKER_KEEP_FREED_BYTES = 32 << 20
_worker_allocator_set = False


def keep_freed_memory_in_worker() -> bool:
    """In a DataLoader worker process, keep freed blocks up to :data:`WORKER_KEEP_FREED_BYTES` for reuse (once per
    process; the main process's allocator is left as it is). True if this call changed the setting."""
    global _worker_allocator_set
    if _worker_allocator_set or data.get_worker_info() is None:
        return False
    _worker_allocator_set = True
    from wbsr_models.evaluation import keep_freed_memory  # imported by then: the plugin registers all its packages
    return keep_freed_memory(WORKER_KEEP_FREED_BYTES)

# The option keys HESPairedImageDataset accepts; any other key is refused (a misspelt option must not be
# silently ignored). PairedImageDataset's own keys (basicsr/data/paired_image_dataset.py) ...
PAIRED_IMAGE_DATASET_KEYS = ('dataroot_gt', 'dataroot_lq', 'meta_info_file', 'filename_tmpl', 'io_backend', 'gt_size',
                             'use_hflip', 'use_rot', 'mean', 'std', 'color')
# ... the keys BasicSR's parse_options, build_dataset, build_dataloader and train.py set or read on a
# training dataset's dict (use_shuffle appears in BasicSR's own option files) ...
BASICSR_DATASET_KEYS = ('name', 'type', 'phase', 'scale', 'num_worker_per_gpu', 'batch_size_per_gpu',
                        'dataset_enlarge_ratio', 'prefetch_mode', 'num_prefetch_queue', 'pin_memory',
                        'persistent_workers', 'use_shuffle')
# ... and HES's own (README: option reference).
HES_KEYS = ('num_classes', 'delta', 'switch_ratio', 'patch_stride', 'projection', 'index_cache', 'index_workers',
            'skip_small_images', 'cache_images', 'cache_images_max_mb')
ACCEPTED_KEYS = frozenset(PAIRED_IMAGE_DATASET_KEYS + BASICSR_DATASET_KEYS + HES_KEYS)
DEFAULT_CACHE_MAX_MB = 4096


def check_option_keys(opt: Mapping[str, Any]) -> None:
    """Refuse keys of a dataset option dict that HESPairedImageDataset does not know, naming them."""
    unknown = sorted(set(opt) - ACCEPTED_KEYS)
    if not unknown:
        return
    hints = [f'{k!r} -> {close[0]!r}' for k in unknown for close in [difflib.get_close_matches(k, ACCEPTED_KEYS, 1)]
             if close]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ''
    raise ValueError(f"dataset '{opt.get('name', '?')}' (HESPairedImageDataset): unknown option(s) {unknown}{hint}; "
                     f'accepted: {sorted(ACCEPTED_KEYS)}')


def set_train_progress(current_iter: int, total_iter: int) -> None:
    """Tell every HES dataset of this process that training has reached iteration ``current_iter``.

    Samples made from then on are for iteration ``current_iter + 1`` or later. BasicSR models call this
    by themselves (see the module docstring); other training loops call it with the iteration whose
    batch they have just taken.
    """
    for dataset in list(_LIVE_DATASETS):
        dataset.set_progress(current_iter, total_iter)


def _total_iter(opt: Mapping[str, Any]) -> Optional[int]:
    total = (opt.get('train') or {}).get('total_iter') if opt.get('is_train') else None
    return None if total is None else int(total)


def report_progress_from_basicsr_models() -> None:
    """Make BasicSR's ``BaseModel`` report its training progress to HES datasets; idempotent.

    Wraps three ``BaseModel`` methods, so that every model built on it reports, whatever it overrides
    as long as it calls up: ``__init__`` (iteration 0 of ``train.total_iter``, before the first batch is
    loaded), ``update_learning_rate(current_iter)`` (BasicSR's training loop calls it right after loading
    the batch of ``current_iter``, so every later sample is for a later iteration) and ``resume_training``
    (the resumed iteration). Nothing else about the methods changes.
    """
    if getattr(BaseModel.update_learning_rate, '_wbsr_reports_progress', False):
        return
    init, update, resume = BaseModel.__init__, BaseModel.update_learning_rate, BaseModel.resume_training

    @functools.wraps(init)
    def __init__(self, opt, *args, **kwargs):
        init(self, opt, *args, **kwargs)
        total = _total_iter(opt)
        if total is not None:
            set_train_progress(0, total)

    @functools.wraps(update)
    def update_learning_rate(self, current_iter, *args, **kwargs):
        result = update(self, current_iter, *args, **kwargs)
        total = _total_iter(self.opt)
        if total is not None:
            set_train_progress(int(current_iter), total)
        return result

    @functools.wraps(resume)
    def resume_training(self, resume_state, *args, **kwargs):
        result = resume(self, resume_state, *args, **kwargs)
        total = _total_iter(self.opt)
        if total is not None:
            set_train_progress(int(resume_state['iter']), total)
        return result

    for wrapper in (__init__, update_learning_rate, resume_training):
        wrapper._wbsr_reports_progress = True
    BaseModel.__init__, BaseModel.update_learning_rate = __init__, update_learning_rate
    BaseModel.resume_training = resume_training


def class_masses(counts: np.ndarray, delta: float) -> np.ndarray:
    """pi_k proportional to delta^-(k-1) over the classes that have candidates (classes 1..K)."""
    k = np.arange(len(counts), dtype=np.float64)
    mass = np.where(counts > 0, float(delta)**-k, 0.)
    return mass / mass.sum()


# Storage types of the image cache, narrowest first, with the divisor that gives back decode_image's floats.
_STORAGE = ((np.uint8, 255.), (np.uint16, 65535.), (np.float32, None))


def _to_float(stored: np.ndarray, divisor: Optional[float]) -> np.ndarray:
    """The float32 image decode_image made, from its stored form (always a new array: augment flips in place)."""
    return stored.astype(np.float32) / divisor if divisor is not None else stored.copy()


def _encode(img: np.ndarray) -> tuple[int, np.ndarray]:
    """``(kind, stored)``: ``img`` (float32) in the narrowest ``_STORAGE`` type that gives it back exactly."""
    for kind, (dtype, divisor) in enumerate(_STORAGE[:-1]):
        stored = np.rint(img * divisor).astype(dtype)
        if np.array_equal(_to_float(stored, divisor), img):
            return kind, stored
    return len(_STORAGE) - 1, img


def _convert(stored: np.ndarray, kind: int, target: int) -> np.ndarray:
    """An image stored as ``kind`` in the wider storage type ``target`` (exact: checked)."""
    if kind == target:
        return stored
    img = _to_float(stored, _STORAGE[kind][1])
    dtype, divisor = _STORAGE[target]
    if divisor is None:
        return img
    wider = np.rint(img * divisor).astype(dtype)
    if not np.array_equal(_to_float(wider, divisor), img):  # never seen; refuse rather than change samples
        raise ValueError(f'image cache: a {np.dtype(_STORAGE[kind][0])} image is not exact as {np.dtype(dtype)}')
    return wider


class ImageCache:
    """The decoded GT and LR images of a dataset, in one flat array per side.

    Images are stored in the narrowest of uint8, uint16 and float32 that gives back the decoded float32
    values exactly (checked per image; one type for the whole dataset), so a crop taken from the cache
    equals the crop of a fresh decode. The two arrays are ordinary process memory that is only ever read,
    so DataLoader workers started by ``fork`` (the default on Linux up to Python 3.13) share it without
    copies; workers started by ``spawn`` or ``forkserver`` receive a copy each.
    """

    def __init__(self, images: list, kind: int) -> None:
        """``images``: per image ``((kind, gt), (kind, lq))`` as :func:`_encode` stores them; emptied while copying."""
        self.dtype, self.divisor = _STORAGE[kind]
        self.shapes = [(gt.shape, lq.shape) for (_, gt), (_, lq) in images]
        sizes = np.array([[gt.size, lq.size] for (_, gt), (_, lq) in images], dtype=np.int64)
        self.offsets = np.concatenate([np.zeros((1, 2), np.int64), np.cumsum(sizes, axis=0)])
        self.gt = np.empty(int(self.offsets[-1, 0]), self.dtype)
        self.lq = np.empty(int(self.offsets[-1, 1]), self.dtype)
        for i in range(len(images)):
            pair, images[i] = images[i], None  # freed once copied: the peak stays near the cache's size
            for side, (buf, (stored_kind, img)) in enumerate(zip((self.gt, self.lq), pair)):
                buf[self.offsets[i, side]:self.offsets[i + 1, side]] = _convert(img, stored_kind, kind).reshape(-1)

    @property
    def nbytes(self) -> int:
        return self.gt.nbytes + self.lq.nbytes

    def crops(self, image: int, top: int, left: int, size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
        """The GT crop at (top, left) of ``size`` and its LR crop, float32 as decode_image makes them."""
        out = []
        for side, (buf, shape) in enumerate(zip((self.gt, self.lq), self.shapes[image])):
            img = buf[self.offsets[image, side]:self.offsets[image + 1, side]].reshape(shape)
            t, lf, n = (top, left, size) if side == 0 else (top // scale, left // scale, size // scale)
            out.append(_to_float(img[t:t + n, lf:lf + n], self.divisor))
        return out[0], out[1]


def build_image_cache(opt: Mapping[str, Any], pairs: list[dict[str, str]], scale: int,
                      max_mb: float) -> Optional[ImageCache]:
    """Decode every pair once into an :class:`ImageCache`; None, with a warning, if it would exceed ``max_mb``."""
    client, images, kind, elements = make_file_client(opt), [], 0, 0
    for n, pair in enumerate(pairs, 1):
        gt, lq = read_pair(client, pair, scale)
        (kind_gt, gt), (kind_lq, lq) = stored = _encode(gt), _encode(lq)
        images.append(stored)
        kind, elements = max(kind, kind_gt, kind_lq), elements + gt.size + lq.size
        megabytes = elements * np.dtype(_STORAGE[kind][0]).itemsize / 2**20
        if megabytes > max_mb:
            get_root_logger().warning(
                f"dataset '{opt.get('name', '?')}': cache_images needs more than cache_images_max_mb={max_mb:g} "
                f'({megabytes:.0f} MB for the first {n} of {len(pairs)} images); reading the images from disk '
                'instead (raise cache_images_max_mb, or set cache_images: false to silence this)')
            return None
    return ImageCache(images, kind)


class HESPairedImageDataset(data.Dataset):
    """Paired LR/GT training dataset with Hierarchical Equalization Sampling.

    Takes every option of BasicSR's ``PairedImageDataset`` (``dataroot_gt``, ``dataroot_lq``,
    ``filename_tmpl``, ``meta_info_file``, ``io_backend`` disk or lmdb, ``gt_size``, ``use_hflip``,
    ``use_rot``, ``mean``/``std``, ``color``, ``scale``) and the keys BasicSR's loader reads, plus:

    - ``num_classes`` (K): difficulty classes. Default: 10.
    - ``delta``: class-level decay, in (0, 1]; class k gets mass proportional to delta^-(k-1).
      Default: 0.9 (see the README's sweep).
    - ``switch_ratio``: fraction of ``total_iter`` after which sampling is class-level. Default: 0.7.
    - ``patch_stride``: grid stride of candidate GT crops, a multiple of ``scale``. Default: ``gt_size // 2``
      (rounded down to a multiple of ``scale``).
    - ``projection``: ``pca`` or ``sum`` (spec section 1). Default: ``pca``.
    - ``index_cache``: folder of the patch-index cache. Default: ``$WBSR_CACHE_DIR`` or
      ``~/.cache/wbsr/hes_index``.
    - ``index_workers``: processes that read and score the images when the index is built (0: the main
      process). Default: one per 64 images, at most one per CPU the process may use.
    - ``skip_small_images``: leave out (with a warning) images smaller than ``gt_size`` instead of
      refusing them. Default: false.
    - ``cache_images``: decode the training images once, at start-up, and keep them in memory instead of
      decoding a whole image for every sample. Default: false.
    - ``cache_images_max_mb``: the most memory (MiB) the cache may take; a larger training set is read
      from disk, with a warning. Default: 4096.

    Any other key is refused with a ``ValueError`` that names it. Items are dicts with ``lq``, ``gt``,
    ``lq_path``, ``gt_path`` like ``PairedImageDataset``, plus ``hes_class`` (1..K of the candidate) and
    ``hes_phase`` (0 sample-level, 1 class-level). The option dict is never modified.
    """

    def __init__(self, opt: Mapping[str, Any]) -> None:
        super().__init__()
        check_option_keys(opt)
        self.opt = copy.deepcopy(dict(opt))
        self.delta = float(self.opt.get('delta', 0.9))
        self.switch_ratio = float(self.opt.get('switch_ratio', 0.7))
        if not 0. < self.delta <= 1.:
            raise ValueError(f'delta must be in (0, 1], got {self.delta}')
        if not 0. <= self.switch_ratio <= 1.:
            raise ValueError(f'switch_ratio must be in [0, 1], got {self.switch_ratio}')
        cache_images = self.opt.get('cache_images', False)
        cache_max_mb = float(self.opt.get('cache_images_max_mb', DEFAULT_CACHE_MAX_MB))
        if not isinstance(cache_images, bool):
            raise ValueError(f'cache_images must be true or false, got {cache_images!r}')
        if not cache_max_mb >= 0:
            raise ValueError(f'cache_images_max_mb must be >= 0, got {cache_max_mb}')
        self.index_options = IndexOptions.from_dataset_opt(self.opt)
        self.index: PatchIndex = load_or_build_index(self.opt)
        batch = self.opt.get('batch_size_per_gpu')
        if self.opt.get('phase') == 'train' and isinstance(batch, int) and not isinstance(batch, bool):
            # BasicSR drops the last incomplete batch: a set that fills none would end the run at iteration 0
            # (under basicsr/train.py, only after its training loop; wbsr-train checks this before any folder)
            ratio = self.opt.get('dataset_enlarge_ratio') or 1
            if math.ceil(len(self.index) * ratio) < batch:
                raise ValueError(f'datasets.train: {len(self.index)} candidate patches make no batch of '
                                 f'batch_size_per_gpu={batch} (the last, incomplete batch is dropped, so no training '
                                 'step would run); lower batch_size_per_gpu or add images')
        self.scale, self.gt_size = self.index_options.scale, self.index_options.gt_size
        self.mean, self.std = self.opt.get('mean'), self.opt.get('std')
        counts = self.index.class_counts()
        self.class_mass = class_masses(counts, self.delta)
        order = np.argsort(self.index.classes, kind='stable')
        self._class_members = np.split(order, np.cumsum(counts)[:-1])
        self._class_cdf = np.cumsum(self.class_mass)
        # [iteration reached, total iterations]; total -1 until a model reports progress.
        self._progress = torch.tensor([0, -1], dtype=torch.int64).share_memory_()
        self._file_client = None
        self._warned_no_progress = False
        self._last_phase = SAMPLE_LEVEL
        logger = get_root_logger()
        self.image_cache: Optional[ImageCache] = None
        if cache_images:
            self.image_cache = build_image_cache(self.opt, self.index.pairs, self.scale, cache_max_mb)
            if self.image_cache is not None:
                logger.info(f"dataset '{self.opt.get('name', '?')}': {len(self.index.pairs)} images decoded into "
                            f'memory ({self.image_cache.nbytes / 2**20:.1f} MB as {np.dtype(self.image_cache.dtype)})')
        # BasicSR's train.py logs len(dataset) as "Number of train images"; for HES that is the candidate count.
        logger.info(f"HESPairedImageDataset '{self.opt.get('name', '?')}': {len(self.index.pairs)} images, "
                    f'{len(self.index)} candidate patches (an epoch draws every candidate once; BasicSR\'s "Number '
                    'of train images" counts the candidates)')
        _LIVE_DATASETS.add(self)

    # ---- what the model and the tools use -----------------------------------------------------------
    @property
    def difficulty_projection(self):
        """Thresholds and projection of this dataset's classes (stored by the model in checkpoints)."""
        return self.index.projection

    def set_progress(self, current_iter: int, total_iter: int) -> None:
        self._progress[0] = int(current_iter)
        self._progress[1] = int(total_iter)

    def switch_iter(self, total_iter: int) -> int:
        """Last iteration of the sample-level phase."""
        return int(round(self.switch_ratio * total_iter))

    def current_phase(self) -> int:
        """Phase of the next sample: the one for the iteration after the last reported one."""
        reached, total = (int(v) for v in self._progress.tolist())
        if total < 0:
            if not self._warned_no_progress:
                self._warned_no_progress = True
                get_root_logger().warning('HESPairedImageDataset: no training progress reported (no BasicSR model '
                                          'is training in this process), so sampling stays sample-level (uniform)')
            return SAMPLE_LEVEL
        phase = CLASS_LEVEL if reached + 1 > self.switch_iter(total) else SAMPLE_LEVEL
        if phase != self._last_phase:
            self._last_phase = phase
            worker = data.get_worker_info()
            where = '' if worker is None else f' (DataLoader worker {worker.id}: batches it made before arrive first)'
            level = 'class' if phase == CLASS_LEVEL else 'sample'
            get_root_logger().info(f'HES: {level}-level sampling from iteration {reached + 1} of {total} on{where}')
        return phase

    def draw_class_level(self) -> int:
        """One candidate drawn class-level, from Python's ``random`` (seeded by BasicSR)."""
        k = min(int(np.searchsorted(self._class_cdf, random.random(), side='right')), len(self._class_cdf) - 1)
        while self.class_mass[k] == 0:  # guard against float round-off at the top of the CDF
            k -= 1
        members = self._class_members[k]
        return int(members[random.randrange(len(members))])

    # ---- torch Dataset ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        keep_freed_memory_in_worker()
        phase = self.current_phase()
        cand = self.draw_class_level() if phase == CLASS_LEVEL else int(idx)
        image = int(self.index.image[cand])
        pair = self.index.pairs[image]
        top, left, size, s = int(self.index.top[cand]), int(self.index.left[cand]), self.gt_size, self.scale
        if self.image_cache is not None:
            gt, lq = self.image_cache.crops(image, top, left, size, s)
        else:
            if self._file_client is None:
                self._file_client = make_file_client(self.opt)
            gt, lq = read_pair(self._file_client, pair, s)
            gt = gt[top:top + size, left:left + size]
            lq = lq[top // s:(top + size) // s, left // s:(left + size) // s]
        gt, lq = augment([gt, lq], self.opt.get('use_hflip', False), self.opt.get('use_rot', False))
        if self.opt.get('color') == 'y':  # as PairedImageDataset
            gt, lq = bgr2ycbcr(gt, y_only=True)[..., None], bgr2ycbcr(lq, y_only=True)[..., None]
        gt, lq = img2tensor([gt, lq], bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(lq, self.mean, self.std, inplace=True)
            normalize(gt, self.mean, self.std, inplace=True)
        return {'lq': lq, 'gt': gt, 'lq_path': pair['lq_path'], 'gt_path': pair['gt_path'],
                'hes_class': int(self.index.classes[cand]), 'hes_phase': phase}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_file_client'] = None  # lmdb environments do not cross process boundaries
        return state


report_progress_from_basicsr_models()
