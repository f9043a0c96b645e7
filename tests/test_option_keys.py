"""Every option block the plugin owns refuses unknown keys, naming them and the accepted ones.

HESPairedImageDataset's keys are tested in test_hes.py, ``train.wbsr`` in test_model.py; this file covers
BDLoss (``train.pixel_opt``), built by BasicSR's ``build_loss`` or fitted beforehand.
"""
import inspect

import pytest

from basicsr.losses import build_loss
from wbsr_losses import BDLoss
from wbsr_losses.gmm import gmm_fit_options

from test_bd_loss import MIX_3D, gmm_file, make_gmm

BDLOSS_KEYS = ['gmm_path', 'label_space', 'num_components', 'covariance_type', 'blur_sigma', 'gmm_pixels', 'seed',
               'init_noise_sigma', 'learn_sigma', 'sigma_lr', 'loss_weight', 'reduction']


def test_bdloss_signature_is_still_keyword_only_and_typed():
    params = inspect.signature(BDLoss).parameters
    assert list(params) == BDLOSS_KEYS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


@pytest.mark.parametrize('typo', ['label_spce', 'detla'])
def test_bdloss_typo_names_the_key_and_the_accepted_ones(tmp_path, typo):
    path = gmm_file(tmp_path, make_gmm(MIX_3D))
    with pytest.raises(TypeError) as err:
        build_loss({'type': 'BDLoss', 'gmm_path': path, typo: 'rgb'})
    assert str(err.value) == (f"BDLoss got an unexpected keyword argument '{typo}' (unknown option(s) ['{typo}']); "
                              f'accepted: {BDLOSS_KEYS}')


def test_gmm_fit_options_name_the_accepted_keys():
    with pytest.raises(TypeError) as err:
        gmm_fit_options({'type': 'BDLoss', 'num_component': 2})
    assert str(err.value) == f"BDLoss options: unknown keys ['num_component']; accepted: {['type'] + BDLOSS_KEYS}"
