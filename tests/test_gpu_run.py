"""The GPU run's pieces on the CPU: packing the data for a device call, planning the training, the benchmark step
and the summary (bench/gpu_pack.py, bench/gpu_run.py), and bench/gpu_run.sh's refusals.

The whole dry run (``bash bench/gpu_run.sh --dry-run``) is not run here: it starts eight Python processes and took
45 s on the shared 2-core machine (README, "GPU run").
"""
import json
import os
import subprocess
import sys
import tarfile

import cv2
import numpy as np
import pytest

from wbsr_models.routing.modes import MODES

from basicsr.models import build_model
from wbsr_data.hes_dataset import check_option_keys
from wbsr_data.pairs import decode_image

from conftest import REPO, model_options, textured_image

sys.path.insert(0, str(REPO / 'bench'))
import gpu_pack  # noqa: E402
import gpu_run  # noqa: E402


# ---- training plan -----------------------------------------------------------------------------------------
def test_plan_iterations_fits_the_budget_in_whole_hundreds():
    # 270 s x 0.9 margin - 20 s fixed = 223 s; at 0.03 s/iteration 7433 -> 7400
    assert gpu_run.plan_iterations(270, 20, 0.03) == 7400
    assert gpu_run.plan_iterations(270, 20, 0.03, maximum=5000) == 5000
    assert gpu_run.plan_iterations(10, 20, 0.03) == 100  # nothing fits: the minimum
    assert gpu_run.plan_iterations(100, 0, 0.25, margin=1.0, multiple=1, minimum=1) == 400


LOG = '''Disable distributed.
2026-11-29 10:00:00,000 INFO: Start training from epoch: 0, iter: 0
2026-11-29 10:00:02,000 INFO: [gpu_t..][epoch:  0, iter:      25, lr:(2.000e-04,)] [eta: 0:01:00, time (data): 0.080 (0.001)] l_pix: 5.0e-03 hes_phase: 0.0000e+00
2026-11-29 10:00:03,000 INFO: [gpu_t..][epoch:  0, iter:      50, lr:(2.000e-04,)] [eta: 0:00:40, time (data): 0.060 (0.001)] l_pix: 4.0e-03 hes_phase: 0.0000e+00
some other line, iter: 75
2026-11-29 10:00:05,500 INFO: [gpu_t..][epoch:  1, iter:   1,100, lr:(1.000e-04,)] [eta: 0:00:00, time (data): 0.050 (0.001)] l_pix: 3.5e-03 hes_phase: 1.0000e+00
'''  # noqa: E501  (BasicSR's own lines)


def test_basicsr_log_lines_give_seconds_per_iteration_and_last_losses():
    points = gpu_run.log_iterations(LOG)
    assert [it for _, it in points] == [25, 50, 1100]
    assert points[1][0] - points[0][0] == pytest.approx(1.0)
    assert gpu_run.seconds_per_iteration(points, skip=50) == pytest.approx(2.5 / 1050)  # past the warm-up
    assert gpu_run.seconds_per_iteration(points, skip=1100) is None  # one point measures nothing
    assert gpu_run.last_losses(LOG) == {'l_pix': 3.5e-3, 'hes_phase': 1.0}


def test_newest_checkpoint_prefers_a_finished_run(tmp_path):
    assert gpu_run.newest_checkpoint(str(tmp_path / 'none')) == (None, None)
    for name in ('net_g_200.pth', 'net_g_1000.pth', 'net_g_600.pth'):
        (tmp_path / name).write_bytes(b'x')
    assert gpu_run.newest_checkpoint(str(tmp_path)) == (str(tmp_path / 'net_g_1000.pth'), 1000)
    (tmp_path / 'net_g_latest.pth').write_bytes(b'x')
    assert gpu_run.newest_checkpoint(str(tmp_path)) == (str(tmp_path / 'net_g_latest.pth'), None)


