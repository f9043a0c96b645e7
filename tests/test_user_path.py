"""The README's user path: datasets in the documented layout, the shipped option files unchanged.

A working directory is laid out as "Preparing datasets" in the README says (DIV2K sub-images as BasicSR's
``extract_subimages.py`` names them, test sets and the 291-image pool as ``wbsr-make-lr`` writes them, the
reference checkpoint in ``experiments/pretrained_models/``), filled with a few small synthetic images. Every
shipped training file then trains for 2 iterations through ``python -m basicsr.train`` with only sizes
overridden (``--force_yml``), never a path; the shipped test file runs from this clone's layout and from a
BasicSR checkout's (``python basicsr/test.py -opt <clone>/options/...``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import wbsr_hook
from basicsr.utils.registry import ARCH_REGISTRY
from wbsr_arch import SupernetMixin
from wbsr_data.make_lr import bicubic_lr, make_dataset

from conftest import REPO, textured_image
from test_registration import needs_hook

OPTIONS = REPO / 'options'
TRAIN_FILES = sorted(p.name for p in OPTIONS.glob('train_*.yml'))
TEST_FILE = 'test_wbsr_srresnet_x4.yml'
CHECKPOINT = REPO / 'checkpoints' / 'wbsr_srresnet_x4_train291.pth'
TEST_SETS = ('Set5', 'Set14', 'B100', 'Urban100')
DIV2K_SUBIMAGES = 3  # HR sub-images of 96 px (BasicSR's are 480), so x4 LR ones are 24 px
TRAIN291_IMAGES = 3

# Network sizes that keep a training step in milliseconds; everything else in the files is left as shipped.
#: ``--force_yml`` sizes of a tiny network per architecture: every registered WBSR supernet's own tiny
#: configuration (its contract), and BasicSR's MSRResNet for the plain-baseline file.
TINY_NETWORKS = {cls.__name__: [f'{key}={value}' for key, value in cls.tiny_options().items()]
                 for name, cls in ARCH_REGISTRY if name.startswith('WBSR') and isinstance(cls, type)
                 and issubclass(cls, SupernetMixin)}
TINY_NETWORKS['MSRResNet'] = ['num_feat=8', 'num_block=2']


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path


def build_documented_layout(work: Path) -> None:
    """``work/datasets`` and ``work/experiments/pretrained_models`` as the README's preparation steps leave them."""
    datasets = work / 'datasets'
    # DIV2K after BasicSR's extract_subimages.py: <image>_s<index>.png in DIV2K_train_HR_sub and
    # DIV2K_train_LR_bicubic/X{s}_sub (the 'x4' of the official LR file names is dropped by the script).
    for i in range(DIV2K_SUBIMAGES):
        hr = textured_image(96, 96, seed=10 + i)
        name = f'0001_s{i + 1:03d}.png'
        write_png(datasets / 'DIV2K' / 'DIV2K_train_HR_sub' / name, hr)
        for scale in (2, 4):
            write_png(datasets / 'DIV2K' / 'DIV2K_train_LR_bicubic' / f'X{scale}_sub' / name,
                      bicubic_lr(hr.astype(np.float64) / 255., scale))
    # test sets and the 291-image pool: HR images made into <set>/HR and <set>/LR_bicubic/X{2,4} by wbsr-make-lr
    sources = work / 'downloads'
    for n, name in enumerate((*TEST_SETS, 'train291')):
        count = TRAIN291_IMAGES if name == 'train291' else 1
        for i in range(count):
            write_png(sources / name / f'img{i:03d}.png', textured_image(96 + 8 * i, 88, seed=20 + 5 * n + i))
        counts = make_dataset([str(sources / name)], str(datasets / name), [2, 4], quiet=True)
        assert counts == {'written': count, 'skipped': 0}
    pretrained = work / 'experiments' / 'pretrained_models'
    pretrained.mkdir(parents=True)
    shutil.copy(CHECKPOINT, pretrained / CHECKPOINT.name)


def clone_like(work: Path) -> Path:
    """This clone's root: its options/ and checkpoints/ (linked), where the datasets are made."""
    work.mkdir(parents=True)
    for name in ('options', 'checkpoints'):
        (work / name).symlink_to(REPO / name, target_is_directory=True)
    return work


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != wbsr_hook.ENV_DISABLE}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def load(path: Path) -> dict:
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def size_overrides(opt_file: Path, cache: Path) -> list[str]:
    """``--force_yml`` entries for a 2-iteration CPU run of a shipped training file: sizes only, no path."""
    opt = load(opt_file)
    network = opt['network_g']['type']
    entries = [f'network_g:{entry}' for entry in TINY_NETWORKS[network]]
    entries += ['num_gpu=0', 'train:total_iter=2', 'val:val_freq=2', 'logger:print_freq=1',
                'logger:save_checkpoint_freq=2', 'logger:use_tb_logger=false',
                'datasets:train:gt_size=32', 'datasets:train:patch_stride=16', 'datasets:train:batch_size_per_gpu=2',
                'datasets:train:num_worker_per_gpu=0', 'datasets:train:persistent_workers=false',
                f'datasets:train:index_cache={cache}']
    if opt['train']['pixel_opt']['type'] == 'BDLoss':
        entries.append('train:pixel_opt:gmm_pixels=5000')
    return entries


