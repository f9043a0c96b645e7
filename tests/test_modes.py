"""The registry of routing modes: every mode from wbsr-infer, an option file (WBSRModel's validation, what
basicsr/test.py runs) and the benchmark; the learned mode's predictor, allocation and quality target."""
import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model
from wbsr_data.difficulty import DifficultyProjection
from wbsr_data.fileio import torch_load, torch_save
from wbsr_models import infer
from wbsr_models.baselines import ArmTable, build_arm_table
from wbsr_models.router import Router, RoutingOptions
from wbsr_models.routing.allocation import slope_subnets, tradeoff_subnets
from wbsr_models.routing.artefacts import ClassErrors, RoutingArtefacts
from wbsr_models.routing.modes import MODES, OPTIONS, RoutingMode, register_mode
from wbsr_models.routing.predictor import (CONTEXT, ErrorMaps, ErrorPredictor, FitOptions, fit_predictor,
                                           pad_context)

from conftest import REPO, model_options, textured_image, write_pair_folder
from test_arch import randomise, tiny_srresnet
from test_hostile import TINY_NET

sys.path.insert(0, str(REPO / 'bench'))
import benchmark  # noqa: E402


def example(name: str) -> dict:
    """Options that make mode ``name`` run: its quick point, or its first sweep point, or what it requires."""
    mode = MODES[name]
    point = (mode.quick or mode.sweep or ({},))[0]
    return dict(point, subnet=1) if name == 'fixed' else dict(point)


def calibrated_checkpoint(path: Path) -> tuple[Path, torch.nn.Module, DifficultyProjection]:
    """A tiny supernet's checkpoint with thresholds, class errors and an (untrained) error predictor."""
    net = randomise(tiny_srresnet())
    projection = DifficultyProjection.fit(np.random.default_rng(0).random((200, 4)) * 0.05, 10)
    k, m = np.arange(1, 11)[:, None], np.arange(9)[None, :]
    routing = RoutingArtefacts(class_errors=ClassErrors(1e-3 * k * (1 + 1 / (1 + m))),
                               predictor=ErrorPredictor(num_subnets=9, width=4, hidden=8))
    torch_save({'params': OrderedDict((key, v.cpu()) for key, v in net.state_dict().items()),
                'wbsr': {'format': 1, 'difficulty': projection.to_dict(), 'routing': routing.to_dict(),
                         'subnets': [list(p) for p in net.subnets], 'network': dict(TINY_NET), 'scale': 4}}, str(path))
    return path, net, projection


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('modes')
    ckpt, net, projection = calibrated_checkpoint(root / 'net.pth')
    pairs = write_pair_folder(root / 'pairs', n=2, size=(64, 72))
    lq = torch.from_numpy(textured_image(20, 28, seed=3)).permute(2, 0, 1)[None].float() / 255.
    gt = torch.nn.functional.interpolate(lq, scale_factor=4, mode='bicubic').clamp(0, 1)
    table = build_arm_table(Router(net, RoutingOptions(tile_size=8), 4, projection), [(lq, gt)], num_bins=4)
    table.save(str(root / 'arm.npz'))
    return {'root': root, 'ckpt': ckpt, 'net': net, 'projection': projection, 'pairs': pairs,
            'arm': str(root / 'arm.npz')}


def test_the_registry_holds_every_mode_with_its_options():
    assert list(MODES) == ['wbsr', 'budget', 'calibrated', 'alpha', 'arm', 'learned', 'full', 'fixed']
    assert MODES['learned'].needs == ('predictor',) and MODES['calibrated'].needs == ('projection', 'class_errors')
    assert all(set(m.reads()) <= set(OPTIONS) for m in MODES.values())
    assert {n for n in RoutingOptions.__dataclass_fields__} >= set(OPTIONS)  # one field per option


#: Every mode with its example options, and every option that selects another way of routing within a mode.
RUNS = [(name, example(name)) for name in MODES] + [('calibrated', {'slope': 0.003}), ('learned', {'slope': 0.003}),
                                                     ('learned', {'slope': 0.003, 'level': 'classes'})]


@pytest.mark.parametrize('name,point', RUNS, ids=[f'{n}-{"-".join(p)}' for n, p in RUNS])
def test_every_mode_runs_from_wbsr_infer(name, point, setup, tmp_path, capsys):
    img = tmp_path / 'in.png'
    import cv2
    cv2.imwrite(str(img), textured_image(24, 40, seed=1))
    flags = [f'{OPTIONS[k].flag}={v}' for k, v in point.items()]
    if name == 'arm':
        flags.append(f'--arm-lut={setup["arm"]}')
    code = infer.main(['-i', str(img), '-o', str(tmp_path / 'out'), '--model', str(setup['ckpt']), '--mode', name,
                       '--tile-size', '8', *flags])
    assert code == 0, capsys.readouterr().err
    assert cv2.imread(str(tmp_path / 'out' / 'in.png')).shape == (96, 160, 3)


