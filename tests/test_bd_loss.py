"""BDLoss and its label GMM: the maths against references, numerical safety, sigma handling, files, fitting."""
from __future__ import annotations

import copy
import logging
import math
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from basicsr.losses import build_loss
from basicsr.utils.registry import LOSS_REGISTRY
from conftest import write_pair_folder
from wbsr_data.fileio import CorruptFileError, load_npz, save_npz
from wbsr_losses import BDLoss, PixelGMM, detail_component, fit_gmm, fit_gmm_for_options, load_gmm, save_gmm
from wbsr_losses.fit_gmm import main as fit_gmm_main
from wbsr_losses.gmm import gaussian_kernel1d, list_gt_images, sample_label_pixels

# A 1-D and a 3-D mixture with well separated, differently shaped components.
MIX_1D = dict(weights=[0.3, 0.7], means=[[0.2], [0.6]], covariances=[[[0.01]], [[0.04]]])
_A = np.array([[[0.10, 0.02, 0.00], [0.03, 0.08, 0.01], [0.00, 0.02, 0.05]],
               [[0.05, 0.00, 0.01], [0.01, 0.12, 0.00], [0.02, 0.01, 0.07]],
               [[0.09, 0.04, 0.04], [0.04, 0.09, 0.04], [0.04, 0.04, 0.09]]])
MIX_3D = dict(weights=[0.5, 0.3, 0.2], means=[[0.2, 0.3, 0.25], [0.7, 0.6, 0.5], [0.5, 0.5, 0.9]],
              covariances=(_A @ _A.transpose(0, 2, 1)).tolist())


def make_gmm(mix: dict, covariance_type: str = 'full', label_space: str = 'rgb', blur_sigma: float = 1.5) -> PixelGMM:
    cov = np.asarray(mix['covariances'], np.float64)
    if covariance_type == 'diag':
        cov = np.einsum('lii->li', cov)
    return PixelGMM(weights=mix['weights'], means=mix['means'], covariances=cov, covariance_type=covariance_type,
                    label_space=label_space, blur_sigma=blur_sigma)


def gmm_file(tmp_path: Path, gmm: PixelGMM, name: str = 'gmm.npz') -> str:
    path = str(tmp_path / name)
    save_gmm(path, gmm)
    return path


def bd_loss(path: str, gmm: PixelGMM, **kwargs) -> BDLoss:
    """A BDLoss whose options agree with the file (no 'options differ' warning), sigma learnable."""
    kwargs.setdefault('label_space', gmm.label_space)
    kwargs.setdefault('learn_sigma', True)
    kwargs.setdefault('init_noise_sigma', 0.05)
    return BDLoss(gmm_path=path, num_components=gmm.num_components, covariance_type=gmm.covariance_type,
                  blur_sigma=gmm.blur_sigma, **kwargs)


def gray_gmm(covariance_type: str, label_space: str) -> PixelGMM:
    """A mixture fitted on gray pixels: its full RGB covariances are rank 1 plus scikit-learn's 1e-6 I."""
    from sklearn.mixture import GaussianMixture

    v = np.random.default_rng(0).uniform(0, 1, (3000, 1)) * (0.2 if label_space == 'detail' else 1.0)
    fit = GaussianMixture(n_components=3, covariance_type=covariance_type, random_state=0).fit(np.repeat(v, 3, 1))
    return PixelGMM(weights=fit.weights_, means=fit.means_, covariances=fit.covariances_,
                    covariance_type=covariance_type, label_space=label_space, blur_sigma=1.5)


class _Terms(nn.Module):
    """The two unscaled terms of BDLoss as a module, so functional_call can substitute sigma."""

    def __init__(self, loss: BDLoss) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.loss.nll_term(pred, target) + self.loss.balancing_term(pred)).sum()


