"""Evaluating a router on a test set the way published SR tables are made (spec section 9), and timing it.

PSNR and SSIM are BasicSR's ``calculate_psnr`` / ``calculate_ssim`` on the Y channel with
``crop_border = scale``; FLOPs come from the router's accounting. Wall times that are compared across
modes come from :func:`time_modes`, which times every mode under the same conditions.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np
import torch

from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img

from wbsr_data.pairs import read_image_file

from .router import Router, RoutingResult


@dataclass
class TestImage:
    name: str
    lq: torch.Tensor  # (1, 3, h, w) RGB in [0, 1]
    gt: np.ndarray  # uint8 BGR HxWx3


def gt_tensor(image: TestImage) -> torch.Tensor:
    """The HR image of ``image`` as a ``(1, 3, H, W)`` RGB tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.gt[..., ::-1].transpose(2, 0, 1))).float()[None] / 255.


def read_rgb_tensor(path: str) -> torch.Tensor:
    """An image file as a (1, 3, H, W) RGB float tensor in [0, 1] (gray and RGBA converted)."""
    img = read_image_file(path)
    return torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).unsqueeze(0)


def load_test_set(folder: str, scale: int, device: str = 'cpu', limit: Optional[int] = None) -> list[TestImage]:
    """``folder/HR`` and ``folder/LR_bicubic/X{scale}`` as written by ``wbsr-make-lr``."""
    hr_dir, lr_dir = os.path.join(folder, 'HR'), os.path.join(folder, 'LR_bicubic', f'X{scale}')
    names = sorted(os.listdir(hr_dir))[:limit]
    if not names:
        raise ValueError(f'no images in {hr_dir}')
    images = []
    for name in names:
        gt = (read_image_file(os.path.join(hr_dir, name)) * 255.).round().astype(np.uint8)
        lq = read_rgb_tensor(os.path.join(lr_dir, name)).to(device)
        images.append(TestImage(name=name, lq=lq, gt=gt[:lq.shape[2] * scale, :lq.shape[3] * scale]))
    return images


def keep_freed_memory(largest_block: int = 1 << 30) -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the system.

    By default glibc gives every freed block above its mmap threshold (at most 32 MB) back to the system, so
    the next image pays again for the page faults of fresh memory: here about a quarter of a whole-image pass of
    the x4 SRResNet on a 256x170 LR image, on every mode alike. Blocks up to ``largest_block`` bytes are then
    kept; larger ones still go back. The benchmarks and the demo (small images, timed) keep every block up to
    1 GB; ``wbsr-infer`` keeps blocks up to 32 MB, because on large images keeping everything raises the peak
    (a 1024x1024 LR image with the reference checkpoint: 4278 MB with 1 GB, 2748 MB with 32 MB, 2402 MB with
    glibc's default). It affects the whole process; it returns False where the allocator is not glibc's.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(bool(mallopt(option, value)) for option, value in
               ((m_mmap_threshold, int(largest_block)), (m_trim_threshold, 1 << 33), (m_top_pad, 1 << 28)))


def run_timed(router: Router, lq: torch.Tensor, repeats: int = 1, **kwargs) -> tuple[RoutingResult, float]:
    """The router's result on ``lq`` and the median wall time of ``repeats`` runs."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = router(lq, **kwargs)
        if lq.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def time_modes(modes: Mapping[str, tuple[Router, Optional[Callable[[TestImage], Callable]]]],
               images: Sequence[TestImage], repeats: int = 3, progress: Optional[Callable[[], None]] = None
               ) -> dict[str, float]:
    """Seconds per image of every mode, measured under the same conditions.

    ``modes`` maps a label to ``(router, assign_for)`` (``assign_for(image)`` gives a per-image ``assign``, or is
    None). On each image every mode first runs once untimed, so that no mode pays for the first use of the
    image's shapes (convolution set-up, memory); then the modes run in turn, ``repeats`` times, in an order
    rotated from one repeat to the next, so that none is always first or last. A mode's time on an image is
    the median of its repeats; its figure is the mean over the images. ``progress()`` is called after each image.
    """
    labels = list(modes)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for image in images:
        runs = {label: (router, {'assign': assign_for(image)} if assign_for else {})
                for label, (router, assign_for) in modes.items()}
        for router, kwargs in runs.values():
            router(image.lq, **kwargs)
        per_image: dict[str, list[float]] = {label: [] for label in labels}
        for r in range(max(1, repeats)):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                router, kwargs = runs[label]
                per_image[label].append(run_timed(router, image.lq, 1, **kwargs)[1])
        for label in labels:
            times[label].append(statistics.median(per_image[label]))
        if progress is not None:
            progress()
    return {label: float(np.mean(values)) for label, values in times.items()}


def bicubic_summary(images: Iterable[TestImage], scale: int) -> dict:
    """PSNR-Y / SSIM-Y of OpenCV bicubic upsampling: the floor every table row should clear."""
    psnr, ssim = [], []
    for image in images:
        lr = tensor2img([image.lq[0].cpu()])
        up = cv2.resize(lr, (lr.shape[1] * scale, lr.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
        psnr.append(calculate_psnr(up, image.gt, crop_border=scale, test_y_channel=True))
        ssim.append(calculate_ssim(up, image.gt, crop_border=scale, test_y_channel=True))
    return {'psnr': float(np.mean(psnr)), 'ssim': float(np.mean(ssim))}


def evaluate(router: Router, images: Iterable[TestImage], repeats: int = 1,
             on_image: Optional[Callable[[TestImage, RoutingResult, np.ndarray], None]] = None,
             assign_for: Optional[Callable[[TestImage], Callable]] = None) -> dict:
    """Mean PSNR-Y, SSIM-Y, GFLOPs, both FLOPs ratios, seconds and subnet shares over ``images``.

    ``on_image(image, result, sr_uint8)`` is called for every image (to save outputs or maps);
    ``assign_for(image)`` may return a per-image subnet assignment (the benchmark's oracle).
    """
    rows = []
    for image in images:
        kwargs = {'assign': assign_for(image)} if assign_for else {}
        result, seconds = run_timed(router, image.lq, repeats, **kwargs)
        sr = tensor2img([result.output[0].detach().cpu()])
        scale = router.scale
        rows.append({'psnr': calculate_psnr(sr, image.gt, crop_border=scale, test_y_channel=True),
                     'ssim': calculate_ssim(sr, image.gt, crop_border=scale, test_y_channel=True),
                     'gflops': result.flops / 1e9, 'ratio_regions': result.ratio_regions,
                     'ratio_whole': result.ratio_whole, 'seconds': seconds, 'shares': result.shares(),
                     **{k: float(v) for k, v in result.extra.items() if isinstance(v, (int, float))}})
        if on_image is not None:
            on_image(image, result, sr)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != 'shares'}
    if 'predicted_loss_db' in rows[0]:  # a quality target: how far the predicted losses spread over the images
        summary['predicted_loss_db_sd'] = float(np.std([r['predicted_loss_db'] for r in rows]))
    summary['shares'] = np.mean([r['shares'] for r in rows], axis=0).tolist()
    summary['images'] = len(rows)
    return summary