@pytest.mark.parametrize('name,point', RUNS, ids=[f'{n}-{"-".join(p)}' for n, p in RUNS])
def test_every_mode_runs_from_an_option_file(name, point, setup, tmp_path, basicsr_log):
    """WBSRModel's validation with ``val.routing``, which is what ``basicsr/test.py`` runs."""
    opt = model_options(tmp_path, setup['pairs'], is_train=False)
    opt['path']['pretrain_network_g'] = str(setup['ckpt'])
    opt['val']['routing'] = {'mode': name, 'tile_size': 8, **point}
    if name == 'arm':
        opt['val']['routing']['arm_lut'] = setup['arm']
    model = build_model(opt)
    assert model.routing_artefacts.predictor is not None and model.routing_artefacts.class_errors is not None
    val_set = build_dataset(opt['datasets']['val'])
    loader = build_dataloader(val_set, opt['datasets']['val'], num_gpu=0, dist=False, sampler=None, seed=0)
    model.validation(loader, 1, None, False)
    assert f'# subnet_share ({name}, tiles)' in basicsr_log.text


def test_every_mode_is_a_row_of_the_benchmark(setup):
    net, projection = setup['net'], setup['projection']
    routing = infer.load_model(str(setup['ckpt'])).routing
    table = ArmTable.load(setup['arm'])
    rows = benchmark.set_modes(net, 4, projection, table, {}, routing)
    for name, mode in MODES.items():
        points = [mode.label(p) for p in mode.sweep] if not mode.whole_image else []
        assert all(f'tiles: {label}' in rows for label in points), name
    assert 'tiles: learned 0.5' in rows and 'tiles: learned max_loss 0.05' in rows and 'full' in rows
    assert all(f'fixed {i} (w{w} d{d})' in rows for i, (w, d) in enumerate(net.subnets))
    assert 'tiles: oracle 0.05' in rows and 'tiles: ARM eta 1.0' in rows and 'tiles: calibrated 0.6' in rows
    assert 'tiles: calibrated slope 0.003' in rows and 'tiles: learned slope 0.003' in rows
    only = benchmark.set_modes(net, 4, projection, table, {}, routing, only={'full', 'learned'})
    assert all(key == 'full' or key.startswith('tiles: learned') for key in only)
    assert len(only) == 1 + len(MODES['learned'].sweep)
    slopes = benchmark.set_modes(net, 4, projection, table, {}, routing, only={'full', 'calibrated:slope',
                                                                               'learned:slope'})
    assert sorted(slopes) == sorted(['full'] + [f'tiles: {m} slope {v}' for m in ('calibrated', 'learned')
                                                for v in benchmark.sweep_values(m, 'slope', level=None)]
                                    + [f'tiles: learned (class level) slope {v}'
                                       for v in benchmark.LEARNED_CLASS_SLOPES])
    assert benchmark.LEARNED_CLASS_SLOPES == benchmark.LEARNED_SLOPES == benchmark.CALIBRATED_SLOPES


def test_the_benchmark_times_points_of_the_calibrated_and_learned_modes(setup):
    from wbsr_models.evaluation import TestImage
    net, projection = setup['net'], setup['projection']
    routing = infer.load_model(str(setup['ckpt'])).routing
    gt = textured_image(64, 96, seed=5)
    lq = torch.from_numpy(np.ascontiguousarray(gt[::4, ::4, ::-1].transpose(2, 0, 1))).float()[None] / 255.
    point = benchmark.parse_point
    rows = benchmark.wall_time(net, 4, projection, ArmTable.load(setup['arm']), [TestImage('a', lq, gt)], 1,
                               {'patches': [], 'tiles': []}, False, routing, learned=[point('slope=0.003')],
                               calibrated=[point('slope=0.003'), point('budget=0.5')])
    timed = {r['mode']: r for r in rows}
    assert {'tiles: learned slope 0.003', 'tiles: calibrated slope 0.003', 'tiles: calibrated 0.5'} <= set(timed)
    assert all(r['seconds'] > 0 and 0 < r['ratio_whole'] for r in timed.values())
    assert timed['tiles: calibrated 0.5']['ratio_whole'] <= 0.5 + 1e-9


