"""CUDA against the CPU: routed inference under both schemes, WBSRModel training steps (float32 and AMP), timing.

Every test here is marked ``gpu``: skipped where there is no CUDA device, run on one by ``pytest -m gpu`` (the GPU
run, ``bench/gpu_run.sh``, does). With ``WBSR_GPU_TESTS_ON_CPU=1`` they run with the CPU standing in for CUDA
(the GPU run's dry run does), which exercises everything in them but CUDA itself. TF32 is off in the comparisons
(``exact_float32``), so the tolerances are float32's, not TF32's 10-bit mantissa.
"""
import copy

import numpy as np
import pytest
import torch

from basicsr.models import build_model
from wbsr_arch import WBSRSRResNet
from wbsr_data.difficulty import DifficultyProjection
from wbsr_models.evaluation import run_timed
from wbsr_models.router import Router, RoutingOptions

from conftest import model_options, write_pair_folder
from test_amp import BD, fixed_batch
from test_arch import randomise, tiny_srresnet
from test_router import textured

pytestmark = pytest.mark.gpu


def routed(net, projection, lq, device, **options):
    result = Router(net.to(device), RoutingOptions(**options), 4, projection)(lq.to(device))
    return result.output.cpu(), result


@pytest.mark.parametrize('options', [
    {'mode': 'wbsr', 'scheme': 'tiles'}, {'mode': 'budget', 'budget': 0.6, 'scheme': 'tiles'},
    {'mode': 'wbsr', 'scheme': 'patches'}, {'mode': 'budget', 'budget': 0.6, 'scheme': 'patches'},
    {'mode': 'full'}, {'mode': 'fixed', 'subnet': 2}], ids=lambda o: '-'.join(str(v) for v in o.values()))
def test_routed_inference_on_the_gpu_matches_the_cpu(gpu_device, exact_float32, options):
    projection = DifficultyProjection.fit(np.random.default_rng(0).random((500, 4)) * 0.05, num_classes=10)
    net = randomise(tiny_srresnet(), seed=3).eval()
    lq = textured(61, 75, seed=1)  # not a multiple of the tile or patch step
    expected, on_cpu = routed(net, projection, lq, 'cpu', **options)
    output, on_gpu = routed(copy.deepcopy(net), projection, lq, gpu_device, **options)
    assert on_gpu.output.device.type == gpu_device.type
    assert output.shape == (1, 3, 244, 300)
    assert on_gpu.subnets.tolist() == on_cpu.subnets.tolist()  # the same allocation
    assert (on_gpu.flops, on_gpu.flops_full_image) == (on_cpu.flops, on_cpu.flops_full_image)
    assert torch.allclose(output, expected, atol=1e-5, rtol=0), float((output - expected).abs().max())


def training_steps(opt: dict, init: dict, steps: int = 3):
    """A WBSRModel after ``steps`` steps on fixed batches from the weights ``init``; per step the loss, the
    network's gradients (one vector) and sigma."""
    model = build_model(copy.deepcopy(opt))
    model.net_g.load_state_dict(init)
    trace = []
    for it in range(1, steps + 1):
        model.feed_data(fixed_batch(it))
        model.optimize_parameters(it)
        grads = torch.cat([p.grad.detach().flatten().cpu() for p in model.net_g.parameters() if p.grad is not None])
        log = model.get_current_log()
        trace.append((log['l_pix'], grads, log['noise_sigma']))
    return model, trace


@pytest.fixture
def training_options(tmp_path):
    data = write_pair_folder(tmp_path / 'data', n=3, size=(96, 80))
    # Adam with a large eps updates in proportion to the gradient, so the weights of two runs compare after steps
    # (with eps=1e-8 the first step is lr * sign(gradient), which a near-zero gradient can flip).
    return model_options(tmp_path, data, pixel_opt=dict(BD), optim_g={'type': 'Adam', 'lr': 1e-3, 'eps': 1.0})


def on_device(opt: dict, device: torch.device, **wbsr) -> dict:
    opt = copy.deepcopy(opt)
    opt['num_gpu'] = 1 if device.type == 'cuda' else 0
    opt['train']['wbsr'] = wbsr
    return opt


def test_training_steps_on_the_gpu_match_the_cpu(gpu_device, exact_float32, training_options):
    init = copy.deepcopy(build_model(copy.deepcopy(training_options)).net_g.state_dict())
    cpu_model, cpu_trace = training_steps(on_device(training_options, torch.device('cpu')), init)
    gpu_model, gpu_trace = training_steps(on_device(training_options, gpu_device), init)
    assert next(gpu_model.net_g.parameters()).device.type == gpu_device.type
    for (loss, grads, sigma), (gpu_loss, gpu_grads, gpu_sigma) in zip(cpu_trace, gpu_trace):
        assert gpu_loss == pytest.approx(loss, rel=1e-5)
        assert (gpu_grads - grads).norm() <= 1e-4 * grads.norm()
        assert gpu_sigma == pytest.approx(sigma, rel=1e-5)
    assert cpu_trace[-1][2] != pytest.approx(BD['init_noise_sigma'], rel=1e-3)  # sigma was trained
    for key, value in cpu_model.net_g.state_dict().items():
        assert torch.allclose(gpu_model.net_g.state_dict()[key].cpu(), value, atol=1e-6, rtol=1e-5), key


def test_amp_training_steps_on_the_gpu_stay_close_to_float32(gpu_device, exact_float32, training_options):
    init = copy.deepcopy(build_model(copy.deepcopy(training_options)).net_g.state_dict())
    _, cpu_trace = training_steps(on_device(training_options, torch.device('cpu')), init)
    amp_model, amp_trace = training_steps(on_device(training_options, gpu_device, amp=True), init)
    assert amp_model.grad_scaler.get_scale() == 65536.0  # no step was skipped for inf/NaN gradients
    for (loss, grads, sigma), (amp_loss, amp_grads, amp_sigma) in zip(cpu_trace, amp_trace):
        assert amp_loss == pytest.approx(loss, rel=1e-2)
        assert (amp_grads - grads).norm() <= 1e-2 * grads.norm()  # unscaled, and float16 (bfloat16 on a CPU)
        assert amp_sigma == pytest.approx(sigma, rel=1e-3)


def test_run_timed_waits_for_the_gpu(gpu_device, exact_float32):
    """``run_timed`` synchronises: its seconds cover the kernels, which CUDA events time on the GPU itself."""
    cuda = gpu_device.type == 'cuda'
    net = (WBSRSRResNet() if cuda else tiny_srresnet()).eval().to(gpu_device)
    side = 256 if cuda else 24  # on CUDA: enough GPU work to dwarf the launch time
    lq = torch.rand(1, 3, side, side, device=gpu_device)
    router = Router(net, RoutingOptions(mode='full'), 4)
    run_timed(router, lq)  # warm-up: kernels chosen and memory allocated
    if not cuda:
        result, seconds = run_timed(router, lq)
        assert seconds > 0 and result.output.shape == (1, 3, 4 * side, 4 * side)
        return
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    result, seconds = run_timed(router, lq)
    end.record()
    torch.cuda.synchronize()
    gpu_seconds = start.elapsed_time(end) / 1000
    assert result.output.shape == (1, 3, 4 * side, 4 * side)
    assert gpu_seconds > 1e-3  # the check means something only if the kernels take a while
    assert seconds >= 0.9 * gpu_seconds, (seconds, gpu_seconds)
