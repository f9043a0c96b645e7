"""HES: the difficulty function, the patch index and its cache, sampling, the phase switch, bad input."""
import copy
import math
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from basicsr.data import build_dataset
from basicsr.data.data_sampler import EnlargedSampler
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from wbsr_data import inspect as hes_inspect
from wbsr_data.difficulty import DifficultyProjection, extract_patches, gradient_vectors, grid_starts
from wbsr_data.hes_dataset import CLASS_LEVEL, SAMPLE_LEVEL, HESPairedImageDataset, class_masses, set_train_progress
from wbsr_data.pairs import ImageFileError

from conftest import write_pair_folder

Y_GAIN = 219. / 255.  # BT.601 luminance of a gray RGB ramp: dY = 219/255 dRGB


def hes_options(folders, tmp_path, **extra):
    opt = {'name': 'tiny', 'type': 'HESPairedImageDataset', 'phase': 'train', 'scale': 4, 'gt_size': 32,
           'io_backend': {'type': 'disk'}, 'use_hflip': True, 'use_rot': True,
           'index_cache': str(tmp_path / 'cache'), 'delta': 0.5, **folders}
    opt.update(extra)
    return opt


@pytest.fixture
def hes_folder(tmp_path):
    return write_pair_folder(tmp_path / 'data', n=4, size=(160, 128))


# ---- the difficulty function ------------------------------------------------------------------------
def test_gradient_vector_of_constant_patch_is_zero():
    assert gradient_vectors(torch.full((3, 3, 16, 16), 0.37)).abs().max().item() < 1e-7


@pytest.mark.parametrize('slope', [0.01, 0.03])
def test_gradient_vector_of_ramp_is_its_slope(slope):
    ramp = (torch.arange(20.) * slope).view(1, 1, 1, 20).expand(1, 3, 20, 20)
    g = gradient_vectors(ramp)[0]
    assert g[0].item() == pytest.approx(slope * Y_GAIN, rel=1e-5)  # mean |gx|
    assert g[1].item() == pytest.approx(0, abs=1e-6)  # std |gx|
    assert g[2:].abs().max().item() == pytest.approx(0, abs=1e-6)  # no vertical gradient
    vertical = gradient_vectors(ramp.transpose(2, 3))[0]
    assert vertical[2].item() == pytest.approx(slope * Y_GAIN, rel=1e-5) and vertical[0].item() < 1e-6


def test_gradient_vector_std_separates_noise_from_a_flat_patch():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = flat + torch.randn(1, 1, 32, 32).expand(1, 3, 32, 32) * 0.05
    g = gradient_vectors(torch.cat([flat, noisy]))
    assert g[0].sum() == 0 and g[1, 1] > 0.01 and g[1, 3] > 0.01


def test_gradient_vectors_gray_and_rgba_and_tiny_patches():
    rgb = torch.rand(2, 3, 8, 8)
    gray = rgb[:, :1]
    assert torch.allclose(gradient_vectors(gray), gradient_vectors(gray.expand(-1, 3, -1, -1)))
    assert torch.equal(gradient_vectors(torch.cat([rgb, torch.ones(2, 1, 8, 8)], 1)), gradient_vectors(rgb))
    assert torch.equal(gradient_vectors(torch.rand(4, 3, 2, 9)), torch.zeros(4, 4))
    with pytest.raises(ValueError, match='expected 1, 3 or 4 channels'):
        gradient_vectors(torch.rand(1, 2, 8, 8))


def test_extract_patches_and_grid():
    img = torch.rand(3, 50, 70)
    assert grid_starts(50, 32, 28, cover_end=True) == [0, 18]
    assert grid_starts(70, 32, 28, cover_end=True) == [0, 28, 38]
    assert grid_starts(70, 32, 16, cover_end=False) == [0, 16, 32]
    assert grid_starts(20, 32, 28, cover_end=True) == [0]
    patches = extract_patches(img, [0, 18], [0, 28, 38], 32, 32)
    assert patches.shape == (6, 3, 32, 32)
    assert torch.equal(patches[4], img[:, 18:50, 28:60])


