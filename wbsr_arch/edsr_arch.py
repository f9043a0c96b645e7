"""WBSREDSR: BasicSR's EDSR as a slimmable supernet."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from basicsr.archs.edsr_arch import EDSR

from .executor import Executor, Feature
from .supernet import SupernetMixin, upsample_layers


class WBSREDSR(SupernetMixin, EDSR):
    """EDSR holding ``len(widths) x len(depths)`` weight-sharing subnets.

    A subnet of depth ``d`` runs the first ``d`` residual blocks (``conv_after_body`` and the long skip stay). With
    the largest subnet this *is* BasicSR's ``EDSR``: the same state_dict keys, so official checkpoints load strictly,
    and bit-identical outputs for the same weights and input.

    Args:
        num_in_ch: Input channels. Default: 3.
        num_out_ch: Output channels. Default: 3.
        num_feat: Channels of the full network. Default: 64.
        num_block: Residual blocks of the full network. Default: 16.
        upscale: Scale factor, 2, 3, 4 or 8. Default: 4.
        res_scale: Residual scaling inside the blocks. Default: 1 (EDSR-L: 0.1).
        img_range: Image range the network works in. Default: 255.
        rgb_mean: Mean subtracted from the input, RGB. Default: DIV2K's (0.4488, 0.4371, 0.4040).
        widths: Subnet widths, ascending, the last equal to ``num_feat``. Default: [36, 52, 64].
        depths: Subnet depths (first d residual blocks), ascending, the last equal to ``num_block``.
            Default: [4, 8, 16].
        tile_executor: ``'auto'``, ``'maps'`` or ``'stores'`` (:attr:`SupernetMixin.tile_executor`). Default: auto.
    """

    supported_scales = (2, 3, 4, 8)

    def __init__(self,
                 *,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 num_feat: int = 64,
                 num_block: int = 16,
                 upscale: int = 4,
                 res_scale: float = 1,
                 img_range: float = 255.,
                 rgb_mean: Sequence[float] = (0.4488, 0.4371, 0.4040),
                 widths: Sequence[int] = (36, 52, 64),
                 depths: Sequence[int] = (4, 8, 16),
                 tile_executor: str = 'auto') -> None:
        if upscale not in self.supported_scales:
            raise ValueError(f'upscale must be one of {self.supported_scales} for WBSREDSR, got {upscale}')
        super().__init__(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block,
                         upscale=upscale, res_scale=res_scale, img_range=img_range, rgb_mean=tuple(rgb_mean))
        self._init_supernet(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block,
                            upscale=upscale, widths=widths, depths=depths, tile_executor=tile_executor)
        self.res_scale, self.rgb_mean = res_scale, tuple(rgb_mean)

    @classmethod
    def tiny_options(cls) -> dict[str, Any]:
        return {'num_feat': 16, 'num_block': 4, 'res_scale': 0.5, 'widths': [8, 12, 16], 'depths': [1, 2, 4]}

    def trunk(self, ex: Executor, x: Feature) -> Feature:
        first = ex.conv(self.conv_first, x)
        feat, mid = ex.copy(first), None
        for block in ex.blocks(self.body):
            mid = ex.conv(block.conv1, feat, mid, act='relu')
            ex.conv(block.conv2, mid, feat, scale=block.res_scale, add=feat)
        return ex.conv(self.conv_after_body, feat, add=first)

    def head(self, ex: Executor, feat: Feature) -> Feature:
        return ex.conv(self.conv_last, upsample_layers(ex, feat, self.upsample), slim=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(dtype=x.dtype, device=x.device)) * self.img_range

    def postprocess(self, x: torch.Tensor, y: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        return y / self.img_range + self.mean.to(dtype=x.dtype, device=x.device)

    def plain_network(self, width: int, depth: int) -> nn.Module:
        return EDSR(num_in_ch=self.num_in_ch, num_out_ch=self.num_out_ch, num_feat=width, num_block=depth,
                    upscale=self.upscale, res_scale=self.res_scale, img_range=self.img_range, rgb_mean=self.rgb_mean)
