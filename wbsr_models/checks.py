"""One validation layer for the options and flags of every entry point, and for what a checkpoint claims.

Every entry point (``wbsr-infer``, ``wbsr-calibrate``, ``wbsr-inspect``, ``wbsr-fit-gmm``, ``wbsr-make-lr``, option
files through ``wbsr-train``, ``wbsr-test``, ``basicsr/train.py`` and ``basicsr/test.py``) checks what it is given here,
at start-up, before any training step or image:

- numbers by type and range: a real, non-bool, finite number where a number is meant, an integer where a size, a count
  or an index is (``2e-4`` written without a dot is text in YAML, and says so); names that become file names without
  path separators; output paths writable and of the right kind (:mod:`wbsr_data.fileio`);
- routing options through the registry (:data:`wbsr_models.routing.modes.OPTIONS`, :class:`RoutingOptions`), plus the
  bounds the registry leaves open: regions of at least 3 x 3 LR pixels (smaller ones have no gradient, so every
  difficulty is 0), and trade-offs small enough that the allocation's arithmetic stays finite;
- what depends on the network (a subnet index, a budget the cheapest subnet can meet, a mode's checkpoint artefacts)
  by building a :class:`~wbsr_models.router.Router` once against it;
- a checkpoint as untrusted data: its network options are compared with its weights' shapes on the ``meta`` device
  before anything is allocated, with the construction stopped as soon as it outgrows the weights, and every weight
  must be finite.

Errors are ``ValueError`` subclasses (or ``OSError`` for paths) whose one-line message names the flag, the option or the
file; the tools print it and exit with status 2.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import inspect
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from wbsr_data.fileio import CorruptFileError, first_line

#: Smallest side (LR pixels) of a routing region: the difficulty's 3 x 3 gradient needs it.
MIN_REGION_SIDE = 3
#: Largest ``alpha``, ``arm_eta`` and ``slope``: beyond it every region already gets the full network (``alpha``,
#: ``arm_eta``) or the cheapest subnet (``slope``), and ``alpha * C_full`` could overflow to infinity, which would route
#: everything to the cheapest subnet instead.
MAX_TRADEOFF = 1e6
#: Largest ``max_loss`` (dB): 10^(max_loss / 10) must stay a finite number.
MAX_LOSS_DB = 100.


class UsageError(ValueError):
    """A command-line argument does not fit; the message names the flag."""


class OptionFileError(ValueError):
    """An option file is unreadable or its options do not fit; the message names the file and the key."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f'{path}: {reason}')
        self.path, self.reason = path, reason


class RunLockedError(OSError):
    """Another run holds the experiment (or results) folder."""


def read_option_file(path: str) -> dict:
    """A YAML option file as BasicSR reads it, with one-line errors naming it."""
    import yaml
    from basicsr.utils.options import ordered_yaml
    if not os.path.isfile(path):
        raise OptionFileError(path, 'no such option file')
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        raise OptionFileError(path, f'not valid YAML ({getattr(exc, "problem", None) or first_line(exc)}{where})') \
            from None
    except UnicodeDecodeError:
        raise OptionFileError(path, 'not a text file') from None
    if not isinstance(opt, Mapping):
        raise OptionFileError(path, 'not a mapping of options')
    return dict(opt)


