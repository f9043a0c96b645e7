"""The HES index at scale: one build per run across ranks, the remembered content hash, reading processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from torch.utils.data import DataLoader

from wbsr_data import hes_dataset, patch_index
from wbsr_data.hes_dataset import HESPairedImageDataset
from wbsr_data.pairs import ImageFileError

from conftest import REPO, textured_image, write_pair_folder
from test_reliability import PYTHON_ENV, free_port


def hes_options(folders, cache, **extra):
    return {'name': 'tiny', 'type': 'HESPairedImageDataset', 'phase': 'train', 'scale': 4, 'gt_size': 32,
            'io_backend': {'type': 'disk'}, 'index_cache': str(cache), **folders, **extra}


class FileReads:
    """Counts the files the index hashes in this process (reading processes disabled: index_workers 0)."""

    def __init__(self, monkeypatch):
        self.count = 0
        digests = patch_index._PairReader.digests

        def counted(reader, i):
            self.count += 2
            return digests(reader, i)

        monkeypatch.setattr(patch_index._PairReader, 'digests', counted)


def test_ranks_share_one_build_and_rank_zero_errors_reach_every_rank(tmp_path):
    good = write_pair_folder(tmp_path / 'good', n=4, size=(96, 96))
    bad = write_pair_folder(tmp_path / 'bad', n=3, size=(96, 96))
    (Path(bad['dataroot_gt']) / 'img001.png').write_bytes(b'not an image')
    out = tmp_path / 'out'
    out.mkdir()
    env = dict(PYTHON_ENV, WBSR_DDP_OUT=str(out), OMP_NUM_THREADS='1',
               WBSR_TEST_OPT=json.dumps(hes_options(good, tmp_path / 'cache', index_workers=0)),
               WBSR_TEST_BAD_OPT=json.dumps(hes_options(bad, tmp_path / 'cache', index_workers=0)))
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                           str(free_port()), str(REPO / 'tests' / 'hes_index_worker.py')],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((out / f'rank{r}.json').read_text()) for r in range(2)]
    # rank 0 builds once and hashes the 8 files once (the second call finds the remembered hash); rank 1 reads
    # no file at all
    assert [(r['builds'], r['files_hashed']) for r in ranks] == [(1, 8), (0, 0)]
    assert len({r['digest'] for r in ranks}) == 1 and all(r['second_call_same'] for r in ranks)
    assert ranks[0]['candidates'] == 25 + 25 + 30 + 30  # GT 96x96 .. 120x108, 32-pixel crops every 16 pixels
    assert len(list((tmp_path / 'cache').glob('hes_index_*.npz'))) == 1
    bad_file = str(Path(bad['dataroot_gt']) / 'img001.png')
    assert ranks[0]['bad'] == ['ImageFileError', f'{bad_file}: not a readable image']
    assert ranks[1]['bad'] == ['RankZeroIndexError', f'HES index: rank 0 could not load or build it: ImageFileError: '
                               f'{bad_file}: not a readable image']


def write_uncompressed_pairs(root: Path, n: int = 3) -> dict:
    """Pairs saved as stored (uncompressed) PNGs: a file's size depends only on the image's size."""
    folders = write_pair_folder(root, n=n, size=(96, 80))
    for folder in folders.values():
        for path in Path(folder).glob('*.png'):
            cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED), [cv2.IMWRITE_PNG_COMPRESSION, 0])
    return folders


def test_content_hash_is_remembered_until_a_file_changes(tmp_path, monkeypatch, basicsr_log):
    folders = write_uncompressed_pairs(tmp_path / 'data')
    opt = hes_options(folders, tmp_path / 'cache', index_workers=0)
    reads = FileReads(monkeypatch)
    first = patch_index.load_or_build_index(opt)
    assert reads.count == 6
    memo = list((tmp_path / 'cache').glob('hes_content_*.json'))
    assert len(memo) == 1 and json.loads(memo[0].read_text())['files'] == 6
    patch_index.load_or_build_index(opt)
    assert reads.count == 6 and 'reusing' in basicsr_log.text  # nothing read again
    # new pixels, same file size, modification time set back: the change time still gives it away
    path = Path(folders['dataroot_lq']) / 'img001.png'
    stat = path.stat()
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), 255 - img, [cv2.IMWRITE_PNG_COMPRESSION, 0])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    changed = patch_index.load_or_build_index(opt)
    assert reads.count == 12
    assert not np.array_equal(changed.vectors, first.vectors)
    assert len(list((tmp_path / 'cache').glob('hes_index_*.npz'))) == 2
    # an unreadable memo is hashed again, not trusted
    memo[0].write_text('{not json')
    again = patch_index.load_or_build_index(opt)
    assert reads.count == 18 and np.array_equal(again.scores, changed.scores)


def test_reading_processes_give_the_same_index_and_name_a_bad_file(tmp_path, basicsr_log):
    folders = write_pair_folder(tmp_path / 'data', n=5, size=(128, 112))
    alone = patch_index.load_or_build_index(hes_options(folders, tmp_path / 'c0', index_workers=0))
    workers = patch_index.load_or_build_index(hes_options(folders, tmp_path / 'c2', index_workers=2))
    assert 'HES index: 243 candidates from 5 images' in basicsr_log.text and '2 reading processes' in basicsr_log.text
    for name in patch_index.ARRAYS:
        assert np.array_equal(getattr(alone, name), getattr(workers, name)), name
    assert alone.pairs == workers.pairs
    bad = Path(folders['dataroot_lq']) / 'img003.png'
    bad.write_bytes(b'\x89PNG broken')
    with pytest.raises(ImageFileError, match=f'^{bad}: not a readable image$'):
        patch_index.load_or_build_index(hes_options(folders, tmp_path / 'c3', index_workers=2))


def test_default_reading_processes_follow_the_images_and_cpus(monkeypatch):
    options = patch_index.IndexOptions.from_dataset_opt({'scale': 4, 'gt_size': 32})
    monkeypatch.setattr(patch_index, '_usable_cpus', lambda: 16)
    assert [options.num_workers(n) for n in (10, 63, 64, 500, 32592)] == [0, 0, 1, 7, 16]
    fixed = patch_index.IndexOptions.from_dataset_opt({'scale': 4, 'gt_size': 32, 'index_workers': 3})
    assert fixed.num_workers(10) == 3


@pytest.mark.parametrize('value', [-1, 1.5, 'two', True])
def test_bad_index_workers_is_refused_by_name(tmp_path, value):
    folders = write_pair_folder(tmp_path / 'data', n=1)
    with pytest.raises(ValueError, match=f"dataset 'tiny': index_workers must be an integer >= 0 .*got {value!r}"):
        HESPairedImageDataset(hes_options(folders, tmp_path / 'cache', index_workers=value))
    assert not (tmp_path / 'cache').exists()  # refused before any work


# ---- the scale harness's synthetic data (bench/scale.py) ----------------------------------------------------
sys.path.insert(0, str(REPO / 'bench'))
import scale  # noqa: E402


def test_harness_sub_images_pair_real_crops_with_their_lr(monkeypatch):
    photos = [textured_image(320, 480, seed) for seed in range(3)]
    pool = [(hr, cv2.resize(hr, (hr.shape[1] // 4, hr.shape[0] // 4), interpolation=cv2.INTER_AREA)) for hr in photos]
    monkeypatch.setattr(scale, '_POOL', pool)
    gt, lq = scale.sub_image(7)
    assert gt.shape == (480, 480, 3) and lq.shape == (120, 120, 3)
    assert np.array_equal(scale.sub_image(7)[0], gt) and not np.array_equal(scale.sub_image(8)[0], gt)
    # every 240x240 quadrant is a crop of a pool photograph (after a flip or rotation), and its LR quadrant the
    # same crop of that photograph's LR
    for r in range(2):
        for c in range(2):
            quad = gt[240 * r:240 * (r + 1), 240 * c:240 * (c + 1)]
            quad_lr = lq[60 * r:60 * (r + 1), 60 * c:60 * (c + 1)]
            found = [(j, op) for j, (hr, lr) in enumerate(pool) for op in range(8)
                     if _contains(scale._transform(hr, op), quad, scale._transform(lr, op), quad_lr)]
            assert found, (r, c)
    assert [scale.sub_name(i) for i in (0, 40, 41, 32591)] == ['0001_s001', '0001_s041', '0002_s001', '0795_s038']


def _contains(hr: np.ndarray, quad: np.ndarray, lr: np.ndarray, quad_lr: np.ndarray) -> bool:
    """Whether ``quad`` is a crop of ``hr`` at a multiple of 4 whose LR crop in ``lr`` is ``quad_lr``."""
    for top in range(0, hr.shape[0] - 239, 4):
        for left in range(0, hr.shape[1] - 239, 4):
            if (hr[top, left, 0] == quad[0, 0, 0] and np.array_equal(hr[top:top + 240, left:left + 240], quad)
                    and np.array_equal(lr[top // 4:top // 4 + 60, left // 4:left // 4 + 60], quad_lr)):
                return True
    return False


def test_harness_mosaic_fills_the_image_with_centre_crops():
    photos = [np.full((600, 1024, 3), v, np.uint8) for v in (10, 20, 30)] + [np.full((1100, 700, 3), 40, np.uint8)]
    img, used = scale.mosaic(photos, 2048, 2048)
    assert img.shape == (2048, 2048, 3)
    assert used == [0, 1, 2, 3, 0, 1, 2, 3]  # 4 rows of 512 (at most 564 high) x 2 columns, photographs reused
    assert img[0, 0, 0] == 10 and img[0, 1024, 0] == 20 and img[512, 1024, 0] == 40 and img[2047, 2047, 0] == 40
    with pytest.raises(ValueError, match='width 1000 is not a multiple of 1024'):
        scale.mosaic(photos, 1000, 1000)


class _AllocatorState:
    """Items: whether the HES item made in this process had set the worker allocator (read in the worker)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return 2

    def __getitem__(self, i):
        self.dataset[i]
        return hes_dataset._worker_allocator_set


def test_workers_keep_freed_memory_and_the_main_process_is_left_alone(tmp_path):
    folders = write_pair_folder(tmp_path / 'data', n=2)
    dataset = HESPairedImageDataset(hes_options(folders, tmp_path / 'cache'))
    dataset[0]
    assert hes_dataset._worker_allocator_set is False  # no worker here: glibc's defaults stay
    loader = DataLoader(_AllocatorState(dataset), batch_size=None, num_workers=1)
    assert [bool(v) for v in loader] == [True, True]
    assert hes_dataset._worker_allocator_set is False
