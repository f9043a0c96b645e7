"""The checkpoint's default routing: what runs when no mode is given (``val.routing.mode``, ``wbsr-infer --mode``),
chosen by ``wbsr-calibrate --predictor`` on its held-out training images."""
import dataclasses

import numpy as np
import pytest
import torch

from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model
from wbsr_data.fileio import torch_load, torch_save
from wbsr_models import calibrate, infer
from wbsr_models.router import Router, RoutingOptions
from wbsr_models.routing.artefacts import DefaultRouting, RoutingArtefacts
from wbsr_models.routing.predictor import ErrorMaps

from conftest import model_options, textured_image, write_pair_folder
from test_modes import calibrated_checkpoint

DEFAULT = {'mode': 'learned', 'level': 'classes', 'slope': 0.002}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """A tiny supernet's checkpoint with class errors and a predictor, once without and once with a stored default."""
    root = tmp_path_factory.mktemp('default')
    plain, net, projection = calibrated_checkpoint(root / 'plain.pth')
    state = torch_load(str(plain))
    state['wbsr']['routing']['default'] = DefaultRouting(dict(DEFAULT), {'images': 3}).to_dict()
    torch_save(state, str(root / 'with_default.pth'))
    return {'root': root, 'plain': plain, 'default': root / 'with_default.pth', 'net': net, 'projection': projection}


def lq_image(seed: int = 4) -> torch.Tensor:
    return torch.from_numpy(textured_image(32, 40, seed=seed)).permute(2, 0, 1)[None].float() / 255.


def test_no_mode_runs_the_stored_default_and_the_same_subnets_as_asking_for_it(checkpoints):
    model = infer.load_model(str(checkpoints['default']))
    assert model.routing.default.options == DEFAULT
    router = Router(model.net, RoutingOptions(tile_size=8), 4, model.projection, routing=model.routing)
    assert router.by_default and router.stored_default and router.options.mode == 'learned'
    assert (router.options.level, router.options.slope) == ('classes', 0.002)
    assert router.describe() == ('learned (slope 0.002, level classes), the checkpoint\'s default (chosen by '
                                 'wbsr-calibrate on its held-out training images)')
    asked = Router(model.net, RoutingOptions(tile_size=8, **DEFAULT), 4, model.projection, routing=model.routing)
    assert not asked.by_default
    lq = lq_image()
    assert np.array_equal(router(lq).subnets, asked(lq).subnets)


def test_without_a_stored_default_or_its_predictor_no_mode_is_eq15(checkpoints):
    model = infer.load_model(str(checkpoints['plain']))
    router = Router(model.net, RoutingOptions(tile_size=8), 4, model.projection, routing=model.routing)
    assert router.options.mode == 'wbsr' and router.by_default and not router.stored_default
    assert router.describe() == 'wbsr, the default of a checkpoint that stores none (Eq. 15)'
    stored = infer.load_model(str(checkpoints['default'])).routing
    without = RoutingArtefacts(class_errors=stored.class_errors, default=stored.default)  # the predictor is gone
    assert Router(model.net, RoutingOptions(tile_size=8), 4, model.projection, routing=without).options.mode == 'wbsr'
    assert not Router(model.net, RoutingOptions(mode='wbsr', tile_size=8), 4, model.projection).by_default


def test_an_option_without_a_mode_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^val.routing.slope is read by calibrated and learned mode\(s\): give "
                       r"val.routing.mode too \(without one, the checkpoint's default routing runs\)$"):
        RoutingOptions.from_opt({'slope': 0.002})


@pytest.mark.parametrize('entry,message', [
    ({'options': {'slope': 0.002}}, 'it has no routing options with a mode'),
    ({'options': {'mode': 'learned', 'slope': 0.002, 'scheme': 'patches'}},
     r"it sets \['scheme'\], which are not routing-mode options"),
    ({'options': {'mode': 'learned', 'slope': -1.0}}, 'default.slope must be > 0, got -1.0'),
    ({'options': {'mode': 'teleport'}}, 'default.mode must be one of'),
    ('learned', 'it has no routing options with a mode'),
])
def test_a_damaged_default_names_the_file_and_what_is_wrong(checkpoints, tmp_path, entry, message):
    state = torch_load(str(checkpoints['plain']))
    state['wbsr']['routing']['default'] = entry
    path = tmp_path / 'damaged.pth'
    torch_save(state, str(path))
    with pytest.raises(ValueError, match=f'{path}.*bad default routing \\({message}'):
        infer.load_model(str(path))


