"""WBSRModel: training plans, a training step, checkpoints, validation with routing, test pipeline, wbsr-infer."""
import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from basicsr.archs.srresnet_arch import MSRResNet
from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model
from wbsr_data.difficulty import gradient_vectors
from wbsr_data.fileio import torch_load
from wbsr_data.hes_dataset import HESPairedImageDataset
from wbsr_models import infer, runners
from wbsr_models.router import eq15_subnets
from wbsr_models.wbsr_model import WBSRModel
from wbsr_arch.supernet import TileAssignment

from conftest import model_options, write_pair_folder


@pytest.fixture
def data(tmp_path):
    return write_pair_folder(tmp_path / 'data', n=3, size=(96, 80))


def batch_of(opt, n=4):
    ds = build_dataset(opt['datasets']['train'])
    loader = build_dataloader(ds, opt['datasets']['train'], num_gpu=0, dist=False, sampler=None, seed=0)
    return next(iter(loader))


def test_a_training_iteration_changes_weights_and_logs_l_keys(tmp_path, data):
    opt = model_options(tmp_path, data)
    model = build_model(opt)
    assert isinstance(model, WBSRModel)
    before = copy.deepcopy(model.net_g.state_dict())
    model.feed_data(batch_of(opt))
    model.optimize_parameters(1)
    changed = [k for k, v in model.net_g.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and 'conv_first.weight' in changed
    log = model.get_current_log()
    assert set(k for k in log if k.startswith('l_')) == {'l_pix'} and np.isfinite(log['l_pix'])
    assert model.net_g.active_subnet == model.num_subnets - 1  # the plan is undone after the step


def test_flops_squared_plan_is_seeded_by_iteration_and_follows_flops_squared(tmp_path, data):
    model = build_model(model_options(tmp_path, data, wbsr={'subnet_sampling': 'flops_squared'}))
    lq = torch.rand(4, 3, 8, 8)
    plans = [model.training_plan(lq, it)[1] for it in range(1, 3001)]
    assert plans[:50] == [model.training_plan(lq, it)[1] for it in range(1, 51)]  # same iteration, same subnet
    model.opt['rank'] = 1  # another rank draws the same
    assert plans[:50] == [model.training_plan(lq, it)[1] for it in range(1, 51)]
    cost = np.asarray(model.net_g.subnet_flops((8, 8)), dtype=float)
    expected = cost**2 / (cost**2).sum()
    freq = np.bincount(plans, minlength=9) / len(plans)
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / len(plans)) + 1e-9)


def test_sandwich_and_routed_plans(tmp_path, data):
    model = build_model(model_options(tmp_path, data, wbsr={'subnet_sampling': 'sandwich', 'sandwich_random': 2}))
    lq = torch.rand(3, 3, 8, 8)
    repeats, subnets = model.training_plan(lq, 5)
    assert repeats == 4 and subnets.shape == (12, )
    assert subnets[:3].tolist() == [8] * 3 and subnets[3:6].tolist() == [0] * 3
    assert len(set(subnets[6:].tolist())) == 2 and all(0 < s < 8 for s in subnets[6:].tolist())
    routed = build_model(model_options(tmp_path, data, wbsr={'subnet_sampling': 'routed'}))
    batch = batch_of(routed.opt)
    _, assign = routed.training_plan(batch['lq'], 1)
    classes = routed.difficulty.classify(routed.difficulty.score(gradient_vectors(batch['lq'])))
    assert assign.tolist() == eq15_subnets(classes, 10, 9).tolist()
    routed.feed_data(batch)
    routed.optimize_parameters(1)
    assert np.isfinite(routed.get_current_log()['l_pix'])


