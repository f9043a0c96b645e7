"""``wbsr-train`` and ``wbsr-test``: BasicSR's own pipelines, with three upstream problems fixed.

They take BasicSR's arguments (``-opt``, ``--launcher``, ``--auto_resume``, ``--debug``, ``--force_yml``) and
run ``basicsr.train.train_pipeline`` / ``basicsr.test.test_pipeline`` with these differences:

- experiments/ and results/ go under the current directory (``python -m basicsr.train`` puts them next
  to the installed BasicSR);
- resuming works without CUDA: BasicSR's ``load_resume_state`` maps the state to
  ``torch.cuda.current_device()``; here it goes to the model's device, is read with
  ``weights_only=True``, and a corrupt state file is refused by name;
- ``--launcher pytorch`` on a machine without CUDA uses the gloo backend (BasicSR's ``init_dist`` assumes
  NCCL and a GPU per rank), so DDP runs, and is tested, on CPUs.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

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
from wbsr_data.fileio import torch_load  # noqa: E402


def load_resume_state(opt: dict) -> Optional[dict]:
    """BasicSR's ``load_resume_state``, device-agnostic and safe (``weights_only``)."""
    path = None
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        if os.path.isdir(state_dir):
            states = [int(name[:-len('.state')]) for name in scandir(state_dir, suffix='state', recursive=False)
                      if name[:-len('.state')].isdigit()]
            if states:
                path = os.path.join(state_dir, f'{max(states)}.state')
                opt['path']['resume_state'] = path
    elif opt['path'].get('resume_state'):
        path = opt['path']['resume_state']
    if path is None:
        return None
    device = torch.device('cuda', torch.cuda.current_device()) if opt['num_gpu'] != 0 else torch.device('cpu')
    state = torch_load(path, map_location=device)
    check_resume(opt, state['iter'])
    return state


def init_dist(launcher: str, backend: str = 'nccl', **kwargs) -> None:
    """BasicSR's ``init_dist``, or a gloo process group when there is no CUDA device."""
    if launcher == 'pytorch' and not torch.cuda.is_available():
        torch.distributed.init_process_group(backend='gloo')
        return
    basicsr_init_dist(launcher, backend, **kwargs)


def _patch_basicsr() -> None:
    basicsr.train.load_resume_state = load_resume_state
    basicsr_options.init_dist = init_dist


def _run(pipeline, argv: Optional[Sequence[str]]) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    _patch_basicsr()
    pipeline(os.getcwd())
    return 0


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``wbsr-train -opt options/train_wbsr_srresnet_x4.yml [--auto_resume] [--launcher pytorch]``."""
    return _run(basicsr.train.train_pipeline, argv)


def test_main(argv: Optional[Sequence[str]] = None) -> int:
    """``wbsr-test -opt options/test_wbsr_srresnet_x4.yml``."""
    return _run(basicsr.test.test_pipeline, argv)
