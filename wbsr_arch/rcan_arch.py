"""WBSRRCAN: BasicSR's RCAN as a slimmable supernet."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.archs.rcan_arch import RCAN

from .executor import ConvFn, Executor, Feature, PostHook
from .supernet import SupernetMixin, upsample_layers


class WBSRRCAN(SupernetMixin, RCAN):
    """RCAN holding ``len(widths) x len(depths)`` weight-sharing subnets.

    A subnet of depth ``d`` runs the first ``d`` RCABs of every residual group (every group's tail conv
    and the global skip stay). Channel attention of a width-``w`` subnet squeezes to the first
    ``max(1, w // squeeze_factor)`` channels. With the largest subnet this *is* BasicSR's ``RCAN``.

    Args:
        num_in_ch: Input channels. Default: 3.
        num_out_ch: Output channels. Default: 3.
        num_feat: Channels of the full network. Default: 64.
        num_group: Residual groups. Default: 10.
        num_block: RCABs per group in the full network. Default: 20 (the RCAN paper's; BasicSR's
            class default is 16, so set it explicitly when loading such a checkpoint).
        squeeze_factor: Channel-attention reduction. Default: 16.
        upscale: Scale factor, 2, 3, 4 or 8. Default: 4.
        res_scale: Residual scaling inside RCABs. Default: 1.
        img_range: Image range the network works in. Default: 255.
        rgb_mean: Mean subtracted from the input, RGB. Default: DIV2K's (0.4488, 0.4371, 0.4040).
        widths: Subnet widths, ascending, the last equal to ``num_feat``. Default: [36, 52, 64].
        depths: RCABs per group of each subnet depth, ascending, the last equal to ``num_block``.
            Default: [5, 10, 20].
        tile_executor: ``'auto'``, ``'maps'`` or ``'stores'`` (:attr:`SupernetMixin.tile_executor`). Default: auto.

    In the seamless tile scheme, channel attention pools over each tile's own region (as it pools over each patch
    in the patch scheme, and over each training crop): a tile's attention does not depend on the rest of the image,
    and with one tile covering the image the output is the whole-image network's. The trunk margin of a band
    (:meth:`forward_tiles` on very large images) is capped at 64 LR pixels, so such bands are approximate.
    """

    supported_scales = (2, 3, 4, 8)
    pools_over_tiles = True
    trunk_margin_cap = 64

    def __init__(self,
                 *,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 num_feat: int = 64,
                 num_group: int = 10,
                 num_block: int = 20,
                 squeeze_factor: int = 16,
                 upscale: int = 4,
                 res_scale: float = 1,
                 img_range: float = 255.,
                 rgb_mean: Sequence[float] = (0.4488, 0.4371, 0.4040),
                 widths: Sequence[int] = (36, 52, 64),
                 depths: Sequence[int] = (5, 10, 20),
                 tile_executor: str = 'auto') -> None:
        if upscale not in self.supported_scales:
            raise ValueError(f'upscale must be one of {self.supported_scales} for WBSRRCAN, got {upscale}')
        if num_feat // squeeze_factor < 1:
            raise ValueError(f'squeeze_factor={squeeze_factor} leaves no attention channel for num_feat={num_feat}')
        super().__init__(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_group=num_group,
                         num_block=num_block, squeeze_factor=squeeze_factor, upscale=upscale, res_scale=res_scale,
                         img_range=img_range, rgb_mean=tuple(rgb_mean))
        self._init_supernet(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block,
                            upscale=upscale, widths=widths, depths=depths, tile_executor=tile_executor)
        self.num_group, self.squeeze_factor, self.res_scale = num_group, squeeze_factor, res_scale
        self.rgb_mean = tuple(rgb_mean)

    @classmethod
    def tiny_options(cls) -> dict[str, Any]:
        return {'num_feat': 16, 'num_group': 2, 'num_block': 4, 'squeeze_factor': 4, 'widths': [8, 12, 16],
                'depths': [1, 2, 4]}

    def trunk(self, ex: Executor, x: Feature) -> Feature:
        first = ex.conv(self.conv_first, x)
        res, mid = ex.copy(first), None
        for group in self.body:
            skip = ex.copy(res)
            for rcab in ex.blocks(group.residual_group):
                conv1, _, conv2, attention = rcab.rcab
                mid = ex.conv(conv1, res, mid, act='relu')
                ex.conv(conv2, mid, res, post=self._attention(attention), scale=rcab.res_scale, add=res)
            res = ex.conv(group.conv, res, skip, add=skip)
        return ex.conv(self.conv_after_body, res, first, add=first)

    def _attention(self, attention: nn.Module) -> PostHook:
        """Channel attention at the output's width, squeezed to its first ``max(1, w // squeeze_factor)`` channels,
        pooled over the region the executor gives (the image, or each tile)."""
        _, squeeze, _, expand, _ = attention.attention

        def post(y: torch.Tensor, conv: ConvFn) -> torch.Tensor:
            width = y.shape[1]
            weight = F.relu(conv(squeeze, F.adaptive_avg_pool2d(y, 1), max(1, width // self.squeeze_factor)))
            return y * torch.sigmoid(conv(expand, weight, width))

        return post

    def head(self, ex: Executor, feat: Feature) -> Feature:
        return ex.conv(self.conv_last, upsample_layers(ex, feat, self.upsample), slim=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(dtype=x.dtype, device=x.device)) * self.img_range

    def postprocess(self, x: torch.Tensor, y: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        return y / self.img_range + self.mean.to(dtype=x.dtype, device=x.device)

    def plain_network(self, width: int, depth: int) -> nn.Module:
        if width // self.squeeze_factor < 1:
            raise ValueError(f'a plain RCAN of width {width} has no attention channel with '
                             f'squeeze_factor={self.squeeze_factor}')
        return RCAN(num_in_ch=self.num_in_ch, num_out_ch=self.num_out_ch, num_feat=width, num_group=self.num_group,
                    num_block=depth, squeeze_factor=self.squeeze_factor, upscale=self.upscale,
                    res_scale=self.res_scale, img_range=self.img_range, rgb_mean=self.rgb_mean)