def test_a_new_mode_is_one_entry(setup, tmp_path):
    """A mode registered from outside runs from the option checks, the router and wbsr-infer's flags at once."""
    @register_mode
    class Cheapest(RoutingMode):
        name = 'cheapest_test'
        summary = 'every region on the cheapest subnet'

        def select(self, s):
            return np.zeros(len(s.regions), dtype=np.int64)
    try:
        result = Router(setup['net'], RoutingOptions(mode='cheapest_test', tile_size=8), 4)(torch.rand(1, 3, 16, 24))
        assert result.subnets.tolist() == [0] * 6
        with pytest.raises(ValueError, match='val.routing.budget is read by budget and calibrated and learned mode'):
            RoutingOptions(mode='cheapest_test', budget=0.5)
        parser = argparse.ArgumentParser()
        infer.add_routing_arguments(parser)
        assert infer.resolve_mode(parser.parse_args(['--mode', 'cheapest_test'])) == 'cheapest_test'
        with pytest.raises(ValueError, match="routing mode 'cheapest_test' is registered already"):
            register_mode(Cheapest)
    finally:
        del MODES['cheapest_test']


@pytest.mark.parametrize('options,message', [
    ({'mode': 'learned'}, r'val.routing: learned mode takes exactly one of budget, max_loss and slope$'),
    ({'mode': 'learned', 'budget': 0.5, 'max_loss': 0.05},
     'learned mode takes exactly one of budget, max_loss and slope, got budget and max_loss'),
    ({'mode': 'calibrated'}, r'val.routing: calibrated mode takes exactly one of budget and slope$'),
    ({'mode': 'calibrated', 'budget': 0.5, 'slope': 0.01},
     'calibrated mode takes exactly one of budget and slope, got budget and slope'),
    ({'mode': 'calibrated', 'slope': 0}, 'val.routing.slope must be > 0, got 0.0'),
    ({'mode': 'budget', 'budget': 0.5, 'slope': 0.01}, 'val.routing.slope is read by calibrated and learned mode'),
    ({'mode': 'learned', 'max_loss': -0.1}, r'val.routing.max_loss must be >= 0 \(dB\), got -0.1'),
    ({'mode': 'learned', 'max_loss': float('nan')}, 'val.routing.max_loss must be a finite number, got nan'),
    ({'mode': 'learned', 'budget': '0.5'}, "val.routing.budget must be a finite number, got '0.5'"),
    ({'mode': 'learned', 'budget': 0.5, 'cost': 'joules'}, r"val.routing.cost must be one of \('flops', 'seconds'\)"),
    ({'mode': 'wbsr', 'max_loss': 0.05}, 'val.routing.max_loss is read by learned mode'),
    ({'mode': 'learned', 'max_loss': 0.05, 'level': 'classes'},
     r"val.routing: level classes takes budget or slope, not max_loss \(the quality target is mapped on the "
     r"predictor's own errors\)"),
    ({'mode': 'learned', 'slope': 0.01, 'level': 'class'},
     r"val.routing.level must be one of \('predictor', 'classes'\)"),
    ({'mode': 'calibrated', 'slope': 0.01, 'level': 'classes'}, 'val.routing.level is read by learned mode'),
    ({'mode': 'fixed', 'subnet': True}, 'val.routing.subnet must be an integer >= 0, got True'),
    ({'mode': 'wbsr', 'tile_size': 1.5}, 'val.routing.tile_size must be an integer >= 1, got 1.5'),
])
def test_mode_options_are_checked_by_type_and_mode(options, message):
    with pytest.raises(ValueError, match=message):
        RoutingOptions.from_opt(options)


def test_a_mode_without_its_artefact_is_refused_before_any_image(setup):
    net, projection = setup['net'], setup['projection']
    with pytest.raises(ValueError, match='needs an error predictor in the checkpoint'):
        Router(net, RoutingOptions(mode='learned', budget=0.5), 4, projection)
    with pytest.raises(ValueError, match='needs an ARM lookup table'):
        Router(net, RoutingOptions(mode='arm'), 4, projection)
    with pytest.raises(ValueError, match=r'val.routing.level classes needs difficulty thresholds and class errors in '
                       r'the checkpoint \(wbsr-calibrate\)'):
        Router(net, RoutingOptions(mode='learned', slope=0.01, level='classes'), 4, projection,
               routing=RoutingArtefacts(predictor=ErrorPredictor(num_subnets=9, width=4)))
    with pytest.raises(ValueError, match='the predictor is for 5 subnets, the network has 9'):
        Router(net, RoutingOptions(mode='learned', budget=0.5), 4, projection,
               routing=RoutingArtefacts(predictor=ErrorPredictor(num_subnets=5, width=4)))


