"""Shared test helpers: small real-looking images made on the fly, and the optional benchmark data."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
import torch

import wbsr_arch  # noqa: F401  (registers every WBSR type in BasicSR)

torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS') or 0) or max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get('WBSR_SHARED_DATA', REPO.parent / 'shared' / 'data'))
#: ``WBSR_GPU_TESTS_ON_CPU=1`` runs the ``gpu`` tests with the CPU standing in for the CUDA device (the GPU run's
#: dry run does, so that everything in them but CUDA itself is exercised where there is no GPU).
GPU_TESTS_ON_CPU = os.environ.get('WBSR_GPU_TESTS_ON_CPU') == '1'


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where there is no CUDA device (unless WBSR_GPU_TESTS_ON_CPU=1)."""
    if torch.cuda.is_available() or GPU_TESTS_ON_CPU:
        return
    skip = pytest.mark.skip(reason='needs a CUDA device (WBSR_GPU_TESTS_ON_CPU=1 runs it on the CPU instead)')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpu_device() -> torch.device:
    """The device of the ``gpu`` tests: CUDA, or the CPU under WBSR_GPU_TESTS_ON_CPU=1 where there is no GPU."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


@pytest.fixture
def exact_float32():
    """TF32 off for the test (cuDNN convolutions and matrix products), so CUDA results compare with the CPU's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


#: Relative tolerance of the algebraic equivalence checks (tiles vs the whole image, stores vs maps, an exported subnet
#: vs the supernet, tiled vs whole-image gradients). They run in float64, where two summation orders of these small
#: networks agree to about 1e-15 of the largest value; 1e-10 leaves five orders of magnitude for that and still fails
#: for any real difference (a missing halo exchange moves outputs by about 1e-1). In float32 the same comparisons
#: differ between CPUs' kernels (``ATEN_CPU_CAPABILITY``, oneDNN's ISA): up to 2.5e-3 relative in a gradient.
EXACT_RTOL = 1e-10


def assert_equivalent(got: torch.Tensor, expected: torch.Tensor, rtol: float = EXACT_RTOL) -> None:
    """``got`` equals ``expected`` up to float64 rounding, relative to the largest magnitude of ``expected``."""
    assert got.dtype == expected.dtype == torch.float64, f'equivalence is checked in float64, got {got.dtype}'
    assert got.shape == expected.shape, (tuple(got.shape), tuple(expected.shape))
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    assert diff <= rtol * scale, f'largest difference {diff:.3g} above {rtol:g} x {scale:.3g}'


def textured_image(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """uint8 image with flat regions, edges and noise, so patches span easy to hard."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.3 * np.sin(xx / (4 + seed % 5)) * (xx > w / 2)  # texture on the right half only
    base = base + 0.2 * (yy > h / 3)  # one horizontal edge
    img = base[..., None] + rng.normal(0, 0.02, (h, w, channels)) * (xx[..., None] > w / 2)
    img = img + rng.uniform(-0.1, 0.1, (1, 1, channels))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8).squeeze()


def write_pair_folder(root: Path, n: int = 3, size: tuple[int, int] = (96, 80), scale: int = 4,
                      seed: int = 0) -> dict[str, str]:
    """Write ``n`` GT images and their bicubic LR (OpenCV) under ``root/{HR,LR}``; return the two folders."""
    gt_dir, lq_dir = root / 'HR', root / 'LR'
    gt_dir.mkdir(parents=True, exist_ok=True)
    lq_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = size[0] + 8 * i, size[1] + 4 * i
        h, w = h - h % scale, w - w % scale
        gt = textured_image(h, w, seed + i)
        lq = cv2.resize(gt, (w // scale, h // scale), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(gt_dir / f'img{i:03d}.png'), gt)
        cv2.imwrite(str(lq_dir / f'img{i:03d}.png'), lq)
    return {'dataroot_gt': str(gt_dir), 'dataroot_lq': str(lq_dir)}


@pytest.fixture
def pair_folder(tmp_path):
    return write_pair_folder(tmp_path / 'pairs')


@pytest.fixture
def shared_data() -> Path:
    """The real benchmark images beside the checkout; tests using them skip where they are absent."""
    if not (SHARED_DATA / 'train').is_dir():
        pytest.skip(f'benchmark data not found at {SHARED_DATA} (set WBSR_SHARED_DATA to use it)')
    return SHARED_DATA


def model_options(root: Path, data: dict, *, network: Optional[dict] = None, pixel_opt: Optional[dict] = None,
                  total_iter: int = 10, is_train: bool = True, name: str = 'tiny', **train_extra) -> dict:
    """An option dict as ``basicsr.utils.options.parse_options`` makes it, for a tiny WBSRModel run on CPU."""
    exp = root / 'experiments' / name
    for sub in ('models', 'training_states', 'visualization'):
        (exp / sub).mkdir(parents=True, exist_ok=True)
    train_set = {'name': 'tiny', 'type': 'HESPairedImageDataset', 'phase': 'train', 'scale': 4, **data,
                 'io_backend': {'type': 'disk'}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True,
                 'index_cache': str(root / 'cache'), 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 4}
    return {
        'name': name, 'model_type': 'WBSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0, 'dist': False,
        'rank': 0, 'world_size': 1, 'is_train': is_train, 'auto_resume': False,
        'datasets': {'train': train_set,
                     'val': {'name': 'tinyval', 'type': 'PairedImageDataset', 'phase': 'val', 'scale': 4, **data,
                             'io_backend': {'type': 'disk'}}},
        'network_g': network or {'type': 'WBSRSRResNet', 'num_feat': 16, 'num_block': 4, 'widths': [8, 12, 16],
                                 'depths': [1, 2, 4]},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None,
                 'experiments_root': str(exp), 'models': str(exp / 'models'),
                 'training_states': str(exp / 'training_states'), 'log': str(exp),
                 'visualization': str(exp / 'visualization')},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3, 'weight_decay': 0, 'betas': [0.9, 0.99]},
                  'scheduler': {'type': 'CosineAnnealingRestartLR', 'periods': [total_iter], 'restart_weights': [1],
                                'eta_min': 1e-7},
                  'total_iter': total_iter, 'warmup_iter': -1,
                  'pixel_opt': pixel_opt or {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}, **train_extra},
        'val': {'val_freq': 5, 'save_img': False, 'routing': {'mode': 'wbsr'},
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 5, 'use_tb_logger': False},
    }


class LogText:
    """What BasicSR's logger printed during a test (it does not propagate, so caplog cannot see it)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def basicsr_log():
    logger = logging.getLogger('basicsr')
    record = LogText()
    handler = logging.StreamHandler(record.stream)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield record
    logger.removeHandler(handler)
    logger.setLevel(old_level)
