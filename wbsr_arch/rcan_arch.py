"""WBSRRCAN: BasicSR's RCAN as a slimmable supernet."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.archs.rcan_arch import RCAN

from .supernet import SupernetMixin, check_choices, sliced_conv
from .tiles import Epilogue, FlopCount, TileGroup, TilePlan, conv_tiles, gather, new_map, zero_tiles

SUPPORTED_SCALES = (2, 3, 4, 8)


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
    """

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
                 depths: Sequence[int] = (5, 10, 20)) -> None:
        if upscale not in SUPPORTED_SCALES:
            raise ValueError(f'upscale must be one of {SUPPORTED_SCALES} for WBSRRCAN, got {upscale}')
        widths = check_choices('widths', widths, num_feat, 'num_feat')
        depths = check_choices('depths', depths, num_block, 'num_block')
        if num_feat // squeeze_factor < 1:
            raise ValueError(f'squeeze_factor={squeeze_factor} leaves no attention channel for num_feat={num_feat}')
        super().__init__(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_group=num_group,
                         num_block=num_block, squeeze_factor=squeeze_factor, upscale=upscale, res_scale=res_scale,
                         img_range=img_range, rgb_mean=tuple(rgb_mean))
        self.num_in_ch, self.num_out_ch = num_in_ch, num_out_ch
        self.num_feat, self.num_group, self.num_block = num_feat, num_group, num_block
        self.squeeze_factor, self.upscale, self.res_scale = squeeze_factor, upscale, res_scale
        self.rgb_mean = tuple(rgb_mean)
        self.widths, self.depths = widths, depths

    def _rcab(self, rcab: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
        conv1, _, conv2, attention = rcab.rcab
        _, squeeze, _, expand, _ = attention.attention
        res = sliced_conv(conv2, F.relu(sliced_conv(conv1, x, width)), width)
        weight = F.adaptive_avg_pool2d(res, 1)
        weight = F.relu(sliced_conv(squeeze, weight, max(1, width // self.squeeze_factor)))
        weight = torch.sigmoid(sliced_conv(expand, weight, width))
        return res * weight * rcab.res_scale + x

    def _forward_subnet(self, x: torch.Tensor, width: int, depth: int) -> torch.Tensor:
        mean = self.mean.to(dtype=x.dtype, device=x.device)
        x = sliced_conv(self.conv_first, (x - mean) * self.img_range, width)
        res = x
        for group in self.body:
            group_in = res
            for rcab in group.residual_group[:depth]:
                res = self._rcab(rcab, res, width)
            res = sliced_conv(group.conv, res, width) + group_in
        res = sliced_conv(self.conv_after_body, res, width) + x
        for layer in self.upsample:
            if isinstance(layer, nn.Conv2d):
                res = sliced_conv(layer, res, layer.out_channels // self.num_feat * width)
            else:
                res = layer(res)
        return sliced_conv(self.conv_last, res) / self.img_range + mean

    # ---- seamless tiles (wbsr_arch.tiles) -----------------------------------------------------------------
    # Channel attention pools over each tile's own region (as it pools over each patch in the patch scheme, and
    # over each training crop): a tile's attention does not depend on the rest of the image, and with one tile
    # covering the image the output is the whole-image network's.
    def _tile_trunk_radius(self, depth: int) -> int:
        exact = self.num_group * (2 * depth + 1) + 1
        return min(exact, 64)  # beyond 64 LR pixels of margin, very large images are approximate (README)

    def _tile_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(dtype=x.dtype, device=x.device)) * self.img_range

    def _trunk_tiles(self, plan: TilePlan, xmap: torch.Tensor, counter: FlopCount) -> torch.Tensor:
        first = new_map(plan, self.num_feat, 1, xmap)
        conv_tiles(plan, xmap, first, self.conv_first, counter, in_channels=lambda w: xmap.shape[1])
        res, spare = first.clone(), new_map(plan, self.num_feat, 1, xmap)
        mid = new_map(plan, self.num_feat, 1, xmap)
        depth = int(plan.depths.max())
        for group in self.body:
            group_in = res.clone()
            for b, rcab in enumerate(group.residual_group[:depth]):
                stopped = plan.groups(exact_depth=b)
                if stopped:
                    zero_tiles(plan, mid, stopped)
                active = plan.groups(min_depth=b)
                conv1, _, conv2, attention = rcab.rcab
                conv_tiles(plan, res, mid, conv1, counter, epilogue=Epilogue(act='relu'), groups=active)
                post = self._attention_post(attention, rcab.res_scale, counter)
                conv_tiles(plan, mid, res, conv2, counter, post=post, groups=active,
                           epilogue=Epilogue(accumulate=True))
            conv_tiles(plan, res, spare, group.conv, counter, post=_plus(plan, group_in))
            res, spare = spare, res
        conv_tiles(plan, res, spare, self.conv_after_body, counter, post=_plus(plan, first))
        return spare

    def _attention_post(self, attention: nn.Module, res_scale: float, counter: FlopCount):
        _, squeeze, _, expand, _ = attention.attention

        def post(y: torch.Tensor, group: TileGroup, segments) -> torch.Tensor:
            width = y.shape[1]
            weight = y.mean(dim=(2, 3), keepdim=True)  # pooled over the tile
            hidden = max(1, width // self.squeeze_factor)
            weight = F.relu(sliced_conv(squeeze, weight, hidden))
            counter.conv(weight, squeeze.weight[:hidden, :width])
            weight = sliced_conv(expand, weight, width)
            counter.conv(weight, expand.weight[:width, :hidden])
            return y * torch.sigmoid(weight) * res_scale

        return post

    def _head_tiles(self, plan: TilePlan, feat: torch.Tensor, counter: FlopCount) -> torch.Tensor:
        cur, at = feat, 1
        layers = list(self.upsample)
        for conv, shuffle in zip(layers[::2], layers[1::2]):
            r = shuffle.upscale_factor
            nxt = new_map(plan, self.num_feat, at * r, feat)
            conv_tiles(plan, cur, nxt, conv, counter, scale=at, out_channels=lambda w, r=r: r * r * w,
                       epilogue=Epilogue(shuffle=r))
            cur, at = nxt, at * r
        out = new_map(plan, self.num_out_ch, at, feat)
        conv_tiles(plan, cur, out, self.conv_last, counter, scale=at, out_channels=lambda w: self.num_out_ch)
        return out[:, :, 1:-1, 1:-1]

    def _tile_output(self, x: torch.Tensor, y: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return y / self.img_range + self.mean.to(dtype=x.dtype, device=x.device)

    def _plain_network(self, width: int, depth: int) -> nn.Module:
        if width // self.squeeze_factor < 1:
            raise ValueError(f'a plain RCAN of width {width} has no attention channel with '
                             f'squeeze_factor={self.squeeze_factor}')
        return RCAN(num_in_ch=self.num_in_ch, num_out_ch=self.num_out_ch, num_feat=width, num_group=self.num_group,
                    num_block=depth, squeeze_factor=self.squeeze_factor, upscale=self.upscale,
                    res_scale=self.res_scale, img_range=self.img_range, rgb_mean=self.rgb_mean)


def _plus(plan: TilePlan, fmap: torch.Tensor):
    """``post`` that adds the tile's own region of ``fmap`` (a skip connection)."""
    return lambda y, group, segments: y + gather(plan, fmap, group, segments, 1, y.shape[1], 0)
