"""Calibrated allocation: per-class measured errors, spent by marginal error removed per FLOP."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from wbsr_data.difficulty import DifficultyProjection
from wbsr_models import calibrate
from wbsr_models.router import Router, RoutingOptions, calibrated_subnets
from wbsr_models.routing.allocation import slope_subnets
from wbsr_models.routing.artefacts import ClassErrors, RoutingArtefacts

from test_arch import randomise, tiny_srresnet
from test_hostile import tiny_checkpoint

COSTS = np.array([1.08, 1.28, 1.66, 2.24, 2.64, 3.38, 3.44, 3.99, 5.19])


def class_mse(num_classes=10):
    """Harder classes have more error, and larger subnets remove more of it (with diminishing returns)."""
    k = np.arange(1, num_classes + 1)[:, None]
    m = np.arange(9)[None, :]
    return 1e-3 * k * (1 + 1 / (1 + m))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=120), st.floats(0.21, 1.0), st.integers(0, 3))
def test_budget_respected_monotone_in_the_budget_and_deterministic(classes, budget, seed):
    classes = np.asarray(classes)
    position = np.random.default_rng(seed).random(len(classes))
    costs = np.tile(COSTS, (len(classes), 1))
    area = np.full(len(classes), 1024.)
    chosen = calibrated_subnets(classes, position, costs, class_mse(), area, budget)
    assert costs[np.arange(len(chosen)), chosen].sum() <= budget * costs[:, -1].sum() * (1 + 1e-9)
    more = calibrated_subnets(classes, position, costs, class_mse(), area, min(1.0, budget + 0.1))
    assert np.all(more >= chosen)  # a larger budget never downgrades a region
    assert np.array_equal(chosen, calibrated_subnets(classes, position, costs, class_mse(), area, budget))


def test_the_budget_goes_where_it_removes_the_most_error():
    mse = np.tile([[4e-3, 1e-3, 1e-3]], (2, 1))  # class 1: the middle subnet removes most of the error
    mse[1] = [2e-3, 1.9e-3, 1e-3]  # class 2: only the largest helps, and less per FLOP
    costs = np.tile([1., 2., 4.], (4, 1))
    classes, position = np.array([1, 2, 1, 2]), np.array([0.1, 0.9, 0.2, 0.8])
    # class 1: 3e-3 removed for 1 extra FLOP (the largest removes no more: skipped); class 2: 1e-3 for 3 extra
    # FLOPs via the largest (the middle one's 1e-4 for 1 FLOP is below that line: skipped)
    for budget, expected in ((0.5, [1, 0, 1, 0]), (0.7, [1, 2, 1, 0]), (0.75, [1, 2, 1, 2]), (0.3, [0, 0, 0, 0])):
        chosen = calibrated_subnets(classes, position, costs, mse, np.ones(4), budget)
        assert chosen.tolist() == expected, budget  # within a class, the harder region (larger position) first


def test_region_area_weighs_the_error():
    mse = np.array([[2e-3, 1e-3]])
    costs = np.array([[1., 2.], [4., 8.]])  # a full tile and one four times larger, same class
    chosen = calibrated_subnets(np.array([1, 1]), np.array([0.9, 0.1]), costs, mse, np.array([1., 4.]), 0.6)
    assert chosen.tolist() == [1, 0]  # 6 of 10 FLOPs: only the small one fits; same ratio, harder first
    chosen = calibrated_subnets(np.array([1, 1]), np.array([0.9, 0.1]), costs, mse, np.array([1., 4.]), 1.0)
    assert chosen.tolist() == [1, 1]


def test_class_errors_round_trip_and_older_checkpoints():
    proj = DifficultyProjection.fit(np.random.default_rng(0).random((200, 4)), 10)
    errors = ClassErrors(class_mse(), {'scheme': 'tiles', 'images': 3})
    entry = {'difficulty': proj.to_dict(), 'routing': RoutingArtefacts(class_errors=errors).to_dict()}
    again = RoutingArtefacts.from_checkpoint_entry(entry).class_errors
    assert np.array_equal(again.class_mse, errors.class_mse) and again.info == {'scheme': 'tiles', 'images': 3}
    assert 'class_mse' not in entry['difficulty']  # routing artefacts live beside the thresholds, not in them
    older = {'difficulty': dict(proj.to_dict(), class_mse=class_mse().tolist(), calibration={'images': 3})}
    assert np.array_equal(RoutingArtefacts.from_checkpoint_entry(older).class_errors.class_mse, class_mse())
    bad = {'difficulty': proj.to_dict(), 'routing': {'class_errors': {'class_mse': [[1.0, 2.0]] * 9}}}
    with pytest.raises(ValueError, match=r'9 classes, the thresholds make 10: a \(K=10, M\) table is needed'):
        RoutingArtefacts.from_checkpoint_entry(bad)
    bad['routing']['class_errors']['class_mse'] = [[1.0, float('nan')]] * 10
    with pytest.raises(ValueError, match=r'finite, non-negative \(K, M\) table'):
        RoutingArtefacts.from_checkpoint_entry(bad)


def test_router_calibrated_mode_needs_a_calibration():
    net = randomise(tiny_srresnet(), seed=1)
    proj = DifficultyProjection.fit(np.random.default_rng(0).random((200, 4)) * 0.05, 10)
    with pytest.raises(ValueError, match='needs the measured error of every subnet'):
        Router(net, RoutingOptions(mode='calibrated', budget=0.5), 4, proj)
    with pytest.raises(ValueError, match='val.routing: calibrated mode takes exactly one of budget and slope'):
        RoutingOptions.from_opt({'mode': 'calibrated'})
    routing = RoutingArtefacts(class_errors=ClassErrors(class_mse()))
    x = torch.rand(1, 3, 40, 56)
    for scheme in ('tiles', 'patches'):
        options = RoutingOptions(mode='calibrated', budget=0.5, scheme=scheme, tile_size=8)
        result = Router(net, options, 4, proj, routing=routing)(x)
        assert result.ratio_regions <= 0.5 + 1e-9 and result.output.shape == (1, 3, 160, 224)


def test_wbsr_calibrate_writes_the_class_errors_into_a_new_checkpoint(tmp_path, capsys):
    from wbsr_data.make_lr import make_dataset
    from conftest import textured_image
    import cv2
    hr = tmp_path / 'photos'
    hr.mkdir()
    for i in range(2):
        cv2.imwrite(str(hr / f'p{i}.png'), textured_image(96, 128, seed=i))
    make_dataset([str(hr)], str(tmp_path / 'train'), [4], quiet=True)
    ckpt = tiny_checkpoint(tmp_path / 'net.pth')
    out = tmp_path / 'calibrated.pth'
    assert calibrate.main(['--model', str(ckpt), '--data', str(tmp_path / 'train'), '--out', str(out),
                           '--tile-size', '8']) == 0
    text = capsys.readouterr().out
    assert 'wbsr-calibrate: 2 images, 24 regions' in text  # 2 images of 24x32 LR in 8x8 tiles: 3 x 4 each
    from wbsr_models.infer import load_model
    routing = load_model(str(out)).routing
    assert routing.class_errors.class_mse.shape == (10, 9) and routing.class_errors.info['regions'] == 24
    assert routing.predictor is None  # without --predictor
    assert calibrate.main(['--model', str(out), '--data', str(tmp_path / 'train'), '--out', str(out)]) == 2
    assert 'is --model: write the calibrated checkpoint to another file' in capsys.readouterr().err


# ---- one slope (dB per 1% of the image's full-network cost) -------------------------------------------------------
def slope_objective(errors, costs, chosen, slope):
    rows = np.arange(len(errors))
    return (10 * np.log10(errors[rows, chosen].sum() / errors[:, -1].sum()) +
            slope * 100 * costs[rows, chosen].sum() / costs[:, -1].sum())


def test_slope_upgrades_exactly_the_regions_worth_their_cost():
    # region 0 loses 1.0 of the image's 2.0 on the cheap subnet, region 1 only 0.01; an upgrade costs 25% of the image
    errors, costs = np.array([[2.0, 1.0], [1.01, 1.0]]), np.array([[1.0, 2.0], [1.0, 2.0]])
    # upgrading region 0 buys 4.34 * 1.0 / 2.01 / 25 = 0.086 dB per 1%; region 1, 0.00086 dB per 1%
    assert slope_subnets(errors, costs, 0.1).tolist() == [0, 0]
    assert slope_subnets(errors, costs, 0.01).tolist() == [1, 0]
    assert slope_subnets(errors, costs, 0.0005).tolist() == [1, 1]
    # one slope, two images: the one whose upgrade gains 0.49 dB gets it, the one where it gains 0.01 dB does not
    assert slope_subnets(np.array([[1.12, 1.0]]), np.array([[1.0, 2.0]]), 0.005).tolist() == [1]
    assert slope_subnets(np.array([[1.0023, 1.0]]), np.array([[1.0, 2.0]]), 0.005).tolist() == [0]
    assert slope_subnets(np.zeros((3, 2)), np.array([[1.0, 2.0]] * 3), 0.005).tolist() == [0, 0, 0]  # no error


@pytest.mark.parametrize('seed', range(4))
def test_slope_allocation_is_the_best_of_every_allocation(seed):
    """Exhaustive search over the 9^4 allocations of 4 regions, with subnets whose error ratios are like the reference
    checkpoint's (the cheapest leaves up to 1.6x the full network's error)."""
    import itertools
    rng = np.random.default_rng(seed)
    costs = np.outer(rng.uniform(0.5, 1.0, 4), COSTS)
    ratios = 1 + np.sort(rng.uniform(0, 0.6, (4, 9)), axis=1)[:, ::-1]
    ratios[:, -1] = 1
    errors = rng.uniform(0.2, 2.0, (4, 1)) * ratios
    grid = np.array(list(itertools.product(range(9), repeat=4)))
    for slope in (0.001, 0.003, 0.01, 0.03):
        chosen = slope_subnets(errors, costs, slope)
        values = (10 * np.log10(errors[np.arange(4), grid].sum(1) / errors[:, -1].sum()) +
                  slope * 100 * costs[np.arange(4), grid].sum(1) / costs[:, -1].sum())
        assert slope_objective(errors, costs, chosen, slope) == pytest.approx(values.min(), abs=1e-12), slope


def test_slope_refuses_bad_calls():
    with pytest.raises(ValueError, match=r'errors and costs must be \(n, M\) arrays of one shape'):
        slope_subnets(np.ones((2, 3)), np.ones((2, 2)), 0.01)
    for bad in (0.0, -1.0, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='slope must be a finite number > 0'):
            slope_subnets(np.ones((2, 2)), np.ones((2, 2)), bad)
