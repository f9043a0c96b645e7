"""Seconds per LR pixel of every subnet on this device: the ``cost: seconds`` prices of the ``learned`` mode.

On a CPU, narrow subnets do fewer FLOPs per second than the full network (README, wall time), so a budget in
FLOPs is not a budget in time. :func:`time_table` measures each subnet once per device, network and tile size,
in the seamless tile scheme on a 4 x 4-tile image with every tile on that subnet (warmed, median of
``repeats``), together with the error predictor, and caches the table as JSON in ``$WBSR_CACHE_DIR/timing`` (or
``~/.cache/wbsr/timing``), keyed by the device, the CPU, the number of threads, torch's version and the network's
structure. A region's price is its area times its subnet's seconds per pixel.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from wbsr_data.fileio import atomic_path

TIMING_FORMAT = 1
#: Tiles per side of the timed image.
TILES = 4


@dataclass(frozen=True)
class TimeTable:
    """Seconds per LR pixel of every subnet (ascending FLOPs order) and of the error predictor, on one device."""

    subnet_seconds: tuple[float, ...]
    predictor_seconds: float
    key: str

    def region_seconds(self, area: np.ndarray) -> np.ndarray:
        """``(n, M)`` seconds of every subnet on regions of ``area`` LR pixels."""
        return np.outer(np.asarray(area, dtype=np.float64), self.subnet_seconds)


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(net: torch.nn.Module, predictor: Optional[torch.nn.Module], tile_size: int) -> str:
    """What a table depends on: device, CPU or GPU name, threads, torch version, the networks' structure, tile size."""
    param = next(net.parameters())
    device = param.device
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else _cpu_name()
    structure = [type(net).__name__, getattr(net, 'subnets', None), getattr(net, 'upscale', None), str(param.dtype),
                 {k: tuple(v.shape) for k, v in net.state_dict().items()}]
    if predictor is not None:
        structure.append({k: tuple(v.shape) for k, v in predictor.state_dict().items()})
    text = json.dumps([device.type, name, torch.get_num_threads(), torch.__version__, tile_size,
                       os.environ.get('ATEN_CPU_CAPABILITY', ''), repr(structure)], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_dir() -> str:
    root = os.environ.get('WBSR_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'wbsr')
    return os.path.join(root, 'timing')


def _seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(max(1, repeats)):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(net: torch.nn.Module, predictor: Optional[torch.nn.Module], tile_size: int, repeats: int = 3) -> TimeTable:
    """Time every subnet (and the predictor) on this device, now."""
    param = next(net.parameters())
    side = TILES * tile_size
    x = torch.rand(1, int(getattr(net, 'num_in_ch', 3)), side, side, device=param.device, dtype=param.dtype)
    pixels = side * side
    seconds = []
    for m in range(int(net.num_subnets)):
        assign = np.full((TILES, TILES), m)
        seconds.append(_seconds(lambda: net.forward_tiles(x, assign, tile_size=tile_size), repeats, param.device)
                       / pixels)
    boxes = np.array([(t, lf, tile_size, tile_size) for t in range(0, side, tile_size)
                      for lf in range(0, side, tile_size)])
    predictor_seconds = 0.0
    if predictor is not None:
        predictor_seconds = _seconds(lambda: predictor.predict(x, boxes), repeats, param.device) / pixels
    return TimeTable(tuple(seconds), predictor_seconds, device_key(net, predictor, tile_size))


def time_table(net: torch.nn.Module, predictor: Optional[torch.nn.Module], tile_size: int,
               refresh: bool = False) -> TimeTable:
    """The cached table for this device and network, measured (about a second per subnet) when there is none."""
    key = device_key(net, predictor, tile_size)
    path = os.path.join(cache_dir(), f'{key}.json')
    if not refresh and os.path.isfile(path):
        try:
            with open(path, encoding='utf-8') as f:
                data = json.load(f)
            seconds = tuple(float(v) for v in data['subnet_seconds'])
            predictor_seconds = float(data['predictor_seconds'])
            if (data.get('format') == TIMING_FORMAT and len(seconds) == int(net.num_subnets) and
                    all(np.isfinite(seconds)) and min(seconds) > 0 and np.isfinite(predictor_seconds)):
                return TimeTable(seconds, predictor_seconds, key)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache is measured again and replaced
    table = measure(net, predictor, tile_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump({'format': TIMING_FORMAT, 'subnet_seconds': list(table.subnet_seconds),
                       'predictor_seconds': table.predictor_seconds, 'tile_size': tile_size}, f)
    return table
