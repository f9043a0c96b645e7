"""The WBSR supernets: the contract, FLOPs table, equivalence with BasicSR's networks, export, routing, bad options.

Tests that every architecture must pass are parametrised over the WBSR supernets registered in BasicSR's
ARCH_REGISTRY (:data:`SUPERNETS`), each built from its own tiny configuration: a new architecture is tested here
without editing any list.
"""
import pytest
import torch

from basicsr.archs.edsr_arch import EDSR
from basicsr.archs.rcan_arch import RCAN
from basicsr.archs.srresnet_arch import MSRResNet
from basicsr.utils.registry import ARCH_REGISTRY
from wbsr_arch import WBSREDSR, WBSRRCAN, WBSRSRResNet, SupernetMixin, count_flops

from conftest import assert_equivalent

SPEC_SRRESNET = {(36, 4): 1.08, (36, 8): 1.28, (36, 16): 1.66, (52, 4): 2.24, (52, 8): 2.64, (52, 16): 3.44,
                 (64, 4): 3.38, (64, 8): 3.99, (64, 16): 5.19}
SPEC_RCAN = {(36, 5): 3.16, (36, 10): 5.55, (36, 20): 10.33, (52, 5): 6.58, (52, 10): 11.56, (52, 20): 21.53,
             (64, 5): 9.95, (64, 10): 17.50, (64, 20): 32.60}

#: Every WBSR supernet registered in BasicSR, by name.
SUPERNETS = sorted((cls for name, cls in ARCH_REGISTRY if name.startswith('WBSR') and isinstance(cls, type)
                    and issubclass(cls, SupernetMixin)), key=lambda cls: cls.__name__)
by_name = pytest.mark.parametrize('cls', SUPERNETS, ids=lambda cls: cls.__name__)


def tiny(cls, scale=4, **overrides):
    """``cls`` in its tiny configuration (``cls.tiny_options()``) at ``scale``."""
    return cls(**{**cls.tiny_options(), 'upscale': scale, **overrides})


def tiny_srresnet(scale=4):
    return tiny(WBSRSRResNet, scale)


def tiny_rcan(scale=4):
    return tiny(WBSRRCAN, scale)


def tiny_edsr(scale=4):
    return tiny(WBSREDSR, scale)


def randomise(net, seed=0):
    """Weights large enough that every layer visibly changes the output (BasicSR inits residuals x0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.15)
    return net.eval()


def exact(net, seed=0):
    """``randomise(net, seed)`` in float64, for the equivalence checks (``conftest.EXACT_RTOL``)."""
    return randomise(net.double(), seed)


def rand64(*shape, seed=0):
    """A uniform float64 input."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- the contract --------------------------------------------------------------------------------------------
def test_the_three_architectures_are_registered_supernets():
    assert [cls.__name__ for cls in SUPERNETS] == ['WBSREDSR', 'WBSRRCAN', 'WBSRSRResNet']


@by_name
def test_tiny_configuration_has_every_contract_attribute(cls):
    net = tiny(cls)
    assert not getattr(cls, '__abstractmethods__', None)
    assert (net.num_in_ch, net.num_out_ch, net.upscale) == (3, 3, 4)
    assert net.widths[-1] == net.num_feat and net.depths[-1] == net.num_block
    assert len(net.widths) == len(net.depths) == 3 and net.num_subnets == 9
    assert 4 in cls.supported_scales and net.tile_executor == 'auto'
    # the supernet subclasses the BasicSR network it slims, and exports it
    plain = type(net.export_subnet(0))
    assert plain.__module__.startswith('basicsr.archs.') and isinstance(net, plain)


def test_a_supernet_without_a_hook_cannot_be_built():
    class WBSRIncomplete(SupernetMixin, MSRResNet):
        supported_scales = (4, )

        def trunk(self, ex, x):
            return x

    with pytest.raises(TypeError, match='abstract method.*head'):
        WBSRIncomplete()


@by_name
def test_tile_executor_is_checked_in_the_constructor_and_when_set(cls):
    message = "tile_executor must be 'auto', 'maps' or 'stores', got 'store'"
    with pytest.raises(ValueError, match=message):
        tiny(cls, tile_executor='store')
    net = tiny(cls, tile_executor='maps')
    assert net.tile_executor == 'maps'
    net.tile_executor = 'stores'
    assert net.tile_executor == 'stores'
    with pytest.raises(ValueError, match=message):
        net.tile_executor = 'store'
    assert net.tile_executor == 'stores'


# ---- FLOPs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('cls,spec', [(WBSRSRResNet, SPEC_SRRESNET), (WBSRRCAN, SPEC_RCAN)])
def test_flops_reproduce_spec_table_x4_32px(cls, spec):
    net = cls()
    got = dict(zip(net.subnets, net.subnet_flops((32, 32))))
    assert {pair: round(f / 1e9, 2) for pair, f in got.items()} == spec
    # subnets are ordered by FLOPs, not by (width, depth)
    assert [got[p] for p in net.subnets] == sorted(got.values())


