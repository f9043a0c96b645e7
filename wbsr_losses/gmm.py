"""The training label distribution of BDLoss: a Gaussian mixture over HR pixel vectors (spec section 3).

The balancing term of BDLoss (Eq. 14) needs ``p_train(y)`` in closed form, so it is modelled once, before
training, as a Gaussian mixture (Eq. 12) fitted with scikit-learn on a random sample of the training HR
pixels and stored in a small ``.npz`` file with the options that made it. Two label spaces:

* ``rgb``: ``y`` is the HR pixel (RGB order, in [0, 1]), the paper read literally;
* ``detail``: ``y`` is the pixel of :func:`detail_component` of the HR image (the image minus its
  Gaussian-blurred self), the texture the paper says L1/L2 training under-fits.

:func:`detail_component` is the one definition of the detail space: the fit applies it to whole HR
images, the loss to its predictions, so the two can never disagree.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from basicsr.data.data_util import paths_from_folder, paths_from_lmdb
from basicsr.utils import FileClient, get_root_logger
from wbsr_data.fileio import CorruptFileError, load_npz, save_npz
from wbsr_data.pairs import decode_image

#: Written into every GMM file; bumped when the meaning of the stored arrays changes.
GMM_FORMAT = 'wbsr-bd-gmm'
GMM_FORMAT_VERSION = 1
LABEL_SPACES = ('rgb', 'detail')
COVARIANCE_TYPES = ('full', 'diag')

# Defaults shared by BDLoss, the fit tool and fit_gmm_for_options.
DEFAULT_LABEL_SPACE = 'detail'  # the README's loss sweep
DEFAULT_NUM_COMPONENTS = 8
DEFAULT_COVARIANCE_TYPE = 'full'
DEFAULT_BLUR_SIGMA = 1.5
DEFAULT_GMM_PIXELS = 200000
DEFAULT_SEED = 0

_WEIGHT_SUM_TOL = 1e-6
_SYMMETRY_TOL = 1e-8


@dataclass(frozen=True)
class PixelGMM:
    """A Gaussian mixture over per-pixel label vectors, with the label space it was fitted in.

    Attributes:
        weights: ``(L,)`` mixture weights phi, positive, summing to 1.
        means: ``(L, D)`` component means mu (RGB channel order for 3-channel labels).
        covariances: ``(L, D, D)`` for ``full``, ``(L, D)`` (variances) for ``diag``; positive definite.
        covariance_type: ``'full'`` or ``'diag'``.
        label_space: ``'rgb'`` or ``'detail'``.
        blur_sigma: sigma of the Gaussian blur that defines the detail space (recorded for ``rgb`` too).
        provenance: JSON-able facts about the fit (source folder, pixel count, seed, versions, time).

    Raises:
        ValueError: at construction, if the arrays are inconsistent, non-finite, the weights do not
            sum to 1 or a covariance is not positive definite.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance_type: str
    label_space: str
    blur_sigma: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ('weights', 'means', 'covariances'):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        _validate(self)

    @property
    def num_components(self) -> int:
        """L, the number of mixture components."""
        return int(self.weights.shape[0])

    @property
    def channels(self) -> int:
        """D, the dimension of a label vector (the image's channel count)."""
        return int(self.means.shape[1])