def test_tiles_plan_gives_each_tile_its_eq15_subnet_and_trains(tmp_path, data):
    model = build_model(model_options(tmp_path, data, wbsr={'subnet_sampling': 'tiles'}))
    batch = batch_of(model.opt)  # LR crops of 8x8: tiles of 4 (half the crop; val.routing.tile_size is 32)
    _, plan = model.training_plan(batch['lq'], 1)
    assert isinstance(plan, TileAssignment) and plan.subnets.shape == (4, 2, 2) and plan.grid.rows == (0, 4, 8)
    tile = batch['lq'][:, :, 4:8, 0:4]  # tile (1, 0) of every crop
    classes = model.difficulty.classify(model.difficulty.score(gradient_vectors(tile)))
    assert plan.subnets[:, 1, 0].tolist() == eq15_subnets(classes, 10, 9).tolist()
    assert len(np.unique(plan.subnets)) > 1  # the crops hold tiles of different subnets side by side
    before = copy.deepcopy(model.net_g.state_dict())
    model.feed_data(batch)
    model.optimize_parameters(1)
    assert np.isfinite(model.get_current_log()['l_pix'])
    assert not torch.equal(model.net_g.state_dict()['conv_first.weight'], before['conv_first.weight'])
    assert model.net_g.active_subnet == model.num_subnets - 1  # the plan is undone after the step
    fixed = build_model(model_options(tmp_path, data, wbsr={'subnet_sampling': 'tiles', 'tile_size': 8}))
    assert fixed.training_plan(batch['lq'], 1)[1].subnets.shape == (4, 1, 1)  # one tile per crop: like routed


@pytest.mark.parametrize('kind', ['l1', 'mse'])
def test_distillation_adds_a_detached_target_of_the_largest_subnet(tmp_path, data, kind):
    opt = model_options(tmp_path, data, wbsr={'subnet_sampling': 'routed', 'distill': 0.5, 'distill_loss': kind})
    model = build_model(opt)
    batch = batch_of(opt)
    model.feed_data(batch)
    with torch.no_grad():
        teacher = model.net_g(batch['lq'], subnet=model.num_subnets - 1)
    seen = {}
    original = model.cri_pix.forward

    def spy(output, gt):
        seen['output'] = output
        return original(output, gt)

    model.cri_pix.forward = spy
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert model.cri_pix.forward is spy  # the model's own loss is back in place after the step
    difference = {'l1': torch.nn.functional.l1_loss, 'mse': torch.nn.functional.mse_loss}[kind]
    expected = difference(seen['output'].detach(), teacher).item()
    assert log['l_distill'] == pytest.approx(expected, rel=1e-5) and expected > 0

    # gradients: only the trained subnets' parameters, through the student; the teacher is a constant
    from wbsr_models.wbsr_model import DistilledLoss
    net = model.net_g
    net.zero_grad(set_to_none=True)
    x = batch['lq'][:2]
    student = net(x, subnet=0)
    teacher = net(x, subnet=net.num_subnets - 1)
    DistilledLoss(torch.nn.L1Loss(), teacher, 1.0, kind)(student, torch.zeros_like(student)).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads['body.3.conv1.weight'] is None  # subnet 0 has depth 1: the teacher's deeper blocks get nothing
    assert grads['conv_first.weight'][8:].abs().sum() == 0  # nor do its wider channels (subnet 0 has width 8)
    assert grads['conv_first.weight'][:8].abs().sum() > 0


def test_bad_wbsr_training_options(tmp_path, data):
    with pytest.raises(ValueError, match='subnet_sampling must be one of'):
        build_model(model_options(tmp_path, data, wbsr={'subnet_sampling': 'random'}))
    with pytest.raises(ValueError, match=r"train.wbsr: unknown option\(s\) \['sandwich'\]"):
        build_model(model_options(tmp_path, data, wbsr={'sandwich': 2}))
    with pytest.raises(ValueError, match='train.wbsr.distill must be >= 0'):
        build_model(model_options(tmp_path, data, wbsr={'distill': -1}))
    with pytest.raises(ValueError) as err:
        build_model(model_options(tmp_path, data, wbsr={'distill': 1, 'distill_loss': 'l2'}))
    assert str(err.value) == "train.wbsr.distill_loss must be one of ['l1', 'mse'], got 'l2'"


def test_checkpoint_carries_thresholds_and_loads_into_plain_basicsr(tmp_path, data):
    opt = model_options(tmp_path, data)
    model = build_model(opt)
    model.save(0, 7)
    ckpt_path = Path(opt['path']['models']) / 'net_g_7.pth'
    ckpt = torch_load(str(ckpt_path))
    assert ckpt['wbsr']['difficulty']['thresholds'] == pytest.approx(model.difficulty.thresholds.tolist())
    assert ckpt['wbsr']['network']['type'] == 'WBSRSRResNet' and ckpt['wbsr']['scale'] == 4
    plain = MSRResNet(num_feat=16, num_block=4)
    plain.load_state_dict(ckpt['params'], strict=True)  # a WBSR checkpoint is a BasicSR checkpoint
    # a test-time model restores the thresholds and gives the same outputs
    test_opt = model_options(tmp_path, data, is_train=False)
    test_opt['path']['pretrain_network_g'] = str(ckpt_path)
    restored = build_model(test_opt)
    assert np.array_equal(restored.difficulty.thresholds, model.difficulty.thresholds)
    x = torch.rand(1, 3, 20, 24)
    model.feed_data({'lq': x})
    model.test()
    restored.feed_data({'lq': x})
    restored.test()
    assert torch.equal(model.output, restored.output)


