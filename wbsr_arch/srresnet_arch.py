"""WBSRSRResNet: BasicSR's MSRResNet as a slimmable supernet."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.archs.srresnet_arch import MSRResNet

from .executor import Executor, Feature
from .supernet import SupernetMixin


class WBSRSRResNet(SupernetMixin, MSRResNet):
    """MSRResNet holding ``len(widths) x len(depths)`` weight-sharing subnets.

    With the largest subnet (the default), this *is* BasicSR's ``MSRResNet``: the same state_dict keys,
    so official checkpoints load strictly, and the same output.

    Args:
        num_in_ch: Input channels. Default: 3.
        num_out_ch: Output channels. Default: 3.
        num_feat: Channels of the full network. Default: 64.
        num_block: Residual blocks of the full network. Default: 16.
        upscale: Scale factor, 2, 3 or 4. Default: 4.
        widths: Subnet widths, ascending, the last equal to ``num_feat``. Default: [36, 52, 64].
        depths: Subnet depths (first d residual blocks), ascending, the last equal to ``num_block``.
            Default: [4, 8, 16].
        tile_executor: ``'auto'``, ``'maps'`` or ``'stores'`` (:attr:`SupernetMixin.tile_executor`). Default: auto.
    """

    supported_scales = (2, 3, 4)

    def __init__(self,
                 *,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 num_feat: int = 64,
                 num_block: int = 16,
                 upscale: int = 4,
                 widths: Sequence[int] = (36, 52, 64),
                 depths: Sequence[int] = (4, 8, 16),
                 tile_executor: str = 'auto') -> None:
        if upscale not in self.supported_scales:
            raise ValueError(f'upscale must be one of {self.supported_scales} for WBSRSRResNet, got {upscale}')
        super().__init__(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block,
                         upscale=upscale)
        self._init_supernet(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block,
                            upscale=upscale, widths=widths, depths=depths, tile_executor=tile_executor)

    @classmethod
    def tiny_options(cls) -> dict[str, Any]:
        return {'num_feat': 16, 'num_block': 4, 'widths': [8, 12, 16], 'depths': [1, 2, 4]}

    def trunk(self, ex: Executor, x: Feature) -> Feature:
        feat = ex.conv(self.conv_first, x, act='lrelu')
        mid = None
        for block in ex.blocks(self.body):
            mid = ex.conv(block.conv1, feat, mid, act='relu')
            ex.conv(block.conv2, mid, feat, scale=block.res_scale, add=feat)
        return feat

    def head(self, ex: Executor, feat: Feature) -> Feature:
        steps = [(self.upconv1, 2), (self.upconv2, 2)] if self.upscale == 4 else [(self.upconv1, self.upscale)]
        for conv, shuffle in steps:
            feat = ex.conv(conv, feat, act='lrelu', shuffle=shuffle)
        feat = ex.conv(self.conv_hr, feat, act='lrelu')  # (rebound: the upsampler's output is freed here)
        return ex.conv(self.conv_last, feat, slim=False)

    def postprocess(self, x: torch.Tensor, y: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        # bilinear upsampling of rows top-1..bottom (one row of margin each side: exact for top:bottom) added to y
        ia, ib, s = max(0, top - 1), min(x.shape[2], bottom + 1), self.upscale
        base = F.interpolate(x[:, :, ia:ib], scale_factor=s, mode='bilinear', align_corners=False)
        return y + base[:, :, (top - ia) * s:(bottom - ia) * s]

    def plain_network(self, width: int, depth: int) -> nn.Module:
        return MSRResNet(num_in_ch=self.num_in_ch, num_out_ch=self.num_out_ch, num_feat=width, num_block=depth,
                         upscale=self.upscale)