def test_edsr_flops_are_its_convolutions():
    """EDSR x4 (no table in the spec): 2 x multiply-accumulates of its 3x3 convolutions, layer by layer."""
    net = WBSREDSR()
    h, w = 32, 32
    for (width, depth), flops in zip(net.subnets, net.subnet_flops((h, w))):
        lr = 3 * width + (2 * depth + 1) * width * width + 4 * width * width  # first, blocks, after body, upconv 1
        hr = 4 * (4 * width * width) + 16 * width * 3  # upconv 2 at 2x, conv_last at 4x
        assert flops == 2 * 9 * h * w * (lr + hr), (width, depth)
    assert net.subnets[-1] == (64, 16) and round(net.subnet_flops((32, 32))[-1] / 1e9, 2) == 4.06


def test_ordering_puts_wide_shallow_before_narrow_deep():
    subnets = WBSRSRResNet().subnets
    assert subnets.index((64, 4)) < subnets.index((52, 16))
    assert subnets[0] == (36, 4) and subnets[-1] == (64, 16)


@by_name
@pytest.mark.parametrize('hw', [(37, 23), (1, 1)])
def test_affine_flops_model_equals_direct_count(cls, hw):
    net = tiny(cls)
    predicted = net.subnet_flops(hw)
    counted = [count_flops(net, (1, 3, *hw), subnet=i) for i in range(net.num_subnets)]
    assert predicted == counted


# ---- the largest subnet is the BasicSR network ---------------------------------------------------------------
@pytest.mark.parametrize('scale', [2, 3, 4])
def test_full_subnet_is_basicsr_msrresnet(scale):
    ref = exact(MSRResNet(num_feat=16, num_block=4, upscale=scale), scale)
    sup = tiny_srresnet(scale).double().eval()
    sup.load_state_dict(ref.state_dict(), strict=True)
    MSRResNet(num_feat=16, num_block=4, upscale=scale).load_state_dict(sup.state_dict(), strict=True)  # and back
    x = rand64(2, 3, 11, 9)
    with torch.no_grad():
        assert_equivalent(sup(x), ref(x))


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_full_subnet_is_basicsr_rcan(scale):
    ref = exact(RCAN(3, 3, num_feat=16, num_group=2, num_block=4, squeeze_factor=4, upscale=scale), scale)
    sup = tiny_rcan(scale).double().eval()
    sup.load_state_dict(ref.state_dict(), strict=True)
    RCAN(3, 3, num_feat=16, num_group=2, num_block=4, squeeze_factor=4, upscale=scale).load_state_dict(
        sup.state_dict(), strict=True)
    x = rand64(2, 3, 11, 9)
    with torch.no_grad():
        assert_equivalent(sup(x), ref(x))


@pytest.mark.parametrize('scale,res_scale', [(2, 1), (3, 1), (4, 1), (4, 0.1), (8, 1)])
def test_full_subnet_is_bit_identical_to_basicsr_edsr(scale, res_scale):
    """Same weights, same float32 input: the same bits, in either memory layout (the router feeds channels-last)."""
    ref = randomise(EDSR(3, 3, num_feat=16, num_block=4, upscale=scale, res_scale=res_scale), scale)
    sup = WBSREDSR(num_feat=16, num_block=4, upscale=scale, res_scale=res_scale, widths=[8, 16], depths=[2, 4]).eval()
    sup.load_state_dict(ref.state_dict(), strict=True)
    EDSR(3, 3, num_feat=16, num_block=4, upscale=scale, res_scale=res_scale).load_state_dict(sup.state_dict(),
                                                                                            strict=True)
    x = torch.rand(2, 3, 11, 9, generator=torch.Generator().manual_seed(scale))
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout)
            expected = ref(xl)
            assert torch.equal(sup(xl), expected) and torch.equal(sup(xl, subnet=(16, 4)), expected)
            assert not torch.equal(sup(xl, subnet=(16, 2)), expected)


def test_default_edsr_is_bit_identical_to_basicsrs():
    ref = EDSR(3, 3).eval()  # BasicSR's defaults: 64 features, 16 blocks, x4
    sup = WBSREDSR().eval()
    sup.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sup(x), ref(x))


def test_default_networks_share_basicsr_state_dict_keys():
    assert WBSRSRResNet().state_dict().keys() == MSRResNet().state_dict().keys()
    assert WBSRRCAN().state_dict().keys() == RCAN(3, 3, num_block=20).state_dict().keys()
    assert WBSREDSR().state_dict().keys() == EDSR(3, 3).state_dict().keys()


@by_name
def test_largest_subnet_is_the_plain_network_it_exports(cls):
    """For every registered supernet: its BasicSR network of the full size loads its weights strictly and gives its
    output."""
    net = exact(tiny(cls, 3))
    plain = net.plain_network(net.num_feat, net.num_block).double().eval()
    plain.load_state_dict(net.state_dict(), strict=True)
    assert plain.state_dict().keys() == net.state_dict().keys()
    x = rand64(1, 3, 10, 7)
    with torch.no_grad():
        assert_equivalent(net(x), plain(x))


