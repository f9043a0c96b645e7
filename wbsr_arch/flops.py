"""FLOPs of a network forward, counted without running it.

FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts: 2 x multiply-accumulates of
convolutions and matrix products (the convention of the WBSR, ClassSR and ARM tables; fvcore, thop and
ptflops report half of it). The forward runs on the ``meta`` device through
:func:`torch.func.functional_call`, so counting a 2048x2048 input costs milliseconds and no memory.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def count_flops(net: nn.Module, input_shape: Sequence[int], **forward_kwargs: Any) -> int:
    """FLOPs of ``net(x, **forward_kwargs)`` for an input ``x`` of ``input_shape`` (N, C, H, W)."""
    meta_state = {name: torch.empty_like(t, device='meta') for name, t in net.named_parameters()}
    meta_state.update({name: torch.empty_like(t, device='meta') for name, t in net.named_buffers()})
    dtype = next((t.dtype for t in net.parameters() if t.is_floating_point()), torch.get_default_dtype())
    x = torch.empty(*input_shape, device='meta', dtype=dtype)  # the network's own (a float64 network counts too)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        functional_call(net, meta_state, (x, ), forward_kwargs)
    return int(counter.get_total_flops())