# ---- allocation --------------------------------------------------------------------------------------------------
def brute_force(errors, costs, limit_cost=None, limit_error=None):
    best = None
    for choice in np.array(np.meshgrid(*[range(errors.shape[1])] * len(errors))).T.reshape(-1, len(errors)):
        cost, err = costs[np.arange(len(errors)), choice].sum(), errors[np.arange(len(errors)), choice].sum()
        if limit_cost is not None and cost <= limit_cost + 1e-12:
            key = (err, cost)
        elif limit_error is not None and err <= limit_error + 1e-12:
            key = (cost, err)
        else:
            continue
        best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize('seed', range(6))
def test_tradeoff_allocation_meets_its_limit_and_is_near_the_best(seed):
    rng = np.random.default_rng(seed)
    costs = np.sort(rng.uniform(1, 5, (5, 3)), axis=1)
    errors = np.sort(rng.uniform(0, 1, (5, 3)), axis=1)[:, ::-1].copy()  # more cost, less error (mostly)
    errors[rng.integers(0, 5), 2] += 0.5  # and one region where the largest subnet is worse
    for frac in (0.4, 0.6, 0.8):
        limit = frac * costs[:, -1].sum()
        chosen = tradeoff_subnets(errors, costs, limit_cost=limit)
        spent = costs[np.arange(5), chosen].sum()
        if costs[:, 0].sum() > limit:  # no allocation fits: every region on its cheapest subnet
            assert (chosen == 0).all()
            continue
        assert spent <= limit * (1 + 1e-9)
        best_err, _ = brute_force(errors, costs, limit_cost=limit)
        # a Lagrangian allocation with a greedy fill: within one region's largest error step of the optimum
        assert errors[np.arange(5), chosen].sum() <= best_err + np.ptp(errors, axis=1).max() + 1e-12
    for frac in (1.05, 1.3):
        limit = frac * errors[:, -1].sum()
        chosen = tradeoff_subnets(errors, costs, limit_error=limit)
        assert errors[np.arange(5), chosen].sum() <= limit * (1 + 1e-9)
        best_cost, _ = brute_force(errors, costs, limit_error=limit)
        assert costs[np.arange(5), chosen].sum() <= best_cost + np.ptp(costs, axis=1).max() + 1e-12


def test_tradeoff_allocation_is_monotone_in_its_limit_and_refuses_bad_calls():
    rng = np.random.default_rng(1)
    costs = np.tile([1.0, 2.0, 4.0], (40, 1))
    errors = rng.uniform(0.5, 1, (40, 1)) * np.array([[1.0, 0.6, 0.45]])
    totals = [costs[np.arange(40), tradeoff_subnets(errors, costs, limit_cost=f * 160)].sum() for f in (.3, .5, .8, 1)]
    assert totals == sorted(totals) and totals[-1] <= 160
    assert (tradeoff_subnets(errors, costs, limit_cost=1.0) == 0).all()  # under the cheapest: the cheapest
    assert (tradeoff_subnets(errors, costs, limit_error=0.0) == 2).all()  # below the least error: the least error
    with pytest.raises(ValueError, match='give exactly one of limit_cost and limit_error'):
        tradeoff_subnets(errors, costs)
    with pytest.raises(ValueError, match=r'errors and costs must be \(n, M\) arrays of one shape'):
        tradeoff_subnets(errors[:, :2], costs, limit_cost=1.0)


# ---- the predictor ------------------------------------------------------------------------------------------------
def test_predictor_flops_are_what_the_flop_counter_counts():
    pred = ErrorPredictor(num_subnets=9, width=8, hidden=16).eval()
    lq = torch.rand(1, 3, 45, 70)
    boxes = np.array([(t, lf, min(32, 45 - t), min(32, 70 - lf)) for t in (0, 32) for lf in (0, 32, 64)])
    with FlopCounterMode(display=False) as counter:
        out = pred.predict(lq, boxes)
    assert out.shape == (6, 9) and (out > 0).all()
    assert pred.flops((45, 70), 6) == counter.get_total_flops()
    default = ErrorPredictor(num_subnets=9)
    assert default.flops((32, 32), 1) / 5.19e9 < 0.01  # under 1% of the full network's 5.19 GFLOPs there


