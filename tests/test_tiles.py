"""The seamless tile scheme: equivalence with whole-image subnets, exact FLOPs, bands, seams, training.

Tests every architecture must pass are parametrised over the registered WBSR supernets (test_arch.SUPERNETS), each
in its tiny configuration; those that compare tiles with the whole image subnet by subnet take the architectures
whose layers do not pool over their region (:attr:`SupernetMixin.pools_over_tiles`), and the others with one tile.
"""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from wbsr_arch import WBSRSRResNet
from wbsr_arch.executor import WholeImage
from wbsr_arch.supernet import TileAssignment
from wbsr_arch.tiles import Epilogue, TileGrid, _rectangles, row_bands

from conftest import assert_equivalent
from test_arch import SUPERNETS, by_name, exact, rand64, tiny, tiny_srresnet

#: Architectures whose tiles on one subnet give that subnet's whole-image output for any tile size.
LOCAL = [cls for cls in SUPERNETS if not cls.pools_over_tiles]
local = pytest.mark.parametrize('cls', LOCAL, ids=lambda cls: cls.__name__)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def grid_shape(h, w, tile):
    return -(-h // tile), -(-w // tile)


def one_tile_size(cls, tile):
    """``tile``, or a tile covering any test image for an architecture that pools over its tiles."""
    return 1000 if cls.pools_over_tiles else tile


@local
@pytest.mark.parametrize('scale,tile', [(2, 13), (3, 8), (4, 8), (4, 64)])
def test_every_tile_on_subnet_k_is_subnet_k_on_the_whole_image(cls, scale, tile):
    net = exact(tiny(cls, scale), seed=scale)
    x = rand64(1, 3, 21, 19)  # not a multiple of any tile size
    with torch.no_grad():
        for k in range(net.num_subnets):
            expected = net(x, subnet=k)
            got = net.forward_tiles(x, np.full(grid_shape(21, 19, tile), k), tile_size=tile).output
            assert_equivalent(got, expected)


@by_name
def test_largest_subnet_in_tiles_is_the_exported_basicsr_network(cls):
    for scale in cls.supported_scales:
        net = exact(tiny(cls, scale), seed=scale)
        x = rand64(2, 3, 13, 19)
        tile = one_tile_size(cls, 8)
        with torch.no_grad():
            expected = net.export_subnet(net.num_subnets - 1).eval()(x)
            got = net.forward_tiles(x, np.full(grid_shape(13, 19, tile), 8), tile_size=tile).output
        assert_equivalent(got, expected)


@by_name
def test_one_tile_is_the_whole_network(cls):
    net = exact(tiny(cls), seed=1)
    x = rand64(1, 3, 19, 26)
    with torch.no_grad():
        for k in (0, 4, 8):
            expected = net(x, subnet=k)
            got = net.forward_tiles(x, np.full((1, 1), k), tile_size=32).output
            assert_equivalent(got, expected)


@by_name
def test_flops_of_a_mixed_assignment_are_what_the_flop_counter_counts(cls):
    net = exact(tiny(cls), seed=2)
    x = rand64(1, 3, 37, 45)
    assign = np.random.default_rng(0).integers(0, net.num_subnets, grid_shape(37, 45, 8))
    assert len(net.subnets) == 9  # (ordering the subnets counts FLOPs on the meta device: done before counting)
    for executor in ('maps', 'stores'):
        net.tile_executor = executor
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run = net.forward_tiles(x, assign, tile_size=8)
        assert run.flops == counter.get_total_flops() == net.tile_flops((37, 45), assign, tile_size=8)
    boxes = TileGrid.regular(37, 45, 8).boxes()
    per_tile = sum(net.subnet_flops((int(bh), int(bw)))[m] for (_, _, bh, bw), m in zip(boxes, assign.ravel()))
    assert run.flops == per_tile  # the halo costs no convolution work; per-tile attention for RCAN is in both


@by_name
def test_bands_give_the_same_image_and_pay_for_their_margins(cls):
    """On stores (bands on maps give the stores' image: test_store_and_map_executors_give_the_same_image_and_flops)."""
    net = exact(tiny(cls), seed=4)
    x = rand64(1, 3, 29, 13)
    assign = np.random.default_rng(1).integers(0, 9, grid_shape(29, 13, 8))
    with torch.no_grad():
        whole = net.forward_tiles(x, assign, tile_size=8)
        head_bands = net.forward_tiles(x, assign, tile_size=8, max_pixels=8 * 13)  # upsampler a tile row at a time
        all_bands = net.forward_tiles(x, assign, tile_size=8, max_pixels=1)  # the trunk too, with its margins
    assert_equivalent(head_bands.output, whole.output)
    if cls.pools_over_tiles:
        # documented approximation: attention pools over the margin's whole tiles, so a band edge's error reaches
        # further than the receptive field (test_one_row_less_of_band_margin_changes_the_image: exact with one-row
        # tiles); here it stays far below the error of a margin of one tile (5e-2 of the largest value)
        assert (all_bands.output - whole.output).abs().max() < 1e-3 * whole.output.abs().max()
    else:
        assert_equivalent(all_bands.output, whole.output)
    assert whole.flops < head_bands.flops < all_bands.flops
    assert net.tile_flops((29, 13), assign, tile_size=8, max_pixels=1) == all_bands.flops


@pytest.mark.parametrize('cls,margins', [('WBSRSRResNet', lambda d: 2 * d), ('WBSREDSR', lambda d: 2 * d + 1),
                                         ('WBSRRCAN', lambda d: min(10 * (2 * d + 1) + 1, 64))])
def test_band_margins_are_the_trunks_receptive_field(cls, margins):
    """Counted from the layer sequence: two convolutions per block after the first one (SRResNet), plus the
    conv after the body (EDSR), plus a conv per group (RCAN, 10 groups, capped at 64); the head spoils one row."""
    net = next(c for c in SUPERNETS if c.__name__ == cls)()
    for depth in net.depths:
        assert net._band_margins(depth) == (margins(depth), 1)


@by_name
def test_one_row_less_of_band_margin_changes_the_image(cls, monkeypatch):
    """The margins are as small as they can be: one row less of the trunk's (or of the head's) moves the output.

    Every tile runs the largest subnet (a shallower tile next to a band's edge spoils fewer rows), and tiles are one
    row high: margins are not rounded up to whole tiles, and channel attention pools along rows only, so that the
    bands are exact for RCAN too. Two trunk bands of 24 rows (one cut, above RCAN's margin of 21 rows on each side),
    head bands of one row."""
    net = exact(tiny(cls), seed=4)
    x = rand64(1, 3, 48, 8)
    grid = TileGrid(tuple(range(49)), (0, 8))
    assign = np.full(grid.shape, 8)
    with torch.no_grad():
        whole = net.forward_tiles(x, assign, grid=grid).output
        assert_equivalent(net.forward_tiles(x, assign, grid=grid, max_pixels=12).output, whole)
        margins = net._band_margins
        for less in ((1, 0), (0, 1)):
            monkeypatch.setattr(net, '_band_margins', lambda d, less=less: tuple(
                m - k for m, k in zip(margins(d), less)))
            banded = net.forward_tiles(x, assign, grid=grid, max_pixels=12).output
            assert (banded - whole).abs().max() > 1e-6 * whole.abs().max(), less


def test_mixed_tiles_of_a_trained_network_leave_no_visible_seam():
    """A smooth image through a network that is a good interpolator at every width and depth: at tile borders
    between different subnets the output changes no more than inside the tiles."""
    torch.manual_seed(0)
    net = WBSRSRResNet(num_feat=16, num_block=4, widths=[8, 12, 16], depths=[1, 2, 4]).double().eval()
    with torch.no_grad():  # the bilinear skip carries the image, the trunk adds small detail (BasicSR's 0.1 init)
        for p in net.parameters():
            p.mul_(0.3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48, dtype=torch.float64),
                            torch.linspace(0, 1, 64, dtype=torch.float64), indexing='ij')
    x = (0.5 + 0.3 * torch.sin(3 * xx + 2 * yy)).expand(1, 3, 48, 64).contiguous()
    assign = np.array([[0, 8, 3, 6], [8, 0, 6, 3], [2, 7, 0, 8]])  # 16-pixel tiles, neighbours always differ
    with torch.no_grad():
        mixed = net.forward_tiles(x, assign, tile_size=16).output[0].mean(0)
        uniform = {k: net(x, subnet=int(k))[0].mean(0) for k in np.unique(assign)}
    s = 4
    # away from borders, each tile equals its subnet on the whole image (the receptive field is 9 LR pixels)
    for (top, left, bh, bw), k in zip(TileGrid.regular(48, 64, 16).boxes(), assign.ravel()):
        inner = (slice((top + 5) * s, (top + bh - 5) * s), slice((left + 5) * s, (left + bw - 5) * s))
        assert_equivalent(mixed[inner], uniform[k][inner])
    # across every tile border the step between neighbouring output pixels is as small as inside the tiles
    dx = (mixed[:, 1:] - mixed[:, :-1]).abs()
    borders = [c * s - 1 for c in (16, 32, 48)]
    inside = np.setdiff1d(np.arange(dx.shape[1]), borders)
    assert dx[:, borders].max() < 1.5 * dx[:, inside].max()
    # while cutting the image apart with zero padding (a naive tiling) leaves steps far above that
    naive = torch.cat([net(x[:, :, :, c:c + 16], subnet=8) for c in range(0, 64, 16)], 3)[0].mean(0)
    ndx = (naive[:, 1:] - naive[:, :-1]).abs()
    assert ndx[:, borders].max() > 3 * dx[:, borders].max()