def test_quantile_thresholds_give_equal_count_classes():
    vectors = np.random.default_rng(0).random((1000, 4))
    proj = DifficultyProjection.fit(vectors, num_classes=10)
    assert np.bincount(proj.classify(proj.score(vectors)), minlength=11)[1:].tolist() == [100] * 10
    scores = np.sort(proj.score(vectors))
    assert proj.thresholds.tolist() == [scores[math.ceil(k * 1000 / 10) - 1] for k in range(1, 10)]  # Eq. 7
    assert proj.axis.sum() > 0  # larger score = more gradient


def test_projection_round_trip_and_refusals():
    proj = DifficultyProjection.fit(np.random.default_rng(1).random((50, 4)), num_classes=5, kind='sum')
    again = DifficultyProjection.from_dict(proj.to_dict())
    assert np.array_equal(again.thresholds, proj.thresholds) and again.kind == 'sum'
    bad = dict(proj.to_dict(), version=99)
    with pytest.raises(ValueError, match='version 99'):
        DifficultyProjection.from_dict(bad)
    with pytest.raises(ValueError, match='malformed'):
        DifficultyProjection.from_dict({'kind': 'pca'})
    with pytest.raises(ValueError, match='projection must be one of'):
        DifficultyProjection.fit(np.ones((3, 4)), kind='edges')


# ---- sampling -----------------------------------------------------------------------------------------
def test_class_masses_follow_delta():
    masses = class_masses(np.array([10, 10, 10]), 0.5)
    assert masses.tolist() == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert class_masses(np.array([10, 0, 10]), 0.5).tolist() == pytest.approx([0.2, 0, 0.8])
    assert class_masses(np.array([5, 5]), 1.0).tolist() == [0.5, 0.5]


def test_empirical_class_frequencies_before_and_after_switch(hes_folder, tmp_path):
    ds = HESPairedImageDataset(hes_options(hes_folder, tmp_path))
    counts = ds.index.class_counts()
    k_count = len(counts)
    # before the switch: item i is candidate i, the sampler's permutation makes P_i = 1/N
    set_train_progress(0, 100)
    random.seed(0)
    before = np.bincount([ds[i]['hes_class'] for i in range(len(ds))], minlength=k_count + 1)[1:]
    assert before.tolist() == counts.tolist()
    assert {ds[i]['hes_phase'] for i in range(5)} == {SAMPLE_LEVEL}
    # after the switch: class k with mass pi_k, uniform inside the class
    set_train_progress(70, 100)
    random.seed(1)
    n = 20000
    drawn = [ds.draw_class_level() for _ in range(n)]
    freq = np.bincount(ds.index.classes[drawn], minlength=k_count + 1)[1:] / n
    tolerance = 4 * np.sqrt(ds.class_mass * (1 - ds.class_mass) / n) + 1e-9
    assert np.all(np.abs(freq - ds.class_mass) <= tolerance)
    within = np.bincount(np.asarray(drawn)[ds.index.classes[drawn] == k_count])  # uniform inside the top class
    members = np.flatnonzero(ds.index.classes == k_count)
    assert within[members].min() > 0.5 * within[members].mean()
    assert ds[0]['hes_phase'] == CLASS_LEVEL


def test_switch_iteration_is_ratio_of_total(hes_folder, tmp_path):
    ds = HESPairedImageDataset(hes_options(hes_folder, tmp_path, switch_ratio=0.7))
    set_train_progress(69, 100)
    assert ds.current_phase() == SAMPLE_LEVEL  # the next sample is for iteration 70, still sample-level
    set_train_progress(70, 100)
    assert ds.current_phase() == CLASS_LEVEL