# ---- numbers ------------------------------------------------------------------------------------------------------
def _got(value: Any) -> str:
    """``value`` as an error shows it; a string that reads as a number says why it is a string."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return repr(value)
        if re.fullmatch(r'\s*[+-]?\d+[eE][+-]?\d+\s*', value):
            return f'the string {value!r} (YAML reads a number like 2e-4 without a dot as text: write 2.0e-4)'
        return f'the string {value!r} (remove the quotes)'
    return repr(value)


def _range(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f' in {"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}'
    if lo is not None:
        return f' {">" if lo_open else ">="} {lo:g}'
    if hi is not None:
        return f' {"<" if hi_open else "<="} {hi:g}'
    return ''


@dataclass(frozen=True)
class Number:
    """A numeric option: ``kind`` ``int`` (an integer), ``count`` (an integer, or a float with an integer value, as
    BasicSR's own files write ``!!float 5e3``) or ``real`` (a finite real number); bounds inclusive unless open."""

    kind: str = 'real'
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, value: Any, key: str) -> Any:
        """``value`` as this number (int or float); ``ValueError`` naming ``key`` otherwise."""
        what = 'an integer' if self.kind in ('int', 'count') else 'a finite number'
        bounds = _range(self.lo, self.hi, self.lo_open, self.hi_open)
        bad = ValueError(f'{key} must be {what}{bounds}, got {_got(value)}')
        if isinstance(value, bool) or not isinstance(value, Real):
            raise bad
        if self.kind == 'int' and not isinstance(value, Integral):
            raise bad
        if not math.isfinite(value):
            raise bad
        if self.kind == 'count':
            if value != int(value):
                raise bad
            value = int(value)
        elif self.kind == 'real':
            value = float(value)
        else:
            value = int(value)
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            raise bad
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            raise bad
        return value


def check_int(value: Any, key: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An integer (not a bool, not a float) in ``[lo, hi]``; ``ValueError`` naming ``key`` otherwise."""
    return Number('int', lo, hi).check(value, key)


def check_real(value: Any, key: str, lo: Optional[float] = None, hi: Optional[float] = None, *,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (not a bool, not a string) within the bounds; ``ValueError`` naming ``key`` otherwise."""
    return Number('real', lo, hi, lo_open, hi_open).check(value, key)


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{key} must be true or false, got {_got(value)}')
    return value


def check_file_name(value: Any, key: str) -> str:
    """A string used inside a file name: not empty, no path separator, not ``.`` or ``..``, no NUL."""
    if not isinstance(value, str) or not value:
        raise ValueError(f'{key} must be a non-empty name, got {value!r}')
    if os.sep in value or (os.altsep and os.altsep in value) or value in ('.', '..') or '\0' in value:
        raise ValueError(f'{key} {value!r}: a path separator (or . / ..) in a name would write outside its folder')
    return value


def check_path(value: Any, key: str) -> Optional[str]:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f'{key} must be a file path or ~, got {value!r}')
    return value


# ---- option files -------------------------------------------------------------------------------------------------
def _count(lo: int) -> Number:
    return Number('count', lo)


INT0, INT1 = Number('int', 0), Number('int', 1)
NONNEG, POSITIVE = Number('real', 0), Number('real', 0, lo_open=True)
BOOL, NAME, PATH = 'bool', 'name', 'path'

