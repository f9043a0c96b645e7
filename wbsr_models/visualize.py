"""Subnet allocation maps (the paper's Figure 3): the LR image tinted by the subnet of each region."""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

from .router import RoutingResult


def subnet_colors(num_subnets: int) -> np.ndarray:
    """BGR uint8 colours from green (smallest) through yellow to red (largest)."""
    from matplotlib import colormaps  # here, not at import: registering the plugin must not load matplotlib
    rgb = colormaps['RdYlGn_r'](np.linspace(0.05, 0.95, max(1, num_subnets)))[:, :3]
    return (rgb[:, ::-1] * 255).round().astype(np.uint8)


def allocation_map(lq_bgr: np.ndarray, result: RoutingResult, labels: Optional[Sequence[str]] = None,
                   min_side: int = 384) -> np.ndarray:
    """Render the allocation of ``result`` over the LR image ``lq_bgr`` (uint8 HxWx3), with a legend.

    Each region paints its box (overlapping patches later in raster order overwrite earlier ones); the
    image is enlarged by an integer factor to at least ``min_side`` pixels on its short side.
    """
    h, w = lq_bgr.shape[:2]
    colors = subnet_colors(result.num_subnets)
    paint = np.zeros((h, w, 3), np.uint8)
    for (top, left, bh, bw), subnet in zip(result.boxes.tolist(), result.subnets.tolist()):
        paint[top:top + bh, left:left + bw] = colors[subnet]
    gray = cv2.cvtColor(cv2.cvtColor(lq_bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    tinted = cv2.addWeighted(gray, 0.45, paint, 0.55, 0)
    factor = max(1, -(-min_side // max(1, min(h, w))))
    tinted = cv2.resize(tinted, (w * factor, h * factor), interpolation=cv2.INTER_NEAREST)
    shares = result.shares()
    labels = list(labels) if labels is not None else [f'subnet {i}' for i in range(result.num_subnets)]
    row, pad = 22, 8
    legend = np.full((row * len(labels) + 2 * pad, 260, 3), 255, np.uint8)
    for i, label in enumerate(labels):
        y = pad + i * row
        cv2.rectangle(legend, (pad, y + 3), (pad + 16, y + 19), tuple(int(c) for c in colors[i]), -1)
        cv2.putText(legend, f'{label}  {100 * shares[i]:.0f}%', (pad + 24, y + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    height = max(tinted.shape[0], legend.shape[0])
    canvas = np.full((height, tinted.shape[1] + legend.shape[1], 3), 255, np.uint8)
    canvas[:tinted.shape[0], :tinted.shape[1]] = tinted
    canvas[:legend.shape[0], tinted.shape[1]:] = legend
    return canvas


def subnet_labels(net, lr_hw: tuple[int, int] = (32, 32)) -> list[str]:
    """``'w36 d4 1.08G'``-style labels of a supernet's subnets, FLOPs on an LR region of ``lr_hw`` (or one label
    for a plain network)."""
    if not hasattr(net, 'subnets'):
        return ['network']
    flops = net.subnet_flops(lr_hw)
    return [f'w{w} d{d} {f / 1e9:.2f}G' for (w, d), f in zip(net.subnets, flops)]