@pytest.mark.parametrize('persistent', [False, True])
def test_switch_with_two_workers_is_never_early_and_at_most_prefetch_late(hes_folder, tmp_path, persistent):
    """The bound does not depend on timing: a DataLoader sends batch j's indices to a worker only when it hands out
    batch j - num_workers x prefetch_factor, so a worker builds batch j after the progress of iteration
    j - 1 - lag was reported, however slow or loaded the machine (checked with four busy loops on two cores)."""
    ds = HESPairedImageDataset(hes_options(hes_folder, tmp_path, switch_ratio=0.5))
    batch, total = 4, 40
    sampler = EnlargedSampler(ds, 1, 0, ratio=3)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=2, persistent_workers=persistent,
                        drop_last=True, prefetch_factor=2)
    set_train_progress(0, total)
    phases, it, epoch = {}, 0, 0
    while it < total:
        sampler.set_epoch(epoch)
        for data in loader:
            it += 1
            phases[it] = set(data['hes_phase'].tolist())
            set_train_progress(it, total)  # what WBSRModel.optimize_parameters does
            if it == total:
                break
        epoch += 1
    switch, lag = ds.switch_iter(total), 2 * 2  # num_workers * prefetch_factor
    assert all(phases[i] == {SAMPLE_LEVEL} for i in range(1, switch + 1))
    assert all(phases[i] == {CLASS_LEVEL} for i in range(switch + 1 + lag, total + 1))


@pytest.mark.parametrize('resume_iter,expected', [(10, SAMPLE_LEVEL), (80, CLASS_LEVEL)])
def test_switch_after_simulated_resume(hes_folder, tmp_path, resume_iter, expected):
    ds = HESPairedImageDataset(hes_options(hes_folder, tmp_path))  # a fresh process after --auto_resume
    set_train_progress(resume_iter, 100)  # WBSRModel.resume_training reports the resumed iteration
    loader = DataLoader(ds, batch_size=2, num_workers=2, sampler=EnlargedSampler(ds, 1, 0))
    assert set(next(iter(loader))['hes_phase'].tolist()) == {expected}


def test_deterministic_for_a_seed(hes_folder, tmp_path):
    ds = HESPairedImageDataset(hes_options(hes_folder, tmp_path))
    set_train_progress(90, 100)

    def draw():
        random.seed(123)
        return [ds[i] for i in range(6)]

    first, second = draw(), draw()
    assert all(torch.equal(a['gt'], b['gt']) and a['gt_path'] == b['gt_path'] for a, b in zip(first, second))


def lmdb_copy(folders, tmp_path):
    """The pair folders as two lmdb databases (BasicSR's make_lmdb_from_imgs), keyed by file stem."""
    dbs = {}
    for key in ('dataroot_gt', 'dataroot_lq'):
        folder = Path(folders[key])
        names = sorted(p.name for p in folder.glob('*.png'))
        dbs[key] = str(tmp_path / f'{folder.name}.lmdb')
        make_lmdb_from_imgs(str(folder), dbs[key], names, [Path(n).stem for n in names])
    return dbs


def test_lmdb_and_folder_give_identical_samples(hes_folder, tmp_path):
    lmdb_opts = lmdb_copy(hes_folder, tmp_path)
    disk = HESPairedImageDataset(hes_options(hes_folder, tmp_path))
    lmdb = HESPairedImageDataset(hes_options(lmdb_opts, tmp_path, io_backend={'type': 'lmdb'}))
    assert np.array_equal(disk.index.scores, lmdb.index.scores)
    for progress in (0, 90):
        set_train_progress(progress, 100)
        random.seed(7)
        a = [disk[i] for i in range(8)]
        random.seed(7)
        b = [lmdb[i] for i in range(8)]
        assert all(torch.equal(x['gt'], y['gt']) and torch.equal(x['lq'], y['lq']) for x, y in zip(a, b))


# ---- the cache ----------------------------------------------------------------------------------------
def cache_files(tmp_path):
    return sorted((tmp_path / 'cache').glob('hes_index_*.npz'))


def test_cache_is_reused_and_invalidated(hes_folder, tmp_path, basicsr_log):
    opt = hes_options(hes_folder, tmp_path)
    HESPairedImageDataset(opt)
    first = cache_files(tmp_path)
    assert len(first) == 1
    stamp = first[0].stat().st_mtime_ns
    HESPairedImageDataset(opt)
    assert 'reusing' in basicsr_log.text and first[0].stat().st_mtime_ns == stamp
    for change in ({'gt_size': 16}, {'patch_stride': 8}, {'num_classes': 5}, {'projection': 'sum'}):
        HESPairedImageDataset(dict(opt, **change))
    assert len(cache_files(tmp_path)) == 5
    # a changed image makes a new index
    img_path = Path(hes_folder['dataroot_gt']) / 'img000.png'
    img = cv2.imread(str(img_path))
    img[:8, :8] = 255 - img[:8, :8]
    cv2.imwrite(str(img_path), img)
    HESPairedImageDataset(opt)
    assert len(cache_files(tmp_path)) == 6