# --- the maths --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('mix,sigma', [(MIX_1D, 0.1), (MIX_3D, 0.15)], ids=['1d', '3d'])
def test_balancing_term_is_the_integral_of_eq13(tmp_path, mix, sigma):
    """log sum phi_i N(yhat; mu_i, Sigma_i + s2 I) = log E_{y ~ GMM}[N(y; yhat, s2 I)], by Monte Carlo.

    Tolerance: 5 standard errors of the Monte Carlo mean (per prediction), so the test fails for a wrong
    term but holds for the right one with probability 1 - 6e-7 per value; the sample is seeded.
    """
    gmm = make_gmm(mix)
    loss = bd_loss(gmm_file(tmp_path, gmm), gmm, init_noise_sigma=sigma).double()
    dim = gmm.channels
    rng = np.random.default_rng(0)
    preds = rng.uniform(0, 1, (6, dim))
    closed = loss.balancing_term(torch.from_numpy(preds.T.reshape(1, dim, 1, 6))).exp().flatten().detach().numpy()

    n = 400000
    comp = rng.choice(gmm.num_components, p=gmm.weights, size=n)
    chol = np.linalg.cholesky(gmm.covariances)
    y = gmm.means[comp] + np.einsum('nij,nj->ni', chol[comp], rng.standard_normal((n, dim)))
    sq = ((y[:, None, :] - preds[None]) ** 2).sum(-1)  # (n, 6)
    dens = np.exp(-0.5 * sq / sigma**2) / (2 * np.pi * sigma**2) ** (dim / 2)
    mc, se = dens.mean(0), dens.std(0) / math.sqrt(n)
    assert (se / mc).max() < 0.02  # the estimate is informative
    np.testing.assert_array_less(np.abs(closed - mc), 5 * se)


def test_nll_term_is_the_gaussian_negative_log_likelihood(tmp_path):
    gmm = make_gmm(MIX_3D)
    loss = bd_loss(gmm_file(tmp_path, gmm), gmm, init_noise_sigma=0.07).double()
    s2 = loss.noise_sigma.item()**2
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    target = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(pred.permute(0, 2, 3, 1), s2 * torch.eye(3, dtype=torch.float64))
    ref = -mvn.log_prob(target.permute(0, 2, 3, 1))
    got = loss.nll_term(pred, target)
    assert got.shape == (2, 1, 4, 5)
    torch.testing.assert_close(got[:, 0], ref, rtol=1e-12, atol=1e-10)


def test_diag_path_equals_full_path_with_diagonal_matrices(tmp_path):
    diag = make_gmm(MIX_3D, 'diag')
    matrices = np.stack([np.diag(v) for v in diag.covariances])
    full = PixelGMM(weights=diag.weights, means=diag.means, covariances=matrices,
                    covariance_type='full', label_space='rgb', blur_sigma=1.5)
    pred = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = bd_loss(gmm_file(tmp_path, diag, 'd.npz'), diag).double().balancing_term(pred)
    b = bd_loss(gmm_file(tmp_path, full, 'f.npz'), full).double().balancing_term(pred)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_detail_space_balances_on_details_but_keeps_the_likelihood_on_pixels(tmp_path):
    rgb = make_gmm(MIX_3D, label_space='rgb', blur_sigma=1.0)
    det = make_gmm(MIX_3D, label_space='detail', blur_sigma=1.0)
    rgb_loss = bd_loss(gmm_file(tmp_path, rgb, 'r.npz'), rgb).double()
    det_loss = bd_loss(gmm_file(tmp_path, det, 'd.npz'), det).double()
    gen = torch.Generator().manual_seed(2)
    pred, target = torch.rand(2, 3, 8, 9, generator=gen, dtype=torch.float64), torch.rand(2, 3, 8, 9, generator=gen,
                                                                                          dtype=torch.float64)
    torch.testing.assert_close(det_loss.balancing_term(pred), rgb_loss.balancing_term(detail_component(pred, 1.0)))
    torch.testing.assert_close(det_loss.nll_term(pred, target), rgb_loss.nll_term(pred, target))


def test_detail_component_matches_opencv_reflect101_blur():
    img = np.random.default_rng(3).uniform(0, 1, (20, 17, 3))
    kernel = gaussian_kernel1d(1.5, torch.float64).numpy()
    assert kernel.shape == (11, ) and math.isclose(kernel.sum(), 1.0)  # radius ceil(3 * 1.5) = 5
    ref = img - cv2.sepFilter2D(img, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
    got = detail_component(torch.from_numpy(img).permute(2, 0, 1)[None], 1.5)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-12)
    flat = detail_component(torch.full((1, 3, 12, 12), 0.4), 1.5)
    assert flat.abs().max() < 1e-6
    with pytest.raises(ValueError, match='5x12 image is too small for blur_sigma=1.5'):
        detail_component(torch.rand(1, 3, 5, 12), 1.5)