#: BasicSR's own options that the plugin's runs read (``*`` matches one key).
BASICSR_OPTIONS: dict[str, Any] = {
    'name': NAME,
    'manual_seed': INT0,
    'datasets.*.name': NAME,
    'datasets.*.batch_size_per_gpu': INT1,
    'datasets.*.num_worker_per_gpu': INT0,
    'datasets.*.dataset_enlarge_ratio': _count(1),
    'datasets.*.gt_size': INT1,
    'datasets.*.use_hflip': BOOL, 'datasets.*.use_rot': BOOL, 'datasets.*.pin_memory': BOOL,
    'datasets.*.persistent_workers': BOOL,
    'path.pretrain_network_*': PATH, 'path.resume_state': PATH, 'path.strict_load_*': BOOL,
    'train.total_iter': _count(1),
    'train.warmup_iter': _count(-1),
    'train.ema_decay': Number('real', 0, 1, hi_open=True),
    'train.optim_*.lr': NONNEG,
    'train.optim_*.weight_decay': NONNEG,
    'train.optim_*.betas': [Number('real', 0, 1, hi_open=True)],
    'train.optim_*.eps': POSITIVE,
    'train.optim_*.momentum': NONNEG,
    'train.scheduler.periods': [_count(1)],
    'train.scheduler.restart_weights': [NONNEG],
    'train.scheduler.eta_min': NONNEG,
    'train.scheduler.milestones': [_count(0)],
    'train.scheduler.gamma': POSITIVE,
    'train.*_opt.loss_weight': NONNEG,
    'val.val_freq': _count(1),
    'val.save_img': BOOL,
    'val.suffix': NAME,
    'val.metrics.*.crop_border': INT0,
    'logger.print_freq': _count(1),
    'logger.save_checkpoint_freq': _count(1),
    'logger.use_tb_logger': BOOL,
}
#: ``HESPairedImageDataset``'s own keys (README: Option reference).
HES_OPTIONS: dict[str, Any] = {
    'num_classes': INT1, 'delta': Number('real', 0, 1, lo_open=True), 'switch_ratio': Number('real', 0, 1),
    'patch_stride': INT1, 'cache_images_max_mb': NONNEG, 'cache_images': BOOL, 'skip_small_images': BOOL,
}
#: BDLoss's keys that hold numbers or switches.
BDLOSS_OPTIONS: dict[str, Any] = {
    'num_components': INT1, 'blur_sigma': POSITIVE, 'gmm_pixels': INT1, 'seed': INT0, 'init_noise_sigma': POSITIVE,
    'sigma_lr': POSITIVE, 'learn_sigma': BOOL, 'gmm_path': PATH, 'loss_weight': NONNEG,
}
#: ``train.wbsr`` (WBSRModel): the numbers (its names and choices are checked by the model).
WBSR_TRAIN_OPTIONS: dict[str, Any] = {
    'sandwich_random': INT0, 'tile_size': Number('int', MIN_REGION_SIDE), 'distill': Number('real'), 'amp': BOOL,
}


def check_value(spec: Any, value: Any, key: str) -> Any:
    """``value`` checked against one entry of the tables above (``None`` is "not set" and always passes)."""
    if value is None:
        return None
    if spec == BOOL:
        return check_bool(value, key)
    if spec == NAME:
        return check_file_name(value, key)
    if spec == PATH:
        return check_path(value, key)
    if isinstance(spec, list):
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f'{key} must be a non-empty list, got {_got(value)}')
        return [spec[0].check(v, f'{key}[{i}]') for i, v in enumerate(value)]
    return spec.check(value, key)


def _walk(opt: Any, parts: Sequence[str], prefix: str) -> Iterator[tuple[str, Any]]:
    if not parts:
        yield prefix, opt
        return
    if not isinstance(opt, Mapping):
        return
    head, rest = parts[0], parts[1:]
    for key in opt:
        if not isinstance(key, str):
            continue
        if head == key or ('*' in head and _glob(head, key)):
            yield from _walk(opt[key], rest, f'{prefix}.{key}' if prefix else key)


def _glob(pattern: str, key: str) -> bool:
    start, _, end = pattern.partition('*')
    return key.startswith(start) and key.endswith(end) and len(key) >= len(start) + len(end)


def check_table(opt: Mapping[str, Any], table: Mapping[str, Any], prefix: str = '') -> None:
    """Every key of ``opt`` that ``table`` names (``a.*.b`` patterns), checked by :func:`check_value`."""
    for pattern, spec in table.items():
        for key, value in _walk(opt, pattern.split('.'), prefix):
            check_value(spec, value, key)