def basicsr_checkout_like(root: Path, clone_work: Path) -> Path:
    """A BasicSR checkout's root as the README's "from a BasicSR checkout" sets it up.

    ``basicsr/test.py`` is BasicSR's own (copied from the installed package: run as a script it takes its
    folder's parent as root, as in a checkout); ``datasets`` is linked as BasicSR's guide advises; the
    reference checkpoint is copied into ``experiments/pretrained_models/`` as any BasicSR pretrained model.
    """
    import basicsr
    (root / 'basicsr').mkdir(parents=True)
    shutil.copy(Path(basicsr.__file__).with_name('test.py'), root / 'basicsr' / 'test.py')
    (root / 'datasets').symlink_to(clone_work / 'datasets', target_is_directory=True)
    (root / 'experiments' / 'pretrained_models').mkdir(parents=True)
    shutil.copy(CHECKPOINT, root / 'experiments' / 'pretrained_models' / CHECKPOINT.name)
    return root


def training_command(name: str, cache: Path) -> list[str]:
    return ['-m', 'basicsr.train', '-opt', f'options/{name}', '--force_yml', *size_overrides(OPTIONS / name, cache)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict:
    """Every command of this module, run concurrently (each is mostly the import of torch and BasicSR)."""
    base = tmp_path_factory.mktemp('user_path')
    clone = clone_like(base / 'wbsr')
    build_documented_layout(clone)
    checkout = basicsr_checkout_like(base / 'BasicSR', clone)
    jobs = {name: (training_command(name, base / 'hes_cache' / name), clone) for name in TRAIN_FILES}
    jobs['test from this clone'] = (['-m', 'basicsr.test', '-opt', f'options/{TEST_FILE}'], clone)
    jobs['test from a BasicSR checkout'] = (['basicsr/test.py', '-opt', str(OPTIONS / TEST_FILE)], checkout)
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        futures = {key: pool.submit(run, args, cwd) for key, (args, cwd) in jobs.items()}
        done = {key: future.result() for key, future in futures.items()}
    return {'clone': clone, 'checkout': checkout, **done}


@pytest.mark.parametrize('path', sorted(OPTIONS.glob('*.yml')), ids=lambda p: p.name)
def test_option_files_read_only_the_documented_folders(path):
    """Relative paths resolve in any working directory laid out as the README says: datasets/ and experiments/."""
    opt = load(path)
    paths = [dataset[key] for dataset in opt['datasets'].values() for key in ('dataroot_gt', 'dataroot_lq')]
    paths.append(opt['path'].get('pretrain_network_g'))
    for value in filter(None, paths):
        assert value.split('/')[0] in ('datasets', 'experiments'), f'{path.name}: {value}'


@needs_hook
@pytest.mark.parametrize('name', TRAIN_FILES)
def test_shipped_training_file_runs_on_the_documented_layout(runs, name):
    done = runs[name]
    assert done.returncode == 0, done.stderr[-3000:]
    opt = load(OPTIONS / name)
    exp = runs['clone'] / 'experiments' / opt['name']
    log = next(exp.glob('train_*.log')).read_text()
    train_set = opt['datasets']['train']
    images = DIV2K_SUBIMAGES if train_set['name'] == 'DIV2K' else TRAIN291_IMAGES
    assert f"Dataset [HESPairedImageDataset] - {train_set['name']} is built." in log
    assert re.search(rf'HES index: \d+ candidates from {images} images', log), log[-3000:]
    assert f"Network [{opt['network_g']['type']}] is created." in log
    assert 'iter:       2,' in log
    # validation at iteration 2 on Set5, found where wbsr-make-lr writes it
    assert re.search(r'Validation Set5\n\t # psnr: \d+\.\d+', log), log[-3000:]
    assert (exp / 'models' / 'net_g_latest.pth').is_file()
    assert not Path(sysconfig.get_paths()['purelib'], 'experiments', opt['name']).exists()


@needs_hook
@pytest.mark.parametrize('where', ['this clone', 'a BasicSR checkout'])
def test_shipped_test_file_loads_the_reference_checkpoint(runs, where):
    """The README's test command, from both documented working directories, with no override."""
    done = runs[f'test from {where}']
    assert done.returncode == 0, done.stderr[-3000:]
    opt = load(OPTIONS / TEST_FILE)
    results = runs['clone' if where == 'this clone' else 'checkout'] / 'results' / opt['name']
    log = next(results.glob('test_*.log')).read_text()
    assert (f"Loading WBSRSRResNet model from {opt['path']['pretrain_network_g']}, with param key: [params]."
            in log), log[-3000:]
    # the file gives no mode: the checkpoint's stored default routing runs, and the log says which
    assert ("val.routing.mode not given: routing learned (slope 0.00398, level classes), the checkpoint's default"
            in log), log[-3000:]
    assert '# subnet_share (learned, tiles)' in log
    for name in TEST_SETS:
        assert re.search(rf'Validation {name}\n\t # psnr: \d+\.\d+', log), log[-3000:]
        sr = cv2.imread(str(results / 'visualization' / name / f"img000_{opt['name']}.png"))
        assert sr.shape == (96, 88, 3)  # the HR size: the full x4 output of the 24x22 LR image