def _validate(gmm: PixelGMM) -> None:
    if gmm.label_space not in LABEL_SPACES:
        raise ValueError(f'label space {gmm.label_space!r}, expected one of {LABEL_SPACES}')
    if gmm.covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f'covariance type {gmm.covariance_type!r}, expected one of {COVARIANCE_TYPES}')
    if not (math.isfinite(gmm.blur_sigma) and gmm.blur_sigma > 0):
        raise ValueError(f'blur_sigma must be a positive number, got {gmm.blur_sigma}')
    w, mu, cov = gmm.weights, gmm.means, gmm.covariances
    if w.ndim != 1 or w.shape[0] < 1:
        raise ValueError(f'weights must have shape (L,), got {w.shape}')
    num = w.shape[0]
    if mu.ndim != 2 or mu.shape[0] != num or mu.shape[1] < 1:
        raise ValueError(f'means must have shape (L={num}, D), got {mu.shape}')
    dim = mu.shape[1]
    want = (num, dim, dim) if gmm.covariance_type == 'full' else (num, dim)
    if cov.shape != want:
        raise ValueError(f'{gmm.covariance_type} covariances must have shape {want}, got {cov.shape}')
    for name, arr in (('weights', w), ('means', mu), ('covariances', cov)):
        if not np.isfinite(arr).all():
            raise ValueError(f'{name} hold non-finite values')
    if (w <= 0).any() or abs(w.sum() - 1.0) > _WEIGHT_SUM_TOL:
        raise ValueError(f'weights must be positive and sum to 1, they sum to {w.sum():.8f} (min {w.min():.3g})')
    if gmm.covariance_type == 'diag':
        if (cov <= 0).any():
            raise ValueError('diagonal covariances must be positive')
        return
    if np.abs(cov - cov.transpose(0, 2, 1)).max() > _SYMMETRY_TOL * max(1.0, np.abs(cov).max()):
        raise ValueError('covariances are not symmetric')
    for i, c in enumerate(cov):
        try:
            np.linalg.cholesky(c)
        except np.linalg.LinAlgError:
            raise ValueError(f'covariance of component {i} is not positive definite') from None


def save_gmm(path: str, gmm: PixelGMM) -> None:
    """Atomically write ``gmm`` to the ``.npz`` file ``path`` (arrays + JSON metadata, no pickle)."""
    meta = dict(gmm.provenance)
    meta.update(format=GMM_FORMAT, format_version=GMM_FORMAT_VERSION, label_space=gmm.label_space,
                channels=gmm.channels, num_components=gmm.num_components, covariance_type=gmm.covariance_type,
                blur_sigma=float(gmm.blur_sigma))
    save_npz(path, {'weights': gmm.weights, 'means': gmm.means, 'covariances': gmm.covariances}, meta)


def load_gmm(path: str) -> PixelGMM:
    """Read a file written by :func:`save_gmm`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: (a ``ValueError`` naming ``path``) the file is truncated, corrupt, holds pickled
            objects, is not a BDLoss GMM of this format version, or its mixture is invalid.
    """
    arrays, meta = load_npz(path, required=('weights', 'means', 'covariances'))
    if meta.get('format') != GMM_FORMAT:
        raise CorruptFileError(path, f'not a BDLoss GMM file (format {meta.get("format")!r})')
    if meta.get('format_version') != GMM_FORMAT_VERSION:
        raise CorruptFileError(path, f'GMM format version {meta.get("format_version")!r}, this code reads '
                               f'{GMM_FORMAT_VERSION}; fit it again with python -m wbsr_losses.fit_gmm')
    known = ('format', 'format_version', 'label_space', 'channels', 'num_components', 'covariance_type',
             'blur_sigma')
    try:
        gmm = PixelGMM(weights=arrays['weights'], means=arrays['means'], covariances=arrays['covariances'],
                       covariance_type=meta.get('covariance_type'), label_space=meta.get('label_space'),
                       blur_sigma=float(meta.get('blur_sigma', 'nan')),
                       provenance={k: v for k, v in meta.items() if k not in known})
    except (ValueError, TypeError) as exc:
        raise CorruptFileError(path, f'invalid mixture: {exc}') from None
    if meta.get('channels') != gmm.channels or meta.get('num_components') != gmm.num_components:
        raise CorruptFileError(path, f'metadata says D={meta.get("channels")}, L={meta.get("num_components")} '
                               f'but the arrays have D={gmm.channels}, L={gmm.num_components}')
    return gmm


