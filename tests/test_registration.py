"""Registration in BasicSR's registries, the import hook, and BasicSR's own runners finding WBSR types."""
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import wbsr_hook
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY, Registry

from conftest import write_pair_folder

REGISTERED = {ARCH_REGISTRY: ['WBSRSRResNet', 'WBSRRCAN', 'WBSREDSR'], DATASET_REGISTRY: ['HESPairedImageDataset'],
              LOSS_REGISTRY: ['BDLoss'], MODEL_REGISTRY: ['WBSRModel']}


def hook_installed() -> bool:
    dirs = set(site.getsitepackages()) | {sysconfig.get_paths()['purelib']}
    return any(Path(d, 'wbsr-basicsr-hook.pth').is_file() for d in dirs)


needs_hook = pytest.mark.skipif(not hook_installed(), reason='the .pth hook is not installed in this environment '
                                '(install the project with pip, as scripts/setup_env.sh does)')


def run_python(code: str, cwd, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != wbsr_hook.ENV_DISABLE}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_wbsr_type_is_registered_with_its_prefix():
    for registry, names in REGISTERED.items():
        for name in names:
            assert name in registry
            assert name.startswith(wbsr_hook.NAME_PREFIXES)


def test_register_refuses_bad_prefix_and_taken_names_all_or_none():
    registry = Registry('scratch')

    class WBSRThing:
        pass

    class Thing:
        pass

    with pytest.raises(wbsr_hook.RegistrationError, match='Thing: WBSR registry names must start with'):
        wbsr_hook.register(registry, [Thing])
    wbsr_hook.register(registry, [WBSRThing])
    wbsr_hook.register(registry, [WBSRThing])  # same class again: a no-op

    class WBSRNew:
        pass

    other = type('WBSRThing', (), {'__module__': 'elsewhere'})
    with pytest.raises(wbsr_hook.RegistrationError, match="'WBSRThing' is already registered .* by elsewhere|"
                       "'WBSRThing' is already registered"):
        wbsr_hook.register(registry, [WBSRNew, other])
    assert 'WBSRNew' not in registry  # nothing from the refused list was registered
    assert registry.get('WBSRThing') is WBSRThing


def test_torchvision_alias_provides_what_basicsr_imports():
    import torchvision.transforms.functional as F
    wbsr_hook.prepare_basicsr_import()
    # BasicSR 1.4.2's import line; the alias answers it where torchvision >= 0.17 has no such module (a
    # patched BasicSR may never import it, so the test imports it itself)
    from torchvision.transforms.functional_tensor import rgb_to_grayscale
    img = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rgb_to_grayscale(img), F.rgb_to_grayscale(img))
    assert rgb_to_grayscale(img).shape == (1, 5, 4)


def test_fixed_root_path_moves_site_packages_root_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    purelib = sysconfig.get_paths()['purelib']
    assert wbsr_hook.fixed_root_path(purelib) == str(tmp_path)
    assert wbsr_hook.fixed_root_path('/some/checkout') == '/some/checkout'


@needs_hook
def test_plain_import_basicsr_registers_everything(tmp_path):
    code = '''
        import basicsr
        from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY
        print(sorted(n for r in (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY)
                     for n in r.keys() if n.startswith(('WBSR', 'HES', 'BD'))))
    '''
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sorted(n for names in REGISTERED.values() for n in names))


@needs_hook
def test_hook_switched_off_disables_registration_only_in_a_clean_process(tmp_path):
    # No stand-in module: BasicSR 1.4.2 on torchvision >= 0.17 imports only through the alias, which the
    # switch must leave armed.
    code = '''
        import sys
        import basicsr
        from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY
        print(sorted(n for r in (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY)
                     for n in r.keys() if n.startswith(('WBSR', 'HES', 'BD'))))
        print(sorted(m for m in sys.modules if m.startswith('wbsr_') and m != 'wbsr_hook'))
    '''
    done = run_python(code, tmp_path, {wbsr_hook.ENV_DISABLE: '1'})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split('\n')[:2] == ['[]', '[]']  # BasicSR imported; nothing of the plugin registered


def test_hook_module_imports_nothing_at_start_up(tmp_path):
    # The .pth line imports wbsr_hook in every Python process of the environment: it may load nothing
    # beyond what the interpreter has already loaded, with the switch on or off.
    code = f'''
        import os, sys
        sys.path.insert(0, {str(Path(wbsr_hook.__file__).parent)!r})
        before = set(sys.modules)
        import wbsr_hook
        wbsr_hook.install()
        print(sorted(set(sys.modules) - before))
    '''
    for switch in ('0', '1'):
        done = subprocess.run([sys.executable, '-S', '-c', textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env=dict(os.environ, **{wbsr_hook.ENV_DISABLE: switch}))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "['wbsr_hook']"


def test_registration_does_not_import_matplotlib(tmp_path):
    done = run_python('''
        import sys
        import wbsr_models, wbsr_data, wbsr_losses, wbsr_arch
        print(sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules))
    ''', tmp_path, {wbsr_hook.ENV_DISABLE: '1'})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[]'


@needs_hook
def test_hook_leaves_a_real_functional_tensor_module_alone(tmp_path):
    code = '''
        import sys, types
        real = types.ModuleType('torchvision.transforms.functional_tensor')
        real.rgb_to_grayscale = lambda img, num_output_channels=1: 'old torchvision'
        sys.modules[real.__name__] = real
        import basicsr
        print(sys.modules['torchvision.transforms.functional_tensor'].rgb_to_grayscale(None))
    '''
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'old torchvision'


def tiny_train_options(data: dict, name: str, total_iter: int = 2, **train_extra) -> dict:
    return {
        'name': name, 'model_type': 'WBSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {'name': 'tiny', 'type': 'HESPairedImageDataset', **data, 'io_backend': {'type': 'disk'},
                               'gt_size': 32, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0,
                               'batch_size_per_gpu': 2, 'index_cache': str(Path(data['dataroot_gt']).parent / 'cache')}},
        'network_g': {'type': 'WBSRSRResNet', 'num_feat': 8, 'num_block': 2, 'widths': [4, 8], 'depths': [1, 2]},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 2e-4}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [100],
                                                                        'gamma': 0.5},
                  'total_iter': total_iter, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}, **train_extra},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 1000, 'use_tb_logger': False},
    }