def test_corrupt_cache_is_rebuilt_not_used(hes_folder, tmp_path, basicsr_log):
    opt = hes_options(hes_folder, tmp_path)
    good = HESPairedImageDataset(opt).index
    path = cache_files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:200])  # truncated
    rebuilt = HESPairedImageDataset(opt).index
    assert 'rebuilding, the cache is unusable' in basicsr_log.text and str(path) in basicsr_log.text
    assert np.array_equal(rebuilt.scores, good.scores)


def test_option_dict_is_not_modified(hes_folder, tmp_path):
    opt = hes_options(hes_folder, tmp_path)
    before = copy.deepcopy(opt)
    ds = build_dataset(opt)
    ds[0]
    assert opt == before and isinstance(ds, HESPairedImageDataset)


# ---- bad input ----------------------------------------------------------------------------------------
def test_unreadable_image_is_named(hes_folder, tmp_path):
    bad = Path(hes_folder['dataroot_gt']) / 'img001.png'
    bad.write_bytes(b'not an image')
    with pytest.raises(ImageFileError, match='img001.png: not a readable image'):
        HESPairedImageDataset(hes_options(hes_folder, tmp_path))


def test_size_mismatch_is_named(hes_folder, tmp_path):
    lq = Path(hes_folder['dataroot_lq']) / 'img002.png'
    cv2.imwrite(str(lq), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ImageFileError, match=r'img002.png is .* but its LR .*img002.png is 10x10: not x4'):
        HESPairedImageDataset(hes_options(hes_folder, tmp_path))


def test_image_smaller_than_gt_size_is_named_or_skipped(tmp_path, basicsr_log):
    folders = write_pair_folder(tmp_path / 'small', n=2, size=(48, 48))
    with pytest.raises(ImageFileError, match='img000.png is 48x48, smaller than gt_size 64'):
        HESPairedImageDataset(hes_options(folders, tmp_path, gt_size=64))
    ds = HESPairedImageDataset(hes_options(folders, tmp_path, gt_size=52, skip_small_images=True))
    assert 'img000.png' in basicsr_log.text and len(ds.index.pairs) == 1


def test_missing_pair_and_empty_folder(tmp_path):
    folders = write_pair_folder(tmp_path / 'd', n=2)
    (Path(folders['dataroot_lq']) / 'img001.png').unlink()
    with pytest.raises(ValueError, match='cannot pair'):
        HESPairedImageDataset(hes_options(folders, tmp_path))
    empty = {'dataroot_gt': str(tmp_path / 'e' / 'HR'), 'dataroot_lq': str(tmp_path / 'e' / 'LR')}
    Path(empty['dataroot_gt']).mkdir(parents=True)
    Path(empty['dataroot_lq']).mkdir(parents=True)
    with pytest.raises(ValueError, match='no images in'):
        HESPairedImageDataset(hes_options(empty, tmp_path))
    with pytest.raises(FileNotFoundError, match='dataroot_gt: .* is not a folder'):
        HESPairedImageDataset(hes_options({'dataroot_gt': str(tmp_path / 'nope'), 'dataroot_lq': str(tmp_path)},
                                          tmp_path))


def test_grayscale_and_rgba_files_are_converted_with_a_note(tmp_path, basicsr_log):
    folders = write_pair_folder(tmp_path / 'd', n=2, size=(64, 64))
    gt = Path(folders['dataroot_gt']) / 'img000.png'
    cv2.imwrite(str(gt), cv2.imread(str(gt), cv2.IMREAD_GRAYSCALE))
    lq = Path(folders['dataroot_lq']) / 'img001.png'
    img = cv2.imread(str(lq))
    cv2.imwrite(str(lq), np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]))
    ds = HESPairedImageDataset(hes_options(folders, tmp_path))
    sample = ds[0]
    assert 'grayscale, converted to 3 channels' in basicsr_log.text and 'RGBA, alpha channel dropped' in basicsr_log.text
    assert sample['gt'].shape == (3, 32, 32)