def check_network_options(network: Any, key: str = 'network_g') -> None:
    """``network_g``'s keys against its architecture's constructor: unknown keys, and the type of every value whose
    parameter is annotated or defaults to an int, a float, a bool or a list of ints."""
    if not isinstance(network, Mapping) or not isinstance(network.get('type'), str):
        raise ValueError(f"'{key}' must be a mapping with a 'type'")
    from basicsr.utils.registry import ARCH_REGISTRY
    try:
        arch = ARCH_REGISTRY.get(network['type'])
    except KeyError:
        near = difflib.get_close_matches(network['type'], [name for name, _ in ARCH_REGISTRY], n=1)
        hint = f' (did you mean {near[0]}?)' if near else ''
        raise ValueError(f"{key}.type {network['type']!r} is not a registered architecture{hint}") from None
    try:
        params = inspect.signature(arch).parameters
    except (TypeError, ValueError):
        return
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        names = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for name in network:
            if name != 'type' and name not in names:
                near = difflib.get_close_matches(str(name), names, n=1)
                hint = f' (did you mean {near[0]}?)' if near else ''
                raise ValueError(f'{key}.{name}: not an option of {network["type"]}{hint}; its options: '
                                 f'{", ".join(names)}')
    for name, value in network.items():
        if name == 'type' or name not in params:
            continue
        spec = _parameter_spec(params[name])
        if spec is not None:
            check_value(spec, value, f'{key}.{name}')


def _parameter_spec(param: inspect.Parameter) -> Any:
    annotation, default = param.annotation, param.default
    text = annotation if isinstance(annotation, str) else getattr(annotation, '__name__', None)
    if text in ('int', 'float', 'bool'):
        return {'int': INT0, 'float': Number('real'), 'bool': BOOL}[text]
    if isinstance(text, str) and text.replace(' ', '') in ('Sequence[int]', 'list[int]', 'tuple[int,...]'):
        return [INT1]
    # Without annotations the default says only "a number" (BasicSR's EDSR defaults res_scale to 1 and is given 0.1)
    if isinstance(default, bool):
        return BOOL
    if isinstance(default, (int, float)):
        return Number('real')
    if isinstance(default, (list, tuple)) and default and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                for v in default):
        return [Number('real')]
    return None


def check_routing(options: Any, where: str = 'val.routing', flag: Optional[Callable[[str], str]] = None) -> None:
    """What the routing registry leaves open: regions of at least :data:`MIN_REGION_SIDE` pixels for every mode that
    cuts the image into regions, and finite arithmetic for the trade-offs (``alpha``, ``arm_eta``, ``slope``,
    ``max_loss``).

    ``flag`` names an option as the caller shows it (``--tile-size``); by default ``<where>.<option>``.
    """
    from .routing.modes import get_mode
    name = flag or (lambda option: f'{where}.{option}')
    # no mode: the checkpoint's default routing, which cuts the image into regions (Eq. 15 or a stored default)
    mode = get_mode(options.mode or 'wbsr', f'{where}.mode')
    if not mode.whole_image:
        option = 'tile_size' if options.scheme == 'tiles' else 'patch_size'
        side = getattr(options, option)
        if side < MIN_REGION_SIDE:
            raise ValueError(f'{name(option)} {side}: regions under {MIN_REGION_SIDE}x{MIN_REGION_SIDE} LR pixels have '
                             f'no gradient, so {mode.name} mode would give every one the cheapest subnet; use '
                             f'{MIN_REGION_SIDE} or more')
    for option, hi in (('alpha', MAX_TRADEOFF), ('arm_eta', MAX_TRADEOFF), ('slope', MAX_TRADEOFF),
                       ('max_loss', MAX_LOSS_DB)):
        value = getattr(options, option, None)
        if value is not None and value > hi:
            raise ValueError(f'{name(option)} must be at most {hi:g}, got {value:g} (a larger value changes nothing '
                             'but can overflow the allocation)')


def check_dataset_options(opt: Mapping[str, Any]) -> None:
    """The ``datasets`` section of an option dict alone (the tools that read only the training set)."""
    check_table(opt, {k: v for k, v in BASICSR_OPTIONS.items() if k.startswith('datasets.')})
    datasets = opt.get('datasets')
    if isinstance(datasets, Mapping):
        for phase, dataset in datasets.items():
            if isinstance(dataset, Mapping) and dataset.get('type') == 'HESPairedImageDataset':
                check_table(dataset, HES_OPTIONS, f'datasets.{phase}')
    scale = opt.get('scale')
    if scale is not None:
        check_int(scale, 'scale', 1)


