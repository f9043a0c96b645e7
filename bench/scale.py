"""Scale harness: HES and routed inference at the paper's sizes, simulated on one machine.

Question answered: what the plugin costs at DIV2K scale (32,592 sub-images of 480x480, BasicSR's
``extract_subimages.py`` names and sizes) and on 2K-8K outputs, and whether its data pipeline can feed a GPU.

``python bench/scale.py --size 32k`` makes (once) a DIV2K-sized synthetic set on disk, folder and lmdb, and measures

- ``index``: the HES patch index of the set: build time (and the part spent fingerprinting the files), the time
  of the second call (the one ``WBSRModel`` makes), peak memory, cache size, for the folder and the lmdb copy;
- ``ddp``: the same under ``torchrun --nproc_per_node 4`` (gloo): which ranks build, what each rank spends;
- ``loader``: samples per second of BasicSR's training loader (``build_dataloader``, ``EnlargedSampler``,
  ``prefetch_mode: cpu``) with 0, 4 and 8 workers at ``gt_size: 128``, HES against BasicSR's own
  ``PairedImageDataset`` on the same files, alternated, from folder and from lmdb; besides the wall rate, the
  CPU time each item took in its worker, which does not depend on how many other jobs share the machine.

and writes ``bench/results/scale_<size>.md`` and ``.json``. ``--size`` takes ``1k``, ``4k``, ``32k`` (32,592, DIV2K's
count) or a number. ``python bench/scale.py --large`` measures routed inference against the full network on LR
images of 512, 1024 and 2048 pixels a side made from real photographs (``bench/results/scale_large.*``).

Synthetic sub-images are real photographs, not noise: each is a 2x2 mosaic of 240x240 crops (at random positions,
flipped or rotated) of the benchmark pool's photographs (BSD200, T91, B100, Urban100; ``--pool``), and its LR is the
matching crop of the photograph's MATLAB-bicubic x4 LR, as ``extract_subimages.py`` cuts DIV2K's LR. Everything is
written under ``--root`` (several GB for 4k, about 32 GB for 32k: check the free disk first).

Every measurement runs in a fresh process; ``--src DIR`` runs the measured code from another checkout (the
before/after figures of docs/scale.md). Run times on 2 cores: 1k about 10 min, 32k about 2 h (making the set
about 45 min of it); ``--large`` about 30 min.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get('WBSR_SHARED_DATA', REPO.parent / 'shared' / 'data'))
POOL = ('train/BSD200', 'train/T91', 'test/B100/HR', 'test/Urban100/HR')
SIZES = {'1k': 1000, '4k': 4000, '32k': 32592}
SCALE, GT_SUB, QUAD = 4, 480, 240  # x4; 480x480 sub-images made of 2x2 quadrants of 240x240
PER_IMAGE = 41  # sub-images per DIV2K image: 32592 / 800 = 40.7
GT_SIZE, BATCH = 128, 16
MODEL = REPO / 'checkpoints' / 'wbsr_srresnet_x4_train291.pth'
LARGE_SIDES = (512, 1024, 2048)
LARGE_BUDGET = 0.7


# ---- small helpers ------------------------------------------------------------------------------------------
def size_label(text: str) -> tuple[str, int]:
    """``('32k', 32592)`` from ``32k``; ``('500', 500)`` from ``500``."""
    if text in SIZES:
        return text, SIZES[text]
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'--size must be one of {sorted(SIZES)} or a number, got {text!r}') from None
    if n < 1:
        raise argparse.ArgumentTypeError(f'--size must be >= 1, got {n}')
    return text, n


def sub_name(i: int) -> str:
    """BasicSR's sub-image name of the i-th sub-image: ``0001_s001`` ..."""
    return f'{i // PER_IMAGE + 1:04d}_s{i % PER_IMAGE + 1:03d}'


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def machine() -> str:
    return (f'{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), torch '
            f"{_version('torch')}, BasicSR {_version('basicsr')}; shared with other jobs")


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def _version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return '?'