@by_name
def test_exported_subnet_equals_subnet(cls):
    net = exact(tiny(cls))
    x = rand64(1, 3, 10, 12)
    outputs = []
    with torch.no_grad():
        for i, (width, depth) in enumerate(net.subnets):
            plain = net.export_subnet(i).eval()
            assert isinstance(net, type(plain)) and plain.conv_first.weight.dtype == torch.float64
            assert plain.conv_first.out_channels == width
            sub = net(x, subnet=i)
            assert_equivalent(plain(x), sub)
            outputs.append(sub)
    # the subnets really differ from each other
    assert min((a - b).abs().max().item() for a, b in zip(outputs, outputs[1:])) > 1e-3


def test_set_subnet_selects_following_forwards_and_per_sample_routing():
    net = exact(tiny_srresnet())
    x = rand64(3, 3, 8, 8)
    with torch.no_grad():
        per_subnet = {i: net(x, subnet=i) for i in (0, 4, 8)}
        net.set_subnet(4)
        assert torch.equal(net(x), per_subnet[4])
        net.set_subnet(None)
        assert torch.equal(net(x), per_subnet[8])
        net.set_subnet([8, 0, 4])
        mixed = net(x)
        net.set_subnet(None)
    for row, i in enumerate((8, 0, 4)):  # batch composition changes float rounding only
        assert_equivalent(mixed[row], per_subnet[i][row])


@by_name
def test_every_parameter_of_full_subnet_gets_basicsrs_gradient(cls):
    net = exact(tiny(cls)).train()
    ref = net.plain_network(net.num_feat, net.num_block).double().train()
    ref.load_state_dict(net.state_dict())
    x = rand64(2, 3, 8, 8)
    net(x).square().mean().backward()
    ref(x).square().mean().backward()
    grads = dict(ref.named_parameters())
    nonzero = 0
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert_equivalent(p.grad, grads[name].grad)
        nonzero += bool(p.grad.abs().sum() > 0)
    assert nonzero >= 0.9 * len(grads)  # a few channel-attention ReLUs may be dead for random weights


def test_smallest_subnet_leaves_deep_blocks_without_gradient():
    net = randomise(tiny_srresnet()).train()
    net(torch.rand(2, 3, 8, 8), subnet=0).square().mean().backward()
    assert net.body[3].conv1.weight.grad is None
    assert net.body[0].conv1.weight.grad[8:].abs().sum() == 0  # channels beyond width 8 unused
    assert net.body[0].conv1.weight.grad[:8, :8].abs().sum() > 0


@by_name
def test_state_dict_round_trip(cls, tmp_path):
    net = randomise(tiny(cls))
    torch.save(net.state_dict(), tmp_path / 'w.pth')
    other = tiny(cls).eval()
    other.load_state_dict(torch.load(tmp_path / 'w.pth', weights_only=True), strict=True)
    x = torch.rand(1, 3, 9, 9)
    with torch.no_grad():
        for i in (0, 5, 8):
            assert torch.equal(net(x, subnet=i), other(x, subnet=i))


@pytest.mark.parametrize('kwargs,message', [
    ({'widths': [36, 64, 52]}, 'widths must be strictly ascending'),
    ({'widths': [36, 52, 80]}, 'above num_feat=64'),
    ({'widths': [36, 52]}, 'must equal num_feat=64'),
    ({'depths': [4, 8, 32]}, 'above num_block=16'),
    ({'depths': []}, 'depths must be a non-empty list'),
    ({'widths': [0, 64]}, 'widths must be positive'),
    ({'upscale': 5}, 'upscale must be one of'),
])
def test_bad_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WBSRSRResNet(**kwargs)


def test_bad_rcan_and_edsr_options_and_unknown_keyword():
    with pytest.raises(ValueError, match='upscale must be one of'):
        WBSRRCAN(upscale=6)
    with pytest.raises(ValueError, match='depths .* above num_block=20'):
        WBSRRCAN(depths=[5, 10, 40])
    with pytest.raises(ValueError, match=r'upscale must be one of \(2, 3, 4, 8\) for WBSREDSR, got 6'):
        WBSREDSR(upscale=6)
    with pytest.raises(ValueError, match='the largest entry of depths'):
        WBSREDSR(depths=[4, 8])
    with pytest.raises(TypeError):
        WBSRSRResNet(num_blocks=16)  # a typo is an error, not silently ignored
    with pytest.raises(TypeError):
        WBSREDSR(64)  # keyword-only


def test_subnet_index_errors():
    net = tiny_srresnet()
    with pytest.raises(IndexError, match='out of range 0..8'):
        net.set_subnet(9)
    with pytest.raises(ValueError, match='3 entries for a batch of 2'):
        net(torch.rand(2, 3, 8, 8), subnet=[0, 1, 2])
    with pytest.raises(ValueError, match='not among widths'):
        net(torch.rand(1, 3, 8, 8), subnet=(10, 1))
