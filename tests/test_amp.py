"""``train.wbsr.amp``: mixed-precision training steps of WBSRModel (bfloat16 autocast on the CPU, float16 on CUDA)."""
import copy

import numpy as np
import pytest
import torch

from basicsr.models import build_model

from conftest import model_options, write_pair_folder

# BDLoss with a learnt sigma: its optimizer steps from the network optimizer's post-hook, through the scaler.
BD = {'type': 'BDLoss', 'loss_weight': 1.0, 'label_space': 'rgb', 'gmm_pixels': 3000, 'init_noise_sigma': 0.05,
      'learn_sigma': True, 'sigma_lr': 1e-2}


@pytest.fixture
def data(tmp_path):
    return write_pair_folder(tmp_path / 'data', n=3, size=(96, 80))


def fixed_batch(seed: int = 0, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, 32, 32, generator=g)
    return {'lq': torch.nn.functional.avg_pool2d(gt, 4), 'gt': gt}


def run_steps(opt: dict, init: dict, steps: int = 2):
    """The model after ``steps`` steps on fixed batches from the weights ``init``; each step's network gradients
    (as the optimizer used them) and the sigma gradient its optimizer stepped with."""
    model = build_model(copy.deepcopy(opt))
    model.net_g.load_state_dict(init)
    grads, sigma_grads = [], []
    sigma = model.cri_pix.noise_sigma
    model.optimizer_sigma.register_step_pre_hook(lambda *_: sigma_grads.append(float(sigma.grad)))
    for it in range(1, steps + 1):
        model.feed_data(fixed_batch(it))
        model.optimize_parameters(it)
        grads.append({k: p.grad.clone() for k, p in model.net_g.named_parameters() if p.grad is not None})
    return model, grads, sigma_grads


def test_amp_option_is_checked(tmp_path, data):
    assert build_model(model_options(tmp_path, data, wbsr={'amp': True})).amp is True
    assert build_model(model_options(tmp_path, data)).amp is False  # the default
    with pytest.raises(ValueError) as err:
        build_model(model_options(tmp_path, data, wbsr={'ampp': True}))
    assert str(err.value) == ("train.wbsr: unknown option(s) ['ampp']; known: amp, subnet_sampling, sandwich_random, "
                              "tile_size, distill, distill_loss")
    with pytest.raises(ValueError) as err:
        build_model(model_options(tmp_path, data, wbsr={'amp': 'yes'}))
    assert str(err.value) == "train.wbsr.amp must be true or false, got 'yes'"


def test_amp_step_on_the_cpu_autocasts_to_bfloat16_and_scales_sigma_too(tmp_path, data):
    # Adam with a large eps updates in proportion to the gradient (no sign flips of near-zero gradients), so the
    # weights of the two runs can be compared after the steps.
    opt = model_options(tmp_path, data, pixel_opt=dict(BD), optim_g={'type': 'Adam', 'lr': 1e-3, 'eps': 1.0})
    init = copy.deepcopy(build_model(copy.deepcopy(opt)).net_g.state_dict())
    plain, plain_grads, plain_sigma = run_steps(opt, init)
    amp_opt = copy.deepcopy(opt)
    amp_opt['train']['wbsr'] = {'amp': True}
    mixed, mixed_grads, mixed_sigma = run_steps(amp_opt, init)
    assert plain.grad_scaler is None and mixed.grad_scaler.get_scale() == 65536.0  # no inf: the scale stays
    # bfloat16 is really used: the outputs differ from float32's, within bfloat16's 8-bit mantissa
    diff = (mixed.output - plain.output).abs().max().item()
    assert 0 < diff < 0.05
    # the network's gradients are unscaled before the step: within 1% of float32's (measured: 0.17%; 65536x if not)
    for step in range(2):
        assert plain_grads[step].keys() == mixed_grads[step].keys()
        keys = sorted(plain_grads[step])
        g = torch.cat([plain_grads[step][k].flatten() for k in keys])
        assert (torch.cat([mixed_grads[step][k].flatten() for k in keys]) - g).norm() < 0.01 * g.norm()
    for key, value in plain.net_g.state_dict().items():
        assert torch.allclose(mixed.net_g.state_dict()[key], value, atol=1e-6), key
    # so is sigma's, which its own optimizer steps with
    assert len(mixed_sigma) == len(plain_sigma) == 2
    assert np.allclose(mixed_sigma, plain_sigma, rtol=1e-3)
    assert mixed.get_current_log()['noise_sigma'] == pytest.approx(plain.get_current_log()['noise_sigma'], rel=1e-3)
    assert mixed.get_current_log()['noise_sigma'] != pytest.approx(BD['init_noise_sigma'], rel=1e-3)
