"""Dynamic inference: merging, modes, FLOPs accounting, baselines, allocation maps, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from basicsr.archs.srresnet_arch import MSRResNet
from torch.utils.flop_counter import FlopCounterMode

from wbsr_arch import WBSRSRResNet, count_flops
from wbsr_data.difficulty import DifficultyProjection, gradient_vectors, grid_starts
from wbsr_models.baselines import (ArmTable, build_arm_table, edge_scores, oracle_subnets, region_outputs,
                                   region_psnr_table)
from wbsr_models.regions import cut_patches
from wbsr_models.router import (Router, RoutingOptions, alpha_subnets, budget_subnets, eq15_subnets,
                                shifted_subnets)
from wbsr_models.visualize import allocation_map, subnet_colors, subnet_labels

from conftest import assert_equivalent
from test_arch import exact, randomise, tiny_srresnet


@pytest.fixture(scope='module')
def net():
    return randomise(tiny_srresnet(), seed=3)


@pytest.fixture(scope='module')
def net64():
    """``net`` in float64, for the checks that routing computes what the network computes (``EXACT_RTOL``)."""
    return exact(tiny_srresnet(), seed=3)


@pytest.fixture(scope='module')
def projection():
    rng = np.random.default_rng(0)
    return DifficultyProjection.fit(rng.random((500, 4)) * 0.05, num_classes=10)


def textured(h, w, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(1, 3, h, w).clone()
    base[..., :, w // 2:] += torch.rand(1, 3, h, w - w // 2, generator=gen) * 0.5
    return base.clamp(0, 1).to(dtype)


def route(net, projection, x, **options):
    return Router(net, RoutingOptions(**options), 4, projection)(x)


# ---- merging ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('scheme', ['patches', 'tiles'])
@pytest.mark.parametrize('mode,extra', [('wbsr', {}), ('budget', {'budget': 0.5}), ('alpha', {'alpha': 2.0})])
def test_one_region_covering_the_image_equals_the_plain_forward(net64, projection, mode, extra, scheme):
    x = textured(20, 27, dtype=torch.float64)
    result = route(net64, projection, x, mode=mode, scheme=scheme, patch_size=32, step=28, tile_size=32, **extra)
    assert len(result.subnets) == 1
    with torch.no_grad():
        expected = net64(x, subnet=int(result.subnets[0]))
    assert_equivalent(result.output, expected)


def test_all_full_tiling_equals_whole_image_away_from_patch_borders():
    torch.manual_seed(0)
    small = WBSRSRResNet(num_feat=8, num_block=1, widths=[4, 8], depths=[1]).double().eval()
    for p in small.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.rand(1, 3, 45, 61, dtype=torch.float64)
    with torch.no_grad():
        whole = small(x)
    patch, step, radius, s = 32, 20, 6, 4  # radius > receptive field of this network in LR pixels
    result = Router(small, RoutingOptions(scheme='patches', patch_size=patch, step=step), s)(
        x, assign=lambda regions, classes, costs: np.full(len(regions), costs.shape[1] - 1))

    def clean(n):  # positions at least `radius` from every patch border (image borders are shared)
        ok = np.ones(n, bool)
        for t in grid_starts(n, patch, step, cover_end=True):
            for a in range(t, t + patch):
                if (a - t < radius and a >= radius) or (t + patch - 1 - a < radius and a < n - radius):
                    ok[a] = False
        return ok

    mask = np.kron(np.outer(clean(45), clean(61)), np.ones((s, s), bool))
    diff = (result.output - whole).abs()[0].amax(0).numpy()
    assert mask.mean() > 0.3
    assert diff[mask].max() <= 1e-10 * whole.abs().max().item()  # conftest.EXACT_RTOL
    assert diff.max() > 1e-3  # and the test can see patch-border effects where they are


def test_full_mode_runs_large_images_in_bands_exactly(net64):
    x = textured(40, 50, dtype=torch.float64)
    with torch.no_grad():
        whole = net64(x)
    result = Router(net64, RoutingOptions(mode='full', max_pixels=16 * 50), 4)(x)  # upsampler in bands of 16 rows
    assert_equivalent(result.output, whole)
    assert result.flops > count_flops(net64, (1, 3, 40, 50))  # the band margins are paid for


def test_plain_network_on_large_images_runs_in_pieces_with_margins():
    plain = exact(MSRResNet(num_feat=8, num_block=1), seed=1)
    x = textured(40, 50, dtype=torch.float64)
    with torch.no_grad():
        whole = plain(x)
    result = Router(plain, RoutingOptions(mode='full', max_pixels=24 * 24), 4)(x)  # pieces of 16 with 16 margin
    assert_equivalent(result.output, whole)
    assert result.flops > count_flops(plain, (1, 3, 40, 50))


# ---- modes ----------------------------------------------------------------------------------------------
def test_eq15_maps_ten_classes_onto_nine_subnets():
    assert eq15_subnets(np.arange(1, 11), 10, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert eq15_subnets(np.arange(1, 11), 10, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_shift_zero_at_class_ends_is_eq15():
    positions = np.arange(1, 11) / 10
    assert shifted_subnets(positions, 0.0, 9).tolist() == eq15_subnets(np.arange(1, 11), 10, 9).tolist()


def test_alpha_picks_the_nearest_cost():
    costs = np.array([1., 2., 4., 8.])
    assert alpha_subnets(np.array([1, 5, 10]), 10, costs, alpha=1.0).tolist() == [0, 2, 3]
    assert alpha_subnets(np.array([10]), 10, costs, alpha=0.25).tolist() == [1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=300), st.floats(0.21, 1.0))
def test_budget_never_exceeded_and_monotone(positions, budget):
    costs = np.array([1.08, 1.28, 1.66, 2.24, 2.64, 3.38, 3.44, 3.99, 5.19])
    u = np.asarray(positions)
    chosen = budget_subnets(u, costs, budget)
    assert costs[chosen].mean() <= budget * costs[-1] * (1 + 1e-9)
    order = np.argsort(u, kind='stable')
    assert np.all(np.diff(chosen[order]) >= 0) or np.all(np.diff(u[order])[np.diff(chosen[order]) < 0] == 0)
    more = budget_subnets(u, costs, min(1.0, budget + 0.1))
    assert np.all(more >= chosen)  # a larger budget never downgrades a patch


@pytest.mark.parametrize('scheme', ['patches', 'tiles'])
def test_budget_mode_on_images(net, projection, scheme):
    for seed in range(4):
        x = textured(50 + 7 * seed, 70, seed)
        for budget in (0.45, 0.6, 0.8):
            result = route(net, projection, x, mode='budget', budget=budget, scheme=scheme, tile_size=16)
            assert result.ratio_regions <= budget + 1e-9
            regions = Router(net, RoutingOptions(scheme=scheme, tile_size=16), 4).regions(x)
            scores = projection.score(regions.per_region(lambda c: gradient_vectors(c).numpy()))
            order = np.argsort(scores)
            assert np.all(np.diff(result.subnets[order]) >= 0)  # harder regions never get smaller subnets


def test_patch_flops_are_the_sum_of_per_patch_costs(net, projection):
    x = textured(45, 61)
    result = route(net, projection, x, mode='wbsr', scheme='patches')
    per_subnet = [count_flops(net, (1, 3, 32, 32), subnet=i) for i in range(net.num_subnets)]
    assert result.flops == sum(per_subnet[m] for m in result.subnets)
    assert result.flops_full_regions == per_subnet[-1] * len(result.subnets)
    assert result.flops_full_image == count_flops(net, (1, 3, 45, 61))
    assert result.shares().sum() == pytest.approx(1.0)


def test_tile_flops_are_what_the_flop_counter_counts(net, projection):
    x = textured(45, 61)
    result = Router(net, RoutingOptions(mode='wbsr', tile_size=16), 4, projection)(x)
    assert result.scheme == 'tiles' and len(set(result.subnets.tolist())) > 2  # a mixed assignment
    tiles = [count_flops(net, (1, 3, bh, bw), subnet=int(m)) for (_, _, bh, bw), m in zip(result.boxes, result.subnets)]
    assert result.flops == sum(tiles)  # no halo or gather work hidden: the convolutions do exactly the tiles' work
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run = net.forward_tiles(x, result.subnets.reshape(3, 4), tile_size=16)
    assert result.flops == run.flops == counter.get_total_flops()
    assert net.tile_flops((45, 61), result.subnets.reshape(3, 4), tile_size=16) == result.flops
    assert result.flops_full_regions == result.flops_full_image == count_flops(net, (1, 3, 45, 61))


@pytest.mark.parametrize('scheme,regions', [('patches', 4), ('tiles', 1)])
def test_plain_network_routing(scheme, regions):
    plain = MSRResNet(num_feat=8, num_block=1).eval()
    x = textured(40, 40)
    result = Router(plain, RoutingOptions(mode='wbsr', scheme=scheme), 4)(x)
    assert result.subnets.tolist() == [0] * regions and result.num_subnets == 1
    assert result.flops == regions * count_flops(plain, (1, 3, 40 if regions == 1 else 32, 40 if regions == 1 else 32))


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('hw', [(1, 1), (5, 7), (33, 29), (61, 45)])
@pytest.mark.parametrize('channels', [1, 3, 4])
def test_odd_sizes_and_channels_give_scaled_rgb_output(net, projection, hw, channels):
    x = torch.rand(1, channels, *hw)
    result = route(net, projection, x, mode='wbsr')
    assert result.output.shape == (1, 3, 4 * hw[0], 4 * hw[1])
    assert torch.isfinite(result.output).all()


def test_missing_thresholds_fit_on_the_image_with_a_warning(net, basicsr_log):
    result = Router(net, RoutingOptions(), 4, projection=None)(textured(60, 60))
    assert 'fitted on each test image' in basicsr_log.text
    assert result.classes.min() >= 1 and result.classes.max() <= 10


@pytest.mark.parametrize('options,message', [
    ({'mode': 'fast'}, 'val.routing.mode must be one of'),
    ({'mode': 'budget', 'budget': 1.5}, r'budget must be in \(0, 1\]'),
    ({'mode': 'budget', 'budget': 0}, r'budget must be in \(0, 1\]'),
    ({'mode': 'budget'}, 'val.routing.budget is required for budget mode'),
    ({'mode': 'fixed'}, 'subnet is required for fixed mode'),
    ({'step': 40}, 'step <= patch_size'),
    ({'batch': 3}, r"unknown option\(s\) \['batch'\]"),
])
def test_bad_routing_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        RoutingOptions.from_opt(options)


def test_budget_below_cheapest_subnet_and_bad_fixed_index(net):
    with pytest.raises(ValueError, match='below the cheapest subnet'):
        Router(net, RoutingOptions(mode='budget', budget=0.05), 4)
    with pytest.raises(ValueError, match='subnet=9 out of range'):
        Router(net, RoutingOptions(mode='fixed', subnet=9), 4)
    with pytest.raises(ValueError, match='one LR image'):
        Router(net, RoutingOptions(), 4)(torch.rand(2, 3, 8, 8))


# ---- baselines and maps -----------------------------------------------------------------------------------
def test_arm_table_build_select_and_round_trip(net, projection, tmp_path):
    router = Router(net, RoutingOptions(), 4, projection)
    pairs = [(textured(40, 40, s), torch.rand(1, 3, 160, 160)) for s in range(2)]
    table = build_arm_table(router, pairs, num_bins=4)
    assert table.psnr.shape[1] == net.num_subnets and np.isfinite(table.psnr).all()
    table.save(str(tmp_path / 'arm.npz'))
    again = ArmTable.load(str(tmp_path / 'arm.npz'))
    assert np.array_equal(again.psnr, table.psnr)
    regions = cut_patches(torch.rand(1, 3, 32, 144), 32, 28)
    patches = regions.crops((32, 32), np.arange(len(regions)))
    costs = np.tile(np.asarray(net.subnet_flops((32, 32)), dtype=float), (len(regions), 1))
    bins = np.clip(np.searchsorted(again.edges, edge_scores(patches), side='right') - 1, 0, len(again.psnr) - 1)
    assert again.select(regions, costs, eta=1e6).tolist() == [int(again.psnr[b].argmax()) for b in bins]
    assert again.select(regions, costs, eta=0.0).tolist() == [0] * 5  # cost only: the cheapest
    with pytest.raises(ValueError, match='made for 9 subnets'):
        again.select(regions, costs[:, :3], eta=1.0)


def test_oracle_picks_cheapest_within_tolerance():
    table = np.array([[30.0, 20.0], [30.02, 25.06], [30.04, 25.1]])
    assert oracle_subnets(table, 0.05).tolist() == [0, 1]
    assert oracle_subnets(table, 0.0).tolist() == [2, 2]


def test_reused_patch_outputs_give_the_routed_image_and_the_psnr_table(net64, projection):
    """The benchmark's reuse of per-subnet patch outputs: same merge, same per-patch PSNR as fresh runs."""
    net = net64
    x, gt = textured(45, 61, dtype=torch.float64), textured(180, 244, seed=1, dtype=torch.float64)
    router = Router(net, RoutingOptions(mode='wbsr', scheme='patches'), 4, projection)
    cut = region_outputs(router, x)
    regions, outputs = cut
    assert len(outputs) == net.num_subnets and outputs[0].shape == (len(regions), 3, 128, 128)
    table, _ = region_psnr_table(router, x, gt)
    np.testing.assert_allclose(region_psnr_table(router, x, gt, cut=cut)[0], table, rtol=0, atol=1e-9)
    assert table.shape == (net.num_subnets, 6)  # 2 x 3 patches of 32 at step 28, flush with the border

    class Reusing(Router):
        def patch_sr(self, patches, rows, subnet):
            return outputs[subnet][torch.as_tensor(rows)]

    reused = Reusing(net, RoutingOptions(mode='wbsr', scheme='patches'), 4, projection)(x).output
    assert_equivalent(reused, router(x).output)


def test_allocation_map_has_legend_and_colours(net, projection):
    x = textured(60, 90)
    result = route(net, projection, x, mode='wbsr')
    lq = (x[0].permute(1, 2, 0).numpy()[..., ::-1] * 255).astype(np.uint8)
    img = allocation_map(lq, result, subnet_labels(net))
    assert img.shape[0] >= 384 and img.shape[1] > 384 * 90 // 60
    assert len({tuple(c) for c in subnet_colors(9)}) == 9
    assert subnet_labels(net, (32, 32))[0].startswith('w8 d1')