@pytest.mark.parametrize('wbsr', [{}, {'subnet_sampling': 'routed', 'distill': 0.5}], ids=['default', 'distill'])
def test_training_state_resume_reproduces_the_run(tmp_path, data, wbsr):
    opt = model_options(tmp_path, data, **({'wbsr': wbsr} if wbsr else {}))
    batches = [batch_of(opt) for _ in range(2)]

    def fresh():
        torch.manual_seed(0)
        return build_model(copy.deepcopy(opt))

    straight = fresh()
    for it, batch in enumerate(batches, 1):
        straight.feed_data(batch)
        straight.optimize_parameters(it)
    first = fresh()
    first.feed_data(batches[0])
    first.optimize_parameters(1)
    first.save(0, 1)
    resumed_opt = copy.deepcopy(opt)
    resumed_opt['path']['pretrain_network_g'] = str(Path(opt['path']['models']) / 'net_g_1.pth')
    resumed = build_model(resumed_opt)
    resumed.resume_training(torch_load(str(Path(opt['path']['training_states']) / '1.state')))
    resumed.feed_data(batches[1])
    resumed.optimize_parameters(2)
    if wbsr:  # distillation continues after the resume, with the same target as the straight run
        assert resumed.get_current_log()['l_distill'] == pytest.approx(straight.get_current_log()['l_distill'],
                                                                       rel=1e-5)
    for k, v in straight.net_g.state_dict().items():
        torch.testing.assert_close(resumed.net_g.state_dict()[k], v, rtol=1e-5, atol=1e-7)


def test_validation_logs_routing_figures_and_writes_allocation_maps(tmp_path, data, basicsr_log):
    opt = model_options(tmp_path, data)
    opt['val']['save_img'] = True
    model = build_model(opt)
    val_set = build_dataset(opt['datasets']['val'])
    loader = build_dataloader(val_set, opt['datasets']['val'], num_gpu=0, dist=False, sampler=None, seed=0)
    model.validation(loader, 5, None, True)
    for key in ('# psnr:', '# gflops:', '# flops_vs_full_image:', '# subnet_share (wbsr, tiles):'):
        assert key in basicsr_log.text
    assert '# flops_vs_full_patches:' not in basicsr_log.text  # with tiles, that is the whole image
    maps = sorted(Path(opt['path']['visualization']).rglob('*_alloc.png'))
    assert len(maps) == 3 and cv2.imread(str(maps[0])).shape[0] >= 384


def test_a_plain_basicsr_network_trains_and_routes_as_tiles(tmp_path, data):
    opt = model_options(tmp_path, data, network={'type': 'MSRResNet', 'num_feat': 8, 'num_block': 2})
    model = build_model(opt)
    assert model.num_subnets == 1
    model.feed_data(batch_of(opt))
    model.optimize_parameters(1)
    model.feed_data({'lq': torch.rand(1, 3, 40, 40)})
    model.test()
    assert model.output.shape == (1, 3, 160, 160)
    assert model._route_log[-1]['shares'].tolist() == [1.0]


def test_progress_reaches_the_hes_dataset(tmp_path, data):
    opt = model_options(tmp_path, data, total_iter=10)
    dataset = build_dataset(opt['datasets']['train'])
    model = build_model(opt)
    assert isinstance(dataset, HESPairedImageDataset) and dataset._progress.tolist() == [0, 10]
    model.feed_data(batch_of(opt))
    model.optimize_parameters(7)
    assert dataset._progress.tolist() == [7, 10] and dataset.current_phase() == 1