def test_one_wide_component_gives_mse_plus_a_constant(tmp_path):
    wide = PixelGMM(weights=[1.0], means=[[0.5, 0.5, 0.5]], covariances=[np.eye(3) * 1e6], covariance_type='full',
                    label_space='rgb', blur_sigma=1.5)
    loss = bd_loss(gmm_file(tmp_path, wide), wide, init_noise_sigma=0.05).double()
    gen = torch.Generator().manual_seed(4)
    target = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    p1 = target + 0.1 * torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    p2 = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    d_loss = loss(p1, target) - loss(p2, target)
    d_mse = F.mse_loss(p1, target) - F.mse_loss(p2, target)
    assert abs(d_mse) > 0.05
    # The wide component adds (2 s2 / D) * |yhat - mu|^2 / (2e6) < 1e-8 on top of a constant.
    assert abs(d_loss - d_mse) < 1e-8
    s2 = 0.05**2  # the constant: s2 log(2 pi s2) from the likelihood, (2 s2 / 3) log N(yhat; mu, 1e6 I) ~ balancing
    const = s2 * math.log(2 * math.pi * s2) + 2 * s2 / 3 * (-1.5 * math.log(2 * math.pi * (1e6 + s2)))
    assert abs(loss(p1, target) - F.mse_loss(p1, target) - const) < 1e-8


def test_reductions_weight_and_loss_weight(tmp_path):
    gmm = make_gmm(MIX_3D)
    path = gmm_file(tmp_path, gmm)
    gen = torch.Generator().manual_seed(5)
    pred, target = torch.rand(2, 3, 4, 5, generator=gen), torch.rand(2, 3, 4, 5, generator=gen)
    weight = torch.rand(2, 1, 4, 5, generator=gen)
    per_pixel = bd_loss(path, gmm, reduction='none')(pred, target)
    assert per_pixel.shape == (2, 1, 4, 5)
    torch.testing.assert_close(bd_loss(path, gmm)(pred, target), per_pixel.mean())
    torch.testing.assert_close(bd_loss(path, gmm, reduction='sum')(pred, target), per_pixel.sum())
    torch.testing.assert_close(bd_loss(path, gmm, loss_weight=0.5)(pred, target, weight),
                               0.5 * (per_pixel * weight).sum() / weight.sum())
    with pytest.raises(ValueError, match=r'weight must be a per-pixel \(N, 1, H, W\) map, got \(2, 3, 4, 5\)'):
        bd_loss(path, gmm)(pred, target, torch.ones_like(pred))


def test_float32_agrees_with_float64(tmp_path):
    gmm = make_gmm(MIX_3D)
    loss = bd_loss(gmm_file(tmp_path, gmm), gmm, reduction='none')
    pred = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    target = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loss(pred, target).double(), loss.double()(pred.double(), target.double()), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize('covariance_type,label_space', [('full', 'rgb'), ('diag', 'rgb'), ('full', 'detail')])
def test_gradcheck_prediction_and_sigma(tmp_path, covariance_type, label_space):
    gmm = make_gmm(MIX_3D, covariance_type, label_space, blur_sigma=0.6)
    loss = bd_loss(gmm_file(tmp_path, gmm), gmm, init_noise_sigma=0.1).double().eval()
    gen = torch.Generator().manual_seed(8)
    pred = torch.rand(1, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 3, 4, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: loss(p, target), (pred, ))
    # The loss scales by (2 s2).detach(), so sigma's gradient is that of the two unscaled terms.
    sigma = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    terms = _Terms(loss)
    assert torch.autograd.gradcheck(lambda s: functional_call(terms, {'loss.noise_sigma': s}, (pred.detach(), target)),
                                    (sigma, ))