def test_a_region_sees_the_same_cells_on_a_crop_and_on_the_whole_image():
    """Training cuts crops with CONTEXT pixels around a tile; routing runs the trunk on the whole image once."""
    pred = ErrorPredictor(num_subnets=9, width=4, hidden=8).double().eval()
    lq = torch.rand(1, 3, 80, 96, dtype=torch.float64)
    top, left = 24, 40  # an inner tile, at a multiple of the cell size
    whole = pred.predict(lq, np.array([[top, left, 32, 32]]))
    padded = pad_context(lq)
    crop = padded[:, :, top:top + 32 + 2 * CONTEXT, left:left + 32 + 2 * CONTEXT]
    with torch.no_grad():
        from_crop = pred.to_errors(pred(crop)).numpy()
    np.testing.assert_allclose(whole, from_crop, rtol=1e-10)


def test_large_images_run_the_predictor_in_exact_bands():
    pred = ErrorPredictor(num_subnets=9, width=4, hidden=8).double().eval()
    lq = torch.rand(1, 3, 150, 61, dtype=torch.float64)
    boxes = np.array([(t, lf, min(32, 150 - t), min(32, 61 - lf)) for t in range(0, 150, 32) for lf in (0, 32)])
    whole = pred.predict(lq, boxes)
    banded = pred.predict(lq, boxes, max_pixels=93 * 40)  # bands of 1 to 2 cell rows with their margins
    assert pred.cells(lq, 93 * 40).shape == pred.cells(lq).shape == (8, 23, 12)
    np.testing.assert_allclose(banded, whole, rtol=1e-10)
    with FlopCounterMode(display=False) as counter:
        pred.predict(lq, boxes, max_pixels=93 * 40)
    assert pred.flops((150, 61), len(boxes), max_pixels=93 * 40) == counter.get_total_flops() > pred.flops((150, 61), 10)


def test_predictor_round_trips_and_damaged_entries_are_refused():
    pred = ErrorPredictor(num_subnets=9, width=4, hidden=8)
    data = pred.to_dict({'epochs': 3})
    again = ErrorPredictor.from_dict(data)
    lq = torch.rand(1, 3, 20, 20)
    assert np.array_equal(again.predict(lq, np.array([[0, 0, 20, 20]])), pred.eval().predict(lq, np.array([[0, 0, 20, 20]])))
    assert again.fit_info == {'epochs': 3}
    bad = dict(data, state={**data['state'], 'fc2.bias': torch.full((9,), float('nan'))})
    with pytest.raises(ValueError, match='parameters that are not finite'):
        ErrorPredictor.from_dict(bad)
    with pytest.raises(ValueError, match='do not match its sizes'):
        ErrorPredictor.from_dict(dict(data, width=5))
    with pytest.raises(ValueError, match=r'predictor hidden must be an integer in 1..4096, got 100000'):
        ErrorPredictor.from_dict(dict(data, hidden=100000))


def test_fit_predictor_learns_which_tiles_gain_from_a_larger_subnet():
    """Synthetic labels: textured tiles gain from the larger subnets, flat ones do not; after a short fit the
    predicted gains rank them (Spearman's rho on the held-out images)."""
    rng = np.random.default_rng(0)
    maps = []
    for n in range(12):
        img = textured_image(64, 64, seed=n)  # flat on the left half, texture on the right
        lq = np.ascontiguousarray(img.transpose(2, 0, 1))
        texture = np.abs(np.diff(img.astype(np.float32).mean(2), axis=1, append=0))[None] / 255.
        gains = np.array([1.0, 0.6, 0.4])[:, None, None]  # the larger subnets remove texture error, not flat error
        errors = (1e-4 + texture * 1e-2 * gains) * (1 + 0.01 * rng.random((3, 64, 64)))
        maps.append(ErrorMaps(n, 0, lq, errors.astype(np.float32)))
    predictor, report = fit_predictor(maps, 3, FitOptions(width=8, epochs=8, stride=8, val_every=4, images_per_step=1))
    assert report['val_images'] == 3 and report['train_images'] == 9 and report['epochs'] == 8
    assert report['tiles_per_epoch'] == 9 * 25  # every 8-pixel offset of a 32-pixel tile in a 64 x 64 image
    assert report['losses'][-1] < 0.5 * report['losses'][0]
    assert report['validation']['spearman_gain'] > 0.3  # measured 0.66 (with 12 epochs 0.76); untrained about 0