@needs_hook
def test_python_m_basicsr_train_trains_wbsr_with_bdloss_without_import_line(tmp_path):
    data = write_pair_folder(tmp_path / 'data', n=2, size=(64, 64))
    opt_file = tmp_path / 'train.yml'
    opt = tiny_train_options(data, 'via_basicsr')
    opt['train']['pixel_opt'] = {'type': 'BDLoss', 'gmm_pixels': 5000}  # GMM fitted at start-up
    opt_file.write_text(yaml.safe_dump(opt))
    env = {k: v for k, v in os.environ.items() if k != wbsr_hook.ENV_DISABLE}
    done = subprocess.run([sys.executable, '-m', 'basicsr.train', '-opt', str(opt_file)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = next((tmp_path / 'experiments' / 'via_basicsr').glob('train_*.log')).read_text()
    assert 'Network [WBSRSRResNet] is created.' in log and 'Model [WBSRModel] is created.' in log
    assert 'Loss [BDLoss] is created.' in log and (tmp_path / 'experiments' / 'via_basicsr' / 'bd_gmm_detail.npz').is_file()
    assert 'iter:       2' in log
    assert (tmp_path / 'experiments' / 'via_basicsr' / 'models' / 'net_g_latest.pth').is_file()
    assert not Path(sysconfig.get_paths()['purelib'], 'experiments', 'via_basicsr').exists()


# ---- BasicSR's own runner with BasicSR's own model: HES progress and the tb_logger folder -------------------
SRMODEL_RUN = 'hes_under_srmodel'


@pytest.fixture(scope='module')
def srmodel_hes_run(tmp_path_factory):
    """`python -m basicsr.train` with SRModel, MSRResNet and HES (6 iterations, switch after 3), tensorboard on."""
    root = tmp_path_factory.mktemp('srmodel')
    data = write_pair_folder(root / 'data', n=2, size=(64, 64))
    opt = tiny_train_options(data, SRMODEL_RUN, total_iter=6)
    opt['model_type'] = 'SRModel'
    opt['network_g'] = {'type': 'MSRResNet', 'num_feat': 8, 'num_block': 1}
    opt['datasets']['train']['switch_ratio'] = 0.5
    opt['logger']['use_tb_logger'] = True  # as in the shipped option files
    (root / 'train.yml').write_text(yaml.safe_dump(opt))
    env = {k: v for k, v in os.environ.items() if k != wbsr_hook.ENV_DISABLE}
    done = subprocess.run([sys.executable, '-m', 'basicsr.train', '-opt', str(root / 'train.yml')], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    stray = Path(sysconfig.get_paths()['purelib'], 'tb_logger', SRMODEL_RUN)
    yield root, done, stray.exists()
    if stray.exists():  # left by a BasicSR run that wrote into site-packages: do not keep it there
        shutil.rmtree(stray)
        if not any(stray.parent.iterdir()):
            stray.parent.rmdir()


@needs_hook
def test_python_m_basicsr_train_writes_tb_logger_under_the_working_directory(srmodel_hes_run):
    root, done, wrote_into_site_packages = srmodel_hes_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert not wrote_into_site_packages
    assert list((root / 'tb_logger' / SRMODEL_RUN).glob('events.out.tfevents.*'))
    assert (root / 'experiments' / SRMODEL_RUN / 'models' / 'net_g_latest.pth').is_file()
    assert f'writing experiments/, results/ and tb_logger/ under {root}' in done.stderr


@needs_hook
def test_hes_switches_under_basicsr_srmodel_exactly_without_workers(srmodel_hes_run):
    root, done, _ = srmodel_hes_run
    assert done.returncode == 0, done.stderr[-3000:]
    lines = next((root / 'experiments' / SRMODEL_RUN).glob('train_*.log')).read_text().splitlines()
    assert 'Model [SRModel] is created.' in '\n'.join(lines)
    assert not [line for line in lines if 'no training progress reported' in line]
    switches = [i for i, line in enumerate(lines) if 'HES: class-level sampling from iteration' in line]
    assert len(switches) == 1 and lines[switches[0]].endswith('HES: class-level sampling from iteration 4 of 6 on')
    iters = {int(m.group(1)): i for i, line in enumerate(lines) for m in [re.search(r'iter:\s+(\d+),', line)] if m}
    # the batch of iteration 4 is the first class-level one: made after iteration 3 was logged, before 4 ran
    assert iters[3] < switches[0] < iters[4]


@needs_hook
def test_hes_logs_images_and_candidate_patches_apart(srmodel_hes_run):
    root, done, _ = srmodel_hes_run
    log = next((root / 'experiments' / SRMODEL_RUN).glob('train_*.log')).read_text()
    found = re.search(r"HESPairedImageDataset 'tiny': (\d+) images, (\d+) candidate patches", log)
    assert found and int(found.group(1)) == 2
    assert f'Number of train images: {found.group(2)}' in log  # BasicSR's own line counts the candidates
    assert int(found.group(2)) == 18  # 9 crops of 32 at stride 16 on each of the two images
