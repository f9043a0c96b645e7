"""The one interface a supernet's layer sequence is written against, and the executors that run it.

An architecture states its network once, as calls on an :class:`Executor` (:meth:`SupernetMixin.trunk` and
:meth:`SupernetMixin.head`): 3x3 convolutions with their activation, pixel shuffle, residual scaling, skip or
residual addition and an optional hook (channel attention), and the residual blocks whose first ``d`` a subnet of
depth ``d`` runs (:meth:`Executor.blocks`). The executor decides what that means:

- :class:`WholeImage` runs one subnet (a width and a depth) on whole images, with autograd: the network's plain
  forward, and the one FLOPs are counted on;
- :class:`~wbsr_arch.tiles.MapExecutor` runs every tile at its own subnet on whole-image feature maps, with
  autograd (training through tiles);
- :class:`~wbsr_arch.tile_store.StoreExecutor` does the same on per-tile stores with a halo exchange, without
  autograd (inference);
- :class:`BandMargin` runs nothing: it counts how many rows at a band's cut edge the sequence gets wrong, which
  sizes the margins of :meth:`SupernetMixin.forward_tiles`.

What makes tiles exact (zero rings of tiles that do not write, halo exchange, clearing the inner activation of a
tile that stopped) is the tile executors' business, never the architecture's.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: ``conv(module, x, out_channels)``: ``module`` with its first ``out_channels`` filters (all when None) over the
#: first ``x.shape[1]`` input channels; what a post hook calls, so that the executor counts its FLOPs.
ConvFn = Callable[[nn.Conv2d, torch.Tensor, Optional[int]], torch.Tensor]
#: ``post(y, conv) -> y``: applied to a convolution's output over one region (the whole image, or a batch of tiles,
#: each pooled over its own area), e.g. channel attention.
PostHook = Callable[[torch.Tensor, ConvFn], torch.Tensor]

ACTIVATIONS = (None, 'relu', 'lrelu')


def sliced_conv(conv: nn.Conv2d, x: torch.Tensor, out_ch: Optional[int] = None) -> torch.Tensor:
    """``conv`` applied with its first ``out_ch`` filters over the first ``x.shape[1]`` input channels."""
    weight = conv.weight[:out_ch, :x.shape[1]]
    bias = None if conv.bias is None else conv.bias[:out_ch]
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def activation(y: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    """``relu``, ``lrelu`` (slope 0.1, SRResNet's) or nothing."""
    if act == 'relu':
        return F.relu(y)
    if act == 'lrelu':
        return F.leaky_relu(y, 0.1)
    return y


class Feature:
    """A feature map of the layer sequence: the executor's handle on wherever it keeps it.

    Attributes:
        scale: Resolution relative to the LR input (1 in the trunk; the pixel shuffles multiply it).
        channels: Channels of the full network.
        slim: Whether a subnet of width ``w`` has its first ``w`` channels of it (hidden features); otherwise every
            subnet has all ``channels`` (the input image, the output).
        data: The executor's storage (a tensor, a map, stores, a margin).
        state: The executor's bookkeeping (which tiles wrote it, which halos are current).
    """

    __slots__ = ('scale', 'channels', 'slim', 'data', 'state')

    def __init__(self, scale: int, channels: int, slim: bool, data: Any, state: Any = None) -> None:
        self.scale, self.channels, self.slim, self.data, self.state = scale, channels, slim, data, state

    def width_channels(self, width: int) -> int:
        """Channels a subnet of ``width`` has of this feature."""
        return min(width, self.channels) if self.slim else self.channels


class Executor(ABC):
    """Runs a layer sequence. Subclasses implement :meth:`input`, :meth:`result`, :meth:`copy`, :meth:`_conv` and
    :meth:`max_depth`; the checks, and the state of :meth:`blocks`, are shared."""

    def __init__(self) -> None:
        #: Index of the residual block being run (inside :meth:`blocks`), None outside.
        self.block: Optional[int] = None

    # ---- what an architecture calls ----------------------------------------------------------------------------
    def conv(self, conv: nn.Conv2d, src: Feature, into: Optional[Feature] = None, *, act: Optional[str] = None,
             shuffle: int = 1, slim: bool = True, post: Optional[PostHook] = None, scale: float = 1.0,
             add: Optional[Feature] = None) -> Feature:
        """``into = add + scale * post(act(pixel_shuffle(conv(src), shuffle)))``, at every width and depth.

        Args:
            conv: A 3x3 convolution (stride 1, padding 1) of the full network.
            src: What it reads (the first ``w`` channels of a slim feature, at width ``w``).
            into: The feature it writes (None: a new one). Never ``src`` (a tile's neighbours read its old values).
            act: ``'relu'``, ``'lrelu'`` or None.
            shuffle: Pixel-shuffle factor ``r``: a slim output takes the first ``r * r * w`` filters.
            slim: Whether the output follows the width (False for the network's output layer: every filter).
            post: Hook on the convolution's output (channel attention); not with ``act`` or ``shuffle``.
            scale: Multiplier of the result (residual scaling).
            add: A feature added to the result: ``into`` itself (a residual add in place) or another one (a skip
                connection); not with ``act`` or ``shuffle``.

        Returns:
            ``into``, or the new feature.

        Inside :meth:`blocks`, only the tiles deeper than the running block compute; the others keep what they
        had (with ``add=into``) or show zeros to their neighbours (a block's inner activation they did not compute).
        """
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3) or conv.stride != (1, 1) \
                or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f'a supernet layer is a 3x3 convolution with stride 1 and padding 1, got {conv}')
        if act not in ACTIVATIONS:
            raise ValueError(f'act must be one of {ACTIVATIONS}, got {act!r}')
        if shuffle < 1 or conv.out_channels % (shuffle * shuffle):
            raise ValueError(f'{conv} cannot be pixel-shuffled by {shuffle}')
        if (add is not None or post is not None) and (act is not None or shuffle != 1):
            raise ValueError('add and post take the convolution\'s output as it is (no activation, no pixel shuffle)')
        if into is not None and into is src:
            raise ValueError('a convolution cannot write the feature it reads: neighbouring tiles read its old values')
        out_scale, channels = src.scale * shuffle, conv.out_channels // (shuffle * shuffle)
        for other, name in ((into, 'into'), (add, 'add')):
            if other is not None and (other.scale, other.channels, other.slim) != (out_scale, channels, slim):
                raise ValueError(f'{name} is a feature of {other.channels} channels at scale {other.scale}, the '
                                 f'convolution writes {channels} at scale {out_scale}')
        return self._conv(conv, src, into, act=act, shuffle=shuffle, slim=slim, post=post, scale=float(scale),
                          add=add)

    def blocks(self, modules: Sequence[nn.Module]) -> Iterator[nn.Module]:
        """The residual blocks a subnet runs: the first ``depth`` of ``modules`` (the deepest tile's, for tiles).

        Convolutions called while a block is yielded run on the tiles deeper than it.
        """
        if self.block is not None:
            raise RuntimeError('residual blocks do not nest: a subnet\'s depth counts one level of blocks')
        depth = self.max_depth()
        if depth > len(modules):
            raise ValueError(f'depth {depth} but only {len(modules)} blocks')
        try:
            for b, module in enumerate(modules[:depth]):
                self.block = b
                yield module
        finally:
            self.block = None

    # ---- what an executor provides ---------------------------------------------------------------------------
    @abstractmethod
    def max_depth(self) -> int:
        """Residual blocks the deepest subnet of this run has."""

    @abstractmethod
    def input(self, x: Any, *, slim: bool) -> Feature:
        """The feature the sequence starts from (LR scale)."""

    @abstractmethod
    def result(self, feature: Feature) -> Any:
        """What the sequence produced, as the executor's caller takes it."""

    @abstractmethod
    def copy(self, feature: Feature) -> Feature:
        """An independent copy (a skip connection kept while the original is updated in place)."""

    @abstractmethod
    def _conv(self, conv: nn.Conv2d, src: Feature, into: Optional[Feature], *, act: Optional[str], shuffle: int,
              slim: bool, post: Optional[PostHook], scale: float, add: Optional[Feature]) -> Feature:
        """:meth:`conv`, its arguments checked."""


