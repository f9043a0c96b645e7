"""WBSRModel extends BasicSR's checkpoint and validation-log methods instead of rewriting them.

What BasicSR does in them (retrying a failed write, ``params_ema`` fallback, the metric log) must keep
happening under WBSRModel, with the plugin's additions (the ``'wbsr'`` entries, atomic files, the safe
read, the routing figures) on top.
"""
from pathlib import Path

import pytest
import torch

from basicsr.data import build_dataloader, build_dataset
from basicsr.models import base_model, build_model
from basicsr.models.sr_model import SRModel
from wbsr_data.fileio import torch_load

from conftest import model_options, write_pair_folder

BD = {'type': 'BDLoss', 'label_space': 'rgb', 'gmm_pixels': 3000, 'init_noise_sigma': 0.05, 'learn_sigma': True}


@pytest.fixture
def data(tmp_path):
    return write_pair_folder(tmp_path / 'data', n=2, size=(64, 64))


@pytest.fixture
def flaky_save(monkeypatch):
    """torch.save fails on its first ``fail`` calls (a full disk for a moment), and BasicSR's retries do not sleep."""
    real_save, calls = torch.save, {'n': 0, 'fail': 1}

    def save(obj, f, *args, **kwargs):
        calls['n'] += 1
        if calls['n'] <= calls['fail']:
            raise OSError('No space left on device')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save)
    monkeypatch.setattr(base_model.time, 'sleep', lambda seconds: None)
    return calls


def exp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_network_keeps_basicsr_retry_and_adds_the_wbsr_entry(tmp_path, data, flaky_save, basicsr_log):
    opt = model_options(tmp_path, data, network={'type': 'WBSRSRResNet', 'num_feat': 8, 'num_block': 2,
                                                 'widths': [4, 8], 'depths': [1, 2]})
    model = build_model(opt)
    model.save_network(model.net_g, 'net_g', 7)
    assert 'Save model error: No space left on device, remaining retry times: 2' in basicsr_log.text
    ckpt = torch_load(str(Path(opt['path']['models']) / 'net_g_7.pth'))
    assert sorted(ckpt) == ['params', 'wbsr'] and ckpt['wbsr']['scale'] == 4
    assert ckpt['wbsr']['difficulty']['thresholds'] == pytest.approx(model.difficulty.thresholds.tolist())
    assert exp_files(Path(opt['path']['models'])) == ['net_g_7.pth']  # no temporary folder left behind


def test_save_training_state_keeps_basicsr_retry_and_adds_sigma(tmp_path, data, flaky_save, basicsr_log):
    opt = model_options(tmp_path, data, pixel_opt=dict(BD))
    model = build_model(opt)
    model.save_training_state(0, 3)
    assert 'Save training state error: No space left on device, remaining retry times: 2' in basicsr_log.text
    state = torch_load(str(Path(opt['path']['training_states']) / '3.state'))
    assert (state['epoch'], state['iter'], len(state['optimizers'])) == (0, 3, 1)
    assert float(state['wbsr']['noise_sigma']) == pytest.approx(0.05)
    assert exp_files(Path(opt['path']['training_states'])) == ['3.state']


def test_a_write_that_keeps_failing_leaves_the_previous_file(tmp_path, data, flaky_save, basicsr_log):
    opt = model_options(tmp_path, data)
    model = build_model(opt)
    flaky_save['fail'] = 0
    model.save(0, -1)
    latest = Path(opt['path']['models']) / 'net_g_latest.pth'
    before = latest.read_bytes()
    flaky_save['n'], flaky_save['fail'] = 0, 99  # every write fails: BasicSR gives up after three tries
    model.save_network(model.net_g, 'net_g', -1)
    assert 'Still cannot save' in basicsr_log.text
    assert latest.read_bytes() == before and exp_files(latest.parent) == ['net_g_latest.pth']


def test_load_network_goes_through_basicsr(tmp_path, data, monkeypatch, basicsr_log):
    opt = model_options(tmp_path, data)
    build_model(opt).save(0, 2)
    calls = []
    real = base_model.BaseModel.load_network

    def spy(self, net, load_path, strict=True, param_key='params'):
        calls.append((Path(load_path).name, strict, param_key))
        return real(self, net, load_path, strict, param_key)

    monkeypatch.setattr(base_model.BaseModel, 'load_network', spy)
    test_opt = model_options(tmp_path, data, is_train=False)
    test_opt['path']['pretrain_network_g'] = str(Path(opt['path']['models']) / 'net_g_2.pth')
    test_opt['path']['param_key_g'] = 'params_ema'  # absent: BasicSR's fallback to 'params'
    restored = build_model(test_opt)
    assert calls == [('net_g_2.pth', True, 'params_ema')]
    assert 'Loading: params_ema does not exist, use params.' in basicsr_log.text
    assert restored.difficulty is not None  # the 'wbsr' entry was read


def test_validation_log_is_basicsr_s_plus_the_routing_figures(tmp_path, data, monkeypatch, basicsr_log):
    opt = model_options(tmp_path, data)
    model = build_model(opt)
    calls = []
    real = SRModel._log_validation_metric_values

    def spy(self, current_iter, dataset_name, tb_logger):
        calls.append((current_iter, dataset_name))
        return real(self, current_iter, dataset_name, tb_logger)

    monkeypatch.setattr(SRModel, '_log_validation_metric_values', spy)
    val_set = build_dataset(opt['datasets']['val'])
    model.validation(build_dataloader(val_set, opt['datasets']['val'], num_gpu=0, dist=False), 5, None, False)
    assert calls == [(5, 'tinyval')]
    log = basicsr_log.text
    assert 'Validation tinyval\n\t # psnr: ' in log and '\tBest: ' in log  # BasicSR's own lines
    assert log.index('# psnr:') < log.index('Routing tinyval\n\t # gflops: ') < log.index('# subnet_share (wbsr, tiles):')
