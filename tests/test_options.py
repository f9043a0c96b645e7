"""Every shipped option file parses, names only registered types, and builds its model on tiny data."""
from pathlib import Path

import pytest
import yaml

from basicsr.archs import build_network
from basicsr.models import build_model
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

from conftest import REPO, write_pair_folder

OPTION_FILES = sorted((REPO / 'options').glob('*.yml'))
SCHEDULERS = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR')  # what BaseModel builds


def load(path: Path) -> dict:
    with open(path, encoding='utf-8') as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def test_there_are_train_and_test_files_for_both_networks_and_scales():
    names = {p.name for p in OPTION_FILES}
    for arch in ('srresnet', 'rcan'):
        for scale in (2, 4):
            assert f'train_wbsr_{arch}_x{scale}.yml' in names and f'test_wbsr_{arch}_x{scale}.yml' in names


@pytest.mark.parametrize('path', OPTION_FILES, ids=lambda p: p.name)
def test_every_type_resolves(path):
    opt = load(path)
    assert opt['model_type'] in MODEL_REGISTRY
    assert opt['network_g']['type'] in ARCH_REGISTRY
    for dataset in opt['datasets'].values():
        assert dataset['type'] in DATASET_REGISTRY
    for metric in (opt.get('val') or {}).get('metrics', {}).values():
        assert metric['type'] in METRIC_REGISTRY
    if 'train' in opt:
        assert opt['train']['pixel_opt']['type'] in LOSS_REGISTRY
        assert opt['train']['scheduler']['type'] in SCHEDULERS
        assert opt['train']['optim_g']['type'] == 'Adam'
    net = build_network(dict(opt['network_g']))
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize('path', OPTION_FILES, ids=lambda p: p.name)
def test_model_builds_from_the_file(path, tmp_path):
    """What parse_options would produce, with the data pointed at tiny folders and the CPU."""
    opt = load(path)
    data = write_pair_folder(tmp_path / 'data', n=2, size=(160, 144), scale=opt['scale'])
    is_train = 'train' in opt
    opt.update(num_gpu=0, dist=False, rank=0, world_size=1, is_train=is_train, auto_resume=False)
    for phase, dataset in opt['datasets'].items():
        dataset.update(data, phase=phase.split('_')[0], scale=opt['scale'])
        dataset['index_cache'] = str(tmp_path / 'cache')
    exp = tmp_path / 'experiments' / opt['name']
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'), log=str(exp),
                       training_states=str(exp / 'training_states'), visualization=str(exp / 'visualization'),
                       results_root=str(exp), pretrain_network_g=None)
    exp.mkdir(parents=True)
    if is_train and opt['train']['pixel_opt']['type'] == 'BDLoss':
        opt['train']['pixel_opt']['gmm_pixels'] = 5000
    model = build_model(opt)
    assert type(model).__name__ == opt['model_type']
    if is_train:
        assert model.optimizers and model.schedulers
        if opt['train']['pixel_opt']['type'] == 'BDLoss':
            assert (exp / f"bd_gmm_{opt['train']['pixel_opt']['label_space']}.npz").is_file()
            assert (model.optimizer_sigma is not None) == opt['train']['pixel_opt']['learn_sigma']