def check_option_file(opt: Mapping[str, Any], is_train: Optional[bool] = None) -> None:
    """Every option of a BasicSR option dict the plugin knows, by type and range (``ValueError`` naming the key).

    Runs on the file as read and again on BasicSR's parsed dict; keys that are not set are not checked.
    """
    check_table(opt, BASICSR_OPTIONS)
    num_gpu = opt.get('num_gpu')
    if num_gpu is not None and num_gpu != 'auto':
        check_int(num_gpu, 'num_gpu', 0)
    check_dataset_options(opt)
    if opt.get('network_g') is not None:
        check_network_options(opt['network_g'])
    train = opt.get('train') if is_train is not False else None
    if isinstance(train, Mapping):
        for key, loss in train.items():
            if isinstance(key, str) and key.endswith('_opt') and isinstance(loss, Mapping) and \
                    loss.get('type') == 'BDLoss':
                check_table(loss, BDLOSS_OPTIONS, f'train.{key}')
        if isinstance(train.get('wbsr'), Mapping):
            check_table(train['wbsr'], WBSR_TRAIN_OPTIONS, 'train.wbsr')
    val = opt.get('val')
    if is_train is False and isinstance(val, Mapping) and val.get('save_img') and 'suffix' not in val:
        raise ValueError('val.suffix is missing: with val.save_img a test run names every saved image with it '
                         '(BasicSR looks it up at the first image); set it, or suffix: ~ for none')
    if isinstance(val, Mapping) and (opt.get('model_type') == 'WBSRModel' or val.get('routing') is not None):
        from .router import RoutingOptions
        options = RoutingOptions.from_opt(val.get('routing'))
        check_routing(options)


def check_test_weights(opt: Mapping[str, Any]) -> None:
    """A test run needs weights: ``path.pretrain_network_g`` must name a checkpoint (else random weights are
    evaluated)."""
    path = (opt.get('path') or {}).get('pretrain_network_g')
    if not path:
        raise ValueError('path.pretrain_network_g is not set: a test run would evaluate an untrained network; name the '
                         'checkpoint to test')


def training_samples(dataset_opt: Mapping[str, Any], enough: int) -> Optional[int]:
    """How many samples a training set gives, counted from file listings and image headers without decoding (and
    without logging: it runs before BasicSR sets up its log file), up to ``enough``; ``None`` where it cannot tell
    (another dataset type, an lmdb, an unreadable header: the data loader's own check then decides).

    ``PairedImageDataset`` gives one sample per pair; ``HESPairedImageDataset`` one per candidate patch, the grid of
    ``gt_size`` crops at ``patch_stride`` of every image (as the HES index counts them).
    """
    from wbsr_data.pairs import image_size, list_pairs
    kind = dataset_opt.get('type')
    if kind not in ('PairedImageDataset', 'HESPairedImageDataset') or \
            dict(dataset_opt.get('io_backend') or {}).get('type', 'disk') != 'disk':
        return None
    try:
        pairs = list_pairs(dataset_opt)
    except (OSError, ValueError):
        return None  # the dataset reports it, by name
    if kind == 'PairedImageDataset':
        return len(pairs)
    from wbsr_data.difficulty import grid_starts
    from wbsr_data.patch_index import IndexOptions
    try:
        options = IndexOptions.from_dataset_opt(dataset_opt)
    except (ValueError, TypeError):
        return None
    count = 0
    for pair in pairs:
        size = image_size(pair['lq_path'])
        if size is None:
            return None
        gt_w, gt_h = size[0] * options.scale, size[1] * options.scale
        if min(gt_w, gt_h) < options.gt_size:
            if not options.skip_small_images:
                return None  # refused by name when the index is built
            continue
        count += len(grid_starts(gt_h, options.gt_size, options.patch_stride, cover_end=False)) * \
            len(grid_starts(gt_w, options.gt_size, options.patch_stride, cover_end=False))
        if count >= enough:
            break
    return count


