"""BDLoss, the Balanced Diversity Loss of WBSR (Eq. 14 / 21; spec section 3)."""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from basicsr.losses.loss_util import weight_reduce_loss
from basicsr.utils import get_root_logger
from wbsr_losses.gmm import (COVARIANCE_TYPES, DEFAULT_BLUR_SIGMA, DEFAULT_COVARIANCE_TYPE, DEFAULT_GMM_PIXELS,
                             DEFAULT_LABEL_SPACE, DEFAULT_NUM_COMPONENTS, DEFAULT_SEED, LABEL_SPACES, PixelGMM,
                             detail_component, load_gmm)

_REDUCTIONS = ('none', 'mean', 'sum')
_LOG_2PI = math.log(2 * math.pi)


def _name_unknown_options(init: Callable[..., None]) -> Callable[..., None]:
    """``__init__`` that refuses an unknown keyword (a typo in ``pixel_opt``) naming it and the accepted ones.

    Python's own error names only the unexpected keyword; this one also lists what BDLoss takes. The
    signature seen by ``inspect`` stays the keyword-only one of ``init``.
    """
    accepted = [name for name in inspect.signature(init).parameters if name != 'self']

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(f'{type(self).__name__} got an unexpected keyword argument {unknown[0]!r} '
                            f'(unknown option(s) {unknown}); accepted: {accepted}')
        init(self, *args, **kwargs)

    return __init__


