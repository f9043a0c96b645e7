"""The shipped checkpoint against its stored reference (``tests/data/reference.json``, made by
``tests/data/make_reference.py``): PSNR-Y, subnet map and FLOPs of the full network, Eq. 15 and budget 0.7 on two
small real images, with the router's default options. A change to the weights, the routing or the executor that
moves any of them fails here, and a new reference is then a deliberate, reviewed change of reference.json."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parent / 'data'
sys.path.insert(0, str(DATA))
import make_reference  # noqa: E402

from wbsr_models.infer import load_model  # noqa: E402

#: PSNR of the float output (before 8-bit rounding): CPUs' float32 kernels move it by at most 1e-7 dB (default, AVX2
#: and AVX-512 kernels measured); weights perturbed by 1e-3 of their own size move it by at least 1e-4 dB.
FLOAT_PSNR_TOL = 1e-5
#: PSNR of the 8-bit output, as published tables report it: one pixel rounded the other way moves it by about 4e-5.
PSNR_TOL = 5e-4


@pytest.fixture(scope='module')
def shipped():
    loaded = load_model(str(make_reference.CHECKPOINT))
    net, projection = loaded[0], loaded[2]
    return net, projection


@pytest.fixture(scope='module')
def stored():
    return json.loads((DATA / 'reference.json').read_text())


def mismatches(values: dict, stored: dict) -> list[str]:
    """Every value that differs from the stored reference beyond its tolerance."""
    problems = []
    assert values.keys() == stored['values'].keys()
    for key, want in stored['values'].items():
        got = values[key]
        if got['flops'] != want['flops']:
            problems.append(f"{key}: FLOPs {got['flops']} != {want['flops']}")
        if got['subnet_map_sha256'] != want['subnet_map_sha256']:
            problems.append(f'{key}: another subnet map')
        if abs(got['psnr_y_float'] - want['psnr_y_float']) > FLOAT_PSNR_TOL:
            problems.append(f"{key}: float PSNR-Y {got['psnr_y_float']:.7f} != {want['psnr_y_float']:.7f}")
        if abs(got['psnr_y'] - want['psnr_y']) > PSNR_TOL:
            problems.append(f"{key}: PSNR-Y {got['psnr_y']:.6f} != {want['psnr_y']:.6f}")
    return problems


def test_shipped_checkpoint_gives_the_stored_reference(shipped, stored):
    net, projection = shipped
    assert stored['checkpoint'] == make_reference.CHECKPOINT.name
    assert mismatches(make_reference.compute(net, projection), stored) == []


def test_the_reference_sees_weights_perturbed_by_1e_3(shipped, stored):
    net, projection = shipped
    perturbed = type(net)(**{k: getattr(net, k) for k in ('num_feat', 'num_block', 'upscale', 'widths', 'depths')})
    perturbed.load_state_dict(net.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=gen))
    problems = mismatches(make_reference.compute(perturbed.eval(), projection), stored)
    assert len([p for p in problems if 'float PSNR-Y' in p]) == 6  # every image and mode
    assert not [p for p in problems if 'FLOPs' in p or 'subnet map' in p]  # routing does not read the weights


def test_the_reference_sees_another_tile_size(shipped, stored):
    net, projection = shipped
    problems = mismatches(make_reference.compute(net, projection, tile_size=16), stored)
    for key in ('astronaut/wbsr', 'rocket/wbsr', 'astronaut/budget_0.7', 'rocket/budget_0.7'):
        assert f'{key}: another subnet map' in problems
    assert not [p for p in problems if p.startswith(('astronaut/full', 'rocket/full'))]  # one whole-image pass


def test_the_reference_images_are_far_from_every_class_threshold(shipped):
    assert make_reference.check_margins(*shipped) == []
