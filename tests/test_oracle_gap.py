"""bench/studies/oracle_gap.py: the validation split's FLOPs point, also on the trimmed mean of the per-image losses."""
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / 'bench' / 'studies'))
import oracle_gap  # noqa: E402
from wbsr_models.calibrate import RegionRecords  # noqa: E402


def _records(ratios):
    """One tile per image; subnet 0's error is ``ratio`` x the full network's (subnet 1) on that image."""
    n = len(ratios)
    mse = np.stack([1e-3 * np.asarray(ratios, dtype=np.float64), np.full(n, 1e-3)], 1)
    return RegionRecords(image=np.arange(n), area=np.full(n, 64.), vectors=np.zeros((n, 4)), scores=np.zeros(n),
                         classes=np.ones(n, dtype=np.int64), mse=mse)


def test_one_image_where_the_full_network_fails_is_left_out_of_the_trimmed_loss():
    # nine images lose 10 log10(1.25) = 0.969 dB on subnet 0; on the tenth subnet 0 is 10 dB better than the full one
    records = _records([1.25] * 9 + [0.1])
    chosen = np.zeros(10, dtype=np.int64)
    assert oracle_gap.trimmed_loss(records, chosen) == pytest.approx(10 * np.log10(1.25))
    assert oracle_gap.image_psnr(records, chosen) - oracle_gap.image_psnr(records, np.ones(10, dtype=np.int64)) == \
        pytest.approx(-(9 * 10 * np.log10(1.25) - 10) / 10)  # the plain mean follows the one image
    assert oracle_gap.trimmed_loss(records, np.ones(10, dtype=np.int64)) == 0.0


def test_flops_at_reads_a_loss_curve_with_its_sign():
    curve = {0.4: {'flops': 0.4, 'loss': 0.2}, 0.5: {'flops': 0.5, 'loss': 0.1}, 0.6: {'flops': 0.6, 'loss': 0.0}}
    assert oracle_gap.flops_at(curve, -0.05, 'loss', sign=-1) == pytest.approx(0.55)
    assert oracle_gap.flops_at(curve, -0.2, 'loss', sign=-1) == 0.4
    assert oracle_gap.flops_at(curve, 0.01, 'loss', sign=-1) == 1.0  # never gains 0.01 dB