@pytest.mark.parametrize('covariance_type,label_space', [('full', 'rgb'), ('diag', 'rgb'), ('full', 'detail')])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_finite_for_tiny_sigma_and_rank_deficient_gray_mixture(tmp_path, covariance_type, label_space, dtype):
    gmm = gray_gmm(covariance_type, label_space)
    if covariance_type == 'full':
        assert np.linalg.eigvalsh(gmm.covariances).min() < 1e-5  # numerically rank 1
    loss = bd_loss(gmm_file(tmp_path, gmm), gmm, init_noise_sigma=1e-3).to(dtype)  # s2 = 1e-6
    loss.mark_sigma_optimized()
    gen = torch.Generator().manual_seed(9)
    gray = torch.rand(2, 1, 16, 16, generator=gen).expand(-1, 3, -1, -1)
    preds = [torch.rand(2, 3, 16, 16, generator=gen), gray, torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)]
    for pred in preds:
        pred = pred.to(dtype).requires_grad_()
        value = loss(pred, torch.rand(2, 3, 16, 16, generator=gen).to(dtype))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(pred.grad).all() and torch.isfinite(loss.noise_sigma.grad)
        loss.noise_sigma.grad = None


# --- sigma -----------------------------------------------------------------------------------------------------


def test_one_adam_step_moves_sigma_only_when_learnable(tmp_path):
    gmm = make_gmm(MIX_3D)
    path = gmm_file(tmp_path, gmm)
    gen = torch.Generator().manual_seed(10)
    pred = torch.rand(2, 3, 8, 8, generator=gen, requires_grad=True)
    target = torch.rand(2, 3, 8, 8, generator=gen)

    loss = bd_loss(path, gmm, sigma_lr=2e-3)
    optimizer = torch.optim.Adam([loss.noise_sigma], lr=loss.sigma_lr)
    loss.mark_sigma_optimized()
    loss(pred, target).backward()
    optimizer.step()
    assert math.isclose(abs(loss.noise_sigma.item() - 0.05), 2e-3, rel_tol=1e-3)  # Adam's first step is lr

    fixed = bd_loss(path, gmm, learn_sigma=False)
    assert not fixed.noise_sigma.requires_grad
    optimizer = torch.optim.Adam([fixed.noise_sigma], lr=1e-3)
    fixed(pred, target).backward()
    optimizer.step()
    assert fixed.noise_sigma.grad is None and fixed.noise_sigma.item() == torch.tensor(0.05).item()

    again = bd_loss(path, gmm)
    assert list(loss.state_dict()) == ['noise_sigma']
    again.load_state_dict(loss.state_dict())
    assert again.noise_sigma.item() == loss.noise_sigma.item() != 0.05


def test_sigma_not_optimised_is_fixed_and_said_once(tmp_path):
    gmm = make_gmm(MIX_3D)
    loss = bd_loss(gmm_file(tmp_path, gmm), gmm, init_noise_sigma=0.03)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('basicsr')
    logger.addHandler(handler)
    try:
        pred, target = torch.rand(1, 3, 6, 6, requires_grad=True), torch.rand(1, 3, 6, 6)
        loss.eval()
        loss(pred, target)
        assert not records  # validation does not need an optimiser
        loss.train()
        for _ in range(3):
            loss(pred, target).backward()
        assert loss.noise_sigma.grad is None
        loss.mark_sigma_optimized()
        loss(pred, target).backward()
        assert loss.noise_sigma.grad is not None and loss.noise_sigma.grad.abs() > 0
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert messages == ['BDLoss: noise sigma stays fixed at 0.03 because the model does not optimise it (it never '
                        "called mark_sigma_optimized(); BasicSR's SRModel does not)"]


# --- GMM files -------------------------------------------------------------------------------------------------


def test_missing_gmm_path_says_how_to_get_one():
    with pytest.raises(ValueError, match=r'WBSRModel fits it at start-up .* `python -m wbsr_losses.fit_gmm -opt '
                       r'<file>` and name it in gmm_path'):
        BDLoss()


def test_gmm_of_another_label_space_blur_or_dimension_is_refused(tmp_path):
    det = make_gmm(MIX_3D, label_space='detail', blur_sigma=2.0)
    path = gmm_file(tmp_path, det)
    with pytest.raises(ValueError, match=f"{path}: GMM fitted in label space 'detail', but BDLoss has "
                       "label_space='rgb'"):
        BDLoss(gmm_path=path, label_space='rgb')
    with pytest.raises(ValueError, match=f'{path}: GMM fitted on details of blur_sigma=2.0, but BDLoss has '
                       'blur_sigma=1.5'):
        BDLoss(gmm_path=path, label_space='detail', blur_sigma=1.5)
    one = make_gmm(MIX_1D)
    path1 = gmm_file(tmp_path, one, 'one.npz')
    loss = bd_loss(path1, one)
    with pytest.raises(ValueError, match=f'{path1}: GMM of 1-channel labels, but the prediction has 3 channels'):
        loss(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    assert loss(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)).shape == ()


