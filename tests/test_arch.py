"""The WBSR supernets: FLOPs table, equivalence with BasicSR's networks, export, routing, bad options."""
import pytest
import torch

from basicsr.archs.rcan_arch import RCAN
from basicsr.archs.srresnet_arch import MSRResNet
from wbsr_arch import WBSRRCAN, WBSRSRResNet, count_flops

from conftest import assert_equivalent

SPEC_SRRESNET = {(36, 4): 1.08, (36, 8): 1.28, (36, 16): 1.66, (52, 4): 2.24, (52, 8): 2.64, (52, 16): 3.44,
                 (64, 4): 3.38, (64, 8): 3.99, (64, 16): 5.19}
SPEC_RCAN = {(36, 5): 3.16, (36, 10): 5.55, (36, 20): 10.33, (52, 5): 6.58, (52, 10): 11.56, (52, 20): 21.53,
             (64, 5): 9.95, (64, 10): 17.50, (64, 20): 32.60}


def tiny_srresnet(scale=4):
    return WBSRSRResNet(num_feat=16, num_block=4, upscale=scale, widths=[8, 12, 16], depths=[1, 2, 4])


def tiny_rcan(scale=4):
    return WBSRRCAN(num_feat=16, num_group=2, num_block=4, squeeze_factor=4, upscale=scale, widths=[8, 12, 16],
                    depths=[1, 2, 4])


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


@pytest.mark.parametrize('cls,spec', [(WBSRSRResNet, SPEC_SRRESNET), (WBSRRCAN, SPEC_RCAN)])
def test_flops_reproduce_spec_table_x4_32px(cls, spec):
    net = cls()
    got = dict(zip(net.subnets, net.subnet_flops((32, 32))))
    assert {pair: round(f / 1e9, 2) for pair, f in got.items()} == spec
    # subnets are ordered by FLOPs, not by (width, depth)
    assert [got[p] for p in net.subnets] == sorted(got.values())


def test_ordering_puts_wide_shallow_before_narrow_deep():
    subnets = WBSRSRResNet().subnets
    assert subnets.index((64, 4)) < subnets.index((52, 16))
    assert subnets[0] == (36, 4) and subnets[-1] == (64, 16)


@pytest.mark.parametrize('make', [tiny_srresnet, tiny_rcan])
@pytest.mark.parametrize('hw', [(37, 23), (5, 64), (1, 1)])
def test_affine_flops_model_equals_direct_count(make, hw):
    net = make()
    predicted = net.subnet_flops(hw)
    counted = [count_flops(net, (1, 3, *hw), subnet=i) for i in range(net.num_subnets)]
    assert predicted == counted


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


def test_default_networks_share_basicsr_state_dict_keys():
    assert WBSRSRResNet().state_dict().keys() == MSRResNet().state_dict().keys()
    assert WBSRRCAN().state_dict().keys() == RCAN(3, 3, num_block=20).state_dict().keys()


@pytest.mark.parametrize('make', [tiny_srresnet, tiny_rcan])
def test_exported_subnet_equals_subnet(make):
    net = exact(make())
    x = rand64(1, 3, 10, 12)
    outputs = []
    with torch.no_grad():
        for i, (width, depth) in enumerate(net.subnets):
            plain = net.export_subnet(i).eval()
            assert type(plain) in (MSRResNet, RCAN) and plain.conv_first.weight.dtype == torch.float64
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


@pytest.mark.parametrize('make,plain', [
    (tiny_srresnet, lambda: MSRResNet(num_feat=16, num_block=4)),
    (tiny_rcan, lambda: RCAN(3, 3, num_feat=16, num_group=2, num_block=4, squeeze_factor=4)),
])
def test_every_parameter_of_full_subnet_gets_basicsrs_gradient(make, plain):
    net, ref = exact(make()).train(), plain().double().train()
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


def test_state_dict_round_trip(tmp_path):
    net = randomise(tiny_rcan())
    torch.save(net.state_dict(), tmp_path / 'w.pth')
    other = tiny_rcan().eval()
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


def test_bad_rcan_options_and_unknown_keyword():
    with pytest.raises(ValueError, match='upscale must be one of'):
        WBSRRCAN(upscale=6)
    with pytest.raises(ValueError, match='depths .* above num_block=20'):
        WBSRRCAN(depths=[5, 10, 40])
    with pytest.raises(TypeError):
        WBSRSRResNet(num_blocks=16)  # a typo is an error, not silently ignored


def test_subnet_index_errors():
    net = tiny_srresnet()
    with pytest.raises(IndexError, match='out of range 0..8'):
        net.set_subnet(9)
    with pytest.raises(ValueError, match='3 entries for a batch of 2'):
        net(torch.rand(2, 3, 8, 8), subnet=[0, 1, 2])
    with pytest.raises(ValueError, match='not among widths'):
        net(torch.rand(1, 3, 8, 8), subnet=(10, 1))