def check_one_batch(samples: int, batch_size: int, world_size: int = 1, enlarge_ratio: float = 1,
                    what: str = 'samples') -> None:
    """A training set must fill one batch of ``batch_size`` on each of ``world_size`` ranks (BasicSR drops the last,
    incomplete batch), else the run ends at iteration 0 with an untrained network."""
    per_rank = math.ceil(samples * enlarge_ratio / max(1, world_size))
    if per_rank < batch_size:
        ranks = f' on each of {world_size} ranks' if world_size > 1 else ''
        raise ValueError(f'datasets.train: {samples} {what} make no batch of batch_size_per_gpu={batch_size}{ranks} '
                         '(the last, incomplete batch is dropped, so no training step would run); lower '
                         'batch_size_per_gpu or add images')


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def first_non_finite(state: Mapping[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor of ``state`` with a NaN or an infinity, or ``None``."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) and \
                not bool(torch.isfinite(value).all()):
            return str(name)
    return None


def check_finite_weights(state: Mapping[str, Any], path: str) -> None:
    """Refuse a state dict with a non-finite weight (it would give NaN or black images), naming the parameter."""
    bad = first_non_finite(state)
    if bad is not None:
        raise CorruptFileError(path, f'the weight {bad} has NaN or infinite values; the network would output '
                               'garbage')


class _Outgrown(Exception):
    """Raised inside a network's construction once it registers more than its checkpoint holds."""


@contextlib.contextmanager
def _bounded_construction(max_tensors: int, max_elements: int) -> Iterator[None]:
    """Stop any module construction in this block that registers more than ``max_tensors`` parameters and buffers, or
    more than ``max_elements`` elements in them."""
    from torch.nn.modules import module as nn_module
    seen = [0, 0]

    def count(_module: Any, _name: str, tensor: Any) -> None:
        if tensor is None:
            return
        seen[0] += 1
        seen[1] += int(tensor.numel())
        if seen[0] > max_tensors or seen[1] > max_elements:
            raise _Outgrown()

    handles = [nn_module.register_module_parameter_registration_hook(count),
               nn_module.register_module_buffer_registration_hook(count)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_network_fits(network_opt: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                       build: Callable[[dict], torch.nn.Module]) -> Optional[RuntimeError]:
    """Compare network options with a state dict before the network is built for real.

    The network is built on the ``meta`` device (no memory for its tensors) under a bound: its construction stops as
    soon as it registers more than twice the checkpoint's tensors or elements (a ``num_block: 200000`` or
    ``num_feat: 4096`` in a checkpoint's own options is refused in milliseconds, not after a hang or a 20 GB
    allocation). Then the checkpoint is loaded into it with ``strict=True``, which compares every name and shape.

    Returns the ``load_state_dict`` error (the caller words it), ``None`` when everything fits. Raises ``ValueError``
    for options that describe a larger network than the weights, or that cannot be built. An architecture that cannot
    be built on ``meta`` is built on the CPU under the same bound.
    """
    tensors = len(state)
    elements = sum(int(v.numel()) for v in state.values())
    bound = (2 * tensors + 64, 2 * elements + (1 << 20))
    net = None
    for device in ('meta', 'cpu'):
        try:
            with _bounded_construction(*bound), torch.device(device), warnings.catch_warnings():
                warnings.simplefilter('ignore')
                net = build(dict(network_opt))
            break
        except _Outgrown:
            raise ValueError(f'its network options describe a network larger than its weights ({tensors} tensors, '
                             f'{elements} values)') from None
        except Exception as exc:  # noqa: BLE001  (an arch that cannot run on meta: try the CPU; else: options error)
            if device == 'cpu':
                raise ValueError(f'cannot build network_g ({first_line(exc)})') from None
    try:
        with warnings.catch_warnings():  # "copying from a non-meta parameter to a meta parameter is a no-op"
            warnings.simplefilter('ignore')
            net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        return exc
    return None


# ---- the network: routing at start-up --------------------------------------------------------------------------------
def check_router(net: torch.nn.Module, options: Any, scale: int, projection: Any = None, arm_table: Any = None,
                 routing: Any = None, *, arm_table_later: bool = False) -> Any:
    """Build the :class:`~wbsr_models.router.Router` once against the network, so that what depends on it (a subnet
    index, a budget below the cheapest subnet, a mode's checkpoint artefacts) fails at start-up; returns it.

    ``arm_table_later``: the ARM table is built from the validation set when it is first needed (an option file without
    ``arm_lut``); the router is then checked as the ``wbsr`` mode and not returned.
    """
    from dataclasses import replace

    from .router import Router
    if arm_table_later and options.mode == 'arm' and arm_table is None:
        Router(net, replace(options, mode='wbsr', arm_lut=None, arm_eta=None), scale, projection, None, routing)
        return None
    return Router(net, options, scale, projection, arm_table, routing)


def load_checkpoint_entries(path: str, param_key: Optional[str] = 'params') -> tuple[dict, Any, Any]:
    """A checkpoint as untrusted data: ``(state dict, difficulty projection or None, routing artefacts)``.

    :class:`CorruptFileError` naming the file for anything that is not a BasicSR checkpoint with finite weights and
    well-formed ``'wbsr'`` entries (finite, ordered thresholds and projection; finite class errors and predictor).
    """
    from wbsr_data.difficulty import DifficultyProjection
    from wbsr_data.fileio import torch_load

    from .routing.artefacts import RoutingArtefacts
    checkpoint = torch_load(path)
    if not isinstance(checkpoint, dict):
        raise CorruptFileError(path, 'not a BasicSR checkpoint (a dict of state dicts)')
    key = param_key if param_key is None or param_key in checkpoint or 'params' not in checkpoint else 'params'
    params = checkpoint if key is None else checkpoint.get(key)
    if not isinstance(params, Mapping) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise CorruptFileError(path, f'no {key!r} state dict (keys: {sorted(map(str, checkpoint))})')
    state = {k[7:] if isinstance(k, str) and k.startswith('module.') else k: v for k, v in params.items()}
    check_finite_weights(state, path)
    extras = checkpoint.get('wbsr') if isinstance(checkpoint.get('wbsr'), Mapping) else {}
    try:
        projection = DifficultyProjection.from_dict(extras['difficulty']) if extras.get('difficulty') else None
        artefacts = RoutingArtefacts.from_checkpoint_entry(extras)
    except ValueError as exc:
        raise CorruptFileError(path, first_line(exc)) from None
    return state, projection, artefacts


def check_run_start(opt: Mapping[str, Any], is_train: bool) -> None:
    """What a ``wbsr-train`` / ``wbsr-test`` run needs, checked before BasicSR makes any folder.

    ``network_g`` is built (from its class: BasicSR's ``build_network`` logs, and nothing may log before BasicSR sets up
    its log file) and compared with ``path.pretrain_network_g`` (when ``strict_load_g``; the ``RuntimeError`` of the
    comparison is raised as it is), whose weights and entries must be sound (:func:`load_checkpoint_entries`); the
    router is built once against it (:func:`check_router`); a training set must fill one batch
    (:func:`training_samples`).
    """
    from basicsr.utils.registry import ARCH_REGISTRY
    network = dict(opt['network_g'])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            net = ARCH_REGISTRY.get(network.pop('type'))(**network)
    except Exception as exc:  # noqa: BLE001  (any failure to build from these options is an options error)
        raise ValueError(f'cannot build network_g ({first_line(exc)})') from None
    paths = opt.get('path') or {}
    projection = artefacts = None
    if paths.get('pretrain_network_g'):
        state, projection, artefacts = load_checkpoint_entries(paths['pretrain_network_g'],
                                                               paths.get('param_key_g', 'params'))
        if paths.get('strict_load_g', True):
            net.load_state_dict(state, strict=True)
    val = opt.get('val')
    if opt.get('model_type') == 'WBSRModel' and isinstance(val, Mapping):
        from .baselines import ArmTable
        from .router import RoutingOptions
        routing = RoutingOptions.from_opt(val.get('routing'))
        arm_table = ArmTable.load(routing.arm_lut) if routing.arm_lut else None
        check_router(net, routing, int(opt['scale']), projection, arm_table, artefacts, arm_table_later=True)
    check_dataset_files(opt)
    train_set = (opt.get('datasets') or {}).get('train')
    pixel_opt = (opt.get('train') or {}).get('pixel_opt')
    if (is_train and isinstance(train_set, Mapping) and isinstance(pixel_opt, Mapping) and
            pixel_opt.get('type') == 'BDLoss' and not pixel_opt.get('gmm_path')):  # the model fits it at start-up
        from wbsr_losses.fit_gmm import check_image_sizes
        from wbsr_losses.gmm import gmm_fit_options
        try:
            fit = gmm_fit_options(pixel_opt)
        except TypeError as exc:
            raise ValueError(f'train.pixel_opt: {exc}') from None
        if fit['label_space'] == 'detail':  # the files themselves were checked above: only the sizes are left
            check_image_sizes(train_set, fit['label_space'], fit['blur_sigma'])
    if is_train and isinstance(train_set, Mapping):
        batch, world = int(train_set['batch_size_per_gpu']), int(opt.get('world_size') or 1)
        ratio = train_set.get('dataset_enlarge_ratio') or 1
        enough = math.ceil(batch * world / ratio)
        samples = training_samples(train_set, enough)
        if samples is not None and samples < enough:
            what = 'candidate patches' if train_set.get('type') == 'HESPairedImageDataset' else 'image pairs'
            check_one_batch(samples, batch, world, ratio, what=what)


def check_dataset_files(opt: Mapping[str, Any]) -> None:
    """Every image of the paired datasets on disk (training, validation and test sets), checked from its size and
    header alone (:func:`~wbsr_data.pairs.check_image_file`): BasicSR's ``PairedImageDataset`` reads whole files and
    keeps the first frame of an animation, and the training set is read only after BasicSR has made the experiment
    folder, so a padded or multi-frame file is refused by name before the run starts."""
    from wbsr_data.pairs import check_image_file, list_pairs
    for dataset in (opt.get('datasets') or {}).values():
        if not isinstance(dataset, Mapping):
            continue
        backend = dict(dataset.get('io_backend') or {'type': 'disk'}).get('type', 'disk')
        if backend != 'disk' or not dataset.get('dataroot_gt') or not dataset.get('dataroot_lq'):
            continue
        for pair in list_pairs(dataset):
            for key in ('lq_path', 'gt_path'):
                check_image_file(pair[key])


# ---- one run per experiment folder ----------------------------------------------------------------------------------
@dataclass
class RunLock:
    """An exclusive ``flock`` on ``<parent>/.<folder name>.lock``, held while a run uses the folder; the kernel
    releases it when the process ends, however it ends, so a killed run never blocks the next one."""

    path: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def lock_run_folder(folder: str) -> RunLock:
    """Lock the experiment (or results) folder ``folder`` for this run, before it is made or archived.

    Raises :class:`RunLockedError` naming the folder (and the process holding it) when another run holds it: BasicSR
    would otherwise rename the running run's folder and both would write into one.
    """
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f'.{name}.lock')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode('ascii', 'replace').strip()
        os.close(fd)
        by = f' (process {holder})' if holder.isdigit() else ''
        raise RunLockedError(f'{folder} is in use by another run{by}: wait for it to end, or give this run another '
                             'name') from None
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    return RunLock(path, fd)