def test_lmdb_without_a_key_is_named(hes_folder, tmp_path):
    opts = lmdb_copy(hes_folder, tmp_path)
    meta = Path(opts['dataroot_gt']) / 'meta_info.txt'
    meta.write_text(meta.read_text() + 'ghost.png (8,8,3) 1\n')
    lq_meta = Path(opts['dataroot_lq']) / 'meta_info.txt'
    lq_meta.write_text(lq_meta.read_text() + 'ghost.png (2,2,3) 1\n')
    with pytest.raises(ImageFileError, match='ghost: not found'):
        HESPairedImageDataset(hes_options(opts, tmp_path, io_backend={'type': 'lmdb'}))


@pytest.mark.parametrize('change,message', [({'delta': 0}, 'delta must be in'), ({'switch_ratio': 1.5}, 'switch_ratio'),
                                            ({'gt_size': 30}, 'multiple of scale'),
                                            ({'patch_stride': 6}, 'patch_stride'),
                                            ({'projection': 'edge'}, 'projection must be one of')])
def test_bad_hes_options(hes_folder, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        HESPairedImageDataset(hes_options(hes_folder, tmp_path, **change))


# ---- the inspection tool ------------------------------------------------------------------------------
def test_inspect_tool_prints_classes_and_writes_pngs(hes_folder, tmp_path, capsys):
    import yaml
    opt_file = tmp_path / 'opt.yml'
    train = hes_options(hes_folder, tmp_path)
    train.pop('scale')
    opt_file.write_text(yaml.safe_dump({'scale': 4, 'datasets': {'train': train}}))
    assert hes_inspect.main(['-opt', str(opt_file), '--out', str(tmp_path / 'out'), '--per-class', '3']) == 0
    out = capsys.readouterr().out
    assert 'class  count' in out and 'mass after (delta=0.5)' in out
    for name in ('hes_scores.png', 'hes_classes.png'):
        img = cv2.imread(str(tmp_path / 'out' / name))
        assert img is not None and img.shape[0] > 100
    assert hes_inspect.main(['-opt', str(tmp_path / 'missing.yml')]) == 2


# ---- progress from any BasicSR model ------------------------------------------------------------------------
def srmodel_options(folders, tmp_path, total_iter=20):
    """What parse_options makes for BasicSR's own SRModel with MSRResNet on a HES dataset."""
    return {'name': 'plain', 'model_type': 'SRModel', 'scale': 4, 'num_gpu': 0, 'dist': False, 'rank': 0,
            'world_size': 1, 'is_train': True, 'manual_seed': 0,
            'datasets': {'train': hes_options(folders, tmp_path, switch_ratio=0.5)},
            'network_g': {'type': 'MSRResNet', 'num_feat': 8, 'num_block': 1},
            'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
            'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [50],
                                                                             'gamma': 0.5},
                      'total_iter': total_iter, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}}


@pytest.mark.filterwarnings('ignore:Detected call of .lr_scheduler.step')  # no optimizer step in these tests
def test_basicsr_srmodel_reports_progress_to_hes(hes_folder, tmp_path):
    from basicsr.models import build_model
    opt = srmodel_options(hes_folder, tmp_path)
    ds = build_dataset(opt['datasets']['train'])
    ds.set_progress(0, -1)  # as a fresh process: nothing reported yet
    model = build_model(opt)
    assert type(model).__name__ == 'SRModel' and ds._progress.tolist() == [0, 20]
    model.update_learning_rate(10)  # BasicSR's loop: the batch of iteration 10 is already loaded
    assert ds._progress.tolist() == [10, 20] and ds.current_phase() == CLASS_LEVEL  # iteration 11 on
    model.update_learning_rate(9, warmup_iter=-1)
    assert ds.current_phase() == SAMPLE_LEVEL  # iteration 10 is the last sample-level one
    state = {'epoch': 0, 'iter': 15, 'optimizers': [o.state_dict() for o in model.optimizers],
             'schedulers': [s.state_dict() for s in model.schedulers]}
    model.resume_training(state)
    assert ds._progress.tolist() == [15, 20]


