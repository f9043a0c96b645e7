"""``wbsr-train`` and ``wbsr-test``: BasicSR's own pipelines, with upstream problems fixed and one-line errors.

They take BasicSR's arguments (``-opt``, ``--launcher``, ``--auto_resume``, ``--debug``, ``--force_yml``) and
run ``basicsr.train.train_pipeline`` / ``basicsr.test.test_pipeline`` with these differences:

- experiments/ and results/ go under the current directory (``python -m basicsr.train`` puts them next
  to the installed BasicSR);
- resuming works without CUDA: BasicSR's ``load_resume_state`` maps the state to
  ``torch.cuda.current_device()``; here it goes to the model's device and is read with ``weights_only=True``.
  A corrupt state is refused by name; with ``--auto_resume`` the newest intact state (and its network
  checkpoint) is taken instead, with a warning that names the corrupt one;
- ``--launcher pytorch`` on a machine without CUDA uses the gloo backend (BasicSR's ``init_dist`` assumes
  NCCL and a GPU per rank), so DDP runs, and is tested, on CPUs;
- a bad option file (broken YAML, a missing key, no ``network_g``, ``scale`` against ``network_g.upscale``,
  ``num_gpu`` > 0 without a GPU, a network that does not match its checkpoint, a number of the wrong type or range,
  a name with a path separator: :mod:`wbsr_models.checks`), a corrupt checkpoint or an unreadable image ends the
  run with one line naming the file and the key, exit status 2, no traceback, at start-up: the file is checked as
  read and again as BasicSR parsed it, before any folder is made;
- the experiment (``wbsr-train``) or results (``wbsr-test``) folder is locked for the run: a second run with the same
  name refuses to start instead of archiving the first run's folder and writing into it;
- a training set that cannot fill one batch, and a test run without ``pretrain_network_g``, refuse to start.

BasicSR's own ``basicsr/train.py`` and ``basicsr/test.py`` get the same checks, lock and patches on an option file that
names a WBSR type (:func:`script_parse_options`, reached through the import hook's ``parse_options``).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

import basicsr.test  # noqa: E402
import basicsr.train  # noqa: E402
from basicsr.utils import scandir  # noqa: E402
from basicsr.utils.misc import check_resume  # noqa: E402
from basicsr.utils import options as basicsr_options  # noqa: E402
from basicsr.utils.dist_util import init_dist as basicsr_init_dist  # noqa: E402

import wbsr_models  # noqa: E402,F401  (registration)
from wbsr_data.fileio import CorruptFileError, first_line, torch_load  # noqa: E402
from wbsr_data.pairs import ImageFileError  # noqa: E402

from .checks import (RunLock, RunLockedError, check_one_batch, check_option_file, check_run_start,  # noqa: E402
                     check_test_weights, lock_run_folder)
from .infer import OptionFileError, state_dict_mismatch, network_option_problem, read_option_file  # noqa: E402

_parse_options = basicsr_options.parse_options
_create_train_val_dataloader = basicsr.train.create_train_val_dataloader
_current: dict[str, Any] = {}  # the option file and dict of this run, for error messages


def read_training_state(path: str, map_location: Any = 'cpu') -> dict:
    """A ``.state`` file as ``WBSRModel.save_training_state`` writes it; anything else is a CorruptFileError."""
    state = torch_load(path, map_location=map_location)
    if not isinstance(state, dict):
        raise CorruptFileError(path, f'not a training state (a {type(state).__name__}, not a dict)')
    for key in ('iter', 'epoch'):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CorruptFileError(path, f'not a training state ({key!r} is {value!r})')
    for key in ('optimizers', 'schedulers'):
        value = state.get(key)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise CorruptFileError(path, f'not a training state ({key!r} is not a list of state dicts)')
    for optimizer in state['optimizers']:
        if not isinstance(optimizer.get('state'), dict) or not isinstance(optimizer.get('param_groups'), list):
            raise CorruptFileError(path, 'not a training state (an optimizer state without state/param_groups)')
    if state.get('wbsr') is not None and not isinstance(state['wbsr'], dict):
        raise CorruptFileError(path, "not a training state (its 'wbsr' entry is not a dict)")
    return state


def _check_networks(opt: dict, resume_iter: int) -> None:
    """The network checkpoints ``check_resume`` will point at for ``resume_iter`` exist and load."""
    for key in opt:
        if key.startswith('network_') and key not in (opt['path'].get('ignore_resume_networks') or ()):
            path = os.path.join(opt['path']['models'], f"net_{key[len('network_'):]}_{resume_iter}.pth")
            if not isinstance(torch_load(path), dict):
                raise CorruptFileError(path, 'not a BasicSR checkpoint (a dict of state dicts)')


def _state_iters(state_dir: str) -> list[int]:
    if not os.path.isdir(state_dir):
        return []
    return sorted((int(name[:-len('.state')]) for name in scandir(state_dir, suffix='state', recursive=False)
                   if name[:-len('.state')].isdigit()), reverse=True)


def load_resume_state(opt: dict) -> Optional[dict]:
    """BasicSR's ``load_resume_state``, device-agnostic, safe (``weights_only``) and tolerant of a corrupt state.

    With ``--auto_resume`` the newest state that loads, and whose network checkpoint loads, is used; skipping
    a corrupt newer one prints a warning naming it. An explicit ``path.resume_state`` that is corrupt is
    refused, naming the previous intact state of its folder if there is one.
    """
    device = torch.device('cuda', torch.cuda.current_device()) if opt['num_gpu'] != 0 else torch.device('cpu')
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        problems: list[CorruptFileError] = []
        for it in _state_iters(state_dir):
            path = os.path.join(state_dir, f'{it}.state')
            try:
                state = read_training_state(path, map_location=device)
                _check_networks(opt, state['iter'])
            except (CorruptFileError, FileNotFoundError) as exc:
                problems.append(exc if isinstance(exc, CorruptFileError) else CorruptFileError(path, str(exc)))
                continue
            if problems:
                print(f"{_current.get('prog', 'wbsr-train')}: warning: {'; '.join(map(str, problems))}; resuming "
                      f'from the previous intact state {path} instead', file=sys.stderr)
            opt['path']['resume_state'] = path
            check_resume(opt, state['iter'])
            return state
        if problems:
            raise CorruptFileError(problems[0].path, f'{problems[0].reason}; no earlier training state in {state_dir} '
                                   'is intact either (move the corrupt ones away to start the run again)')
        return None
    path = opt['path'].get('resume_state')
    if not path:
        return None
    try:
        state = read_training_state(path, map_location=device)
    except CorruptFileError as exc:
        earlier = [os.path.join(os.path.dirname(path), f'{it}.state') for it in _state_iters(os.path.dirname(path))]
        earlier = [p for p in earlier if not os.path.samefile(p, path) and _intact(p)]
        hint = f'; the newest intact state there is {earlier[0]} (set path.resume_state to it)' if earlier else ''
        raise CorruptFileError(path, exc.reason + hint) from None
    check_resume(opt, state['iter'])
    return state


def _intact(path: str) -> bool:
    try:
        read_training_state(path)
    except (CorruptFileError, OSError):
        return False
    return True


def _opt_file_argument() -> Optional[str]:
    """The ``-opt`` argument of this command line (BasicSR's runners parse it later, with their other flags)."""
    arg_parser = argparse.ArgumentParser(add_help=False)
    arg_parser.add_argument('-opt', default=None)
    return arg_parser.parse_known_args()[0].opt


def parse_options(root_path: str, is_train: bool = True) -> tuple[dict, argparse.Namespace]:
    """BasicSR's ``parse_options`` with one-line errors naming the option file and the key.

    Beyond what BasicSR parses: YAML errors, missing keys, no ``network_g``, ``scale`` different from
    ``network_g.upscale``, and ``num_gpu`` > 0 on a machine without CUDA are refused before any work.
    """
    opt_file = _opt_file_argument()
    _current['opt_file'] = opt_file
    if opt_file:
        raw = read_option_file(opt_file)  # YAML errors and non-mappings, named
        _check(raw, opt_file, is_train)  # before BasicSR's parsing, which does arithmetic on some of them
    try:
        opt, args = _parse_options(root_path, is_train=is_train)
    except KeyError as exc:
        raise OptionFileError(opt_file, f'missing option {exc.args[0]!r}') from None
    _current['opt'] = opt
    problem = network_option_problem(opt)
    if problem:
        raise OptionFileError(opt_file, problem)
    _check(opt, opt_file, is_train)  # again with --force_yml's changes
    num_gpu = opt.get('num_gpu')
    if isinstance(num_gpu, int) and num_gpu > 0 and not torch.cuda.is_available():
        raise OptionFileError(opt_file, f'num_gpu is {num_gpu} but there is no CUDA GPU on this machine; to run on '
                              'the CPU set num_gpu: 0 (or add --force_yml num_gpu=0)')
    try:  # the network, its checkpoint, the router and one batch: before any folder is made
        check_run_start(opt, is_train)
    except CorruptFileError:
        raise
    except ValueError as exc:
        raise OptionFileError(opt_file, str(exc)) from None
    if opt.get('rank', 0) == 0:  # before BasicSR makes (and archives) the folder
        folder = opt['path']['experiments_root'] if is_train else opt['path']['results_root']
        _current['lock'] = lock_run_folder(folder)
    return opt, args


def _check(opt: dict, opt_file: Optional[str], is_train: bool) -> None:
    """:func:`~wbsr_models.checks.check_option_file`, and weights for a test run; errors name the option file."""
    try:
        check_option_file(opt, is_train)
        if not is_train:
            check_test_weights(opt)
    except ValueError as exc:
        raise OptionFileError(opt_file, str(exc)) from None


def create_train_val_dataloader(opt: dict, logger: Any) -> tuple:
    """BasicSR's, refusing a training set that fills no batch (the run would end at iteration 0, untrained)."""
    result = _create_train_val_dataloader(opt, logger)
    loader = result[0]
    if loader is not None and len(loader) == 0:
        dataset_opt = opt['datasets']['train']
        try:
            check_one_batch(len(loader.dataset), int(dataset_opt['batch_size_per_gpu']), opt.get('world_size', 1),
                            dataset_opt.get('dataset_enlarge_ratio', 1), what='training samples')
        except ValueError as exc:
            raise OptionFileError(_current.get('opt_file'), str(exc)) from None
        raise OptionFileError(_current.get('opt_file'), 'datasets.train makes no batch; no training step would run')
    return result


def init_dist(launcher: str, backend: str = 'nccl', **kwargs) -> None:
    """BasicSR's ``init_dist``, or a gloo process group when there is no CUDA device."""
    if launcher == 'pytorch' and not torch.cuda.is_available():
        torch.distributed.init_process_group(backend='gloo')
        return
    basicsr_init_dist(launcher, backend, **kwargs)


def _patch_basicsr() -> None:
    basicsr.train.load_resume_state = load_resume_state
    basicsr.train.parse_options = parse_options
    basicsr.train.create_train_val_dataloader = create_train_val_dataloader
    basicsr.test.parse_options = parse_options
    basicsr_options.init_dist = init_dist


def _error_line(exc: BaseException) -> Optional[str]:
    """One line for an error caused by the option file or a data file, or ``None`` (a real failure)."""
    opt_file = _current.get('opt_file')
    if isinstance(exc, (OptionFileError, CorruptFileError, ImageFileError, FileNotFoundError, RunLockedError)):
        return str(exc)
    if isinstance(exc, KeyError):
        key = exc.args[0] if exc.args else '?'
        if isinstance(key, str) and ' ' in key:  # a registry's "No object named 'X' found in 'arch' registry!"
            return f'{opt_file}: {key}'
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return f'{opt_file}: missing key {key!r} (looked up at {os.path.basename(frame.filename)}:{frame.lineno})'
    if isinstance(exc, RuntimeError) and str(exc).startswith('Error(s) in loading state_dict'):
        checkpoint = ((_current.get('opt') or {}).get('path') or {}).get('pretrain_network_g')
        return f'{opt_file}: network_g does not match the checkpoint {checkpoint}: {state_dict_mismatch(exc)}'
    if isinstance(exc, ValueError):
        return f'{opt_file}: {first_line(exc)}'
    if isinstance(exc, OSError) and exc.filename:  # a file the run reads or writes (a full disk, a removed folder)
        return f'{exc.filename}: {exc.strerror or first_line(exc)}'
    return None


RUN_ERRORS = (OptionFileError, CorruptFileError, ImageFileError, OSError, KeyError, RuntimeError, ValueError)


def _report(exc: BaseException, prog: str) -> bool:
    """Print ``prog: <one line>`` for an error of the option file or a data file; ``False`` for a real failure."""
    line = _error_line(exc)
    if line is not None:
        print(f'{prog}: {line}', file=sys.stderr)
    return line is not None


def names_wbsr_type(opt: Any) -> bool:
    """Whether an option dict names a WBSR type (``model_type``, or a ``type`` anywhere: network, dataset, loss)."""
    if isinstance(opt, dict):
        return any(names_wbsr_type(value) or (key in ('type', 'model_type') and isinstance(value, str) and
                                              value.startswith(wbsr_hook.NAME_PREFIXES)) for key, value in opt.items())
    if isinstance(opt, list):
        return any(names_wbsr_type(value) for value in opt)
    return False


def script_parse_options(root_path: str, is_train: bool, prog: str) -> tuple[dict, argparse.Namespace]:
    """``parse_options`` for BasicSR's own ``train.py`` / ``test.py`` run on an option file that names a WBSR type:
    the start-up checks, the folder lock and the patches of ``wbsr-train`` / ``wbsr-test``, and their one-line errors
    (exit status 2, nothing written). Other option files are BasicSR's business and go through unchanged."""
    _current.clear()
    _current['prog'] = prog
    opt_file = _opt_file_argument()
    try:
        if not (opt_file and names_wbsr_type(read_option_file(opt_file))):
            return _parse_options(root_path, is_train=is_train)
        opt, args = parse_options(root_path, is_train)
    except RUN_ERRORS as exc:
        if not _report(exc, prog):
            raise
        raise SystemExit(2) from None
    main = sys.modules.get('__main__')  # the script's own functions, looked up when train_pipeline calls them
    for name, function in (('create_train_val_dataloader', create_train_val_dataloader),
                           ('load_resume_state', load_resume_state)):
        if callable(getattr(main, name, None)):
            setattr(main, name, function)
    return opt, args  # the folder lock is held until the process ends


def _run(pipeline: Callable[[str], None], argv: Optional[Sequence[str]], prog: str) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    _patch_basicsr()
    _current.clear()
    _current['prog'] = prog
    try:
        pipeline(os.getcwd())
    except RUN_ERRORS as exc:
        if not _report(exc, prog):
            raise
        return 2
    finally:
        lock: Optional[RunLock] = _current.pop('lock', None)
        if lock is not None:
            lock.release()
    return 0


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``wbsr-train -opt options/train_wbsr_srresnet_x4.yml [--auto_resume] [--launcher pytorch]``."""
    return _run(basicsr.train.train_pipeline, argv, 'wbsr-train')


def test_main(argv: Optional[Sequence[str]] = None) -> int:
    """``wbsr-test -opt options/test_wbsr_srresnet_x4.yml``."""
    return _run(basicsr.test.test_pipeline, argv, 'wbsr-test')