def test_wbsr_calibrate_fits_a_predictor_and_the_learned_mode_uses_it(tmp_path, capsys):
    from wbsr_data.make_lr import make_dataset
    from wbsr_models import calibrate
    from test_hostile import tiny_checkpoint
    import cv2
    hr = tmp_path / 'photos'
    hr.mkdir()
    for i in range(2):
        cv2.imwrite(str(hr / f'p{i}.png'), textured_image(96, 128, seed=i))
    make_dataset([str(hr)], str(tmp_path / 'train'), [4], quiet=True)
    ckpt = tiny_checkpoint(tmp_path / 'net.pth')
    out = tmp_path / 'calibrated.pth'
    assert calibrate.main(['--model', str(ckpt), '--data', str(tmp_path / 'train'), '--out', str(out),
                           '--tile-size', '16', '--predictor', '--epochs', '1', '--width', '4', '--stride', '8',
                           '--transforms', '2']) == 0
    text = capsys.readouterr().out
    assert 'predictor: ' in text and 'held-out images' in text
    model = infer.load_model(str(out))
    from wbsr_models.calibrate import default_line
    assert default_line(model.routing) + '\n' in text  # the default routing, chosen on the held-out image, is stored
    stored = model.routing.default.to_dict() if model.routing.default is not None else None
    assert model.routing.predictor.fit_info['default'] == stored
    assert model.routing.predictor is not None and model.routing.class_errors.class_mse.shape == (10, 9)
    info = model.routing.predictor.fit_info
    assert info['transforms'] == 2 and info['train_images'] == 1 and info['val_images'] == 1
    assert info['train_maps'] == 2  # the training image and its flipped/rotated copy
    assert torch.equal(torch_load(str(out))['params']['conv_first.weight'],
                       torch_load(str(ckpt))['params']['conv_first.weight'])  # the weights are not touched
    lq = torch.rand(1, 3, 32, 40)
    for options in ({'budget': 0.5}, {'max_loss': 0.05}, {'budget': 0.5, 'cost': 'seconds'}):
        router = Router(model.net, RoutingOptions(mode='learned', tile_size=16, **options), 4, model.projection,
                        routing=model.routing)
        result = router(lq)
        predictor_flops = model.routing.predictor.flops((32, 40), len(result.subnets))
        assert result.extra['predictor_flops'] == predictor_flops  # the predictor's work is part of the cost
        if 'budget' in options and options.get('cost') != 'seconds':
            assert result.flops <= 0.5 * result.flops_full_regions * (1 + 1e-9)  # budget includes the predictor
    # --quality-only: the quality map fitted again on the held-out image; everything else is kept
    again = tmp_path / 'requalified.pth'
    assert calibrate.main(['--model', str(out), '--data', str(tmp_path / 'train'), '--out', str(again),
                           '--tile-size', '16', '--quality-only']) == 0
    assert 'quality map fitted on 1 held-out images' in capsys.readouterr().out
    before, after = torch_load(str(out))['wbsr']['routing'], torch_load(str(again))['wbsr']['routing']
    assert all(torch.equal(before['predictor']['state'][k], v) for k, v in after['predictor']['state'].items())
    assert before['class_errors'] == after['class_errors']  # lists of floats and the info
    requested = after['predictor']['quality']['requested']
    assert requested == sorted(requested) and after['predictor']['fit']['quality']['trim'] == 0.1
    assert after['predictor']['fit']['quality']['images'] == 1
    assert calibrate.main(['--model', str(ckpt), '--data', str(tmp_path / 'train'), '--out', str(tmp_path / 'x.pth'),
                           '--quality-only']) == 2
    assert capsys.readouterr().err.strip() == (f'wbsr-calibrate: --quality-only: --model {ckpt} has no error '
                                               'predictor (fit one with --predictor)')
    assert not (tmp_path / 'x.pth').exists()


def test_the_time_table_is_measured_once_and_cached(setup, tmp_path, monkeypatch):
    from wbsr_models.routing import timing
    monkeypatch.setenv('WBSR_CACHE_DIR', str(tmp_path))
    measured = timing.measure(setup['net'], ErrorPredictor(num_subnets=9, width=4), 4, repeats=1)
    assert len(measured.subnet_seconds) == 9 and min(measured.subnet_seconds) > 0 and measured.predictor_seconds > 0
    calls = []
    monkeypatch.setattr(timing, 'measure', lambda *a, **k: calls.append(1) or measured)
    first = timing.time_table(setup['net'], None, 8)
    again = timing.time_table(setup['net'], None, 8)
    assert len(calls) == 1 and first.subnet_seconds == again.subnet_seconds == measured.subnet_seconds
    assert first.region_seconds(np.array([64., 16.])).shape == (2, 9)
    assert timing.device_key(setup['net'], None, 8) != timing.device_key(setup['net'], None, 16)
    path = next((tmp_path / 'timing').glob('*.json'))
    path.write_text('{"format": 1, "subnet_seconds": [NaN]}')  # damaged: measured again and replaced
    timing.time_table(setup['net'], None, 8)
    assert len(calls) == 2 and len(json.loads(path.read_text())['subnet_seconds']) == 9