def test_train_options_are_the_reference_recipe_with_this_runs_changes(tmp_path):
    from wbsr_models.infer import read_option_file
    reference = json.loads(json.dumps(read_option_file(gpu_run.REFERENCE_OPTIONS)))
    opt = gpu_run.train_options(str(tmp_path / 'ds'), str(tmp_path), name='gpu', iters=4200, amp=True, workers=12,
                                dry_run=False, print_freq=100, save_freq=800, gmm_path='/g.npz')
    assert opt['network_g'] == reference['network_g'] and opt['train']['optim_g'] == reference['train']['optim_g']
    assert opt['train']['total_iter'] == 4200 and opt['train']['scheduler']['periods'] == [4200]
    assert opt['train']['wbsr'] == dict(reference['train']['wbsr'], amp=True)
    assert opt['train']['pixel_opt'] == dict(reference['train']['pixel_opt'], gmm_path='/g.npz')
    assert list(opt['datasets']) == ['train'] and 'val' not in opt  # the benchmark step evaluates
    train = opt['datasets']['train']
    assert (train['dataroot_gt'], train['num_worker_per_gpu'], train['cache_images']) == \
        (str(tmp_path / 'ds' / 'train291' / 'HR'), 12, True)
    check_option_keys(train)  # HESPairedImageDataset accepts every key
    assert opt['logger']['save_checkpoint_freq'] == 800 and opt['logger']['use_tb_logger'] is False
    dry = gpu_run.train_options(str(tmp_path), str(tmp_path), name='d', iters=3, amp=False, workers=0, dry_run=True,
                                print_freq=1, save_freq=3)
    assert dry['network_g'] == gpu_run.TINY_NETWORK and dry['datasets']['train']['gt_size'] == 32
    assert dry['datasets']['train']['persistent_workers'] is False  # no workers to keep


# ---- packing for a device call -----------------------------------------------------------------------------
def test_select_takes_the_training_pool_first_then_keeps_the_test_sets_even():
    sizes = {'t1': 10, 't2': 10, 'b1': 3, 'b2': 3, 'b3': 3, 'b4': 3, 'u1': 6, 'u2': 6, 'u3': 6}
    taken, left = gpu_pack.select(['t1', 't2'], [['b1', 'b2', 'b3', 'b4'], ['u1', 'u2', 'u3']], 38, sizes.get)
    # 20 for the pool; then the test set with fewer bytes so far: b1 (B 3, U 0) u1 (3, 6) b2 (6, 6) b3 (9, 6);
    # u2 would make 41 > 38, so Urban100 closes; b4 makes 38
    assert taken == ['t1', 't2', 'b1', 'u1', 'b2', 'b3', 'b4'] and sum(sizes[t] for t in taken) == 38
    assert left == ['u2', 'u3']
    taken, left = gpu_pack.select(['t1', 't2'], [['b1'], ['u1']], 15, sizes.get)
    assert taken == ['t1', 'b1'] and left == ['t2', 'u1']  # the pool itself is cut when it does not fit


def test_encode_gives_lossless_webp_or_the_file_itself(tmp_path):
    rgb, gray = tmp_path / 'rgb.png', tmp_path / 'gray.png'
    cv2.imwrite(str(rgb), textured_image(96, 128, seed=2))
    cv2.imwrite(str(gray), textured_image(64, 64, seed=3, channels=1))
    data, ext = gpu_pack.encode(str(rgb))
    assert ext == '.webp' and 0 < len(data) < rgb.stat().st_size
    assert np.array_equal(decode_image(data, 'rgb.webp'), decode_image(rgb.read_bytes(), 'rgb.png'))
    assert gpu_pack.encode(str(gray)) == (gray.read_bytes(), '.png')  # not 3-channel: copied as it is


