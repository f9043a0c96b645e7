"""bench/studies/error_parts.py: errors factored into level and ratios, and the pairings scored like pool_folds."""
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / 'bench' / 'studies'))
import error_parts  # noqa: E402
from test_pool_folds import image  # noqa: E402


def test_errors_are_a_level_times_ratios_and_each_source_is_scored_on_both():
    t = {'area': np.full(4, 1024.), 'mse': np.array([[4., 1.], [2., 1.], [9., 3.], [3., 3.]]) * 1e-3}
    t['predicted'] = t['mse'] * np.exp([[0.5], [-0.5], [0.5], [-0.5]])  # levels off by e^+-0.5, ratios exact
    t['table'] = np.tile([[6e-3, 2e-3]], (4, 1))  # one class: every region the mean's level and ratio
    assert np.allclose(error_parts.combined(t, 'measured', 'predictor'), t['mse'])
    assert np.allclose(error_parts.combined(t, 'predictor', 'measured'), t['predicted'])
    assert np.allclose(error_parts.combined(t, 'class table', 'measured'), t['mse'] / t['mse'][:, -1:] * 2e-3)
    factors = error_parts.factor_errors([t])
    assert factors['measured'] == {'level_rms': 0., 'ratio_rms': 0.}
    assert factors['predictor']['level_rms'] == pytest.approx(0.5)
    assert factors['predictor']['ratio_rms'] == pytest.approx(0., abs=1e-12)
    weight = np.array([1., 1., 3., 3.]) / 8  # each region's share of the image's full-network error
    diff = np.log(3.) - np.log([4., 2., 3., 1.])
    assert factors['class table']['ratio_rms'] == pytest.approx(np.sqrt((weight * diff ** 2).sum()))
    level = np.log(2e-3) - np.log([1e-3, 1e-3, 3e-3, 3e-3])
    assert factors['class table']['level_rms'] == pytest.approx(np.sqrt(np.mean((level - level.mean()) ** 2)))


def test_measured_ratios_give_the_oracle_whatever_the_level():
    # images alternate: on one kind the cheap subnet loses 3 dB, on the other 0.04 dB; one class holds both kinds
    tiles = [image(2e-3 if n % 4 < 2 else 1.01e-3) for n in range(8)]
    for t in tiles:
        t['table'] = np.tile([[(2e-3 + 1.01e-3) / 2, 1e-3]], (4, 1))
        t['predicted'] = t['mse'] * 3.  # every level three times too high, every ratio right
    points = error_parts.score_parts(tiles)
    assert len(points) == 9
    cheap = (10 * np.log10(2) + 10 * np.log10(1.01)) / 2  # every image on the cheap subnet: 50% of the FLOPs
    split = 10 * np.log10(1.01) / 2  # the losing kind on the full network, the other cheap: 75%
    oracle = 0.5 + (cheap - 0.05) / (cheap - split) * 0.25
    for name, row in points.items():
        assert row['budget per image'] is None  # only every image on the full network is within 0.05 dB
        ratio = name.split(' x ')[1]
        expected = 0.5 + (cheap - 0.05) / cheap * 0.5 if ratio == 'class table' else oracle
        assert row['one slope'] == pytest.approx(expected), name