def test_the_calibrated_mode_prices_regions_in_seconds_when_asked(setup):
    from wbsr_models.routing.allocation import calibrated_subnets
    from wbsr_models.routing.timing import TimeTable
    model = infer.load_model(str(setup['ckpt']))
    table = model.routing.class_errors.class_mse
    lq = torch.from_numpy(textured_image(32, 40, seed=5)).permute(2, 0, 1)[None].float() / 255.

    def route(seconds, **options):
        router = Router(model.net, RoutingOptions(mode='calibrated', tile_size=8, **options), 4, model.projection,
                        routing=model.routing)
        router._time_table = TimeTable(tuple(float(v) for v in seconds), 0., 'fake')
        return router, router(lq)

    full_cheapest = range(9, 0, -1)
    _, by_flops = route(full_cheapest, slope=0.01)
    _, by_seconds = route(full_cheapest, slope=0.01, cost='seconds')
    assert by_flops.subnets.min() < 8 and (by_seconds.subnets == 8).all()  # the full network costs least in time
    router, result = route((1, 2, 3, 1.5, 5, 6, 7, 8, 9), budget=0.5, cost='seconds')
    regions = router.regions(router.prepare(lq))
    classes, position, _ = router.classify(regions)
    expected = calibrated_subnets(classes, position, router.region_seconds(regions), table,
                                  regions.boxes[:, 2] * regions.boxes[:, 3], 0.5)
    assert np.array_equal(result.subnets, expected)
    assert 3 in expected and not {1, 2} & set(expected)  # subnet 3 is quicker than 1 and 2 and more accurate
    seconds = router.region_seconds(regions)
    assert seconds[np.arange(len(expected)), expected].sum() <= 0.5 * seconds[:, -1].sum()


def test_level_classes_weighs_the_predicted_ratios_by_the_class_errors(setup):
    model = infer.load_model(str(setup['ckpt']))
    table = model.routing.class_errors.class_mse
    lq = torch.from_numpy(textured_image(32, 40, seed=6)).permute(2, 0, 1)[None].float() / 255.
    routers = {level: Router(model.net, RoutingOptions(mode='learned', tile_size=8, slope=0.002, level=level), 4,
                             model.projection, routing=model.routing) for level in ('predictor', 'classes')}
    regions = routers['classes'].regions(lq)
    classes, _, _ = routers['classes'].classify(regions)
    predicted = routers['classes'].predicted_errors(lq, regions)
    area = (regions.boxes[:, 2] * regions.boxes[:, 3]).astype(np.float64)[:, None]
    costs = regions.costs(routers['classes'].costs)
    hybrid = predicted / predicted[:, -1:] * table[classes - 1, -1:]
    assert np.array_equal(routers['classes'](lq).subnets, slope_subnets(hybrid * area, costs, 0.002))
    assert np.array_equal(routers['predictor'](lq).subnets, slope_subnets(predicted * area, costs, 0.002))
    assert not np.allclose(hybrid, predicted)  # the two levels differ, so the test tells them apart


def test_the_routing_docs_list_every_mode_and_option():
    text = (REPO / 'docs' / 'routing.md').read_text()
    assert all(f'| `{name}`' in text for name in MODES), [n for n in MODES if f'| `{n}`' not in text]
    assert all(f'| `{name}` |' in text for name in OPTIONS), [n for n in OPTIONS if f'| `{n}` |' not in text]


