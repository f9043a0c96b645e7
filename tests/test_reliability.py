"""Reliability: DDP on CPU, killed and resumed runs, atomic writes, untrusted files, hostile inputs, memory."""
import gc
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from basicsr.models import build_model
from wbsr_data import fileio
from wbsr_arch import WBSRSRResNet
from wbsr_data.difficulty import gradient_vectors
from wbsr_data.fileio import CorruptFileError, torch_load, torch_save
from wbsr_data.hes_dataset import HESPairedImageDataset
from wbsr_losses.gmm import load_gmm
from wbsr_models import infer, runners
from wbsr_models.baselines import ArmTable
from wbsr_models.router import Router, RoutingOptions

from conftest import REPO, model_options, write_pair_folder
from test_arch import randomise, tiny_srresnet
from test_registration import tiny_train_options

PYTHON_ENV = {k: v for k, v in os.environ.items() if k != 'WBSR_DISABLE_HOOK'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ---- multi-process training -----------------------------------------------------------------------------
def test_ddp_two_gloo_ranks_stay_in_step(tmp_path):
    data = write_pair_folder(tmp_path / 'data', n=4, size=(96, 96))
    opt = tiny_train_options(data, 'ddp', total_iter=12, wbsr={'subnet_sampling': 'flops_squared'})
    opt['train']['pixel_opt'] = {'type': 'BDLoss', 'gmm_pixels': 5000, 'sigma_lr': 1e-2, 'learn_sigma': True}
    opt['datasets']['train'].update(switch_ratio=0.5, delta=0.5)
    opt['find_unused_parameters'] = True
    (tmp_path / 'ddp.yml').write_text(yaml.safe_dump(opt))
    out = tmp_path / 'out'
    out.mkdir()
    env = dict(PYTHON_ENV, WBSR_DDP_OUT=str(out), OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                           str(free_port()), str(REPO / 'tests' / 'ddp_worker.py'), '-opt', str(tmp_path / 'ddp.yml'),
                           '--launcher', 'pytorch'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert all(r['world_size'] == 2 and r['ddp'] == 'DistributedDataParallel' for r in ranks)
    a, b = (r['records'] for r in ranks)
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert x['subnets'] == y['subnets']  # every rank trains the same subnet
        assert x['weights'] == y['weights']  # identical weights after every step
        assert x['sigma'] == y['sigma']  # and identical BDLoss sigma
        assert x['samples'] != y['samples']  # but different HES samples
    assert len({x['subnets'] for x in a}) > 1  # the subnet changes from iteration to iteration
    assert a[0]['sigma'] != a[-1]['sigma']
    for records in (a, b):  # the switch: sample-level up to iteration 6, class-level from 7 on both ranks
        assert [set(x['phases']) for x in records] == [{0}] * 6 + [{1}] * 6


# ---- interrupted runs -------------------------------------------------------------------------------------
def logged(log: str, key: str) -> dict[int, float]:
    values = {}
    for line in log.splitlines():
        if 'iter:' in line and f' {key}: ' in line:
            it = int(line.split('iter:')[1].split(',')[0])
            values[it] = float(line.split(f' {key}: ')[1].split()[0])
    return values


def test_sigkill_then_auto_resume_continues_the_run(tmp_path):
    data = write_pair_folder(tmp_path / 'data', n=3, size=(96, 80))
    opt = tiny_train_options(data, 'killed', total_iter=400)
    opt['network_g'] = {'type': 'WBSRRCAN', 'num_feat': 8, 'num_group': 1, 'num_block': 2, 'squeeze_factor': 4,
                        'widths': [4, 8], 'depths': [1, 2]}  # starts far from the target: a clear loss curve
    opt['train']['optim_g']['lr'] = 2e-3
    opt['train']['pixel_opt'] = {'type': 'BDLoss', 'gmm_pixels': 5000, 'sigma_lr': 1e-3, 'learn_sigma': True,
                                 'init_noise_sigma': 0.05}
    opt['datasets']['train']['switch_ratio'] = 0.1  # the switch at iteration 40, before the checkpoint
    opt['logger']['save_checkpoint_freq'] = 80
    (tmp_path / 'opt.yml').write_text(yaml.safe_dump(opt))
    exp = tmp_path / 'experiments' / 'killed'
    args = ['-opt', str(tmp_path / 'opt.yml'), '--auto_resume']
    cmd = [sys.executable, '-m', 'wbsr_models.train', *args]
    env = dict(PYTHON_ENV, OMP_NUM_THREADS='1')
    killer = [sys.executable, str(Path(__file__).with_name('kill_after_state.py')), '80', *args]
    with open(tmp_path / 'first.log', 'w') as first_log:  # SIGKILL right after the state of iteration 80 is saved
        first = subprocess.run(killer, cwd=tmp_path, env=env, stdout=first_log, stderr=subprocess.STDOUT, timeout=600)
    assert first.returncode == -signal.SIGKILL, (tmp_path / 'first.log').read_text()[-3000:]
    states = sorted(int(p.stem) for p in (exp / 'training_states').glob('*.state'))
    resume_iter = states[-1]
    assert states == [80] and not list((exp / 'training_states').glob('.*.tmp'))
    saved = torch_load(str(exp / 'training_states' / f'{resume_iter}.state'))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (tmp_path / 'first.log').read_text(), done.stdout + done.stderr
    assert 'Resuming training from epoch: ' in second and f'iter: {resume_iter}.' in second
    losses_before, losses_after = logged(first, 'l_pix'), logged(second, 'l_pix')
    assert min(losses_after) == resume_iter + 1 and max(losses_after) == 400
    untrained = np.mean([losses_before[i] for i in range(1, 6)])
    trained = np.mean([losses_before[i] for i in range(resume_iter - 4, resume_iter + 1) if i in losses_before])
    resumed = np.mean([losses_after[i] for i in range(resume_iter + 1, resume_iter + 6)])
    assert untrained - trained > 0.02  # the run had learnt something
    assert abs(resumed - trained) < abs(resumed - untrained)  # and the resumed run starts from there
    sigma_after = logged(second, 'noise_sigma')[resume_iter + 1]
    assert abs(sigma_after - float(saved['wbsr']['noise_sigma'])) < 2e-3  # one Adam step away
    assert abs(float(saved['wbsr']['noise_sigma']) - 0.05) > 5e-3  # and sigma had moved from its start
    assert set(logged(second, 'hes_phase').values()) == {1.0}  # resumed after the switch: class-level


def test_a_crash_while_saving_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / 'net_g_latest.pth'
    torch_save({'params': {'w': torch.ones(3)}}, str(path))
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        with open(f, 'wb') as handle:
            handle.write(b'PK\x03\x04 half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        torch_save({'params': {'w': torch.zeros(3)}}, str(path))
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ['net_g_latest.pth']
    monkeypatch.undo()
    assert torch.equal(torch_load(str(path))['params']['w'], torch.ones(3))


def test_truncated_checkpoint_and_state_are_refused_by_name(tmp_path, capsys):
    data = write_pair_folder(tmp_path / 'data', n=2)
    opt = model_options(tmp_path, data)
    model = build_model(opt)
    model.save(0, 5)
    ckpt = Path(opt['path']['models']) / 'net_g_5.pth'
    state = Path(opt['path']['training_states']) / '5.state'
    for path in (ckpt, state):
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    test_opt = model_options(tmp_path, data, is_train=False)
    test_opt['path']['pretrain_network_g'] = str(ckpt)
    with pytest.raises(CorruptFileError, match=f'{ckpt}: truncated or corrupt checkpoint'):
        build_model(test_opt)
    resume_opt = dict(opt, auto_resume=True)
    with pytest.raises(CorruptFileError, match=f'{state}: truncated or corrupt checkpoint'):
        runners.load_resume_state(resume_opt)
    assert infer.main(['-i', data['dataroot_lq'], '-o', str(tmp_path / 'o'), '--model', str(ckpt)]) == 2
    assert str(ckpt) in capsys.readouterr().err


# ---- untrusted files ----------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs ``touch <marker>``: a loader that unpickles it is unsafe."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def pickled_npz(path: Path, marker: Path, names) -> None:
    arrays = {name: np.array([Payload(marker)], dtype=object) for name in names}
    arrays[fileio.META_KEY] = np.frombuffer(b'{}', dtype=np.uint8)
    with open(path, 'wb') as f:
        np.savez(f, **arrays)


def test_crafted_pickles_are_refused_everywhere_without_running(tmp_path, basicsr_log):
    marker = tmp_path / 'pwned'
    # the payload really is live: plain pickle runs it
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()

    gmm = tmp_path / 'gmm.npz'
    pickled_npz(gmm, marker, ['weights', 'means', 'covariances'])
    with pytest.raises(CorruptFileError, match='gmm.npz: refused, it holds pickled objects'):
        load_gmm(str(gmm))
    arm = tmp_path / 'arm.npz'
    pickled_npz(arm, marker, ['edges', 'psnr'])
    with pytest.raises(CorruptFileError, match='arm.npz: refused'):
        ArmTable.load(str(arm))
    for name in ('net.pth', '10.state'):
        path = tmp_path / name
        torch.save({'params': {'w': Payload(marker)}, 'iter': 10}, str(path))
        with pytest.raises(CorruptFileError, match=f'{name}: refused by the safe loader'):
            torch_load(str(path))
    # a poisoned patch-index cache is rebuilt, never unpickled
    data = write_pair_folder(tmp_path / 'data', n=2, size=(96, 80))
    opt = {'name': 'x', 'phase': 'train', 'scale': 4, 'gt_size': 32, 'io_backend': {'type': 'disk'},
           'index_cache': str(tmp_path / 'cache'), **data}
    HESPairedImageDataset(opt)
    cache = next((tmp_path / 'cache').glob('hes_index_*.npz'))
    pickled_npz(cache, marker, ['image', 'top', 'left', 'vectors', 'scores', 'classes'])
    HESPairedImageDataset(opt)
    assert 'rebuilding, the cache is unusable' in basicsr_log.text and 'pickled objects' in basicsr_log.text
    assert not marker.exists()


# ---- hostile inputs -----------------------------------------------------------------------------------------
NET = randomise(tiny_srresnet(), seed=5)


@st.composite
def images(draw):
    h, w = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    channels = draw(st.sampled_from([1, 3, 4]))
    kind = draw(st.sampled_from(['zeros', 'ones', 'constant', 'noise', 'binary']))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == 'zeros':
        return torch.zeros(1, channels, h, w)
    if kind == 'ones':
        return torch.ones(1, channels, h, w)
    if kind == 'constant':
        return torch.full((1, channels, h, w), draw(st.floats(0, 1)))
    noise = torch.rand(1, channels, h, w, generator=gen)
    return noise if kind == 'noise' else (noise > 0.5).float()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images(), st.sampled_from(['wbsr', 'budget', 'alpha', 'full']), st.sampled_from(['patches', 'tiles']),
       st.integers(1, 40), st.integers(1, 40))
def test_router_on_any_image(lq, mode, scheme, patch, step):
    options = RoutingOptions(mode=mode, scheme=scheme, patch_size=patch, step=min(step, patch), tile_size=patch,
                             budget=0.6 if mode == 'budget' else None, batch_size=16)
    try:
        router = Router(NET, options, 4, projection=None)
    except ValueError as exc:  # the documented refusal: a budget below the cheapest subnet for tiny patches
        assert 'below the cheapest subnet' in str(exc)
        return
    result = router(lq)
    _, _, h, w = lq.shape
    assert result.output.shape == (1, 3, 4 * h, 4 * w)
    assert torch.isfinite(result.output).all()
    if mode == 'full':
        assert result.flops == NET.subnet_flops((h, w))[-1]
    else:  # the sum of the regions' subnet costs (the seamless scheme does no extra convolution work)
        costs = [NET.subnet_flops((int(bh), int(bw)))[m] for (_, _, bh, bw), m in zip(result.boxes, result.subnets)]
        assert result.flops == sum(costs)
        assert (result.boxes[:, 2] * result.boxes[:, 3]).sum() >= h * w


@settings(max_examples=60, deadline=None)
@given(images())
def test_difficulty_function_on_any_patch(img):
    g = gradient_vectors(img)
    assert g.shape == (1, 4) and torch.isfinite(g).all() and (g >= 0).all()
    if img.min() == img.max():
        assert g.abs().max() < 1e-6


# ---- memory -------------------------------------------------------------------------------------------------
def live_tensor_bytes() -> int:
    """Bytes of every tensor that Python objects still hold (what a per-image leak would grow)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch.distributed aliases
        warnings.simplefilter('ignore', FutureWarning)
        return sum(o.untyped_storage().nbytes() for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.shared_data
def test_routed_inference_over_urban100_keeps_memory_flat(shared_data):
    """Routing all of Urban100 twice holds no more tensors after the second pass than after the first, and no SR
    output outlives its image. (Deterministic: it counts the tensors Python holds, not the process's resident
    memory, which depends on the allocator and the machine's load.)"""
    files = sorted((shared_data / 'test' / 'Urban100' / 'HR').glob('*.png'))
    assert len(files) == 100
    net = WBSRSRResNet(num_feat=8, num_block=2, widths=[4, 8], depths=[1, 2]).eval()
    router = Router(net, RoutingOptions(mode='wbsr'), 4, projection=None)
    images = []
    for path in files:
        hr = cv2.imread(str(path))[..., ::-1].astype(np.float32) / 255.
        hr = hr[:hr.shape[0] // 4 * 4, :hr.shape[1] // 4 * 4]
        lr = cv2.resize(hr, (hr.shape[1] // 4, hr.shape[0] // 4), interpolation=cv2.INTER_AREA)
        images.append(torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))[None])
    held, outputs = [], []
    for _ in range(2):
        for lq in images:
            result = router(lq)
            assert result.output.shape[-2:] == (4 * lq.shape[2], 4 * lq.shape[3])
            outputs.append(weakref.ref(result.output))
            del result
        held.append(live_tensor_bytes())
    assert [ref() for ref in outputs] == [None] * 200  # one leaked SR output would be about 9 MB per image
    assert held[1] == held[0], held