def gaussian_kernel1d(blur_sigma: float, dtype: torch.dtype = torch.float32,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of standard deviation ``blur_sigma``, truncated at ``ceil(3 * blur_sigma)``."""
    if not (math.isfinite(blur_sigma) and blur_sigma > 0):
        raise ValueError(f'blur_sigma must be a positive number, got {blur_sigma}')
    radius = max(1, math.ceil(3 * blur_sigma))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (t / blur_sigma)**2)
    return kernel / kernel.sum()


def detail_component(x: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """``x`` minus its Gaussian-blurred self, for a batch ``(N, C, H, W)``; differentiable.

    The blur is separable, per channel, with reflect padding, so a flat image has zero detail everywhere.
    This is the single definition of the ``detail`` label space (GMM fit and loss both call it).

    Raises:
        ValueError: ``x`` is not 4-D, or is not larger than the blur radius in both spatial dimensions
            (reflect padding needs that).
    """
    if x.dim() != 4:
        raise ValueError(f'expected a (N, C, H, W) batch, got shape {tuple(x.shape)}')
    kernel = gaussian_kernel1d(blur_sigma, dtype=x.dtype, device=x.device)
    radius = kernel.numel() // 2
    channels, height, width = x.shape[1:]
    if height <= radius or width <= radius:
        raise ValueError(f'detail_component: a {height}x{width} image is too small for blur_sigma={blur_sigma} '
                         f'(reflect padding of {radius} needs more than {radius} pixels per side)')
    padded = F.pad(x, (radius, radius, radius, radius), mode='reflect')
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x - blurred


def list_gt_images(dataset_opt: Mapping[str, Any]) -> list[str]:
    """Sorted GT paths (disk) or keys (lmdb) of a BasicSR dataset option dict (not modified).

    Uses ``dataroot_gt`` only, with BasicSR's listing for the dataset's ``io_backend``: every non-hidden
    file of the folder (``paths_from_folder``), the names of ``meta_info_file`` where the dataset sets one,
    or the keys of an lmdb (``paths_from_lmdb``).

    Raises:
        ValueError: no ``dataroot_gt``, an unknown backend, or no images.
        FileNotFoundError: the folder (or the lmdb's ``meta_info.txt``) does not exist.
    """
    folder = dataset_opt.get('dataroot_gt')
    if not folder:
        raise ValueError(f"dataset '{dataset_opt.get('name', '?')}': dataroot_gt is required to fit the BDLoss GMM")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'dataroot_gt: {folder} is not a folder')
    backend = _backend_type(dataset_opt)
    if backend == 'lmdb':
        if not os.path.isfile(os.path.join(folder, 'meta_info.txt')):
            raise FileNotFoundError(f'dataroot_gt: {folder} has no meta_info.txt, it is not a BasicSR lmdb')
        paths = paths_from_lmdb(folder)
    elif dataset_opt.get('meta_info_file'):
        with open(dataset_opt['meta_info_file'], encoding='utf-8') as f:
            paths = [os.path.join(folder, line.split(' ')[0].strip()) for line in f if line.strip()]
    else:
        paths = paths_from_folder(folder)
    if not paths:
        raise ValueError(f'dataroot_gt: no images in {folder}')
    return sorted(paths)


def _backend_type(dataset_opt: Mapping[str, Any]) -> str:
    backend = dict(dataset_opt.get('io_backend') or {'type': 'disk'}).get('type', 'disk')
    if backend not in ('disk', 'lmdb'):
        raise ValueError(f'io_backend {backend!r}: the BDLoss GMM fit reads disk folders or lmdb only')
    return backend


def _gt_file_client(dataset_opt: Mapping[str, Any]) -> FileClient:
    backend = dict(dataset_opt.get('io_backend') or {'type': 'disk'})
    kind = backend.pop('type', 'disk')
    if kind == 'lmdb':
        backend['db_paths'] = [dataset_opt['dataroot_gt']]
        backend['client_keys'] = ['gt']
    return FileClient(kind, **backend)


def label_image(img_bgr: np.ndarray, label_space: str, blur_sigma: float) -> np.ndarray:
    """Label vectors ``(H*W, 3)`` float32 of one HR image as :func:`decode_image` returns it (BGR, [0, 1])."""
    if label_space not in LABEL_SPACES:
        raise ValueError(f'label_space {label_space!r}, expected one of {LABEL_SPACES}')
    rgb = torch.from_numpy(np.ascontiguousarray(img_bgr[..., ::-1])).permute(2, 0, 1).unsqueeze(0)
    if label_space == 'detail':
        rgb = detail_component(rgb, blur_sigma)
    return rgb[0].flatten(1).t().contiguous().numpy()


def sample_label_pixels(dataset_opt: Mapping[str, Any], *, label_space: str = DEFAULT_LABEL_SPACE,
                        num_pixels: int = DEFAULT_GMM_PIXELS, blur_sigma: float = DEFAULT_BLUR_SIGMA,
                        seed: int = DEFAULT_SEED, progress: bool = True) -> tuple[np.ndarray, int]:
    """A uniform random sample, without replacement, of the label vectors of all GT pixels of a dataset.

    Every pixel of every image is equally likely (a one-pass "smallest random keys" reservoir, so the
    images are read once and never held together). Pools with fewer pixels give all of them.

    Returns:
        ``(labels (M, 3) float32, number of images read)``, ``M = min(num_pixels, total pixels)``.
    """
    if num_pixels < 1:
        raise ValueError(f'gmm_pixels must be positive, got {num_pixels}')
    paths = list_gt_images(dataset_opt)
    client = _gt_file_client(dataset_opt)
    rng = np.random.default_rng(seed)
    keys = np.empty(0)
    values = np.empty((0, 3), np.float32)
    for path in tqdm(paths, desc=f'BDLoss GMM: reading HR images ({label_space})', unit='img', disable=not progress):
        labels = label_image(decode_image(client.get(path, 'gt'), path), label_space, blur_sigma)
        keys = np.concatenate([keys, rng.random(labels.shape[0])])
        values = np.concatenate([values, labels])
        if keys.shape[0] > num_pixels:
            keep = np.argpartition(keys, num_pixels - 1)[:num_pixels]
            keys, values = keys[keep], values[keep]
    return values, len(paths)


def fit_gmm(dataset_opt: Mapping[str, Any], *, label_space: str = DEFAULT_LABEL_SPACE,
            num_components: int = DEFAULT_NUM_COMPONENTS, covariance_type: str = DEFAULT_COVARIANCE_TYPE,
            blur_sigma: float = DEFAULT_BLUR_SIGMA, num_pixels: int = DEFAULT_GMM_PIXELS, seed: int = DEFAULT_SEED,
            progress: bool = True) -> PixelGMM:
    """Fit the label distribution of a dataset's GT images with scikit-learn's ``GaussianMixture``.

    Args:
        dataset_opt: BasicSR dataset options (``dataroot_gt``, ``io_backend``); not modified.
        label_space: ``'rgb'`` or ``'detail'``. Default: 'rgb'.
        num_components: L. Default: 8.
        covariance_type: ``'full'`` or ``'diag'``. Default: 'full'.
        blur_sigma: Gaussian blur of the detail space. Default: 1.5.
        num_pixels: size of the random pixel sample. Default: 200000.
        seed: seeds the pixel sample and scikit-learn. Default: 0.
        progress: show a progress bar over the images read. Default: True.

    Returns:
        The fitted mixture, with its provenance (source, pixels, seed, versions, fit time). Components are
        ordered by the sum of their mean, darkest first.

    Raises:
        ValueError: an invalid option, no images, or fewer pixels than components.
        FileNotFoundError: the GT folder does not exist.
        ImageFileError: an image cannot be read (the message names it).
    """
    import sklearn
    from sklearn.mixture import GaussianMixture

    if label_space not in LABEL_SPACES:
        raise ValueError(f'label_space {label_space!r}, expected one of {LABEL_SPACES}')
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f'covariance_type {covariance_type!r}, expected one of {COVARIANCE_TYPES}')
    if num_components < 1:
        raise ValueError(f'num_components must be positive, got {num_components}')
    start = time.perf_counter()
    labels, num_images = sample_label_pixels(dataset_opt, label_space=label_space, num_pixels=num_pixels,
                                             blur_sigma=blur_sigma, seed=seed, progress=progress)
    if labels.shape[0] < num_components:
        raise ValueError(f'{dataset_opt["dataroot_gt"]}: {labels.shape[0]} pixels cannot fit {num_components} '
                         'GMM components')
    get_root_logger().info(f'BDLoss GMM: EM for {num_components} {covariance_type} components on '
                           f'{labels.shape[0]} {label_space} pixels of {num_images} images')
    mixture = GaussianMixture(n_components=num_components, covariance_type=covariance_type, random_state=seed)
    mixture.fit(labels.astype(np.float64))
    seconds = time.perf_counter() - start
    if not mixture.converged_:
        get_root_logger().warning(f'BDLoss GMM: EM did not converge in {mixture.n_iter_} iterations; '
                                  'the mixture is used as it is')
    order = np.argsort(mixture.means_.sum(axis=1))  # deterministic component order: darkest mean first
    return PixelGMM(weights=mixture.weights_[order] / mixture.weights_.sum(), means=mixture.means_[order],
                    covariances=mixture.covariances_[order], covariance_type=covariance_type,
                    label_space=label_space, blur_sigma=float(blur_sigma),
                    provenance={'source': os.path.abspath(dataset_opt['dataroot_gt']),
                                'num_images': num_images, 'num_pixels': int(labels.shape[0]), 'seed': seed,
                                'sklearn_version': sklearn.__version__, 'converged': bool(mixture.converged_),
                                'em_iterations': int(mixture.n_iter_), 'fit_seconds': round(seconds, 3)})


def gmm_fit_options(loss_opt: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`fit_gmm` that BDLoss options (a ``pixel_opt`` dict) ask for.

    Raises:
        TypeError: ``loss_opt`` has a key that is not a BDLoss argument (caught before a long fit).
    """
    import inspect

    from wbsr_losses.bd_loss import BDLoss

    accepted = ['type', *inspect.signature(BDLoss).parameters]
    unknown = sorted(set(loss_opt) - set(accepted))
    if unknown:
        raise TypeError(f'BDLoss options: unknown keys {unknown}; accepted: {accepted}')
    return {'label_space': loss_opt.get('label_space', DEFAULT_LABEL_SPACE),
            'num_components': int(loss_opt.get('num_components', DEFAULT_NUM_COMPONENTS)),
            'covariance_type': loss_opt.get('covariance_type', DEFAULT_COVARIANCE_TYPE),
            'blur_sigma': float(loss_opt.get('blur_sigma', DEFAULT_BLUR_SIGMA)),
            'num_pixels': int(loss_opt.get('gmm_pixels', DEFAULT_GMM_PIXELS)),
            'seed': int(loss_opt.get('seed', DEFAULT_SEED))}


def fit_gmm_for_options(loss_opt: Mapping[str, Any], dataset_opt: Mapping[str, Any], out_path: str) -> str:
    """Fit the GMM that BDLoss options ask for on a dataset's GT images, write it to ``out_path``.

    Called by the model when the option file names no ``gmm_path``. Neither dict is modified.

    Args:
        loss_opt: the BDLoss options (``train.pixel_opt``): label_space, num_components, covariance_type,
            blur_sigma, gmm_pixels and seed are used, BDLoss's defaults otherwise.
        dataset_opt: the training dataset options (``datasets.train``).
        out_path: the ``.npz`` file to write (atomically; its folder is created).

    Returns:
        ``out_path``.
    """
    gmm = fit_gmm(dataset_opt, **gmm_fit_options(loss_opt))
    save_gmm(out_path, gmm)
    info = gmm.provenance
    get_root_logger().info(
        f'BDLoss GMM ({gmm.label_space}, {gmm.num_components} {gmm.covariance_type} components) fitted on '
        f'{info["num_pixels"]} pixels of {info["num_images"]} images of {info["source"]} in '
        f'{info["fit_seconds"]:.1f} s, saved to {out_path}')
    return out_path
