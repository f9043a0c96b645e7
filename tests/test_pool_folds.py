"""bench/studies/pool_folds.py: the benchmark's scores on pool folds, a budget per image against one slope."""
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / 'bench' / 'studies'))
import pool_folds  # noqa: E402


def image(cheap_mse: float, tiles: int = 4) -> dict:
    """An image of ``tiles`` 32x32 tiles of one class; subnet 0 costs half of subnet 1 (the full network) and leaves
    ``cheap_mse`` where the full network leaves 1e-3."""
    return {'area': np.full(tiles, 1024.), 'costs': np.tile([1.0, 2.0], (tiles, 1)), 'whole': 2.0 * tiles,
            'classes': np.ones(tiles, dtype=np.int64), 'position': np.zeros(tiles),
            'mse': np.tile([cheap_mse, 1e-3], (tiles, 1))}


def test_scores_are_means_over_images_of_shares_and_losses():
    tiles = [image(2e-3), image(1.01e-3)]
    share, trimmed, plain = pool_folds.score(tiles, [np.array([1, 1, 1, 1]), np.array([0, 0, 0, 0])])
    assert share == pytest.approx(0.75)  # 100% on the first image, 50% on the second
    assert plain == pytest.approx(10 * np.log10(1.01) / 2)
    assert pool_folds.point([(0.5, 0.2), (0.7, 0.1), (0.6, 0.15)]) is None  # never within 0.05 dB
    assert pool_folds.point([(0.5, 0.2), (0.7, 0.0), (0.6, 0.1)]) == pytest.approx(0.65)  # in order of FLOPs


def test_one_slope_moves_flops_to_the_image_that_gains_from_them():
    # images alternate: on one kind the cheap subnet loses 3 dB, on the other 0.04 dB; every fold holds both kinds
    tiles = [image(2e-3 if n % 4 < 2 else 1.01e-3) for n in range(8)]
    result = pool_folds.budget_vs_slope(tiles, folds=2, num_classes=1)
    cheap = (10 * np.log10(2) + 10 * np.log10(1.01)) / 2  # every image on the cheap subnet: 50% of the FLOPs
    split = 10 * np.log10(1.01) / 2  # the losing kind on the full network, the other cheap: 75%
    for name, rows in result.items():
        assert len(rows) == 2
        for row in rows:
            # a budget per image reaches 0.05 dB only when every image runs the full network (the sweep ends at 95%)
            assert row['budget per image']['plain'] is None
            if name == 'oracle':  # one slope: the losing kind gets the full network first
                assert row['one slope']['plain'] == pytest.approx(0.5 + (cheap - 0.05) / (cheap - split) * 0.25)
            else:  # one class for both kinds: the class table cannot tell them apart, all move together
                assert row['one slope']['plain'] == pytest.approx(0.5 + (cheap - 0.05) / cheap * 0.5)