@pytest.mark.filterwarnings('ignore:Detected call of .lr_scheduler.step')
def test_a_model_of_another_project_reports_progress(hes_folder, tmp_path):
    from basicsr.models.sr_model import SRModel

    class OtherProjectModel(SRModel):  # overrides what it needs and calls up, like HAT's or Real-ESRGAN's
        def update_learning_rate(self, current_iter, warmup_iter=-1):
            super().update_learning_rate(current_iter, warmup_iter)

    opt = srmodel_options(hes_folder, tmp_path, total_iter=8)
    ds = build_dataset(opt['datasets']['train'])
    model = OtherProjectModel(opt)
    assert ds._progress.tolist() == [0, 8]
    model.update_learning_rate(4)
    assert ds._progress.tolist() == [4, 8] and ds[0]['hes_phase'] == CLASS_LEVEL


def test_no_progress_is_reported_by_a_test_time_model(hes_folder, tmp_path):
    from basicsr.models import build_model
    ds = HESPairedImageDataset(hes_options(hes_folder, tmp_path))
    set_train_progress(3, 10)
    opt = dict(srmodel_options(hes_folder, tmp_path), is_train=False)
    build_model(opt)
    assert ds._progress.tolist() == [3, 10]


# ---- option keys and the log ------------------------------------------------------------------------------
@pytest.mark.parametrize('typo,hint', [('num_clases', "'num_clases' -> 'num_classes'"), ('detla', "'detla' -> 'delta'"),
                                       ('cache_image', "'cache_image' -> 'cache_images'")])
def test_misspelt_keys_are_refused_with_their_name(hes_folder, tmp_path, typo, hint):
    opt = hes_options(hes_folder, tmp_path, **{typo: 4})
    with pytest.raises(ValueError) as err:
        build_dataset(opt)
    message = str(err.value)
    assert message.startswith(f"dataset 'tiny' (HESPairedImageDataset): unknown option(s) ['{typo}'] (did you mean "
                              f'{hint}?); accepted: [')
    assert "'num_classes'" in message and "'dataroot_gt'" in message and "'batch_size_per_gpu'" in message
    assert not cache_files(tmp_path)  # refused before any work


def test_shipped_training_sets_use_only_accepted_keys():
    from basicsr.utils.options import ordered_yaml
    from conftest import REPO
    from wbsr_data.hes_dataset import check_option_keys
    files = sorted((REPO / 'options').glob('train_*.yml'))
    assert files
    for path in files:
        with open(path, encoding='utf-8') as f:
            train_set = yaml.load(f, Loader=ordered_yaml()[0])['datasets']['train']
        check_option_keys(dict(train_set, phase='train', scale=4))  # what parse_options adds


def test_log_counts_images_and_candidates_also_when_the_index_is_reused(hes_folder, tmp_path, basicsr_log):
    opt = hes_options(hes_folder, tmp_path)
    first = HESPairedImageDataset(opt)
    second = HESPairedImageDataset(opt)
    assert 'reusing' in basicsr_log.text
    line = f"HESPairedImageDataset 'tiny': 4 images, {len(first)} candidate patches"
    # crops of 32 at stride 16: 9 x 7 on 160x128 and 168x132, 10 x 7 on 176x136 and 184x140
    assert basicsr_log.text.count(line) == 2 and len(second) == len(first) == 63 + 63 + 70 + 70


# ---- the image cache ----------------------------------------------------------------------------------------
def samples(ds, seed, n=10):
    random.seed(seed)
    return [ds[i] for i in range(n)]


def assert_same_samples(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x['gt'], y['gt']) and torch.equal(x['lq'], y['lq'])
        assert Path(x['gt_path']).stem == Path(y['gt_path']).stem  # lmdb paths are keys: the file stem
        assert (x['hes_class'], x['hes_phase']) == (y['hes_class'], y['hes_phase'])