def write_test_option_file(tmp_path, data, ckpt, mode='wbsr'):
    opt = {'name': 'tiny_test', 'model_type': 'WBSRModel', 'scale': 4, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'tinyset', 'type': 'PairedImageDataset', **data,
                                   'io_backend': {'type': 'disk'}}},
           'network_g': {'type': 'WBSRSRResNet', 'num_feat': 16, 'num_block': 4, 'widths': [8, 12, 16],
                         'depths': [1, 2, 4]},
           'path': {'pretrain_network_g': str(ckpt), 'strict_load_g': True},
           'val': {'save_img': True, 'suffix': None,
                   'routing': {'mode': mode, **({'budget': 0.6} if mode == 'budget' else {})},
                   'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}}}
    path = tmp_path / f'test_{mode}.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


@pytest.mark.parametrize('mode', ['wbsr', 'budget', 'arm', 'full'])
def test_wbsr_test_runner_prints_psnr_and_flops(tmp_path, data, mode, monkeypatch, basicsr_log):
    opt = model_options(tmp_path, data)
    build_model(opt).save(0, 3)
    ckpt = Path(opt['path']['models']) / 'net_g_3.pth'
    option_file = write_test_option_file(tmp_path, data, ckpt, mode)
    monkeypatch.chdir(tmp_path)
    assert runners.test_main(['-opt', str(option_file)]) == 0
    log = basicsr_log.text
    assert '# psnr:' in log and '# gflops:' in log and f'# subnet_share ({mode}, tiles):' in log
    assert len(list((tmp_path / 'results' / 'tiny_test' / 'visualization' / 'tinyset').glob('*_alloc.png'))) == 3


def test_wbsr_infer_folder_with_a_bad_file(tmp_path, data, capsys):
    opt = model_options(tmp_path, data)
    build_model(opt).save(0, 3)
    inputs = Path(data['dataroot_lq'])
    (inputs / 'broken.png').write_bytes(b'\x89PNG garbage')
    out = tmp_path / 'out'
    code = infer.main(['-i', str(inputs), '-o', str(out), '--model', str(Path(opt['path']['models']) / 'net_g_3.pth'),
                       '--budget', '0.6', '--save-map'])
    printed = capsys.readouterr().out
    assert code == 1  # one file failed, the others were written
    assert 'broken.png: skipped' in printed and printed.count('FLOPs') == 3
    assert len(list(out.glob('img*_alloc.png'))) == 3
    sr = cv2.imread(str(out / 'img000.png'))
    lr = cv2.imread(str(inputs / 'img000.png'))
    assert sr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
    assert infer.main(['-i', str(inputs), '--model', str(tmp_path / 'nope.pth')]) == 2


BD = {'type': 'BDLoss', 'loss_weight': 1.0, 'label_space': 'rgb', 'gmm_pixels': 5000, 'init_noise_sigma': 0.05,
      'learn_sigma': True,
      'sigma_lr': 1e-2}


def test_bdloss_gmm_fitted_at_startup_and_sigma_trained_at_constant_lr(tmp_path, data):
    opt = model_options(tmp_path, data, pixel_opt=dict(BD), total_iter=4)
    model = build_model(opt)
    assert (Path(opt['path']['experiments_root']) / 'bd_gmm_rgb.npz').is_file()
    assert model.optimizer_sigma is not None and model.cri_pix.noise_sigma.requires_grad
    sigmas = [float(model.cri_pix.noise_sigma.detach())]
    for it in range(1, 5):
        model.update_learning_rate(it)
        model.feed_data(batch_of(opt))
        model.optimize_parameters(it)
        sigmas.append(model.get_current_log()['noise_sigma'])
    assert all(a != b for a, b in zip(sigmas, sigmas[1:]))  # sigma moves every step
    assert model.optimizer_sigma.param_groups[0]['lr'] == 1e-2  # not scheduled
    assert model.optimizer_g.param_groups[0]['lr'] < 1e-3  # the network's lr is (cosine)


def test_bdloss_sigma_is_saved_and_restored_on_resume(tmp_path, data):
    opt = model_options(tmp_path, data, pixel_opt=dict(BD))
    model = build_model(opt)
    for it in (1, 2):
        model.feed_data(batch_of(opt))
        model.optimize_parameters(it)
    model.save(0, 2)
    sigma = float(model.cri_pix.noise_sigma.detach())
    assert sigma != pytest.approx(BD['init_noise_sigma'])
    state = torch_load(str(Path(opt['path']['training_states']) / '2.state'))
    again = build_model(copy.deepcopy(opt))  # reuses the experiment's GMM file
    assert float(again.cri_pix.noise_sigma.detach()) == pytest.approx(BD['init_noise_sigma'])
    again.resume_training(state)
    assert float(again.cri_pix.noise_sigma.detach()) == sigma
    assert again.optimizer_sigma.state_dict()['state'][0]['step'] == 2
