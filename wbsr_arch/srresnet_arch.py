"""WBSRSRResNet: BasicSR's MSRResNet as a slimmable supernet."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.archs.srresnet_arch import MSRResNet

from .supernet import SupernetMixin, check_choices, sliced_conv
from .tile_store import Exchange, StoreLayout, conv_stores
from .tiles import Epilogue, FlopCount, TilePlan, conv_tiles, new_map, zero_tiles

SUPPORTED_SCALES = (2, 3, 4)


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
    """

    def __init__(self,
                 *,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 num_feat: int = 64,
                 num_block: int = 16,
                 upscale: int = 4,
                 widths: Sequence[int] = (36, 52, 64),
                 depths: Sequence[int] = (4, 8, 16)) -> None:
        if upscale not in SUPPORTED_SCALES:
            raise ValueError(f'upscale must be one of {SUPPORTED_SCALES} for WBSRSRResNet, got {upscale}')
        widths = check_choices('widths', widths, num_feat, 'num_feat')
        depths = check_choices('depths', depths, num_block, 'num_block')
        super().__init__(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block,
                         upscale=upscale)
        self.num_in_ch, self.num_out_ch = num_in_ch, num_out_ch
        self.num_feat, self.num_block = num_feat, num_block
        self.widths, self.depths = widths, depths

    def _forward_subnet(self, x: torch.Tensor, width: int, depth: int) -> torch.Tensor:
        act = self.lrelu
        out = act(sliced_conv(self.conv_first, x, width))
        for block in self.body[:depth]:
            out = out + sliced_conv(block.conv2, F.relu(sliced_conv(block.conv1, out, width)), width) * block.res_scale
        if self.upscale == 4:
            out = act(self.pixel_shuffle(sliced_conv(self.upconv1, out, 4 * width)))
            out = act(self.pixel_shuffle(sliced_conv(self.upconv2, out, 4 * width)))
        else:
            out = act(self.pixel_shuffle(sliced_conv(self.upconv1, out, self.upscale**2 * width)))
        out = sliced_conv(self.conv_last, act(sliced_conv(self.conv_hr, out, width)))
        base = F.interpolate(x, scale_factor=self.upscale, mode='bilinear', align_corners=False)
        return out + base

    # ---- seamless tiles (wbsr_arch.tiles) -----------------------------------------------------------------
    def _tile_trunk_radius(self, depth: int) -> int:
        return 2 * depth  # two 3x3 convolutions per residual block after conv_first

    def _trunk_tiles(self, plan: TilePlan, xmap: torch.Tensor, counter: FlopCount) -> torch.Tensor:
        if self._tile_stores(xmap):
            return self._trunk_stores(plan, xmap, counter)
        feat = new_map(plan, self.num_feat, 1, xmap)
        conv_tiles(plan, xmap, feat, self.conv_first, counter, in_channels=lambda w: xmap.shape[1], epilogue=LRELU)
        mid = new_map(plan, self.num_feat, 1, xmap)
        for b, block in enumerate(self.body[:int(plan.depths.max())]):
            stopped = plan.groups(exact_depth=b)
            if stopped:  # their inner activation is zero from here on (halo rule, wbsr_arch.tiles)
                zero_tiles(plan, mid, stopped)
            active = plan.groups(min_depth=b)
            conv_tiles(plan, feat, mid, block.conv1, counter, epilogue=RELU, groups=active)
            conv_tiles(plan, mid, feat, block.conv2, counter, groups=active,
                       epilogue=Epilogue(scale=block.res_scale, accumulate=True))
        return feat

    def _trunk_stores(self, plan: TilePlan, xmap: torch.Tensor, counter: FlopCount) -> torch.Tensor:
        """:meth:`_trunk_tiles` on stores (:mod:`wbsr_arch.tile_store`): the same features, without autograd."""
        layout = StoreLayout(plan, by_depth=True)
        exchange = Exchange(layout, 1)
        every = layout.sizes()
        feat = layout.new_stores(1, lambda w: w, xmap)
        mid = layout.new_stores(1, lambda w: w, xmap)
        feat_edges, mid_edges = exchange.buffer(self.num_feat, xmap), exchange.buffer(self.num_feat, xmap)
        conv_stores(layout, layout.gather(xmap, 1, lambda w: xmap.shape[1]), feat, self.conv_first, counter, every,
                    in_channels=lambda w: xmap.shape[1], epilogue=LRELU)
        changed = every
        for b, block in enumerate(self.body[:int(plan.depths.max())]):
            active = layout.active(b)
            exchange.run(feat, feat_edges, changed, active)
            exchange.clear(mid_edges, active, changed)  # tiles that stopped: their inner activation reads as zero
            conv_stores(layout, feat, mid, block.conv1, counter, active, epilogue=RELU)
            exchange.run(mid, mid_edges, active, active)
            conv_stores(layout, mid, feat, block.conv2, counter, active,
                        epilogue=Epilogue(scale=block.res_scale, accumulate=True))
            changed = active
        fmap = new_map(plan, self.num_feat, 1, xmap)
        layout.scatter(feat, fmap, 1)
        return fmap

    def _upsample_steps(self) -> list[tuple[nn.Conv2d, int]]:
        """The upsampler's convolutions with their pixel-shuffle factors."""
        s = self.upscale
        return [(self.upconv1, 2), (self.upconv2, 2)] if s == 4 else [(self.upconv1, s)]

    def _head_tiles(self, plan: TilePlan, feat: torch.Tensor, counter: FlopCount) -> torch.Tensor:
        if self._tile_stores(feat):
            return self._head_stores(plan, feat, counter)
        s = self.upscale
        cur, at = feat, 1
        for conv, r in self._upsample_steps():
            nxt = new_map(plan, self.num_feat, at * r, feat)
            conv_tiles(plan, cur, nxt, conv, counter, scale=at, out_channels=lambda w, r=r: r * r * w,
                       epilogue=Epilogue(act='lrelu', shuffle=r))
            cur, at = nxt, at * r
        hr = new_map(plan, self.num_feat, s, feat)
        conv_tiles(plan, cur, hr, self.conv_hr, counter, scale=s, epilogue=LRELU)
        del cur
        out = new_map(plan, self.num_out_ch, s, feat)
        conv_tiles(plan, hr, out, self.conv_last, counter, scale=s, out_channels=lambda w: self.num_out_ch)
        return out[:, :, 1:-1, 1:-1]

    def _head_stores(self, plan: TilePlan, feat: torch.Tensor, counter: FlopCount) -> torch.Tensor:
        """:meth:`_head_tiles` on stores (:mod:`wbsr_arch.tile_store`)."""
        s = self.upscale
        layout = StoreLayout(plan, by_depth=False)
        every = layout.sizes()
        cur, at = layout.gather(feat, 1, lambda w: w), 1
        exchanges = {}
        for conv, r in self._upsample_steps() + [(self.conv_hr, 1)]:
            at *= r
            nxt = layout.new_stores(at, lambda w: w, feat)
            conv_stores(layout, cur, nxt, conv, counter, every, out_channels=lambda w, r=r: r * r * w,
                        epilogue=Epilogue(act='lrelu', shuffle=r))
            if at not in exchanges:  # one exchange and edge buffer per scale, shared by its convolutions
                exchange = Exchange(layout, at)
                exchanges[at] = exchange, exchange.buffer(self.num_feat, feat)
            exchange, edges = exchanges[at]
            exchange.run(nxt, edges, every, every)
            cur = nxt
        out = new_map(plan, self.num_out_ch, s, feat)
        last = layout.new_stores(s, lambda w: self.num_out_ch, feat, ring=False)
        conv_stores(layout, cur, last, self.conv_last, counter, every, out_channels=lambda w: self.num_out_ch,
                    interior=False)
        layout.scatter(last, out, s, interior=False)
        return out[:, :, 1:-1, 1:-1]

    def _tile_output(self, x: torch.Tensor, y: torch.Tensor, a: int, b: int) -> torch.Tensor:
        # bilinear upsampling of rows a-1..b (one row of margin each side: exact for rows a:b) added to the band
        ia, ib, s = max(0, a - 1), min(x.shape[2], b + 1), self.upscale
        base = F.interpolate(x[:, :, ia:ib], scale_factor=s, mode='bilinear', align_corners=False)
        return y + base[:, :, (a - ia) * s:(b - ia) * s]

    def _plain_network(self, width: int, depth: int) -> nn.Module:
        return MSRResNet(num_in_ch=self.num_in_ch, num_out_ch=self.num_out_ch, num_feat=width, num_block=depth,
                         upscale=self.upscale)


RELU, LRELU = Epilogue(act='relu'), Epilogue(act='lrelu')