class WholeImage(Executor):
    """One subnet on whole images: the plain forward of the network (autograd, any device, the FLOPs counter's).

    With the largest width and depth every operation is the BasicSR network's own, in its order, so the output is
    bit-identical to it (tests/test_arch.py).
    """

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.width, self.depth = width, depth

    def max_depth(self) -> int:
        return self.depth

    def input(self, x: torch.Tensor, *, slim: bool) -> Feature:
        return Feature(1, x.shape[1], slim, x)

    def result(self, feature: Feature) -> torch.Tensor:
        return feature.data

    def copy(self, feature: Feature) -> Feature:
        return Feature(feature.scale, feature.channels, feature.slim, feature.data)  # (values are never changed)

    def _conv(self, conv: nn.Conv2d, src: Feature, into: Optional[Feature], *, act: Optional[str], shuffle: int,
              slim: bool, post: Optional[PostHook], scale: float, add: Optional[Feature]) -> Feature:
        y = sliced_conv(conv, src.data, shuffle * shuffle * self.width if slim else None)
        if shuffle > 1:
            y = F.pixel_shuffle(y, shuffle)
        y = activation(y, act)
        if post is not None:
            y = post(y, sliced_conv)
        if scale != 1:
            y = y * scale
        if add is not None:
            y = add.data + y
        if into is None:
            return Feature(src.scale * shuffle, conv.out_channels // (shuffle * shuffle), slim, y)
        into.data = y
        return into


class BandMargin(Executor):
    """Runs nothing: how many LR rows at a band's cut edge the sequence gets wrong.

    A band of rows is computed from its input rows plus the one-row halo beyond them; every later convolution reads
    a map that ends at the band's edge (zeros beyond it), so each one spoils one more row at its own scale
    (``1 / scale`` LR rows). A feature's ``data`` is its spoiled depth in LR rows, None for the input (correct, and
    read with a correct halo).
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth

    def max_depth(self) -> int:
        return self.depth

    def input(self, x: Any = None, *, slim: bool) -> Feature:
        return Feature(1, 0, slim, None)

    def result(self, feature: Feature) -> int:
        """The spoiled rows, rounded up to whole LR rows."""
        return math.ceil(feature.data or 0)

    def copy(self, feature: Feature) -> Feature:
        return Feature(feature.scale, feature.channels, feature.slim, feature.data)

    def _conv(self, conv: nn.Conv2d, src: Feature, into: Optional[Feature], *, act: Optional[str], shuffle: int,
              slim: bool, post: Optional[PostHook], scale: float, add: Optional[Feature]) -> Feature:
        spoiled = Fraction(0) if src.data is None else src.data + Fraction(1, src.scale)
        if add is not None and add.data is not None:
            spoiled = max(spoiled, add.data)
        if into is None:
            return Feature(src.scale * shuffle, conv.out_channels // (shuffle * shuffle), slim, spoiled)
        into.data = spoiled
        return into