def test_pack_writes_what_fits_and_a_manifest(tmp_path):
    shared = tmp_path / 'shared'
    for folder, n, seed in (('train/T91', 2, 0), ('train/BSD200', 2, 10), ('test/B100/HR', 3, 20),
                            ('test/Urban100/HR', 3, 30)):
        (shared / folder).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(shared / folder / f'im{i}.png'), textured_image(64, 80, seed=seed + i))
    sizes = {str(p): len(gpu_pack.encode(str(p))[0]) for p in shared.rglob('*.png')}
    train = sum(v for k, v in sizes.items() if '/train/' in k)
    budget = train + sorted(v for k, v in sizes.items() if '/test/' in k)[-1] * 3  # room for about 3 test images
    manifest = gpu_pack.pack(str(shared), str(tmp_path / 'carry'), budget, wheels=False, python=sys.executable,
                             target_python='3.12')
    written = sorted(p.relative_to(tmp_path / 'carry' / 'data').as_posix()
                     for p in (tmp_path / 'carry' / 'data').rglob('*.webp'))
    assert [w for w in written if w.startswith('train/')] == ['train/BSD200/im0.webp', 'train/BSD200/im1.webp',
                                                              'train/T91/im0.webp', 'train/T91/im1.webp']
    tests = [w for w in written if w.startswith('test/')]
    assert 2 <= len(tests) <= 4 and manifest['data_bytes'] <= budget
    assert manifest['data_bytes'] == sum(p.stat().st_size for p in (tmp_path / 'carry' / 'data').rglob('*.webp'))
    assert len(manifest['left_out']) == 6 - len(tests)
    assert json.loads((tmp_path / 'carry' / 'MANIFEST.json').read_text()) == manifest
    assert '"carry": [' in gpu_pack.device_call(str(tmp_path / 'carry'))


# ---- benchmark and summary ---------------------------------------------------------------------------------
def test_benchmark_and_summary_steps(tmp_path):
    """The dry run's data (synthesised, packed, made into datasets), a tiny checkpoint, the benchmark, the summary."""
    datasets = tmp_path / 'out' / 'datasets'
    gpu_run.prepare(gpu_run.dry_data(str(tmp_path / 'out' / 'data' / 'raw'), str(tmp_path / 'out' / 'data' / 'carry')),
                    str(datasets), jobs=1)
    assert {d: len(os.listdir(datasets / d / 'HR')) for d in ('train291', 'B100', 'Urban100')} == \
        {'train291': 6, 'B100': 2, 'Urban100': 2}
    data = {'dataroot_gt': str(datasets / 'train291' / 'HR'),
            'dataroot_lq': str(datasets / 'train291' / 'LR_bicubic' / 'X4')}
    model = build_model(model_options(tmp_path, data))
    model.save_network(model.net_g, 'net_g', -1)
    checkpoint = str(tmp_path / 'experiments' / 'tiny' / 'models' / 'net_g_latest.pth')
    report = gpu_run.bench(str(datasets), checkpoint, checkpoint, str(tmp_path / 'out' / 'bench'), time_images=1,
                           repeats=1, jobs=0, seconds=600, dry_run=True)
    net = model.net_g
    for name in ('B100', 'Urban100'):
        rows = report['sets'][name]['new']
        # full, 9 fixed subnets, patches Eq. 15, and the quick points of every registered mode this checkpoint can
        # run (no class errors, predictor or ARM table in it)
        region = sum(len(m.quick) for m in MODES.values() if not m.whole_image and
                     not set(m.needs) & {'class_errors', 'predictor', 'arm_table'})
        assert len(rows) == 1 + 9 + 1 + region and rows.keys() == report['sets'][name]['reference'].keys()
        assert {'tiles: Eq. 15', 'tiles: budget 0.5', 'tiles: budget 0.9'} <= set(rows) and region == 4
        assert rows['full']['ratio_whole'] == 1.0
        lr = [cv2.imread(str(p)).shape[:2] for p in sorted((datasets / name / 'LR_bicubic' / 'X4').iterdir())]
        for i in range(9):
            expected = np.mean([net.subnet_flops(hw)[i] / net.subnet_flops(hw)[-1] for hw in lr])
            assert rows[f'fixed {i} (w{net.subnets[i][0]} d{net.subnets[i][1]})']['ratio_whole'] == \
                pytest.approx(expected, rel=1e-12)
        timing = report['timing'][name]
        assert list(timing) == ['new'] and len(timing['new']) == len(rows)  # only the new checkpoint is timed
        assert all(r['images_per_s'] * r['seconds'] == pytest.approx(1.0) for r in timing['new'])
    assert report['verdict'] == {'beats_reference': False, 'psnr_gain_db': {
        name: {'full': 0.0, 'tiles: Eq. 15': 0.0, 'patches: Eq. 15': 0.0} for name in ('B100', 'Urban100')}}
    assert json.loads((tmp_path / 'out' / 'bench' / 'gpu_benchmark.json').read_text())['verdict'] == report['verdict']
    (tmp_path / 'out' / 'steps.tsv').write_text('step\tstatus\tseconds\tlimit\nbench\t0\t12\t150\n')
    text = gpu_run.summary(str(tmp_path / 'out'))
    assert '| bench | 0 | 12 | 150 |' in text and '| tiles: Eq. 15 |' in text
    assert 'Beats the reference (full and tiles Eq. 15 higher on every set): no.' in text
    with tarfile.open(tmp_path / 'out' / 'results.tar.gz') as tar:
        names = tar.getnames()
    assert sorted(names) == ['gpu_run/README.md', 'gpu_run/bench/gpu_benchmark.json', 'gpu_run/bench/gpu_benchmark.md',
                             'gpu_run/steps.tsv']  # not the data, the datasets nor the packed copy