def test_wbsr_infer_without_a_mode_says_which_routing_ran(checkpoints, tmp_path, capsys):
    import cv2
    img = tmp_path / 'in.png'
    cv2.imwrite(str(img), textured_image(24, 40, seed=1))
    assert infer.main(['-i', str(img), '-o', str(tmp_path / 'out'), '--model', str(checkpoints['default']),
                       '--tile-size', '8']) == 0
    out = capsys.readouterr().out
    assert out.startswith('wbsr-infer: routing learned (slope 0.002, level classes), the checkpoint\'s default')
    assert infer.main(['-i', str(img), '-o', str(tmp_path / 'out2'), '--model', str(checkpoints['default']),
                       '--tile-size', '8', '--mode', 'wbsr']) == 0
    assert 'routing' not in capsys.readouterr().out.splitlines()[0]  # a mode asked for: no such line
    assert infer.main(['-i', str(img), '-o', str(tmp_path / 'out4'), '--model', str(checkpoints['plain']),
                       '--tile-size', '8']) == 0
    assert 'routing' not in capsys.readouterr().out.splitlines()[0]  # Eq. 15, the default of a checkpoint without one
    code = infer.main(['-i', str(img), '-o', str(tmp_path / 'out3'), '--model', str(checkpoints['default']),
                       '--cost', 'seconds'])
    assert code == 2
    assert capsys.readouterr().err.strip() == ('wbsr-infer: --cost applies to --mode calibrated or learned only, not '
                                               '--mode wbsr')


def test_an_option_file_without_a_mode_runs_the_default(checkpoints, tmp_path, basicsr_log):
    pairs = write_pair_folder(tmp_path / 'pairs', n=1, size=(64, 72))
    opt = model_options(tmp_path, pairs, is_train=False)
    opt['path']['pretrain_network_g'] = str(checkpoints['default'])
    opt['val']['routing'] = {'mode': None, 'tile_size': 8}
    model = build_model(opt)
    val_set = build_dataset(opt['datasets']['val'])
    loader = build_dataloader(val_set, opt['datasets']['val'], num_gpu=0, dist=False, sampler=None, seed=0)
    model.validation(loader, 1, None, False)
    assert ("val.routing.mode not given: routing learned (slope 0.002, level classes), the checkpoint's default"
            in basicsr_log.text)
    assert '# subnet_share (learned, tiles)' in basicsr_log.text


def test_training_from_a_checkpoint_with_a_default_validates_with_eq15(checkpoints, tmp_path, basicsr_log):
    """Training changes the weights its predictor was fitted on: validation without a mode runs Eq. 15."""
    pairs = write_pair_folder(tmp_path / 'pairs', n=1, size=(64, 72))
    opt = model_options(tmp_path, pairs, is_train=True)
    opt['path']['pretrain_network_g'] = str(checkpoints['default'])
    opt['val']['routing'] = {'tile_size': 8}
    model = build_model(opt)
    assert model.routing_artefacts.predictor is not None and model.routing_artefacts.default is None
    assert model.router_for(model.net_g).options.mode == 'wbsr'
    assert 'its default routing is not used while training' in basicsr_log.text


def held_out_maps(n: int = 3) -> list[ErrorMaps]:
    """Error maps of a few textured images: per pixel a random level times each subnet's ratio to the full network's
    error (the larger the subnet, the smaller its error, as in a trained supernet)."""
    maps, rng = [], np.random.default_rng(0)
    ratios = 1 + 0.3 * np.arange(8, -1, -1)  # subnet m's error over the full network's: 3.4 ... 1
    for i in range(n):
        lq = lq_image(10 + i)
        level = 1e-3 * rng.lognormal(0, 1, lq.shape[-2:])
        maps.append(ErrorMaps(i, 0, (lq[0] * 255).round().to(torch.uint8).numpy(),
                              (ratios[:, None, None] * level[None]).astype(np.float32)))
    return maps, ratios