def test_image_cache_gives_the_samples_of_the_disk(hes_folder, tmp_path, basicsr_log):
    disk = HESPairedImageDataset(hes_options(hes_folder, tmp_path))
    cached = HESPairedImageDataset(hes_options(hes_folder, tmp_path, cache_images=True))
    gt_pixels = sum(cv2.imread(str(p)).size for p in Path(hes_folder['dataroot_gt']).glob('*.png'))
    lq_pixels = sum(cv2.imread(str(p)).size for p in Path(hes_folder['dataroot_lq']).glob('*.png'))
    assert cached.image_cache.dtype == np.uint8 and cached.image_cache.nbytes == gt_pixels + lq_pixels
    assert '4 images decoded into memory (0.3 MB as uint8)' in basicsr_log.text
    for progress in (0, 90):  # sample-level, then class-level draws
        set_train_progress(progress, 100)
        assert_same_samples(samples(disk, 3), samples(cached, 3))
    # in DataLoader workers too (forked: they read the parent's arrays)
    set_train_progress(0, 100)
    batches = [next(iter(DataLoader(ds, batch_size=4, num_workers=2, worker_init_fn=lambda i: random.seed(i))))
               for ds in (disk, cached)]
    assert torch.equal(batches[0]['gt'], batches[1]['gt']) and torch.equal(batches[0]['lq'], batches[1]['lq'])


def test_image_cache_cap_falls_back_to_disk_with_a_warning(hes_folder, tmp_path, basicsr_log):
    total_mb = 0.3  # the four images take 0.30 MB as uint8 (see above)
    ds = HESPairedImageDataset(hes_options(hes_folder, tmp_path, cache_images=True, cache_images_max_mb=0.1))
    assert ds.image_cache is None
    assert "dataset 'tiny': cache_images needs more than cache_images_max_mb=0.1" in basicsr_log.text
    assert 'reading the images from disk instead' in basicsr_log.text
    assert ds[0]['gt'].shape == (3, 32, 32)
    fits = HESPairedImageDataset(hes_options(hes_folder, tmp_path, cache_images=True, cache_images_max_mb=total_mb))
    assert fits.image_cache is not None and fits.image_cache.nbytes <= total_mb * 2**20
    with pytest.raises(ValueError, match='cache_images must be true or false'):
        HESPairedImageDataset(hes_options(hes_folder, tmp_path, cache_images='yes'))


def test_image_cache_with_lmdb_and_16_bit_images(hes_folder, tmp_path):
    img_path = Path(hes_folder['dataroot_gt']) / 'img001.png'  # one 16-bit GT: the cache must store uint16
    img16 = cv2.imread(str(img_path)).astype(np.uint16) * 256 + np.uint16(7)  # not exact in 8 bits
    cv2.imwrite(str(img_path), img16)
    lmdb_opts = lmdb_copy(hes_folder, tmp_path)
    disk = HESPairedImageDataset(hes_options(hes_folder, tmp_path))
    cached = HESPairedImageDataset(hes_options(lmdb_opts, tmp_path, io_backend={'type': 'lmdb'}, cache_images=True))
    assert cached.image_cache.dtype == np.uint16
    for progress in (0, 90):
        set_train_progress(progress, 100)
        assert_same_samples(samples(disk, 5, n=len(disk)), samples(cached, 5, n=len(disk)))


def test_color_y_as_paired_image_dataset(hes_folder, tmp_path):
    rgb = HESPairedImageDataset(hes_options(hes_folder, tmp_path, use_hflip=False, use_rot=False))
    y = HESPairedImageDataset(hes_options(hes_folder, tmp_path, use_hflip=False, use_rot=False, color='y'))
    set_train_progress(0, 100)
    a, b = rgb[5], y[5]
    assert b['gt'].shape == (1, 32, 32) and b['lq'].shape == (1, 8, 8)
    r, g, bl = a['gt'][0], a['gt'][1], a['gt'][2]  # BT.601 luma in [16, 235] / 255
    expected = (16. + 65.481 * r + 128.553 * g + 24.966 * bl) / 255.
    torch.testing.assert_close(b['gt'][0], expected, atol=1e-5, rtol=0)