def child_env(src: Optional[str], threads: int = 1) -> dict[str, str]:
    """Environment of a measuring child: the code under test first on the path, fixed thread counts."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    paths = [str(Path(src).resolve())] if src else [str(REPO)]
    if env.get('PYTHONPATH'):
        paths.append(env['PYTHONPATH'])
    env['PYTHONPATH'] = os.pathsep.join(paths)
    return env


def run_child(args: Sequence[str], src: Optional[str], threads: int = 1, timeout: float = 6 * 3600,
              out: Optional[Path] = None, cmd: Optional[Sequence[str]] = None) -> float:
    """Run a measuring child (this script with ``args``, or ``cmd``) and return its wall seconds.

    Its memory is sampled from here, so that the sampling's own cost (reading ``/proc/<pid>/smaps_rollup`` takes
    the kernel time proportional to the memory mapped) is not charged to the child; with ``out``, the peaks are
    added to the JSON the child wrote there.
    """
    cmd = list(cmd or [sys.executable, str(Path(__file__).resolve()), *args])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(src, threads))
    with PeakPss(proc.pid) as pss:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit(f'measurement ran over {timeout:.0f} s: {" ".join(cmd)}') from None
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f'measurement failed (exit {code}): {" ".join(cmd)}')
    if out is not None:
        result = json.loads(out.read_text())
        result.update(peak_pss_mb=pss.peak_mb, peak_private_mb=pss.peak_private_mb)
        out.write_text(json.dumps(result, indent=1))
    return seconds


class PeakPss:
    """Samples the proportional set size (PSS) of this process and all its descendants; keeps the peaks.

    PSS counts a page shared by several processes (a parent and its forked workers) once in total, so the sum
    over the process tree is the memory the tree takes. ``peak_mb`` includes file pages mapped into the
    processes (an lmdb database is read through such a mapping: page cache, which the kernel can drop);
    ``peak_private_mb`` counts only anonymous and shared memory (``Pss_Anon + Pss_Shmem``), which it cannot.
    """

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid, self.period, self.peak_mb, self.peak_private_mb = pid, period, 0., 0.
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> 'PeakPss':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        pids, todo = [], [pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                for task in os.listdir(f'/proc/{p}/task'):
                    with open(f'/proc/{p}/task/{task}/children') as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return pids

    @staticmethod
    def _pss_kb(pid: int) -> tuple[int, int]:
        fields = {}
        try:
            with open(f'/proc/{pid}/smaps_rollup') as f:
                for line in f:
                    name, _, rest = line.partition(':')
                    if name in ('Pss', 'Pss_Anon', 'Pss_Shmem'):
                        fields[name] = int(rest.split()[0])
        except OSError:
            pass
        return fields.get('Pss', 0), fields.get('Pss_Anon', 0) + fields.get('Pss_Shmem', 0)

    def sample(self) -> None:
        sizes = [self._pss_kb(p) for p in self._tree(self.pid)]
        self.peak_mb = max(self.peak_mb, sum(total for total, _ in sizes) / 1024)
        self.peak_private_mb = max(self.peak_private_mb, sum(private for _, private in sizes) / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def max_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


# ---- the synthetic DIV2K-sized set --------------------------------------------------------------------------
_POOL: list[tuple[np.ndarray, np.ndarray]] = []  # (HR uint8 BGR, LR uint8 BGR) per pool photograph


def load_pool(folders: Sequence[Path], min_side: int = QUAD) -> list[tuple[np.ndarray, np.ndarray]]:
    """HR photographs (mod-cropped to x4) with their MATLAB-bicubic LR; photographs under ``min_side`` left out."""
    from tqdm import tqdm

    from wbsr_data.make_lr import bicubic_lr
    files = [f for folder in folders for f in sorted(folder.glob('*.png'))]
    if not files:
        raise SystemExit(f'no PNG photographs in the pool folders {[str(f) for f in folders]} (see --pool)')
    pool = []
    for path in tqdm(files, desc='pool LR (MATLAB bicubic)', unit='img', leave=False, disable=None):
        hr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if hr is None:
            raise SystemExit(f'{path}: not a readable image')
        h, w = hr.shape[0] // SCALE * SCALE, hr.shape[1] // SCALE * SCALE
        if min(h, w) < min_side:
            continue
        hr = np.ascontiguousarray(hr[:h, :w])
        pool.append((hr, bicubic_lr(hr.astype(np.float32) / 255., SCALE)))
    return pool


def _transform(img: np.ndarray, op: int) -> np.ndarray:
    """One of the 8 flips/rotations (applied alike to HR and LR, whose bicubic kernel is symmetric)."""
    if op & 4:
        img = img[:, ::-1]
    return np.ascontiguousarray(np.rot90(img, op & 3))


def sub_image(i: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sub-image ``i``: a 2x2 mosaic of 240x240 crops of pool photographs, and its 120x120 LR."""
    rng = np.random.default_rng([seed, i])
    gt = np.empty((GT_SUB, GT_SUB, 3), np.uint8)
    lq = np.empty((GT_SUB // SCALE, GT_SUB // SCALE, 3), np.uint8)
    q, ql = QUAD, QUAD // SCALE
    for k in range(4):
        hr, lr = _POOL[int(rng.integers(len(_POOL)))]
        top = int(rng.integers((hr.shape[0] - q) // SCALE + 1)) * SCALE
        left = int(rng.integers((hr.shape[1] - q) // SCALE + 1)) * SCALE
        op = int(rng.integers(8))
        r, c = divmod(k, 2)
        gt[r * q:(r + 1) * q, c * q:(c + 1) * q] = _transform(hr[top:top + q, left:left + q], op)
        t, lf = top // SCALE, left // SCALE
        lq[r * ql:(r + 1) * ql, c * ql:(c + 1) * ql] = _transform(lr[t:t + ql, lf:lf + ql], op)
    return gt, lq


def _write_sub_images(job: tuple[list[int], str, str, int]) -> int:
    indices, gt_dir, lq_dir, seed = job
    for i in indices:
        gt, lq = sub_image(i, seed)
        name = sub_name(i) + '.png'
        # extract_subimages.py's default compression level
        for folder, img in ((gt_dir, gt), (lq_dir, lq)):
            if not cv2.imwrite(os.path.join(folder, name), img, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
                raise OSError(f'{folder}/{name}: cannot write')
    return len(indices)


def set_paths(root: Path) -> dict[str, Path]:
    div2k = root / 'DIV2K'
    return {'gt': div2k / 'DIV2K_train_HR_sub', 'lq': div2k / 'DIV2K_train_LR_bicubic' / 'X4_sub',
            'gt_lmdb': div2k / 'DIV2K_train_HR_sub.lmdb', 'lq_lmdb': div2k / 'DIV2K_train_LR_bicubic_X4_sub.lmdb'}


def make_set(root: Path, n: int, pool_folders: Sequence[Path], jobs: int, seed: int = 0) -> dict[str, Any]:
    """Write the set (folders, then BasicSR lmdb copies) unless ``root/complete.json`` says it is there."""
    marker = root / 'complete.json'
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get('n') == n and done.get('seed') == seed:
            return done
        raise SystemExit(f'{root} holds another set ({done}); remove it or pick another --root')
    import multiprocessing

    from tqdm import tqdm

    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    paths = set_paths(root)
    if root.exists():
        shutil.rmtree(root)  # an unfinished earlier attempt
    paths['gt'].mkdir(parents=True)
    paths['lq'].mkdir(parents=True)
    free = shutil.disk_usage(root).free
    need = n * 2 * (GT_SUB * GT_SUB * 3 * 0.45 + (GT_SUB // SCALE)**2 * 3 * 0.8)  # about 0.45 / 0.8 bytes per pixel
    if need > 0.9 * free:
        raise SystemExit(f'{root}: the set needs about {need / 2**30:.0f} GB, {free / 2**30:.0f} GB free')
    start = time.perf_counter()
    _POOL[:] = load_pool(pool_folders)
    chunks = [list(range(i, min(n, i + 200))) for i in range(0, n, 200)]
    with multiprocessing.get_context('fork').Pool(jobs) as workers, \
            tqdm(total=n, desc='sub-images', unit='img', disable=None) as bar:
        for count in workers.imap_unordered(_write_sub_images,
                                            [(c, str(paths['gt']), str(paths['lq']), seed) for c in chunks]):
            bar.update(count)
    folder_seconds = time.perf_counter() - start
    for key in ('gt', 'lq'):  # as BasicSR's scripts/data_preparation/create_lmdb.py does for DIV2K
        names = sorted(p.name for p in paths[key].glob('*.png'))
        make_lmdb_from_imgs(str(paths[key]), str(paths[f'{key}_lmdb']), names, [Path(p).stem for p in names])
    done = {'n': n, 'seed': seed, 'pool_photographs': len(_POOL), 'folder_seconds': round(folder_seconds, 1),
            'seconds': round(time.perf_counter() - start, 1),
            'bytes': {k: folder_bytes(p) for k, p in paths.items()}}
    marker.write_text(json.dumps(done, indent=1))
    return done


# ---- measuring children ---------------------------------------------------------------------------------------
def dataset_opt(paths: dict[str, Path], backend: str, cache: str, **extra) -> dict[str, Any]:
    lmdb = backend == 'lmdb'
    opt = {'name': 'DIV2K_sim', 'type': 'HESPairedImageDataset', 'phase': 'train', 'scale': SCALE,
           'dataroot_gt': str(paths['gt_lmdb' if lmdb else 'gt']),
           'dataroot_lq': str(paths['lq_lmdb' if lmdb else 'lq']),
           'io_backend': {'type': backend if lmdb else 'disk'}, 'filename_tmpl': '{}', 'gt_size': GT_SIZE,
           'use_hflip': True, 'use_rot': True, 'index_cache': cache, 'batch_size_per_gpu': BATCH,
           'num_worker_per_gpu': 0, 'dataset_enlarge_ratio': 1, 'prefetch_mode': 'cpu', 'num_prefetch_queue': 1}
    opt.update(extra)
    return opt


class Counted:
    """Wraps module functions to count their calls and time them (works on the code before and after a change)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def wrap(self, module: Any, names: Sequence[str]) -> None:
        for name in names:
            fn = getattr(module, name, None)
            if fn is None:
                continue

            def timed(*args, __fn=fn, __name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return __fn(*args, **kwargs)
                finally:
                    self.calls[__name] = self.calls.get(__name, 0) + 1
                    self.seconds[__name] = self.seconds.get(__name, 0.) + time.perf_counter() - start

            setattr(module, name, timed)


#: Functions of wbsr_data.patch_index whose calls and times are recorded (names from before and after the change).
INDEX_FUNCTIONS = ('build_index', '_fingerprint', 'content_fingerprint', '_load', 'index_key')


def child_index(args: argparse.Namespace) -> None:
    """One cold index build and the warm second call, in this fresh process."""
    import torch
    torch.set_num_threads(1)
    from wbsr_data import patch_index
    counted = Counted()
    counted.wrap(patch_index, INDEX_FUNCTIONS)
    opt = json.loads(args.opt)
    options = patch_index.IndexOptions.from_dataset_opt(opt)
    readers = options.num_workers(len(patch_index.list_pairs(opt))) if hasattr(options, 'num_workers') else 0
    cpu, start = cpu_seconds(), time.perf_counter()
    index = patch_index.load_or_build_index(opt)
    first, first_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    first_calls, first_seconds = dict(counted.calls), dict(counted.seconds)
    rss_first = max_rss_mb()
    cpu, start = cpu_seconds(), time.perf_counter()
    again = patch_index.load_or_build_index(opt)  # WBSRModel's call
    second, second_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert np.array_equal(index.scores, again.scores)
    cache = Path(opt['index_cache'])
    out = {'candidates': len(index), 'images': len(index.pairs), 'reading_processes': readers,
           'first_seconds': first, 'first_cpu_seconds': first_cpu, 'second_seconds': second,
           'second_cpu_seconds': second_cpu, 'first_calls': first_calls, 'first_function_seconds': first_seconds,
           'all_calls': counted.calls, 'all_function_seconds': counted.seconds,
           'max_rss_mb': rss_first, 'max_rss_children_mb': max_rss_mb(resource.RUSAGE_CHILDREN),
           'cache_bytes': sum(f.stat().st_size for f in cache.iterdir() if f.is_file()),
           'cache_files': sorted(f.name for f in cache.iterdir())}
    Path(args.out).write_text(json.dumps(out, indent=1))


def child_ddp(args: argparse.Namespace) -> None:
    """One rank under torchrun: the dataset (as BasicSR's train.py builds it) and the model's second call."""
    import hashlib

    import torch
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo')
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from wbsr_data import patch_index
    from wbsr_data.hes_dataset import HESPairedImageDataset
    counted = Counted()
    counted.wrap(patch_index, INDEX_FUNCTIONS)
    opt = json.loads(args.opt)
    torch.distributed.barrier()
    cpu, start = cpu_seconds(), time.perf_counter()
    dataset = HESPairedImageDataset(opt)
    dataset_seconds, dataset_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    cpu, start = cpu_seconds(), time.perf_counter()
    again = patch_index.load_or_build_index(opt)
    model_seconds, model_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    digest = hashlib.sha256()
    for array in (dataset.index.image, dataset.index.top, dataset.index.left, dataset.index.scores,
                  dataset.index.classes):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(dataset.index.pairs, sort_keys=True).encode())
    out = {'rank': rank, 'world_size': world, 'dataset_seconds': dataset_seconds, 'model_seconds': model_seconds,
           'dataset_cpu_seconds': dataset_cpu, 'model_cpu_seconds': model_cpu,
           'calls': counted.calls, 'function_seconds': counted.seconds, 'digest': digest.hexdigest()[:16],
           'same_as_second_call': bool(np.array_equal(again.scores, dataset.index.scores)),
           'candidates': len(dataset.index), 'max_rss_mb': max_rss_mb(),
           'max_rss_children_mb': max_rss_mb(resource.RUSAGE_CHILDREN)}
    Path(args.out, f'rank{rank}.json').write_text(json.dumps(out, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


class TimedItems:
    """A dataset whose items also carry the CPU and wall time their making took (in whichever process made them)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        cpu, wall = time.thread_time(), time.perf_counter()
        item = self.dataset[idx]
        item['item_cpu_s'] = time.thread_time() - cpu
        item['item_wall_s'] = time.perf_counter() - wall
        return item


def loader_rate(dataset: Any, opt: dict[str, Any], workers: int, batches: int, epoch: int) -> dict[str, float]:
    """BasicSR's training loader on ``dataset`` as train.py builds it; rates after ``max(2, workers)`` warm-up
    batches."""
    import torch
    from basicsr.data import build_dataloader
    from basicsr.data.data_sampler import EnlargedSampler
    from basicsr.data.prefetch_dataloader import CPUPrefetcher
    timed = TimedItems(dataset)
    needed = (max(2, workers) + batches + 2 * max(1, workers) + 1) * BATCH  # warm-up, timed, prefetched
    sampler = EnlargedSampler(timed, 1, 0, math.ceil(needed / len(timed)))
    sampler.set_epoch(epoch)
    loader = build_dataloader(timed, dict(opt, num_worker_per_gpu=workers), num_gpu=1, dist=False, sampler=sampler,
                              seed=epoch)
    prefetcher = CPUPrefetcher(loader)
    for _ in range(max(2, workers)):
        prefetcher.next()
    cpu, wall, n = [], [], 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = prefetcher.next()
        cpu.append(batch['item_cpu_s'].double().sum().item())
        wall.append(batch['item_wall_s'].double().sum().item())
        n += len(batch['gt'])
        assert tuple(batch['gt'].shape[1:]) == (3, GT_SIZE, GT_SIZE)
    seconds = time.perf_counter() - start
    threading.excepthook = lambda hook_args: None  # the prefetch thread fails once its workers are gone: expected
    workers_iter = getattr(prefetcher.loader, 'generator', None)  # the DataLoader iterator BasicSR's thread runs
    if hasattr(workers_iter, '_shutdown_workers'):
        workers_iter._shutdown_workers()  # joined, so that their peak memory is counted in RUSAGE_CHILDREN
    return {'samples': n, 'seconds': seconds, 'samples_per_s': n / seconds, 'cpu_ms_per_sample': 1e3 * sum(cpu) / n,
            'item_wall_ms_per_sample': 1e3 * sum(wall) / n}


def child_loader(args: argparse.Namespace) -> None:
    """One loader run of one dataset (HES or BasicSR's PairedImageDataset) with one worker count.

    Each run is a fresh process: LMDB refuses to open an environment twice in one process and must not be used
    across fork, which two datasets on the same lmdb files, or a run without workers followed by one with workers,
    would do in one process.
    """
    import torch
    torch.set_num_threads(1)
    import wbsr_data  # noqa: F401  (registers HES)
    from basicsr.data.paired_image_dataset import PairedImageDataset
    from wbsr_data.hes_dataset import HESPairedImageDataset
    opt = json.loads(args.opt)
    if args.dataset == 'PairedImageDataset':
        opt = {k: v for k, v in opt.items() if k != 'index_cache'}
        opt['type'] = 'PairedImageDataset'
        dataset = PairedImageDataset(copy.deepcopy(opt))  # it changes the dict it is given
    else:
        dataset = HESPairedImageDataset(opt)
    out = loader_rate(dataset, opt, args.workers[0], args.batches, epoch=args.round)
    out.update(max_rss_mb=max_rss_mb(), max_rss_children_mb=max_rss_mb(resource.RUSAGE_CHILDREN))
    Path(args.out).write_text(json.dumps(out, indent=1))
    # BasicSR's prefetch thread is still blocked on its full queue: leave without the interpreter's teardown.
    sys.stdout.flush()
    os._exit(0)


# ---- the size runs ----------------------------------------------------------------------------------------------
def measure_index(paths: dict[str, Path], work: Path, src: Optional[str], extra: dict[str, Any],
                  backends: Sequence[str]) -> dict[str, Any]:
    out = {}
    for backend in backends:
        cache = work / f'cache_{backend}'  # emptied for a cold build; what it leaves, the loader part reuses
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        result = work / f'index_{backend}.json'
        print(f'index, {backend}:', flush=True)
        run_child(['_child-index', '--opt', json.dumps(dataset_opt(paths, backend, str(cache), **extra)),
                   '--out', str(result)], src, out=result)
        out[backend] = json.loads(result.read_text())
    return out


def measure_ddp(paths: dict[str, Path], work: Path, src: Optional[str], nproc: int,
                extra: dict[str, Any]) -> dict[str, Any]:
    import socket
    cache, out_dir = work / 'cache_ddp', work / 'ddp'
    for d in (cache, out_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(port),
           str(Path(__file__).resolve()), '_child-ddp', '--opt',
           json.dumps(dataset_opt(paths, 'disk', str(cache), **extra)), '--out', str(out_dir)]
    print(f'ddp, {nproc} ranks:', flush=True)
    summary = out_dir / 'all.json'
    summary.write_text('{}')
    wall = run_child([], src, cmd=cmd, out=summary)
    ranks = [json.loads((out_dir / f'rank{r}.json').read_text()) for r in range(nproc)]
    cache_files = sorted(f.name for f in cache.iterdir())
    shutil.rmtree(cache)
    return {'nproc': nproc, 'wall_seconds': wall, 'ranks': ranks, 'cache_files': cache_files,
            **json.loads(summary.read_text())}


def measure_loader(paths: dict[str, Path], work: Path, src: Optional[str], workers: Sequence[int], batches: int,
                   rounds: int, extra: dict[str, Any], backends: Sequence[str]) -> dict[str, Any]:
    """HES and PairedImageDataset alternated (A B, B A, ...) on the same files, for each backend and worker count."""
    out: dict[str, Any] = {}
    names = ('PairedImageDataset', 'HES')
    for backend in backends:
        opt = json.dumps(dataset_opt(paths, backend, str(work / f'cache_{backend}'), **extra))
        run_child(['_child-index', '--opt', opt, '--out', str(work / 'loader_index.json')], src)  # index first
        out[backend] = {}
        for w in workers:
            runs: dict[str, list] = {name: [] for name in names}
            for r in range(rounds):
                for name in (names if r % 2 == 0 else names[::-1]):
                    result = work / 'loader_run.json'
                    run_child(['_child-loader', '--opt', opt, '--dataset', name, '--workers', str(w), '--batches',
                               str(batches), '--round', str(r), '--out', str(result)], src, out=result)
                    runs[name].append(json.loads(result.read_text()))
                    print(f"  {backend}, {w} workers, round {r}, {name}: {runs[name][-1]['samples_per_s']:.1f} "
                          f"samples/s, {runs[name][-1]['cpu_ms_per_sample']:.2f} CPU ms/sample", flush=True)
            out[backend][str(w)] = {
                name: {'runs': runs[name], **{key: statistics.median(run[key] for run in runs[name]) for key in
                                              ('samples_per_s', 'cpu_ms_per_sample', 'item_wall_ms_per_sample')}}
                for name in names}
    return out


def fmt(value: float, digits: int = 1) -> str:
    return f'{value:.{digits}f}'


def size_report(label: str, n: int, made: dict[str, Any], results: dict[str, Any]) -> str:
    gb = {k: v / 2**30 for k, v in made['bytes'].items()}
    commands: dict[str, list[str]] = {}
    for part, command in results.get('commands', {}).items():
        commands.setdefault(command, []).append(part)
    lines = [f'# Scale: {label} sub-images ({n})', '', 'Commands (run from the repository root, `PYTHONPATH` on it):',
             '', *[f'- {", ".join(parts)}: `{command}`' for command, parts in commands.items()], '',
             f"Machine: {results['machine']}." + (f" Code measured: `{results['src']}`." if results.get('src') else ''),
             '', f"Set: {n} sub-images of 480x480 (LR 120x120), 2x2 mosaics of crops of {made['pool_photographs']} "
             f"photographs; folder {gb['gt']:.2f} GB GT + {gb['lq']:.2f} GB LR, lmdb {gb['gt_lmdb']:.2f} GB + "
             f"{gb['lq_lmdb']:.2f} GB (made in {made['seconds'] / 60:.0f} min).", '']
    index = results.get('index')
    if index:
        lines += ['## HES index (gt_size 128, stride 64: 36 candidates per sub-image)', '',
                  'Fresh process, empty cache. "first call": what the dataset spends at start-up (content hash, build, '
                  'cache write), wall and CPU seconds (CPU: the process and its reading processes, which on 2 shared '
                  'cores is the steadier figure); "hashing": the part spent computing the content hash; "second '
                  'call": the model\'s call, cache present. Memory: peaks over the process and its reading processes '
                  'together, sampled every 0.5 s by the harness; "private" leaves out file pages mapped into them '
                  '(lmdb is read through such a mapping), "with mapped files" counts them.', '',
                  '| backend | candidates | reading processes | first call s | first call CPU s | of it hashing s | '
                  'second call s | peak private MB | peak with mapped files MB | cache MB |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for backend, r in index.items():
            fs = r['first_function_seconds']
            hashing = fs.get('_fingerprint', fs.get('content_fingerprint', 0.))
            lines.append(f"| {backend} | {r['candidates']} | {r.get('reading_processes', 0)} | "
                         f"{fmt(r['first_seconds'])} "
                         f"| {fmt(r.get('first_cpu_seconds', float('nan')))} | {fmt(hashing)} | "
                         f"{fmt(r['second_seconds'], 2)} | {fmt(r.get('peak_private_mb', float('nan')), 0)} | "
                         f"{fmt(r['peak_pss_mb'], 0)} | {fmt(r['cache_bytes'] / 2**20)} |")
        lines.append('')
    ddp = results.get('ddp')
    if ddp:
        lines += [f"## torchrun --nproc_per_node {ddp['nproc']} (gloo), folder", '',
                  f"Whole launch {fmt(ddp['wall_seconds'])} s, peak private memory of all ranks together "
                  f"{fmt(ddp.get('peak_private_mb', float('nan')), 0)} MB; files in the cache folder afterwards: "
                  f"{', '.join(ddp['cache_files'])}. Per rank: index builds, content-hash passes over the files, "
                  'seconds (wall, CPU) in the dataset\'s constructor and in the model\'s call, peak RSS, and a digest '
                  'of the index the rank got.', '',
                  '| rank | builds | hash passes | hashing s | dataset s | dataset CPU s | model call s | '
                  'model call CPU s | peak RSS MB | index digest |', '|---|---|---|---|---|---|---|---|---|---|']
        for r in ddp['ranks']:
            calls, secs = r['calls'], r['function_seconds']
            fps = calls.get('_fingerprint', 0) + calls.get('content_fingerprint', 0)
            fps_s = secs.get('_fingerprint', 0.) + secs.get('content_fingerprint', 0.)
            lines.append(f"| {r['rank']} | {calls.get('build_index', 0)} | {fps} | {fmt(fps_s)} | "
                         f"{fmt(r['dataset_seconds'])} | {fmt(r.get('dataset_cpu_seconds', float('nan')))} | "
                         f"{fmt(r['model_seconds'], 2)} | {fmt(r.get('model_cpu_seconds', float('nan')), 2)} | "
                         f"{fmt(r['max_rss_mb'], 0)} | {r['digest']} |")
        lines.append('')
    loader = results.get('loader')
    if loader:
        lines += ['## Loader (gt_size 128, batch 16, flips and rotations, prefetch_mode cpu)', '',
                  'Medians of alternated runs, each in a fresh process. "CPU ms/sample": CPU time of making one item '
                  'in its worker (or in the main process with 0 workers); it sets the rate of one worker process with '
                  'a core of its own, 1000 / CPU ms, whatever else runs on the machine. "wall samples/s": what the '
                  'loader delivered here, on 2 cores shared with other jobs. Memory: peak private memory of the '
                  'loading process and its workers together.', '',
                  '| backend | workers | Paired wall samples/s | HES wall samples/s | Paired CPU ms/sample | '
                  'HES CPU ms/sample | HES / Paired per-worker rate | Paired peak private MB | HES peak private MB |',
                  '|---|---|---|---|---|---|---|---|---|']
        for backend, r in loader.items():
            for workers, w in r.items():
                p, h = w['PairedImageDataset'], w['HES']
                mem = [max(run.get('peak_private_mb', float('nan')) for run in x['runs']) for x in (p, h)]
                lines.append(f"| {backend} | {workers} | {fmt(p['samples_per_s'])} | {fmt(h['samples_per_s'])} | "
                             f"{fmt(p['cpu_ms_per_sample'], 2)} | {fmt(h['cpu_ms_per_sample'], 2)} | "
                             f"{p['cpu_ms_per_sample'] / h['cpu_ms_per_sample']:.2f} | {fmt(mem[0], 0)} | "
                             f"{fmt(mem[1], 0)} |")
        lines.append('')
    return '\n'.join(lines)


def run_size(args: argparse.Namespace) -> None:
    label, n = args.size
    root = Path(args.root) / f'div2k_{label}'
    pool = [Path(p) for p in args.pool] if args.pool else [SHARED_DATA / p for p in POOL]
    missing = [str(p) for p in pool if not p.is_dir()]
    if missing and not (root / 'complete.json').is_file():
        raise SystemExit(f'pool folder(s) not found: {missing} (set --pool or WBSR_SHARED_DATA)')
    made = make_set(root, n, pool, args.jobs)
    if args.parts == 'make':
        print(f'{root}: {json.dumps(made)}')
        return
    paths, work = set_paths(root), Path(args.root) / f'work_{label}{"_" + args.tag if args.tag else ""}'
    work.mkdir(parents=True, exist_ok=True)
    extra = json.loads(args.extra) if args.extra else {}
    name = f'scale_{label}{"_" + args.tag if args.tag else ""}'
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if (out / f'{name}.json').is_file():  # parts measured by an earlier command are kept, with that command
        results = json.loads((out / f'{name}.json').read_text())
    command = 'python bench/scale.py ' + ' '.join(sys.argv[1:])
    results.update(size=label, n=n, made=made, machine=machine(), tag=args.tag, src=args.src, extra=extra)
    results.setdefault('commands', {})
    parts = args.parts.split(',')
    if 'index' in parts:
        results['index'] = measure_index(paths, work, args.src, extra, args.backends)
    if 'ddp' in parts:
        results['ddp'] = measure_ddp(paths, work, args.src, args.nproc, extra)
    if 'loader' in parts:
        results['loader'] = measure_loader(paths, work, args.src, args.workers, args.batches, args.rounds, extra,
                                           args.backends)
    results['commands'].update({part: command for part in parts})
    (out / f'{name}.json').write_text(json.dumps(results, indent=1) + '\n')
    (out / f'{name}.md').write_text(size_report(label, n, made, results) + '\n')
    print(f'wrote {out / name}.md and .json')


# ---- large images (item 3) --------------------------------------------------------------------------------------
def mosaic(photos: Sequence[np.ndarray], height: int, width: int, cell_width: int = 1024,
           min_side: int = 564) -> tuple[np.ndarray, list[int]]:
    """A ``height x width`` image of whole-width crops of photographs in rows, in order (landscape orientation).

    Rows are as many as needed to keep every row at most ``min_side`` high; each cell is the centre crop of the next
    photograph (turned to landscape), of the row's height and ``cell_width``. Photographs are reused, mirrored, when
    there are fewer than cells. Returns the image and which photograph filled each cell.
    """
    cols = width // cell_width
    if cols * cell_width != width:
        raise ValueError(f'width {width} is not a multiple of {cell_width}')
    rows = math.ceil(height / min_side)
    bounds = np.linspace(0, height, rows + 1).round().astype(int)
    out, used = np.empty((height, width, 3), np.uint8), []
    k = 0
    for r in range(rows):
        h = bounds[r + 1] - bounds[r]
        for c in range(cols):
            j = k % len(photos)
            img = photos[j]
            if img.shape[0] > img.shape[1]:
                img = np.rot90(img)
            if k >= len(photos):
                img = img[::-1, ::-1]
            top, left = (img.shape[0] - h) // 2, (img.shape[1] - cell_width) // 2
            out[bounds[r]:bounds[r + 1], c * cell_width:(c + 1) * cell_width] = img[top:top + h,
                                                                                   left:left + cell_width]
            used.append(j)
            k += 1
    return out, used


def make_large(root: Path, photos_dir: Path) -> dict[str, Any]:
    """The large test images: ``same scene`` (one 8192x8192 mosaic and its x2, x4 downscales, as Test2K/4K/8K are
    cut from DIV8K) and ``tiled`` (mosaics of more photographs at their own resolution); HR and MATLAB-bicubic LR."""
    from basicsr.utils.matlab_functions import imresize

    from wbsr_data.make_lr import bicubic_lr
    marker = root / 'complete.json'
    if marker.is_file():
        return json.loads(marker.read_text())
    root.mkdir(parents=True, exist_ok=True)
    files = sorted(photos_dir.glob('*.png'))
    photos = [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files]
    photos = [p for p in photos if p is not None and max(p.shape[:2]) >= 1024 and min(p.shape[:2]) >= 564]
    if not photos:
        raise SystemExit(f'no photograph of at least 1024x564 in {photos_dir}')
    big_side = LARGE_SIDES[-1] * SCALE
    big, used = mosaic(photos, big_side, big_side)
    images: dict[str, Any] = {}

    def save(name: str, hr: np.ndarray) -> None:
        lr = bicubic_lr(hr.astype(np.float32) / 255., SCALE)
        cv2.imwrite(str(root / f'{name}_hr.png'), hr)
        cv2.imwrite(str(root / f'{name}_lr.png'), lr)
        images[name] = {'hr': f'{name}_hr.png', 'lr': f'{name}_lr.png', 'lr_side': lr.shape[0]}

    save(f'scene_{LARGE_SIDES[-1]}', big)
    images[f'scene_{LARGE_SIDES[-1]}']['cells'] = len(used)
    for side in LARGE_SIDES[:-1]:
        factor = big_side // (side * SCALE)
        hr = (np.clip(imresize(big.astype(np.float32) / 255., 1 / factor), 0, 1) * 255.).round().astype(np.uint8)
        save(f'scene_{side}', hr)
        tiled, cells = mosaic(photos, side * SCALE, side * SCALE)
        save(f'tiled_{side}', tiled)
        images[f'tiled_{side}']['cells'] = len(cells)
    made = {'photographs': len(photos), 'source': str(photos_dir), 'images': images}
    marker.write_text(json.dumps(made, indent=1))
    return made


def psnr_y(sr: Any, hr: np.ndarray, border: int = SCALE, rows: int = 512) -> float:
    """PSNR of the Y channel (BT.601, 8-bit output as wbsr-infer writes it) with a ``border`` shaved, in bands."""
    import torch
    _, _, h, w = sr.shape
    total, count = 0., 0
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(1, 3, 1, 1) / 255.
    for top in range(border, h - border, rows):
        bottom = min(h - border, top + rows)
        band = (sr[:, :, top:bottom, border:w - border].clamp(0, 1) * 255.).round().double() / 255.
        y_sr = (band * weights).sum(1) * 255. + 16.
        ref = torch.from_numpy(hr[top:bottom, border:w - border, ::-1].copy()).permute(2, 0, 1)[None].double() / 255.
        y_hr = (ref * weights).sum(1) * 255. + 16.
        total += float(((y_sr - y_hr)**2).sum())
        count += y_sr.numel()
    return 10. * math.log10(255.**2 / (total / count))


def child_large(args: argparse.Namespace) -> None:
    """One routed (or full) run on one large image in this fresh process: time, peak memory, FLOPs, PSNR-Y."""
    import torch
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    from wbsr_models.evaluation import keep_freed_memory
    from wbsr_models.infer import load_model
    from wbsr_models.router import Router, RoutingOptions
    keep_freed_memory(32 << 20)  # as wbsr-infer
    net, scale, projection, routing = load_model(args.model)
    rss_model = max_rss_mb()
    lr = cv2.imread(args.lr, cv2.IMREAD_COLOR)
    lq = torch.from_numpy(np.ascontiguousarray(lr[..., ::-1].transpose(2, 0, 1))).float().div(255.)[None]
    options = RoutingOptions(mode=args.mode, scheme='tiles', budget=args.budget)
    router = Router(net, options, scale, projection=projection, routing=routing)
    start = time.perf_counter()
    result = router(lq)
    seconds = time.perf_counter() - start
    rss_peak = max_rss_mb()
    hr = cv2.imread(args.hr, cv2.IMREAD_COLOR)
    out = {'mode': args.mode, 'budget': args.budget, 'lr_hw': list(lq.shape[-2:]), 'seconds': seconds,
           'max_rss_mb': rss_peak, 'rss_after_model_mb': rss_model, 'flops': int(result.flops),
           'flops_full_image': int(result.flops_full_image), 'flops_full_regions': int(result.flops_full_regions),
           'shares': [float(v) for v in result.shares()], 'psnr_y': psnr_y(result.output, hr),
           'threads': torch.get_num_threads()}
    Path(args.out).write_text(json.dumps(out, indent=1))


LARGE_CONFIGS = (('full', None), ('wbsr', None), ('budget', LARGE_BUDGET))


def config_name(mode: str, budget: Optional[float]) -> str:
    return {'full': 'full network', 'wbsr': 'Eq. 15'}.get(mode, f'budget {budget}')


def run_large(args: argparse.Namespace) -> None:
    root = Path(args.root) / 'large'
    made = make_large(root, Path(args.photos) if args.photos else SHARED_DATA / 'test' / 'Urban100' / 'HR')
    work = root / 'runs'
    work.mkdir(exist_ok=True)
    names = [n for n in made['images'] if int(made['images'][n]['lr_side']) in args.sides]
    names.sort(key=lambda n: (made['images'][n]['lr_side'], n))
    results: dict[str, Any] = {'machine': machine(), 'model': str(args.model), 'threads': args.threads,
                               'made': made, 'runs': {}}
    for name in names:  # each configuration twice, in the order A B C then C B A, each in a fresh process
        image = made['images'][name]
        runs: dict[str, list] = {}
        for order in (LARGE_CONFIGS, LARGE_CONFIGS[::-1])[:args.passes]:
            for mode, budget in order:
                out = work / f'{name}_{mode}.json'
                print(f'{name}: {config_name(mode, budget)}', flush=True)
                cmd = ['_child-large', '--model', str(args.model), '--lr', str(root / image['lr']),
                       '--hr', str(root / image['hr']), '--mode', mode, '--out', str(out)]
                if budget is not None:
                    cmd += ['--budget', str(budget)]
                run_child(cmd, args.src, threads=args.threads, out=out)
                runs.setdefault(config_name(mode, budget), []).append(json.loads(out.read_text()))
        results['runs'][name] = runs
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / 'scale_large.json').write_text(json.dumps(results, indent=1) + '\n')
    command = 'python bench/scale.py ' + ' '.join(sys.argv[1:])
    (Path(args.out) / 'scale_large.md').write_text(large_report(results, command) + '\n')
    print(f"wrote {Path(args.out) / 'scale_large.md'}")


def runs_sentence(results: dict[str, Any]) -> str:
    """How many runs each configuration had, from the stored runs themselves."""
    counts = {len(rs) for runs in results['runs'].values() for rs in runs.values()}
    if counts == {1}:
        return ('Each configuration ran once, in a fresh process (orders full, Eq. 15, budget), on a machine shared '
                'with other jobs: the seconds are one measurement each.')
    return ('Each configuration ran twice (orders A B C, C B A), each run in a fresh process; times are the mean of '
            'the runs, peak RSS the larger.')


def large_report(results: dict[str, Any], command: str) -> str:
    made = results['made']
    lines = ['# Scale: routed inference on large images', '', f'Command: `{command}`', '',
             f"Machine: {results['machine']}; {results['threads']} threads per run. Model: `{results['model']}`.", '',
             f"Images ({made['photographs']} Urban100 photographs): `scene_<side>`: one 8192x8192 HR mosaic of whole-"
             'width crops of the photographs and its x2 and x4 MATLAB-bicubic downscales (as Test2K/Test4K are made '
             'from the DIV8K images of Test8K: the same scenes at lower resolution); `tiled_<side>`: mosaics of that '
             'many photographs at their own resolution (the same content per pixel at every size). LR: MATLAB '
             f"bicubic x4 of the HR. {runs_sentence(results)} Peak RSS: `ru_maxrss` of the process, model and "
             'image included. FLOPs are those executed (bands included); "vs full": against the full network run '
             'on the same image the same way.', '',
             '| image | LR (output) | configuration | s | time vs full | peak RSS MB | GFLOPs | FLOPs vs full | '
             'PSNR-Y dB | share on the smallest / largest subnet |', '|---|---|---|---|---|---|---|---|---|---|']
    for name, runs in results['runs'].items():
        full = runs['full network']
        full_s, full_flops = statistics.mean(r['seconds'] for r in full), full[0]['flops']
        for config, rs in runs.items():
            r = rs[0]
            side = r['lr_hw'][0]
            secs = statistics.mean(x['seconds'] for x in rs)
            shares = r['shares']
            lines.append(f"| {name} | {side} ({side * SCALE}) | {config} | {secs:.1f} | {secs / full_s:.2f} | "
                         f"{max(x['max_rss_mb'] for x in rs):.0f} | {r['flops'] / 1e9:.0f} | "
                         f"{r['flops'] / full_flops:.3f} | {r['psnr_y']:.3f} | {shares[0]:.2f} / {shares[-1]:.2f} |")
    return '\n'.join(lines)


# ---- command line ---------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith('_child-'):
        import faulthandler
        import signal
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid> prints where a child is
        child = argparse.ArgumentParser()
        child.add_argument('kind')
        child.add_argument('--opt')
        child.add_argument('--out', required=True)
        child.add_argument('--workers', type=int, nargs='+', default=[0])
        child.add_argument('--batches', type=int, default=32)
        child.add_argument('--round', type=int, default=0)
        child.add_argument('--dataset')
        child.add_argument('--model')
        child.add_argument('--lr')
        child.add_argument('--hr')
        child.add_argument('--mode')
        child.add_argument('--budget', type=float)
        args = child.parse_args(argv)
        {'_child-index': child_index, '_child-ddp': child_ddp, '_child-loader': child_loader,
         '_child-large': child_large}[args.kind](args)
        return
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument('--size', type=size_label, help=f'sub-images: {", ".join(SIZES)} or a number')
    what.add_argument('--large', action='store_true', help='routed inference on 2K-8K outputs')
    parser.add_argument('--root', default='bench_out/scale',
                        help='where the synthetic data goes (default: %(default)s)')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'), help='where the tables go')
    parser.add_argument('--parts', default='index,ddp,loader',
                        help='of index, ddp, loader; or make (only make the set) (default: %(default)s)')
    parser.add_argument('--pool', nargs='+', help='folders of photographs for the sub-images (default: the '
                        'benchmark pool under ../shared/data)')
    parser.add_argument('--jobs', type=int, default=2, help='processes writing the set')
    parser.add_argument('--nproc', type=int, default=4, help='torchrun ranks of the ddp part')
    parser.add_argument('--backends', nargs='+', choices=('disk', 'lmdb'), default=['disk', 'lmdb'],
                        help='backends of the index and loader parts (the ddp part reads the folder)')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 4, 8], help='DataLoader workers to measure')
    parser.add_argument('--batches', type=int, default=32, help='timed batches per loader run')
    parser.add_argument('--rounds', type=int, default=3, help='alternated loader runs per dataset')
    parser.add_argument('--src', help='run the measured code from this checkout (default: this one)')
    parser.add_argument('--tag', default='', help='suffix of the result files (e.g. before)')
    parser.add_argument('--extra', help='JSON dict of extra dataset options for HES')
    parser.add_argument('--model', default=str(MODEL), help='--large: the checkpoint')
    parser.add_argument('--photos', help='--large: folder of photographs of at least 1024x564 (default: Urban100)')
    parser.add_argument('--sides', type=int, nargs='+', default=list(LARGE_SIDES), help='--large: LR sides to run')
    parser.add_argument('--passes', type=int, choices=(1, 2), default=2, help='--large: runs per configuration')
    parser.add_argument('--threads', type=int, default=2, help='--large: torch threads per run')
    args = parser.parse_args(argv)
    if args.large:
        run_large(args)
    else:
        run_size(args)


if __name__ == '__main__':
    main()