def measured(router: Router, maps: list[ErrorMaps], slope: float) -> tuple[float, float]:
    """(trimmed mean loss, mean FLOPs share) of the default's routing at ``slope``, routed image by image."""
    from scipy.stats import trim_mean
    from wbsr_models.routing.predictor import region_mse
    probe = Router(router.net, dataclasses.replace(router.options, mode='learned', level='classes', slope=slope),
                   4, router.projection, routing=router.routing)
    losses, shares = [], []
    for item in maps:
        lq = torch.from_numpy(item.lq)[None].float() / 255.
        result = probe(lq)
        errors = region_mse(item.errors, result.boxes) * (result.boxes[:, 2] * result.boxes[:, 3])[:, None]
        rows = np.arange(len(result.subnets))
        losses.append(10 * np.log10(errors[rows, result.subnets].sum() / errors[:, -1].sum()))
        shares.append(result.ratio_whole)  # the predictor's FLOPs included
    return float(trim_mean(losses, 0.1)), float(np.mean(shares))


def test_the_default_is_the_largest_slope_within_the_target_loss(checkpoints, monkeypatch):
    model = infer.load_model(str(checkpoints['plain']))
    maps, ratios = held_out_maps()
    head = model.routing.predictor.fc2  # predicts the maps' ratios on every tile: the slope decides alone
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.from_numpy(np.log(np.r_[ratios[:-1], 1e-3])))
    router = Router(model.net, RoutingOptions(tile_size=8), 4, model.projection, routing=model.routing)
    slopes = np.geomspace(1e-4, 0.3, 12)
    losses, shares = zip(*[measured(router, maps, v) for v in slopes])
    assert losses[0] < losses[-1]  # the grid spans losses below and above the target set next
    target = float(np.median(losses))
    monkeypatch.setattr(calibrate, 'DEFAULT_SLOPES', tuple(slopes))
    monkeypatch.setattr(calibrate, 'DEFAULT_LOSS_DB', target)
    report = {}
    calibrate.fit_default(model.routing, router, maps, report)
    chosen = model.routing.default
    first_over = next(i for i, loss in enumerate(losses) if loss > target)
    assert first_over >= 1
    assert chosen.options == {'mode': 'learned', 'level': 'classes', 'slope': float(f'{slopes[first_over - 1]:.3g}')}
    assert chosen.info['loss_db'] == pytest.approx(losses[first_over - 1], abs=1e-4)
    assert chosen.info['images'] == 3 and report['default'] == chosen.to_dict()
    assert chosen.info['flops_share'] == pytest.approx(shares[first_over - 1], abs=1e-4)
    monkeypatch.setattr(calibrate, 'DEFAULT_LOSS_DB', min(losses) - 1.0)  # out of reach: no default, Eq. 15 stays
    calibrate.fit_default(model.routing, router, maps, report)
    assert model.routing.default is None and report['default'] is None
    assert calibrate.default_line(model.routing).startswith('default routing: Eq. 15 (on the held-out images the')


def test_the_benchmark_has_a_row_for_a_stored_default(checkpoints):
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / 'bench'))
    import benchmark
    net, projection = checkpoints['net'], checkpoints['projection']
    stored = infer.load_model(str(checkpoints['default'])).routing
    rows = benchmark.set_modes(net, 4, projection, None, {}, stored, only={'full', 'default'})
    assert sorted(rows) == ['full', 'tiles: default, learned (class level) slope 0.002']
    router = rows['tiles: default, learned (class level) slope 0.002'][1]
    assert router.by_default and router.options.slope == 0.002
    plain = infer.load_model(str(checkpoints['plain'])).routing  # no stored default: Eq. 15 is a row already
    assert sorted(benchmark.set_modes(net, 4, projection, None, {}, plain, only={'full', 'default'})) == ['full']