@by_name
def test_training_through_tiles_matches_the_whole_network_gradient(cls):
    net = exact(tiny(cls), seed=5).train()
    x = rand64(3, 3, 16, 16)
    tile = one_tile_size(cls, 8)
    tiles = grid_shape(16, 16, tile)
    for k in (0, 8):
        net.zero_grad()
        net(x, subnet=k).square().mean().backward()
        plain = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad()
        net(x, subnet=TileAssignment(np.full((3, *tiles), k), tile)).square().mean().backward()
        tiled = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        assert plain.keys() == tiled.keys()
        for n in plain:
            assert_equivalent(tiled[n], plain[n])
    net.zero_grad()  # a mixed assignment per sample reaches every layer any of its tiles uses
    assign = np.array([[[0, 8], [8, 0]], [[2, 2], [2, 2]], [[8, 8], [8, 8]]])
    net(x, subnet=TileAssignment(assign, 8)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_assignments_are_refused():
    net = tiny_srresnet()
    x = torch.rand(1, 3, 20, 20)
    with pytest.raises(ValueError, match=r'subnets must be \(3, 3\)'):
        net.forward_tiles(x, np.zeros((2, 2), int), tile_size=8)
    with pytest.raises(IndexError, match=r'in 0..8, got 0..9'):
        net.forward_tiles(x, np.full((3, 3), 9) * np.eye(3, dtype=int), tile_size=8)
    with pytest.raises(ValueError, match='integer array'):
        net.forward_tiles(x, np.zeros((3, 3)), tile_size=8)
    with pytest.raises(ValueError, match='covers 16x20 pixels, the input is 20x20'):
        net.forward_tiles(x, np.zeros((1, 1), int), grid=TileGrid((0, 16), (0, 20)))
    with pytest.raises(ValueError, match='strictly increase'):
        TileGrid((0, 8, 8, 20), (0, 20))


def test_grid_bands_and_rectangles():
    grid = TileGrid.regular(37, 45, 8)
    assert grid.shape == (5, 6) and grid.rows == (0, 8, 16, 24, 32, 37) and len(grid) == 30
    band, rows = grid.band(6, 30)
    assert band.rows == (0, 2, 10, 18, 24) and rows.tolist() == [0, 1, 2, 3]
    assert row_bands(grid.rows, 0, 37, 20) == [(0, 16), (16, 32), (32, 37)]
    assert row_bands(grid.rows, 8, 24, 1) == [(8, 16), (16, 24)]  # at least one tile row per band
    mask = np.array([[[1, 1, 0], [1, 1, 0], [0, 1, 1]]], bool)
    rects = _rectangles(mask)
    covered = np.zeros_like(mask)
    for n, a0, a1, b0, b1 in rects:
        assert not covered[n, a0:a1, b0:b1].any()
        covered[n, a0:a1, b0:b1] = True
    assert (covered == mask).all() and len(rects) == 2


@by_name
@pytest.mark.parametrize('executor', ['maps', 'stores'])
def test_indexed_and_per_segment_writes_agree(cls, executor, monkeypatch):
    """Groups of many segments are written with one indexed copy, few with fused per-segment writes: same image."""
    import wbsr_arch.tiles as tiles
    net = exact(tiny(cls, tile_executor=executor), seed=6)
    x = rand64(1, 3, 37, 45)
    assign = np.random.default_rng(2).integers(0, 9, grid_shape(37, 45, 4))
    with torch.no_grad():
        looped = net.forward_tiles(x, assign, tile_size=4).output
        monkeypatch.setattr(tiles, 'SEGMENT_LOOP_LIMIT', 0)
        indexed = net.forward_tiles(x, assign, tile_size=4).output
    assert_equivalent(indexed, looped)


def test_an_accumulating_epilogue_takes_a_scale_only():
    Epilogue(scale=0.1, accumulate=True)  # a scaled residual add: what the supernets use
    for bad in ({'act': 'relu'}, {'shuffle': 2}):
        with pytest.raises(ValueError, match='an accumulating epilogue takes a scale only'):
            Epilogue(accumulate=True, **bad)


@by_name
@pytest.mark.parametrize('executor', ['maps', 'stores'])
@pytest.mark.parametrize('indexed', [False, True])
def test_no_uninitialised_feature_is_read(cls, executor, indexed, monkeypatch):
    """Feature maps and stores are left uninitialised where no convolution reads them (tile interiors beyond a tile's
    width, tiles that stopped): with every new tensor filled with NaN, a mixed assignment gives the same finite
    image."""
    import wbsr_arch.tiles as tiles
    net = exact(tiny(cls, tile_executor=executor), seed=7)
    x = rand64(1, 3, 21, 27)
    assign = np.random.default_rng(3).integers(0, net.num_subnets, grid_shape(21, 27, 8))
    if indexed:
        monkeypatch.setattr(tiles, 'SEGMENT_LOOP_LIMIT', 0)
    with torch.no_grad():
        expected = net.forward_tiles(x, assign, tile_size=8).output
        deterministic = torch.are_deterministic_algorithms_enabled()
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        try:
            assert torch.empty(4, dtype=torch.float64).isnan().all()  # the check below is meaningful
            got = net.forward_tiles(x, assign, tile_size=8).output
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.utils.deterministic.fill_uninitialized_memory = fill
    assert torch.isfinite(got).all()
    assert_equivalent(got, expected)


@by_name
def test_store_and_map_executors_give_the_same_image_and_flops(cls):
    """Inference runs on per-tile stores with a halo exchange, training on whole-image maps: same image, same FLOPs,
    at every scale, for per-sample mixed assignments, sizes that are not multiples of the tile, and with bands."""
    cases = {2: ((13, 17), 5), 3: ((11, 14), 4), 4: ((21, 19), 8), 8: ((9, 7), 4)}  # smaller where the output is large
    for scale in cls.supported_scales:
        (size, tile), batch = cases[scale], 2 if scale == 4 else 1
        net = exact(tiny(cls, scale), seed=scale)
        x = rand64(batch, 3, *size)
        assign = np.random.default_rng(size[0]).integers(0, 9, (batch, *grid_shape(*size, tile)))
        with torch.no_grad():
            for max_pixels in (None, 1) if scale == 4 else (None, ):  # 1: trunk and head in bands
                net.tile_executor = 'maps'
                maps = net.forward_tiles(x, assign, tile_size=tile, max_pixels=max_pixels)
                net.tile_executor = 'auto'
                stores = net.forward_tiles(x, assign, tile_size=tile, max_pixels=max_pixels)
                assert_equivalent(stores.output, maps.output)
                assert stores.flops == maps.flops


@by_name
@pytest.mark.parametrize('broken', ['run', 'clear'])
def test_store_executor_needs_its_halo_exchange(cls, broken, monkeypatch):
    """The comparison above sees a halo that is not refreshed, or an inner activation of a stopped tile that is
    not cleared: without either step the image moves far beyond float rounding."""
    import wbsr_arch.tile_store as tile_store
    net = exact(tiny(cls), seed=8)
    x = rand64(1, 3, 37, 45)
    assign = np.random.default_rng(4).integers(0, 9, grid_shape(37, 45, 8))
    with torch.no_grad():
        net.tile_executor = 'maps'
        expected = net.forward_tiles(x, assign, tile_size=8).output
        net.tile_executor = 'stores'
        monkeypatch.setattr(tile_store.Exchange, broken, lambda *args: None)
        got = net.forward_tiles(x, assign, tile_size=8).output
    # (without the exchange the rings are uninitialised memory: zeros, or garbage that may be NaN)
    assert not ((got - expected).abs() <= 1e-3 * expected.abs().max().item()).all()


@by_name
def test_map_executor_needs_its_zeroed_rings(cls, monkeypatch):
    """Likewise on maps: without zeroing the rings of tiles that stopped writing an inner activation, neighbours
    read stale values and the image moves."""
    import wbsr_arch.tiles as tiles
    net = exact(tiny(cls, tile_executor='maps'), seed=8)
    x = rand64(1, 3, 37, 45)
    assign = np.random.default_rng(4).integers(0, 9, grid_shape(37, 45, 8))
    with torch.no_grad():
        expected = net.forward_tiles(x, assign, tile_size=8).output
        monkeypatch.setattr(tiles, 'zero_tiles', lambda *args, **kwargs: None)
        got = net.forward_tiles(x, assign, tile_size=8).output
    assert not ((got - expected).abs() <= 1e-3 * expected.abs().max().item()).all()


def test_store_executor_is_for_inference_and_checks_its_option():
    net = tiny_srresnet()
    x = torch.rand(1, 3, 16, 16)
    assert not net._tile_stores(x)  # parameters that need a gradient: training keeps the map executor
    with torch.no_grad():
        assert net._tile_stores(x)
        net.tile_executor = 'maps'
        assert not net._tile_stores(x)
        net.tile_executor = 'stores'
        assert net._tile_stores(x)
    with pytest.raises(RuntimeError, match="tile_executor='stores' runs without autograd"):
        net.forward_tiles(x, np.zeros((2, 2), int), tile_size=8)


def test_layer_sequences_are_checked_by_every_executor():
    """What the executors cannot run the same way is refused, whatever the executor."""
    ex = WholeImage(4, 1)
    x = ex.input(torch.rand(1, 3, 6, 6), slim=False)
    conv = nn.Conv2d(3, 8, 3, 1, 1)
    feat = ex.conv(conv, x)
    assert feat.data.shape == (1, 4, 6, 6) and feat.scale == 1 and feat.slim  # width 4 of 8 filters
    with pytest.raises(ValueError, match='a supernet layer is a 3x3 convolution with stride 1 and padding 1'):
        ex.conv(nn.Conv2d(3, 8, 1), x)
    with pytest.raises(ValueError, match='a convolution cannot write the feature it reads'):
        ex.conv(nn.Conv2d(8, 8, 3, 1, 1), feat, feat)
    with pytest.raises(ValueError, match=r'add and post take the convolution\'s output as it is'):
        ex.conv(nn.Conv2d(8, 8, 3, 1, 1), feat, act='relu', add=feat)
    with pytest.raises(ValueError, match='into is a feature of 3 channels at scale 1, the convolution writes 8 at '
                                         'scale 2'):
        ex.conv(nn.Conv2d(8, 32, 3, 1, 1), feat, x, shuffle=2)
    with pytest.raises(ValueError, match="act must be one of"):
        ex.conv(conv, x, act='gelu')
    with pytest.raises(RuntimeError, match='residual blocks do not nest'):
        for _ in ex.blocks([conv]):
            for _ in ex.blocks([conv]):
                pass
