"""One rank of the DDP test (tests/test_reliability.py), started by torchrun with ``--launcher pytorch``.

It builds everything the way ``basicsr/train.py`` does (``parse_options`` with the plugin's gloo-capable
``init_dist``, ``create_train_val_dataloader``, ``build_model``) and runs the same loop, writing per-
iteration digests of what the test compares across ranks to ``$WBSR_DDP_OUT/rank<r>.json``.
"""
import hashlib
import json
import os
import sys

import torch

from wbsr_models import runners

runners._patch_basicsr()

import basicsr.train as basicsr_train  # noqa: E402
from basicsr.models import build_model  # noqa: E402
from basicsr.utils import get_root_logger, make_exp_dirs  # noqa: E402
from basicsr.utils import options as basicsr_options  # noqa: E402


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    opt, _ = basicsr_options.parse_options(os.getcwd(), is_train=True)
    opt['root_path'] = os.getcwd()
    if opt['rank'] == 0:
        make_exp_dirs(opt)
    torch.distributed.barrier()
    logger = get_root_logger()
    loader, sampler, _, total_epochs, total_iters = basicsr_train.create_train_val_dataloader(opt, logger)
    model = build_model(opt)
    records, it = [], 0
    for epoch in range(total_epochs + 1):
        sampler.set_epoch(epoch)
        for data in loader:
            it += 1
            if it > total_iters:
                break
            model.update_learning_rate(it)
            model.feed_data(data)
            repeats, subnets = model.training_plan(model.lq, it)
            model.optimize_parameters(it)
            records.append({
                'iter': it,
                'subnets': subnets if subnets is None or isinstance(subnets, int) else subnets.tolist(),
                'weights': digest(model.bare_net.state_dict().values()),
                'sigma': float(model.cri_pix.noise_sigma.detach()),
                'samples': digest([data['gt']]),
                'phases': data['hes_phase'].tolist(),
            })
    with open(os.path.join(os.environ['WBSR_DDP_OUT'], f"rank{opt['rank']}.json"), 'w') as f:
        json.dump({'world_size': opt['world_size'], 'ddp': type(model.net_g).__name__, 'records': records}, f)
    torch.distributed.barrier()


if __name__ == '__main__':
    sys.exit(main())
