"""WBSREDSR through BasicSR's own runners with its shipped option files.

A working directory laid out as the README says (DIV2K sub-images, test sets made by ``wbsr-make-lr``), filled with
a few small synthetic images; ``options/train_wbsr_edsr_x4.yml`` trains for 2 iterations through ``python -m
basicsr.train`` with only sizes overridden (the network at :meth:`WBSREDSR.tiny_options`), then
``options/test_wbsr_edsr_x4.yml`` routes the four test sets through ``python -m basicsr.test`` with the weights
the training wrote, where the test file expects them.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import wbsr_hook
from basicsr.archs.edsr_arch import EDSR
from wbsr_arch import WBSREDSR
from wbsr_data.make_lr import bicubic_lr, make_dataset

from conftest import REPO, textured_image
from test_registration import needs_hook

TRAIN_FILE, TEST_FILE = 'train_wbsr_edsr_x4.yml', 'test_wbsr_edsr_x4.yml'
TEST_SETS = ('Set5', 'Set14', 'B100', 'Urban100')
NETWORK = {key: value for key, value in WBSREDSR.tiny_options().items() if key != 'res_scale'}


def force(prefix: str, options: dict) -> list[str]:
    """``--force_yml`` entries setting ``options`` under ``prefix``."""
    return [f'{prefix}:{key}={str(value).replace(" ", "")}' for key, value in options.items()]


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != wbsr_hook.ENV_DISABLE}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def edsr_runs(tmp_path_factory):
    """The training run, then (if it succeeded) the test run, in one working directory."""
    work = tmp_path_factory.mktemp('edsr')
    (work / 'options').symlink_to(REPO / 'options', target_is_directory=True)
    datasets = work / 'datasets'
    for i in range(3):  # DIV2K after BasicSR's extract_subimages.py
        hr = textured_image(96, 96, seed=30 + i)
        name = f'0001_s{i + 1:03d}.png'
        write_png(datasets / 'DIV2K' / 'DIV2K_train_HR_sub' / name, hr)
        write_png(datasets / 'DIV2K' / 'DIV2K_train_LR_bicubic' / 'X4_sub' / name,
                  bicubic_lr(hr.astype(np.float64) / 255., 4))
    for n, name in enumerate(TEST_SETS):
        write_png(work / 'downloads' / name / 'img000.png', textured_image(96, 88, seed=40 + n))
        assert make_dataset([str(work / 'downloads' / name)], str(datasets / name), [4], quiet=True)['written'] == 1
    train = run(['-m', 'basicsr.train', '-opt', f'options/{TRAIN_FILE}', '--force_yml', *force('network_g', NETWORK),
                 'num_gpu=0', 'train:total_iter=2', 'val:val_freq=2', 'logger:print_freq=1',
                 'logger:save_checkpoint_freq=2', 'logger:use_tb_logger=false', 'datasets:train:gt_size=32',
                 'datasets:train:patch_stride=16', 'datasets:train:batch_size_per_gpu=2',
                 'datasets:train:num_worker_per_gpu=0', 'datasets:train:persistent_workers=false',
                 f'datasets:train:index_cache={work / "cache"}', 'train:pixel_opt:gmm_pixels=5000'], work)
    test = None
    if train.returncode == 0:
        test = run(['-m', 'basicsr.test', '-opt', f'options/{TEST_FILE}', '--force_yml', 'num_gpu=0',
                    *force('network_g', NETWORK)], work)
    return work, train, test


def load(name: str) -> dict:
    with open(REPO / 'options' / name, encoding='utf-8') as f:
        return yaml.safe_load(f)


def test_shipped_edsr_files_describe_basicsrs_edsr_and_the_paper_grid():
    for name in (TRAIN_FILE, TEST_FILE):
        network = load(name)['network_g']
        assert network == {'type': 'WBSREDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16,
                           'upscale': 4, 'res_scale': 1, 'img_range': 255.0,
                           'rgb_mean': [0.4488, 0.4371, 0.4040], 'widths': [36, 52, 64], 'depths': [4, 8, 16]}
        net = WBSREDSR(**{k: v for k, v in network.items() if k != 'type'})
        assert net.state_dict().keys() == EDSR(3, 3).state_dict().keys()
    assert load(TEST_FILE)['path']['pretrain_network_g'] == \
        f"experiments/{load(TRAIN_FILE)['name']}/models/net_g_latest.pth"


@needs_hook
def test_edsr_trains_through_basicsr_train_with_the_shipped_file(edsr_runs):
    work, train, _ = edsr_runs
    assert train.returncode == 0, train.stderr[-3000:]
    exp = work / 'experiments' / load(TRAIN_FILE)['name']
    log = next(exp.glob('train_*.log')).read_text()
    assert 'Network [WBSREDSR] is created.' in log and 'Model [WBSRModel] is created.' in log
    assert re.search(r'HES index: \d+ candidates from 3 images', log), log[-3000:]
    assert 'iter:       2,' in log
    assert re.search(r'Validation Set5\n\t # psnr: \d+\.\d+', log), log[-3000:]
    # the weights it saved are a plain BasicSR EDSR's
    params = torch.load(exp / 'models' / 'net_g_latest.pth', map_location='cpu', weights_only=True)['params']
    EDSR(3, 3, num_feat=NETWORK['num_feat'], num_block=NETWORK['num_block']).load_state_dict(params, strict=True)


@needs_hook
def test_edsr_tests_through_basicsr_test_with_routing(edsr_runs):
    work, train, test = edsr_runs
    assert train.returncode == 0, train.stderr[-3000:]
    assert test.returncode == 0, test.stderr[-3000:]
    opt = load(TEST_FILE)
    results = work / 'results' / opt['name']
    log = next(results.glob('test_*.log')).read_text()
    assert f"Loading WBSREDSR model from {opt['path']['pretrain_network_g']}" in log, log[-3000:]
    for name in TEST_SETS:  # Eq. 15 routing, its cost logged beside the metrics
        assert re.search(rf'Validation {name}\n\t # psnr: \d+\.\d+', log), log[-3000:]
        assert re.search(rf'Routing {name}\n\t # gflops: \d+\.\d+\n\t # flops_vs_full_image: \d+\.\d+%\n'
                         r'.*\n\t # subnet_share \(wbsr, tiles\): ', log), log[-3000:]
        sr = cv2.imread(str(results / 'visualization' / name / f"img000_{opt['name']}.png"))
        assert sr.shape == (96, 88, 3)  # the HR size: the full x4 output of the 24x22 LR image