def test_the_quality_map_is_stored_and_read_both_ways():
    pred = ErrorPredictor(num_subnets=3, width=4, hidden=8)
    pred.quality = ((-0.02, 0.03, 0.08), (0.0, 0.05, 0.2))
    again = ErrorPredictor.from_dict(pred.to_dict())
    assert again.quality == pred.quality
    assert again.quality_threshold(0.03) == pytest.approx(0.05) and again.quality_threshold(0.055) == pytest.approx(0.125)
    assert again.quality_estimate(0.125) == pytest.approx(0.055)  # its inverse
    assert ErrorPredictor(num_subnets=3).quality_threshold(0.07) == 0.07  # without a map: as requested
    data = pred.to_dict()
    for bad in ({'requested': [0.1, 0.0], 'internal': [0.0, 0.1]}, {'requested': [0.0], 'internal': [float('inf')]},
                {'requested': [0.0, 0.1], 'internal': [0.0]}):
        with pytest.raises(ValueError, match='quality map must be two finite lists of one length, ascending'):
            ErrorPredictor.from_dict(dict(data, quality=bad))


def test_a_flat_stretch_of_the_measured_curve_keeps_the_quality_map_ascending():
    # a plateau just above a rounding boundary once gave 0.407257 five times, refused when the checkpoint was read
    from wbsr_models.routing.predictor import increasing_pairs
    measured = [0.1, 0.4072566, 0.4072574, 0.4072574, 0.4072571, 0.5]
    requested, internal = increasing_pairs(measured, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert requested == (0.1, 0.407257, 0.5) and internal == (0.0, 0.1, 0.5)
    pred = ErrorPredictor(num_subnets=3, width=4, hidden=8)
    pred.quality = (requested, internal)
    assert ErrorPredictor.from_dict(pred.to_dict()).quality == (requested, internal)


def test_one_image_where_the_full_network_fails_does_not_move_the_quality_map():
    # measured on the pool: one held-out image of 29, where the full network is 3.1 dB worse than a smaller subnet,
    # moved the plain mean by about -0.1 dB; the map leaves the extremes out (QUALITY_TRIM)
    from wbsr_models.routing.predictor import QUALITY_TRIM, quality_map
    rng = np.random.default_rng(0)
    lq = rng.integers(0, 255, (3, 48, 64), dtype=np.uint8)
    typical = (rng.uniform(1e-3, 2e-3, (1, 48, 64)) * np.array([2.0, 1.2, 1.0])[:, None, None]).astype(np.float32)
    failing = typical * np.array([1.0, 1.0, 20.0], dtype=np.float32)[:, None, None]  # the full network 13 dB worse
    maps = [ErrorMaps(n, 0, lq, typical) for n in range(9)] + [ErrorMaps(9, 0, lq, failing)]
    predictor, internal = ErrorPredictor(num_subnets=3, width=4).eval(), (0.0, 0.5, 1.0, 2.0, 4.0)
    with torch.no_grad():  # predicts the typical errors on every tile: subnets 0 and 1 lose 3.0 and 0.8 dB
        predictor.fc2.weight.zero_()
        predictor.fc2.bias.copy_(torch.tensor([np.log(2.0), np.log(1.2), np.log(1.5e-3)]))
    alone = quality_map(predictor, maps[:9], 16, [1.0, 2.0, 4.0], internal=internal)
    assert QUALITY_TRIM == 0.1
    assert quality_map(predictor, maps, 16, [1.0, 2.0, 4.0], internal=internal) == alone
    plain = quality_map(predictor, maps, 16, [1.0, 2.0, 4.0], internal=internal, trim=0.0)
    assert alone == ((0.0, 0.478478, 0.791812, 1.849493, 3.0103), internal)
    assert plain[0][-1] < alone[0][-1] - 1.0  # a plain mean follows the one failing image (1.71 dB at 4 dB)
    with pytest.raises(ValueError, match=r'trim must be in \[0, 0.5\), got 0.5'):
        quality_map(predictor, maps, 16, [1.0, 2.0, 4.0], trim=0.5)


def test_quality_map_measures_the_loss_of_each_threshold():
    from wbsr_models.routing.predictor import quality_map
    rng = np.random.default_rng(0)
    maps = [ErrorMaps(n, 0, rng.integers(0, 255, (3, 48, 64), dtype=np.uint8),
                      (rng.uniform(1e-3, 2e-3, (1, 48, 64)) * np.array([2.0, 1.2, 1.0])[:, None, None]).astype(np.float32))
            for n in range(2)]
    requested, internal = quality_map(ErrorPredictor(num_subnets=3, width=4).eval(), maps, 16, [1.0, 2.0, 4.0],
                                      internal=(0.0, 0.5, 1.0, 2.0, 4.0))
    assert len(requested) == len(internal) >= 1 and internal[0] == 0.0 and set(internal) <= {0.0, 0.5, 1.0, 2.0, 4.0}
    assert list(requested) == sorted(requested) and requested[-1] <= 10 * np.log10(2.0) + 1e-5  # at most all-smallest