class _Payload:
    """Unpickling this creates a file: the proof that a loader ran pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker, ))


def test_corrupt_truncated_and_pickled_files_are_refused(tmp_path):
    good = gmm_file(tmp_path, make_gmm(MIX_3D))
    corrupt = tmp_path / 'corrupt.npz'
    corrupt.write_bytes(b'this is not an npz file' * 20)
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(Path(good).read_bytes()[:300])
    pickled = tmp_path / 'pickled.npz'
    marker = tmp_path / 'unpickled'
    arrays, meta = load_npz(good)
    np.savez(pickled, weights=np.array([_Payload(str(marker))], dtype=object), means=arrays['means'],
             covariances=arrays['covariances'], __meta__=np.frombuffer(b'{}', np.uint8))
    for path in (corrupt, truncated, pickled):
        with pytest.raises(CorruptFileError, match=re.escape(f'{path}: ')):
            BDLoss(gmm_path=str(path))
    with pytest.raises(CorruptFileError, match='not a readable .npz file'):
        load_gmm(str(truncated))
    with pytest.raises(CorruptFileError, match='refused, it holds pickled objects'):
        load_gmm(str(pickled))
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match='nowhere.npz: no such file'):
        BDLoss(gmm_path=str(tmp_path / 'nowhere.npz'))


def _tamper(path: str, out: str, arrays_change=None, meta_change=None, drop=None) -> str:
    arrays, meta = load_npz(path)
    arrays.update(arrays_change or {})
    meta.update(meta_change or {})
    if drop:
        del arrays[drop]
    save_npz(out, arrays, meta)
    return out


@pytest.mark.parametrize('change,reason', [
    (dict(drop='covariances'), "missing arrays ['covariances']"),
    (dict(arrays_change={'means': np.zeros((3, 2))}), 'full covariances must have shape (3, 2, 2), got (3, 3, 3)'),
    (dict(arrays_change={'means': np.full((3, 3), np.nan)}), 'means hold non-finite values'),
    (dict(arrays_change={'weights': np.array([0.5, 0.3, 0.3])}),
     'weights must be positive and sum to 1, they sum to 1.10000000'),
    (dict(arrays_change={'covariances': np.stack([np.eye(3), np.eye(3), -np.eye(3)])}),
     'covariance of component 2 is not positive definite'),
    (dict(meta_change={'label_space': 'lab'}), "label space 'lab'"),
    (dict(meta_change={'channels': 4}), 'metadata says D=4, L=3 but the arrays have D=3, L=3'),
    (dict(meta_change={'format_version': 99}), 'GMM format version 99, this code reads 1'),
    (dict(meta_change={'format': 'other'}), "not a BDLoss GMM file (format 'other')"),
], ids=['missing', 'shapes', 'nan', 'weights', 'not-pd', 'space', 'meta', 'version', 'format'])
def test_invalid_mixture_files_are_refused(tmp_path, change, reason):
    path = _tamper(gmm_file(tmp_path, make_gmm(MIX_3D)), str(tmp_path / 'bad.npz'), **change)
    with pytest.raises(CorruptFileError) as info:
        load_gmm(path)
    assert str(info.value).startswith(f'{path}: ') and reason in str(info.value)


# --- fitting ---------------------------------------------------------------------------------------------------


def _all_rgb_pixels(folder: str) -> np.ndarray:
    files = sorted(Path(folder).glob('*.png'))
    return np.concatenate([cv2.imread(str(f))[..., ::-1].reshape(-1, 3) / 255. for f in files])


def test_fit_on_every_pixel_reproduces_the_rgb_statistics(tmp_path):
    data = write_pair_folder(tmp_path / 'pairs')
    pixels = _all_rgb_pixels(data['dataroot_gt'])
    gmm = fit_gmm(data, label_space='rgb', num_components=1, num_pixels=10**6, progress=False)
    assert gmm.provenance['num_pixels'] == pixels.shape[0] == 26272 and gmm.provenance['num_images'] == 3
    np.testing.assert_allclose(gmm.means[0], pixels.mean(0), atol=1e-6)  # RGB order, not BGR
    assert abs(pixels[:, 0].mean() - pixels[:, 2].mean()) > 1e-3  # so the check above tells RGB from BGR
    np.testing.assert_allclose(gmm.covariances[0], np.cov(pixels.T, bias=True) + 1e-6 * np.eye(3), atol=1e-6)


def test_fit_in_detail_space_uses_detail_component(tmp_path):
    data = write_pair_folder(tmp_path / 'pairs')
    files = sorted(Path(data['dataroot_gt']).glob('*.png'))
    details = [
        detail_component(torch.from_numpy(cv2.imread(str(f))[..., ::-1] / 255.).permute(2, 0, 1)[None], 2.0)
        [0].flatten(1).t() for f in files
    ]
    ref = torch.cat(details).numpy()
    gmm = fit_gmm(data, label_space='detail', num_components=1, blur_sigma=2.0, num_pixels=10**6, progress=False)
    assert gmm.label_space == 'detail' and gmm.blur_sigma == 2.0
    np.testing.assert_allclose(gmm.means[0], ref.mean(0), atol=1e-6)
    np.testing.assert_allclose(gmm.covariances[0], np.cov(ref.T, bias=True) + 1e-6 * np.eye(3), rtol=1e-4)


def test_pixel_sample_is_uniform_over_pixels_seeded_and_sized(tmp_path):
    folder = tmp_path / 'gt'
    folder.mkdir()
    sizes = {40: (20, 20), 120: (40, 30), 200: (10, 80)}  # gray level -> (h, w): 400, 1200, 800 pixels
    for level, (h, w) in sizes.items():
        cv2.imwrite(str(folder / f'{level}.png'), np.full((h, w, 3), level, np.uint8))
    opt = {'dataroot_gt': str(folder)}
    sample, num_images = sample_label_pixels(opt, label_space='rgb', num_pixels=1200, seed=3, progress=False)
    assert sample.shape == (1200, 3) and num_images == 3
    counts = {level: int((np.abs(sample[:, 0] * 255 - level) < 0.5).sum()) for level in sizes}
    for level, (h, w) in sizes.items():
        expected = 1200 * h * w / 2400
        sd = math.sqrt(expected * (1 - h * w / 2400) * (1200 / 2400))  # hypergeometric
        assert abs(counts[level] - expected) < 4 * sd
    again, _ = sample_label_pixels(opt, label_space='rgb', num_pixels=1200, seed=3, progress=False)
    other, _ = sample_label_pixels(opt, label_space='rgb', num_pixels=1200, seed=4, progress=False)
    np.testing.assert_array_equal(np.sort(sample[:, 0]), np.sort(again[:, 0]))
    assert not np.array_equal(np.sort(sample[:, 0]), np.sort(other[:, 0]))


def test_listing_gt_images_errors_name_the_folder(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match=f'dataroot_gt: no images in {empty}'):
        list_gt_images({'dataroot_gt': str(empty)})
    with pytest.raises(FileNotFoundError, match=f'dataroot_gt: {tmp_path / "missing"} is not a folder'):
        list_gt_images({'dataroot_gt': str(tmp_path / 'missing')})
    with pytest.raises(ValueError, match="dataset 'x': dataroot_gt is required"):
        list_gt_images({'name': 'x'})


def test_lmdb_gt_gives_the_same_fit_as_the_folder(tmp_path):
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    data = write_pair_folder(tmp_path / 'pairs', n=2)
    names = sorted(os.listdir(data['dataroot_gt']))
    lmdb_path = str(tmp_path / 'gt.lmdb')
    make_lmdb_from_imgs(data['dataroot_gt'], lmdb_path, names, [n[:-4] for n in names])
    lmdb_opt = {'dataroot_gt': lmdb_path, 'io_backend': {'type': 'lmdb'}}
    assert list_gt_images(lmdb_opt) == ['img000', 'img001']
    a = fit_gmm(lmdb_opt, num_components=1, num_pixels=10**6, progress=False)
    b = fit_gmm(data, num_components=1, num_pixels=10**6, progress=False)
    np.testing.assert_allclose(a.means, b.means, atol=1e-12)


def test_fit_gmm_for_options_writes_a_file_the_loss_loads(tmp_path):
    data = write_pair_folder(tmp_path / 'pairs', n=2)
    dataset_opt = {'name': 'tiny', 'type': 'PairedImageDataset', **data, 'io_backend': {'type': 'disk'}}
    loss_opt = {'type': 'BDLoss', 'label_space': 'detail', 'num_components': 2, 'covariance_type': 'diag',
                'blur_sigma': 1.0, 'gmm_pixels': 3000, 'seed': 1}
    before = copy.deepcopy((loss_opt, dataset_opt))
    out = str(tmp_path / 'exp' / 'gmm.npz')
    assert fit_gmm_for_options(loss_opt, dataset_opt, out) == out
    assert (loss_opt, dataset_opt) == before
    gmm = load_gmm(out)
    assert (gmm.label_space, gmm.num_components, gmm.covariance_type, gmm.blur_sigma) == ('detail', 2, 'diag', 1.0)
    assert gmm.covariances.shape == (2, 3) and abs(gmm.weights.sum() - 1) < 1e-9
    assert gmm.provenance['num_pixels'] == 3000 and gmm.provenance['seed'] == 1
    loss = build_loss({**loss_opt, 'gmm_path': out})
    assert torch.isfinite(loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)))
    with pytest.raises(TypeError, match=r"BDLoss options: unknown keys \['num_component'\]"):
        fit_gmm_for_options({'num_component': 2}, dataset_opt, out)


def _option_file(tmp_path: Path, pixel_opt: dict) -> Path:
    data = write_pair_folder(tmp_path / 'pairs', n=2)
    opt = {'name': 'tiny', 'datasets': {'train': {'name': 'tiny', 'type': 'PairedImageDataset', **data,
                                                   'io_backend': {'type': 'disk'}}},
           'train': {'pixel_opt': pixel_opt}}
    path = tmp_path / 'opt.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


def test_fit_tool_writes_the_file_and_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    opt = _option_file(tmp_path, {'type': 'BDLoss', 'num_components': 3, 'gmm_pixels': 2000})
    out = tmp_path / 'g.npz'
    assert fit_gmm_main(['-opt', str(opt), '--out', str(out), '--label-space', 'detail', '--components', '2']) == 0
    gmm = load_gmm(str(out))
    assert (gmm.label_space, gmm.num_components, gmm.provenance['num_pixels']) == ('detail', 2, 2000)
    printed = capsys.readouterr().out
    assert f'written to {out}' in printed and 'detail GMM, 2 full components' in printed

    monkeypatch.chdir(tmp_path)
    assert fit_gmm_main(['-opt', str(opt)]) == 0
    assert load_gmm(str(tmp_path / 'bd_gmm_detail.npz')).num_components == 3  # the default label space

    capsys.readouterr()
    assert fit_gmm_main(['-opt', str(tmp_path / 'none.yml')]) == 2
    err = capsys.readouterr().err
    assert err == f'wbsr-fit-gmm: error: {tmp_path / "none.yml"}: no such option file\n'
    l1 = _option_file(tmp_path / 'l1', {'type': 'L1Loss'})
    assert fit_gmm_main(['-opt', str(l1)]) == 2
    err = capsys.readouterr().err
    assert err == f"wbsr-fit-gmm: error: {l1}: train.pixel_opt must be of type BDLoss, got 'L1Loss'\n"


# --- registration ----------------------------------------------------------------------------------------------


def test_registered_and_built_by_basicsr(tmp_path):
    gmm = make_gmm(MIX_3D)
    path = gmm_file(tmp_path, gmm)
    assert 'BDLoss' in LOSS_REGISTRY and LOSS_REGISTRY.get('BDLoss') is BDLoss
    opt = {'type': 'BDLoss', 'gmm_path': path, 'label_space': 'rgb', 'num_components': 3, 'loss_weight': 2.0}
    loss = build_loss(opt)
    assert isinstance(loss, BDLoss) and loss.loss_weight == 2.0 and loss.gmm.num_components == 3
    assert opt['type'] == 'BDLoss'
    with pytest.raises(TypeError, match="unexpected keyword argument 'label_spce'"):
        build_loss({'type': 'BDLoss', 'gmm_path': path, 'label_spce': 'rgb'})