class BDLoss(nn.Module):
    """Balanced Diversity Loss: Gaussian likelihood of the target, balanced by the training label density.

    Per pixel vector (D = channels), with ``s2 = noise_sigma ** 2``::

        L = (2 s2).detach() / D * [ -log N(y; yhat, s2 I) + log sum_i phi_i N(f(yhat); mu_i, Sigma_i + s2 I) ]

    The second term is the closed form of ``log E_{y ~ p_train}[N(y; yhat, s2 I)]`` (Eq. 13) for the
    mixture ``p_train = sum_i phi_i N(mu_i, Sigma_i)`` fitted on the training HR pixels (see
    :mod:`wbsr_losses.gmm`); it lowers the reward for predicting frequent labels, as in the GAI form of
    Balanced MSE (Ren et al., CVPR 2022). The factor ``(2 s2).detach() / D`` gives the loss the scale of
    MSE: with one very wide component the loss is ``F.mse_loss(pred, target)`` plus a constant.

    Label space: the label distribution is modelled in the chosen space, the likelihood stays on the
    pixel. In the detail space sigma must stay fixed: learnt, it grows without bound (measured in the
    README), and the constructor warns. With ``label_space='rgb'``, ``f`` is the identity; with ``'detail'``, ``f`` is
    :func:`~wbsr_losses.gmm.detail_component` (the prediction minus its Gaussian blur), so the balancing
    acts on texture. The first term is always on the RGB pixel: a likelihood of the detail component
    alone would leave the low frequencies of the image unsupervised.

    ``noise_sigma`` is a learnable scalar. The model optimises it on its own (learning rate ``sigma_lr``,
    constant, no weight decay) and then calls :meth:`mark_sigma_optimized`. Used by a model that does not
    (BasicSR's plain ``SRModel``), sigma stays fixed at its value and the loss says so once in the log.

    The ``lambda ||theta||^2`` term of Eq. 14 is not computed here: it is the network optimizer's
    ``weight_decay`` (= 2 * lambda), set in the option file.

    Args:
        gmm_path: ``.npz`` file of the label mixture (written by :func:`~wbsr_losses.gmm.save_gmm`).
            Required; ``WBSRModel`` fits one at start-up when the option file names none. Default: None.
        label_space: ``'rgb'`` or ``'detail'``; must be the label space of the GMM file. Default: 'detail'
            (the README's loss sweep: 0.03-0.04 dB above 'rgb').
        num_components: L, used only when fitting the GMM. Default: 8.
        covariance_type: ``'full'`` or ``'diag'``, used only when fitting the GMM. Default: 'full'.
        blur_sigma: blur of the detail space; must match the GMM file for ``'detail'``. Default: 1.5.
        gmm_pixels: number of HR pixels sampled to fit the GMM. Default: 200000.
        seed: seed of the GMM fit (pixel sample and EM). Default: 0.
        init_noise_sigma: sigma (initial value when learnt), in units of pixel values in [0, 1]. The
            balancing term pulls a prediction away from frequent labels by about s2 / (Sigma_i + s2) of its
            distance to them, so a small sigma keeps that pull small. Default: 0.01.
        learn_sigma: whether sigma is a trainable parameter (the GAI form of Balanced MSE). Learnt, sigma
            rises to about 0.07-0.08 and PSNR falls 1.3 dB below L1 (README: the loss sweep), so it is
            fixed by default. Default: False.
        sigma_lr: learning rate of sigma's parameter group. Default: 1e-3.
        loss_weight: multiplies the loss. Default: 1.0.
        reduction: ``'none'`` (per-pixel map ``(N, 1, H, W)``), ``'mean'`` or ``'sum'`` over pixels.
            Default: 'mean'.

    Raises:
        TypeError: an unknown option; the message names it and the accepted ones.
        ValueError: no ``gmm_path``, an invalid option, or a GMM file of another label space or blur.
        CorruptFileError: the GMM file is unreadable or invalid (the message names it).
    """

    @_name_unknown_options
    def __init__(self, *, gmm_path: Optional[str] = None, label_space: str = DEFAULT_LABEL_SPACE,
                 num_components: int = DEFAULT_NUM_COMPONENTS, covariance_type: str = DEFAULT_COVARIANCE_TYPE,
                 blur_sigma: float = DEFAULT_BLUR_SIGMA, gmm_pixels: int = DEFAULT_GMM_PIXELS, seed: int = DEFAULT_SEED,
                 init_noise_sigma: float = 0.01, learn_sigma: bool = False, sigma_lr: float = 1e-3,
                 loss_weight: float = 1.0, reduction: str = 'mean') -> None:
        super().__init__()
        if not gmm_path:
            raise ValueError('BDLoss needs gmm_path, the label-distribution GMM. WBSRModel fits it at start-up '
                             '(wbsr_losses.gmm.fit_gmm_for_options) and passes the file; with another model, fit '
                             'it beforehand with `python -m wbsr_losses.fit_gmm -opt <file>` and name it in '
                             'gmm_path')
        if label_space not in LABEL_SPACES:
            raise ValueError(f'BDLoss: label_space {label_space!r}, expected one of {LABEL_SPACES}')
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f'BDLoss: covariance_type {covariance_type!r}, expected one of {COVARIANCE_TYPES}')
        if reduction not in _REDUCTIONS:
            raise ValueError(f'BDLoss: reduction {reduction!r}, expected one of {_REDUCTIONS}')
        # float() also accepts the strings PyYAML makes of numbers like 1e-3.
        init_noise_sigma, sigma_lr, blur_sigma = float(init_noise_sigma), float(sigma_lr), float(blur_sigma)
        if not (math.isfinite(init_noise_sigma) and init_noise_sigma > 0):
            raise ValueError(f'BDLoss: init_noise_sigma must be positive, got {init_noise_sigma}')
        if not (math.isfinite(sigma_lr) and sigma_lr >= 0):
            raise ValueError(f'BDLoss: sigma_lr must be >= 0, got {sigma_lr}')

        # gmm_pixels and seed matter only to fit_gmm_for_options, which reads them from the same options.
        gmm = load_gmm(gmm_path)
        if gmm.label_space != label_space:
            raise ValueError(f'{gmm_path}: GMM fitted in label space {gmm.label_space!r}, but BDLoss has '
                             f'label_space={label_space!r}')
        if label_space == 'detail' and not math.isclose(gmm.blur_sigma, blur_sigma, rel_tol=1e-6):
            raise ValueError(f'{gmm_path}: GMM fitted on details of blur_sigma={gmm.blur_sigma}, but BDLoss has '
                             f'blur_sigma={blur_sigma}')
        if (gmm.num_components, gmm.covariance_type) != (num_components, covariance_type):
            get_root_logger().warning(
                f'BDLoss: {gmm_path} has {gmm.num_components} {gmm.covariance_type} components, the options say '
                f'{num_components} {covariance_type} (they only apply when fitting); using the file')

        if label_space == 'detail' and learn_sigma:
            get_root_logger().warning(
                'BDLoss: in the detail label space a learnable sigma does not settle (the loss keeps falling as sigma '
                'grows, since the mixture is narrow next to pixel errors); set learn_sigma: false and a small '
                'init_noise_sigma (about 0.01)')
        self.gmm_path = gmm_path
        self.gmm: PixelGMM = gmm
        self.label_space = label_space
        self.blur_sigma = blur_sigma
        self.learn_sigma = bool(learn_sigma)
        self.sigma_lr = sigma_lr
        self.loss_weight = float(loss_weight)
        self.reduction = reduction
        self.noise_sigma = nn.Parameter(torch.tensor(init_noise_sigma), requires_grad=self.learn_sigma)
        # float64, not part of the state_dict: the mixture is defined by gmm_path.
        self.register_buffer('gmm_log_weights', torch.from_numpy(gmm.weights).log(), persistent=False)
        self.register_buffer('gmm_means', torch.from_numpy(gmm.means), persistent=False)
        self.register_buffer('gmm_covariances', torch.from_numpy(gmm.covariances), persistent=False)
        self._sigma_optimized = False
        self._fixed_sigma_logged = False

    def extra_repr(self) -> str:
        return (f'gmm_path={self.gmm_path!r}, label_space={self.label_space!r}, '
                f'components={self.gmm.num_components} {self.gmm.covariance_type}, channels={self.gmm.channels}, '
                f'learn_sigma={self.learn_sigma}, reduction={self.reduction!r}, loss_weight={self.loss_weight}')

    def mark_sigma_optimized(self) -> None:
        """Declare that an optimizer updates ``noise_sigma`` (the model calls this after building it)."""
        self._sigma_optimized = True

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """Loss of a prediction batch against its target.

        Args:
            pred: ``(N, D, H, W)`` network output, RGB for D = 3, values about [0, 1].
            target: ``(N, D, H, W)`` ground truth.
            weight: optional per-pixel weights ``(N, 1, H, W)``; 'mean' becomes the weighted mean.
                Default: None.
            **kwargs: ignored, as in BasicSR's losses.

        Returns:
            A scalar, or the ``(N, 1, H, W)`` per-pixel map for ``reduction='none'``.
        """
        self._check_inputs(pred, target, weight)
        sigma = self.noise_sigma
        if self.training and self.learn_sigma and not self._sigma_optimized:
            if not self._fixed_sigma_logged:
                get_root_logger().warning(
                    f'BDLoss: noise sigma stays fixed at {sigma.item():.4g} because the model does not optimise '
                    'it (it never called mark_sigma_optimized(); BasicSR\'s SRModel does not)')
                self._fixed_sigma_logged = True
            sigma = sigma.detach()
        with torch.autocast(pred.device.type, enabled=False):
            dtype = torch.promote_types(pred.dtype, torch.float32)
            pred, target = pred.to(dtype), target.to(dtype)
            noise_var = sigma.to(torch.float64).square()
            total = self._nll(pred, target, noise_var) + self._balancing(pred, noise_var)
            loss = total * (2 * noise_var.detach() / pred.shape[1]).to(dtype)
            return self.loss_weight * weight_reduce_loss(loss, weight, self.reduction)

    def nll_term(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-log N(y; yhat, s2 I)`` per pixel, ``(N, 1, H, W)``, at the current sigma (unscaled)."""
        self._check_inputs(pred, target, None)
        return self._nll(pred, target, self.noise_sigma.to(torch.float64).square())

    def balancing_term(self, pred: torch.Tensor) -> torch.Tensor:
        """``log sum_i phi_i N(f(yhat); mu_i, Sigma_i + s2 I)`` per pixel, ``(N, 1, H, W)`` (unscaled)."""
        self._check_inputs(pred, pred, None)
        return self._balancing(pred, self.noise_sigma.to(torch.float64).square())

    def _check_inputs(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
        if pred.dim() != 4 or pred.shape != target.shape:
            raise ValueError(f'BDLoss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be the same '
                             '(N, C, H, W) shape')
        if pred.shape[1] != self.gmm.channels:
            raise ValueError(f'{self.gmm_path}: GMM of {self.gmm.channels}-channel labels, but the prediction has '
                             f'{pred.shape[1]} channels')
        if weight is not None and (weight.dim() != 4 or weight.shape[1] != 1):
            raise ValueError(f'BDLoss: weight must be a per-pixel (N, 1, H, W) map, got {tuple(weight.shape)}')

    @staticmethod
    def _nll(pred: torch.Tensor, target: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
        var = noise_var.to(pred.dtype)
        sq_err = (pred - target).square().sum(dim=1, keepdim=True)
        return 0.5 * sq_err / var + 0.5 * pred.shape[1] * (_LOG_2PI + var.log())

    def _balancing(self, pred: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
        """Mixture log-density of ``f(pred)`` with every covariance widened by ``noise_var``.

        Each component's density is evaluated through ``z = W (x - mu)`` with ``W W^T = (Sigma + s2 I)^-1``:
        ``W`` and the log-determinant come from a float64 Cholesky factor of the small D x D matrices (stable
        for near-singular covariances and tiny s2, and differentiable in s2); the per-pixel work is one
        matrix product in the prediction's precision, then a log-sum-exp over components.
        """
        x = detail_component(pred, self.blur_sigma) if self.label_space == 'detail' else pred
        n, d, h, w = x.shape
        means = self.gmm_means.to(torch.float64)
        cov = self.gmm_covariances.to(torch.float64)
        num = means.shape[0]
        if self.gmm.covariance_type == 'full':
            eye = torch.eye(d, dtype=torch.float64, device=cov.device)
            chol = torch.linalg.cholesky(cov + noise_var * eye)
            whiten = torch.linalg.solve_triangular(chol, eye.expand(num, d, d), upper=False)  # (L, D, D) = chol^-1
            half_logdet = chol.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
            shift = (whiten @ means.unsqueeze(-1)).squeeze(-1)  # (L, D)
            z = torch.matmul(whiten.reshape(num * d, d).to(x.dtype), x.reshape(n, d, h * w))
            z = z.view(n, num, d, h * w) - shift.to(x.dtype).view(1, num, d, 1)
        else:
            inv_std = (cov + noise_var).rsqrt()  # (L, D)
            half_logdet = -inv_std.log().sum(dim=-1)
            z = (x.reshape(n, 1, d, h * w) - means.to(x.dtype).view(1, num, d, 1)) * inv_std.to(x.dtype).view(
                1, num, d, 1)
        const = self.gmm_log_weights.to(torch.float64) - half_logdet - 0.5 * d * _LOG_2PI  # (L,)
        log_prob = const.to(x.dtype).view(1, num, 1) - 0.5 * z.square().sum(dim=2)  # (N, L, H*W)
        return torch.logsumexp(log_prob, dim=1).view(n, 1, h, w)