def test_verdict_needs_both_the_full_network_and_eq15_to_gain_on_every_set():
    def report(gains):
        sets = {}
        for name, (full, tiles) in gains.items():
            sets[name] = {'reference': {k: {'psnr': 27.0} for k in ('full', 'tiles: Eq. 15', 'patches: Eq. 15')},
                          'new': {'full': {'psnr': 27.0 + full}, 'tiles: Eq. 15': {'psnr': 27.0 + tiles},
                                  'patches: Eq. 15': {'psnr': 27.0}}}
        return {'sets': sets}
    assert gpu_run.verdict(report({'B100': (0.1, 0.2), 'Urban100': (0.3, 0.01)}))['beats_reference'] is True
    assert gpu_run.verdict(report({'B100': (0.1, 0.2), 'Urban100': (0.3, -0.01)}))['beats_reference'] is False
    assert gpu_run.verdict({'sets': {'B100': {'new': {}}}}) == {'psnr_gain_db': {}, 'beats_reference': False}


# ---- the shell script's refusals -------------------------------------------------------------------------------
def run_sh(*args, cwd=REPO):
    return subprocess.run(['bash', str(REPO / 'bench' / 'gpu_run.sh'), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_gpu_run_sh_refuses_bad_arguments_before_any_work(tmp_path):
    done = run_sh('--out', str(tmp_path / 'a'), '--python', sys.executable)
    assert done.returncode == 2 and done.stderr.splitlines()[0] == (
        'gpu_run: --data DIR is needed (the benchmark images in the shared layout: bench/gpu_pack.py writes one)')
    done = run_sh('--data', str(tmp_path / 'nope'), '--python', sys.executable)
    assert done.returncode == 2 and done.stderr == f'gpu_run: --data {tmp_path / "nope"}: no such folder\n'
    done = run_sh('--dry-run', '--frobnicate')
    assert done.returncode == 2 and done.stderr.startswith('gpu_run: unknown argument --frobnicate\nusage: ')
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'steps.tsv').write_text('step\n')
    done = run_sh('--dry-run', '--out', str(tmp_path / 'b'), '--python', sys.executable)
    assert done.returncode == 2 and 'holds an earlier run (steps.tsv); choose another --out' in done.stderr
    assert (tmp_path / 'b' / 'steps.tsv').read_text() == 'step\n' and not (tmp_path / 'a').exists()
