"""Hostile inputs and lost files: what wbsr-infer, wbsr-make-lr, wbsr-train and wbsr-test refuse, and how.

Every refusal is one line naming the file or flag (no traceback), and nothing the run read is overwritten.
"""
import errno
import importlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image, ImageOps

from basicsr.archs.rrdbnet_arch import RRDBNet
from basicsr.models import build_model
from basicsr.utils import tensor2img
from wbsr_data import fileio, make_lr
from wbsr_data.difficulty import DifficultyProjection
from wbsr_data.fileio import CorruptFileError, save_json, save_npz, torch_save
from wbsr_data.pairs import ImageTooLargeError, apply_orientation, decode_image
import wbsr_hook
from wbsr_models import infer, runners

from conftest import model_options, textured_image, write_pair_folder
from test_registration import needs_hook
from test_arch import randomise, tiny_srresnet

DATA = Path(__file__).resolve().parent / 'data'
TINY_NET = {'type': 'WBSRSRResNet', 'num_feat': 16, 'num_block': 4, 'widths': [8, 12, 16], 'depths': [1, 2, 4]}


# ---- helpers ------------------------------------------------------------------------------------------------
def tiny_checkpoint(path: Path, net=None, network_opt=None, scale: int = 4) -> Path:
    """A checkpoint as ``WBSRModel.save_network`` writes it: params plus the 'wbsr' entry."""
    net = net if net is not None else randomise(tiny_srresnet())
    vectors = np.random.default_rng(0).random((200, 4))
    torch_save({'params': OrderedDict((k, v.cpu()) for k, v in net.state_dict().items()),
                'wbsr': {'format': 1, 'difficulty': DifficultyProjection.fit(vectors, 10).to_dict(),
                         'subnets': [list(p) for p in getattr(net, 'subnets', [])],
                         'network': dict(network_opt or TINY_NET), 'scale': scale}}, str(path))
    return path


def tiny_state(path: Path, iteration: int = 5) -> Path:
    """A training state as ``WBSRModel.save_training_state`` writes it (Adam after one step, a scheduler)."""
    net = tiny_srresnet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(1, 3, 8, 8)).mean().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10])
    torch_save({'epoch': 0, 'iter': iteration, 'optimizers': [optimizer.state_dict()],
                'schedulers': [scheduler.state_dict()],
                'wbsr': {'noise_sigma': torch.tensor(0.05), 'optimizer_sigma': optimizer.state_dict()}}, str(path))
    return path


def write_images(folder: Path, names, size=(20, 24)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), textured_image(*size, seed=i))
    return folder


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid, tiny PNG whose header declares ``width`` x ``height`` (its pixel data is empty)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b''))
                     + chunk(b'IEND', b''))
    return path


def digest(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in text, text
    return lines[0]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'net_g_5.pth')


# ---- 1. outputs never overwrite inputs or each other ------------------------------------------------------------
def test_infer_refuses_an_output_folder_that_holds_an_input(tmp_path, checkpoint, capsys):
    inputs = write_images(tmp_path / 'in', ['a.png', 'b.png'])
    before = digest(inputs)
    assert infer.main(['-i', str(inputs), '-o', str(inputs), '--model', str(checkpoint)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f'wbsr-infer: -o {inputs} is the folder the inputs are read from ({inputs}): outputs would replace or mix '
        'with the inputs; choose another output folder')
    assert infer.main(['-i', str(inputs / 'a.png'), '-o', str(inputs), '--model', str(checkpoint)]) == 2
    assert 'is the folder the inputs are read from' in one_line(capsys.readouterr().err)
    assert digest(inputs) == before


def test_infer_refuses_two_inputs_with_one_output_name_before_any_work(tmp_path, checkpoint, capsys):
    inputs = write_images(tmp_path / 'in', ['photo.jpg', 'photo.png'])
    out = tmp_path / 'out'
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f'wbsr-infer: {inputs}/photo.jpg and {inputs}/photo.png would both be written as photo.png in {out}: rename '
        'them or use --suffix; nothing was written')
    assert not out.exists()
    inputs = write_images(tmp_path / 'in2', ['a.png', 'a_alloc.png'])  # an SR output against a map's name
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint), '--save-map']) == 2
    assert 'would both be written as a_alloc.png' in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_infer_never_writes_through_a_link_to_an_input(tmp_path, checkpoint, capsys):
    inputs = write_images(tmp_path / 'in', ['a.png'])
    out = tmp_path / 'out'
    out.mkdir()
    os.link(inputs / 'a.png', out / 'a.png')  # a hard link to the input, where the output would go
    before = (inputs / 'a.png').read_bytes()
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint)]) == 2
    assert one_line(capsys.readouterr().err) == (f'wbsr-infer: {out}/a.png is one of the inputs (a link to it): it '
                                                 'would be overwritten; choose another output folder')
    assert (inputs / 'a.png').read_bytes() == before


def test_make_lr_refuses_to_write_over_its_inputs(tmp_path, capsys):
    hr = write_images(tmp_path / 'ds' / 'HR', ['a.png'], size=(24, 28))
    deep = (np.random.default_rng(0).random((24, 24, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(hr / 'b16.png'), deep)
    before = digest(hr)
    assert make_lr.main(['--hr', str(hr), '--out', str(tmp_path / 'ds')]) == 2
    assert one_line(capsys.readouterr().err) == (
        f'wbsr-make-lr: --out {tmp_path}/ds would write {tmp_path}/ds/HR, which is the --hr folder {hr}: its images '
        'would be overwritten; choose another --out')
    assert digest(hr) == before

    a = write_images(tmp_path / 'A', ['x.png'], size=(24, 24))
    b = write_images(tmp_path / 'B', ['x.png', 'y.jpg', 'y.png'], size=(24, 24))
    assert make_lr.main(['--hr', str(a), '--hr', str(b), '--out', str(tmp_path / 'merged')]) == 2
    assert one_line(capsys.readouterr().err) == (
        f'wbsr-make-lr: {a}/x.png and {b}/x.png would both be written as x.png; {b}/y.jpg and {b}/y.png would both '
        'be written as y.png: rename them; nothing was written')
    assert not (tmp_path / 'merged').exists()


# ---- 2. oversized images are skipped by name, before decoding ---------------------------------------------------
def test_infer_skips_an_image_that_declares_too_many_pixels_and_writes_the_rest(tmp_path, checkpoint, capsys):
    inputs = write_images(tmp_path / 'in', [f'ok{i}.png' for i in range(3)])
    png_declaring(inputs / 'bomb.png', 100000, 100000)  # 74 bytes
    png_declaring(inputs / 'wide.png', 5000, 4000)  # under PIL's own limit: the size is known
    out = tmp_path / 'out'
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint)]) == 1
    printed = capsys.readouterr().out
    assert (f'bomb.png: skipped ({inputs}/bomb.png: declares 10000000000 pixels, more than --max-pixels '
            f'{infer.DEFAULT_MAX_PIXELS})') in printed
    assert (f'wide.png: skipped ({inputs}/wide.png: 5000x4000 is 20000000 pixels, more than --max-pixels '
            f'{infer.DEFAULT_MAX_PIXELS})') in printed
    assert sorted(p.name for p in out.iterdir()) == ['ok0.png', 'ok1.png', 'ok2.png']
    assert f'wbsr-infer: 3 of 5 images written to {out}' in printed
    assert infer.main(['-i', str(inputs / 'ok0.png'), '-o', str(out), '--model', str(checkpoint),
                       '--max-pixels', '479']) == 1  # 24x20 = 480 pixels
    assert 'ok0.png: 24x20 is 480 pixels, more than --max-pixels 479' in capsys.readouterr().out


def test_an_image_that_runs_out_of_memory_is_skipped_and_the_rest_written(tmp_path, checkpoint, capsys,
                                                                          monkeypatch):
    inputs = write_images(tmp_path / 'in', ['a.png', 'b.png', 'c.png'])
    call = infer.Router.__call__

    def routed(router, lq, *args):
        if lq.shape[-1] == 24 and not hasattr(routed, 'failed'):  # the first image only
            routed.failed = True
            raise RuntimeError('[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can\'t allocate memory')
        return call(router, lq, *args)

    monkeypatch.setattr(infer.Router, '__call__', routed)
    out = tmp_path / 'out'
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint)]) == 1
    assert ("a.png: skipped (out of memory ([enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
            'memory); a lower --max-pixels skips such images up front)') in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ['b.png', 'c.png']


def test_the_size_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    path = png_declaring(tmp_path / 'big.png', 12000, 12000)  # would be 1.6 GB as float32
    monkeypatch.setattr(cv2, 'imdecode', lambda *a: pytest.fail('decoded an image over the limit'))
    with pytest.raises(ImageTooLargeError, match=r'big.png: 12000x12000 is 144000000 pixels, more than the limit '
                       r'of 16777216$'):
        decode_image(path.read_bytes(), str(path), max_pixels=16777216)


def test_make_lr_skips_oversized_and_too_small_images_and_keeps_pairs_complete(tmp_path, capsys):
    hr = tmp_path / 'HR'
    hr.mkdir()
    for side in (4, 5, 6, 7, 8, 12):
        cv2.imwrite(str(hr / f't{side}.png'), textured_image(side, side, seed=side))
    png_declaring(hr / 'bomb.png', 100000, 100000)
    assert make_lr.main(['--hr', str(hr), '--out', str(tmp_path / 'ds'), '--scales', '4']) == 1
    captured = capsys.readouterr()
    for side in (4, 5, 6, 7):
        assert (f'wbsr-make-lr: skipped {hr}/t{side}.png: {side}x{side} is too small for x4 (the mod-cropped HR '
                'must be at least 8 pixels a side)') in captured.err
    assert (f'wbsr-make-lr: skipped {hr}/bomb.png: declares 10000000000 pixels, more than --max-pixels '
            f'{make_lr.DEFAULT_MAX_PIXELS}') in captured.err
    assert 'Traceback' not in captured.err
    written = sorted(p.name for p in (tmp_path / 'ds' / 'HR').iterdir())
    assert written == ['t12.png', 't8.png'] == sorted(p.name for p in (tmp_path / 'ds/LR_bicubic/X4').iterdir())
    assert cv2.imread(str(tmp_path / 'ds/LR_bicubic/X4/t8.png')).shape == (2, 2, 3)


@pytest.mark.parametrize('channels', [3, 1])
def test_to_uint8_gives_tensor2img_numbers_band_by_band(monkeypatch, channels):
    monkeypatch.setattr(infer, 'BAND_PIXELS', 7 * 13)  # 7 rows per band, the last one short
    output = torch.rand(1, channels, 30, 13) * 1.4 - 0.2  # values outside [0, 1] too
    output[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255])  # halves: round to even
    np.testing.assert_array_equal(infer.to_uint8(output), tensor2img([output[0].clone()]))


# ---- 3. corrupt files: one line naming the file, never another exception ----------------------------------------
@pytest.mark.parametrize('content,reason', [
    (b'', 'empty file'),
    (b'this is not a checkpoint\n', 'truncated or corrupt checkpoint (IndexError: pop from empty list)'),
    (b'hello', 'truncated or corrupt checkpoint (KeyError: 101)'),
])
def test_junk_checkpoints_are_refused_in_one_line(tmp_path, content, reason, capsys):
    path = tmp_path / 'junk.pth'
    path.write_bytes(content)
    write_images(tmp_path / 'in', ['a.png'])
    assert infer.main(['-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'out'), '--model', str(path)]) == 2
    assert one_line(capsys.readouterr().err) == f'wbsr-infer: {path}: {reason}'


def damaged(data: bytes, cut: int, flips) -> bytes:
    damaged = bytearray(data[:cut] if cut < len(data) else data)
    for position, xor in flips:
        damaged[position % len(damaged)] ^= xor
    return bytes(damaged)


def pickle_span(data: bytes) -> tuple[int, int]:
    """Byte range of the pickle inside a torch zip checkpoint: where a flipped byte changes structure."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith('data.pkl'))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    return start, start + info.compress_size


def damage_strategy(size: int, span: tuple[int, int]):
    position = st.integers(0, size - 1) | st.integers(*span)
    flips = st.lists(st.tuples(position, st.integers(1, 255)), min_size=0, max_size=3)
    return st.tuples(st.integers(1, size) | st.just(size), flips)


def assert_refused_by_name(path: Path, call) -> None:
    try:
        call()
    except ValueError as exc:  # CorruptFileError, or "no network options inside", always naming the file
        message = str(exc)
        assert message.startswith(f'{path}: ') and '\n' not in message, message


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp('pristine')
    return (tiny_checkpoint(folder / 'net.pth').read_bytes(), tiny_state(folder / '5.state').read_bytes())


def test_fuzzed_checkpoints_and_states_load_or_are_refused_by_name(tmp_path, pristine):
    ckpt, state = pristine
    ckpt_path, state_path = tmp_path / 'net_g_5.pth', tmp_path / '5.state'
    opt = {'num_gpu': 0, 'auto_resume': False, 'network_g': dict(TINY_NET),
           'path': {'resume_state': str(state_path), 'models': str(tmp_path)}}

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(damage=damage_strategy(len(ckpt), pickle_span(ckpt)))
    def fuzz_checkpoint(damage):
        ckpt_path.write_bytes(damaged(ckpt, *damage))
        assert_refused_by_name(ckpt_path, lambda: infer.load_model(str(ckpt_path)))

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(damage=damage_strategy(len(state), pickle_span(state)))
    def fuzz_state(damage):
        state_path.write_bytes(damaged(state, *damage))
        assert_refused_by_name(state_path, lambda: runners.load_resume_state(json.loads(json.dumps(opt))))

    fuzz_checkpoint()
    fuzz_state()
    ckpt_path.write_bytes(ckpt)  # and the undamaged files do load
    assert infer.load_model(str(ckpt_path))[1] == 4
    state_path.write_bytes(state)
    assert runners.load_resume_state(json.loads(json.dumps(opt)))['iter'] == 5


def test_auto_resume_takes_the_previous_intact_state_with_a_warning(tmp_path, capsys):
    data = write_pair_folder(tmp_path / 'data', n=2)
    opt = model_options(tmp_path, data)
    model = build_model(opt)
    model.save(0, 2)
    model.save(0, 4)
    states = Path(opt['path']['training_states'])
    for corrupt in (b'', None):
        if corrupt is None:
            torch.save([1, 2, 3], str(states / '4.state'))  # loads, but is not a training state
        else:
            (states / '4.state').write_bytes(corrupt)
        resume_opt = dict(opt, auto_resume=True, path=dict(opt['path']))
        state = runners.load_resume_state(resume_opt)
        assert state['iter'] == 2 and resume_opt['path']['resume_state'] == str(states / '2.state')
        assert resume_opt['path']['pretrain_network_g'].endswith('net_g_2.pth')
        reason = 'empty file' if corrupt is not None else 'not a training state (a list, not a dict)'
        assert (f'wbsr-train: warning: {states}/4.state: {reason}; resuming from the previous intact state '
                f'{states}/2.state instead') in capsys.readouterr().err
    explicit = dict(opt, path=dict(opt['path'], resume_state=str(states / '4.state')))
    with pytest.raises(CorruptFileError) as refused:
        runners.load_resume_state(explicit)
    assert str(refused.value) == (f'{states}/4.state: not a training state (a list, not a dict); the newest intact '
                                  f'state there is {states}/2.state (set path.resume_state to it)')
    (states / '2.state').write_bytes(b'PK\x03\x04')
    with pytest.raises(CorruptFileError, match=f'^{states}/4.state: not a training state .*; no earlier training '
                       f'state in {states} is intact either'):
        runners.load_resume_state(dict(opt, auto_resume=True, path=dict(opt['path'])))


def run_cli(main, argv, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, 'argv', ['prog'])
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_option_files_end_wbsr_train_test_and_infer_in_one_line(tmp_path, checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_pair_folder(tmp_path / 'data', n=2)
    inputs = write_images(tmp_path / 'in', ['a.png'])
    base = {'name': 'bad', 'model_type': 'WBSRModel', 'scale': 4, 'num_gpu': 0, 'network_g': dict(TINY_NET),
            'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedImageDataset', **data,
                                    'io_backend': {'type': 'disk'}}},
            'path': {'pretrain_network_g': str(checkpoint), 'strict_load_g': True},
            'val': {'save_img': False, 'routing': {'mode': 'wbsr'}}}
    broken = tmp_path / 'broken.yml'
    broken.write_text('name: x\nnetwork_g: {type: WBSRSRResNet\n')
    files = {'broken': broken}
    for name, change in (('nonet', {'network_g': None}), ('scale', {'network_g': dict(TINY_NET, upscale=2)}),
                         ('feat', {'network_g': dict(TINY_NET, num_feat=32, widths=[8, 16, 32])})):
        opt = {k: v for k, v in {**base, **change}.items() if v is not None}
        files[name] = tmp_path / f'{name}.yml'
        files[name].write_text(yaml.safe_dump(opt))
    expected = {
        'broken': f"{broken}: not valid YAML (did not find expected ',' or '}}' at line 3, column 1)",
        'nonet': f"{files['nonet']}: no 'network_g' (the network's options)",
        'scale': f"{files['scale']}: scale is 4 but network_g.upscale is 2: they must agree",
        'feat': (f"{files['feat']}: network_g does not match the checkpoint {checkpoint}: size mismatch for "
                 'conv_first.weight: copying a param with shape torch.Size([16, 3, 3, 3]) from checkpoint, the shape '
                 'in current model is torch.Size([32, 3, 3, 3]). (and 24 more)'),
    }
    for name, message in expected.items():
        code, err = run_cli(runners.test_main, ['-opt', str(files[name])], monkeypatch, capsys)
        assert code == 2 and err.splitlines()[-1] == f'wbsr-test: {message}' and 'Traceback' not in err, err
        if name != 'feat':  # training never gets as far as loading a checkpoint
            code, err = run_cli(runners.train_main, ['-opt', str(files[name])], monkeypatch, capsys)
            assert code == 2 and err.splitlines()[-1] == f'wbsr-train: {message}' and 'Traceback' not in err, err
        code = infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(checkpoint), '-opt',
                           str(files[name])])
        # wbsr-infer names the checkpoint of its --model flag
        assert code == 2 and one_line(capsys.readouterr().err) == f'wbsr-infer: {message}'.replace(
            'does not match the checkpoint', 'does not match')
    assert not (tmp_path / 'out').exists()


def test_a_network_that_upscales_otherwise_than_scale_is_refused(tmp_path, capsys):
    """``scale`` must be what the network does: checked by running it on an 8x8 image (no ``upscale`` key here)."""
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=2, num_feat=8, num_block=1, num_grow_ch=4)
    options = {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'scale': 2, 'num_feat': 8, 'num_block': 1,
               'num_grow_ch': 4}
    ckpt = tiny_checkpoint(tmp_path / 'rrdb.pth', net=net, network_opt=options, scale=4)
    with pytest.raises(CorruptFileError) as refused:
        infer.load_model(str(ckpt))
    assert str(refused.value) == f"{ckpt}: its 'wbsr' entry: scale is 4 but network_g turns 8x8 into 16x16"


# ---- 4. flags are never silently ignored --------------------------------------------------------------------
def flops_line(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines() if 'FLOPs' in line)


def test_mode_flags_choose_their_mode_or_are_refused(tmp_path, checkpoint, capsys):
    inputs = write_images(tmp_path / 'in', ['a.png'], size=(40, 40))
    net = tiny_srresnet()
    common = ['-i', str(inputs), '--model', str(checkpoint)]
    assert infer.main(common + ['-o', str(tmp_path / 'o1'), '--subnet', '0']) == 0
    costs = net.subnet_flops((40, 40))
    assert f'FLOPs {100 * costs[0] / costs[-1]:.1f}% of full on the image' in flops_line(capsys)  # fixed, subnet 0
    assert infer.main(common + ['-o', str(tmp_path / 'o2'), '--alpha', '0.5']) == 0
    implied = flops_line(capsys)
    assert infer.main(common + ['-o', str(tmp_path / 'o3'), '--alpha', '0.5', '--mode', 'alpha']) == 0
    explicit = flops_line(capsys)
    assert infer.main(common + ['-o', str(tmp_path / 'o4')]) == 0
    assert implied.split('  ')[1] == explicit.split('  ')[1] != flops_line(capsys).split('  ')[1]
    refusals = [
        (['--budget', '0.6', '--mode', 'wbsr'], '--budget applies to --mode budget or calibrated or learned only, not '
         '--mode wbsr'),
        (['--budget', '0.6', '--mode', 'full'], '--budget applies to --mode budget or calibrated or learned only, not '
         '--mode full'),
        (['--subnet', '1', '--mode', 'budget', '--budget', '0.5'], '--subnet applies to --mode fixed only, not --mode '
         'budget'),
        (['--budget', '0.6', '--subnet', '1'], '--budget and --subnet select different modes (budget, fixed); give one '
         'of them'),
        (['--mode', 'fixed'], "--mode fixed needs --subnet (fixed mode: index into the network's subnets)"),
        (['--budget', '1.5'], '--budget must be in (0, 1], got 1.5'),
        (['--subnet', '9'], '--subnet 9: this network has subnets 0..8'),
        (['--budget', '0.01'], "--budget 0.01 is below the cheapest subnet's cost, 0.235 of the full network's"),
        (['--step', '0'], 'need --patch-size >= 1 and 1 <= --step <= --patch-size, got 32 and 0'),
    ]
    for flags, message in refusals:
        assert infer.main(common + ['-o', str(tmp_path / 'bad')] + flags) == 2
        assert one_line(capsys.readouterr().err) == f'wbsr-infer: {message}'
    assert not (tmp_path / 'bad').exists()


# ---- 5. EXIF orientation ----------------------------------------------------------------------------------------
def test_the_exif_orientation_is_applied_like_viewers_do(tmp_path, checkpoint, capsys):
    path = DATA / 'exif_orientation6.jpg'  # stored 16 wide x 8 tall, tagged "rotate 90 degrees clockwise"
    with Image.open(path) as stored:
        assert stored.size == (16, 8) and stored.getexif()[0x0112] == 6
    img = decode_image(path.read_bytes(), str(path))
    assert img.shape == (16, 8, 3)
    bgr = (img * 255).round()
    assert np.abs(bgr[:8, :] - [0, 0, 255]).max() < 8  # shown: top half red,
    assert np.abs(bgr[10:, :3] - [0, 255, 0]).max() < 8  # bottom left green,
    assert np.abs(bgr[10:, 5:] - [255, 0, 0]).max() < 8  # bottom right blue
    notes = []
    decode_image(path.read_bytes(), str(path), notes=notes)
    assert notes == ['EXIF orientation 6 applied']
    inputs = tmp_path / 'in'
    inputs.mkdir()
    (inputs / 'phone.jpg').write_bytes(path.read_bytes())
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(checkpoint)]) == 0
    assert cv2.imread(str(tmp_path / 'out' / 'phone.png')).shape == (64, 32, 3)
    assert 'phone.jpg: EXIF orientation 6 applied' in capsys.readouterr().out
    assert make_lr.main(['--hr', str(inputs), '--out', str(tmp_path / 'ds'), '--scales', '2']) == 0
    hr = cv2.imread(str(tmp_path / 'ds' / 'HR' / 'phone.png')).astype(int)
    assert hr.shape == (16, 8, 3) and np.abs(hr[10:, :3] - [0, 255, 0]).max() < 8
    assert f'wbsr-make-lr: {inputs}/phone.jpg: EXIF orientation 6 applied' in capsys.readouterr().err


@pytest.mark.parametrize('orientation', range(1, 9))
def test_apply_orientation_matches_pil_exif_transpose(orientation):
    stored = (np.arange(5 * 3 * 3) * 5).astype(np.uint8).reshape(5, 3, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format='PNG', exif=exif)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(apply_orientation(stored, orientation), shown)
    decoded = decode_image(buf.getvalue(), 'exif.png')  # a PNG's eXIf chunk counts too
    np.testing.assert_array_equal((decoded[..., ::-1] * 255).round().astype(np.uint8), shown)


# ---- 6. smaller gaps --------------------------------------------------------------------------------------------
def test_an_empty_input_folder_is_an_error(tmp_path, checkpoint, capsys):
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'notes.txt').write_text('no images here')
    assert infer.main(['-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'out'), '--model', str(checkpoint)]) == 2
    assert one_line(capsys.readouterr().err) == (f'wbsr-infer: -i {tmp_path}/in: no images (.png, .jpg, .jpeg, .bmp, '
                                                 '.tif, .tiff, .webp) in this folder')


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: chmod 555, or for root a folder of a read-only file system."""
    if os.geteuid() != 0:
        folder = tmp_path / 'read_only'
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        os.close(os.open('/sys/kernel/.wbsr-write-check', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except PermissionError:
        return Path('/sys/kernel')
    except OSError:
        pass
    pytest.skip('no read-only folder for root here')


def test_bad_output_folders_are_refused_before_the_model_is_loaded(tmp_path, checkpoint, capsys, monkeypatch):
    inputs = write_images(tmp_path / 'in', ['a.png'])
    read_only = read_only_folder(tmp_path)
    monkeypatch.setattr(infer, 'load_model', lambda *a: pytest.fail('the model was loaded'))
    assert infer.main(['-i', str(inputs), '-o', str(read_only), '--model', str(checkpoint)]) == 2
    assert one_line(capsys.readouterr().err) == f'wbsr-infer: -o {read_only}: cannot write there (Permission denied)'
    (tmp_path / 'file').write_text('x')
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'file'), '--model', str(checkpoint)]) == 2
    assert one_line(capsys.readouterr().err) == f'wbsr-infer: -o {tmp_path}/file: exists and is not a folder'
    assert make_lr.main(['--hr', str(inputs), '--out', str(read_only)]) == 2
    assert one_line(capsys.readouterr().err) == (f'wbsr-make-lr: --out {read_only}: cannot write there (Permission '
                                                 'denied)')


def full_disk_for(monkeypatch, name: str) -> None:
    """``fsync`` of the temporary file of ``name`` fails with ENOSPC, as a full disk makes it fail."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith(f'.{name}.'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, 'fsync', fsync)


def test_a_full_disk_stops_the_run_naming_the_file_and_keeps_what_is_written(tmp_path, checkpoint, capsys,
                                                                             monkeypatch):
    inputs = write_images(tmp_path / 'in', ['a.png', 'b.png', 'c.png'])
    out = tmp_path / 'out'
    full_disk_for(monkeypatch, 'b.png')
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint)]) == 2
    assert one_line(capsys.readouterr().err) == (f'wbsr-infer: cannot write {out}/b.png (No space left on device); '
                                                 f'stopped, 1 of 3 images written to {out}')
    assert [p.name for p in out.iterdir()] == ['a.png'] and cv2.imread(str(out / 'a.png')).shape == (80, 96, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a CUDA GPU')
def test_asking_for_a_gpu_without_one_says_how_to_run_on_the_cpu(tmp_path, checkpoint, monkeypatch, capsys):
    inputs = write_images(tmp_path / 'in', ['a.png'])
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(checkpoint), '--device',
                       'cuda']) == 2
    assert one_line(capsys.readouterr().err) == ('wbsr-infer: --device cuda: there is no CUDA GPU on this machine; '
                                                 'run on the CPU with --device cpu')
    monkeypatch.chdir(tmp_path)
    data = write_pair_folder(tmp_path / 'data', n=1)
    opt = {'name': 'gpu', 'model_type': 'WBSRModel', 'scale': 4, 'num_gpu': 1, 'network_g': dict(TINY_NET),
           'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedImageDataset', **data,
                                   'io_backend': {'type': 'disk'}}},
           'path': {'pretrain_network_g': str(checkpoint)}, 'val': {'save_img': False}}
    (tmp_path / 'gpu.yml').write_text(yaml.safe_dump(opt))
    code, err = run_cli(runners.test_main, ['-opt', str(tmp_path / 'gpu.yml')], monkeypatch, capsys)
    assert code == 2 and err.splitlines()[-1] == (
        f'wbsr-test: {tmp_path}/gpu.yml: num_gpu is 1 but there is no CUDA GPU on this machine; to run on the CPU set '
        'num_gpu: 0 (or add --force_yml num_gpu=0)')


def test_conversions_are_noted_on_the_console_one_line_per_image(tmp_path, checkpoint, capsys):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    cv2.imwrite(str(inputs / 'deep.png'), (np.random.default_rng(0).random((20, 20, 3)) * 65535).astype(np.uint16))
    cv2.imwrite(str(inputs / 'rgba.png'), np.random.default_rng(1).integers(0, 255, (20, 20, 4), dtype=np.uint8))
    cv2.imwrite(str(inputs / 'gray.png'), np.random.default_rng(2).integers(0, 255, (20, 20), dtype=np.uint8))
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(checkpoint)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if 'FLOPs' not in line and 'written to' not in line] == [
        'deep.png: 16-bit, written as 8-bit', 'gray.png: grayscale, converted to 3 channels',
        'rgba.png: RGBA, alpha channel dropped']
    assert make_lr.main(['--hr', str(inputs), '--out', str(tmp_path / 'ds'), '--scales', '2']) == 0
    assert capsys.readouterr().err.splitlines() == [
        f'wbsr-make-lr: {inputs}/deep.png: 16-bit, written as 8-bit',
        f'wbsr-make-lr: {inputs}/gray.png: grayscale, converted to 3 channels',
        f'wbsr-make-lr: {inputs}/rgba.png: RGBA, alpha channel dropped']


# ---- 7. files are shared like any other file: the umask decides ------------------------------------------------
WRITERS = {
    'checkpoint': lambda path: torch_save({'params': {'w': torch.ones(2)}}, path),
    'training state': lambda path: torch_save({'iter': 1}, path),
    'npz (GMM, ARM table, index cache)': lambda path: save_npz(path, {'w': np.ones(2)}),
    'json': lambda path: save_json(path, {'a': 1}),
    'make-lr png': lambda path: make_lr.write_png(path, np.zeros((4, 4, 3), np.uint8)),
    'infer output': lambda path: fileio.write_bytes(path, b'png'),
}


@pytest.mark.parametrize('writer', sorted(WRITERS))
@pytest.mark.parametrize('umask,mode', [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_respect_the_umask(tmp_path, writer, umask, mode):
    old = os.umask(umask)
    try:
        WRITERS[writer](str(tmp_path / 'file'))
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE((tmp_path / 'file').stat().st_mode)) == oct(mode)
    assert [p.name for p in tmp_path.iterdir()] == ['file']  # no temporary file left


# ---- 8. second round: untrusted checkpoints, late failures, true counts ------------------------------------------
def option_file(folder: Path, stem: str, data: dict, train: bool = True, **changes) -> Path:
    """A tiny wbsr-train (or, ``train=False``, wbsr-test) option file ``<stem>.yml`` of the run ``stem``; ``changes``
    set dotted keys (``None`` removes one)."""
    opt = {'name': stem, 'model_type': 'WBSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
           'network_g': dict(TINY_NET),
           'datasets': {'train': {'name': 'tiny', 'type': 'HESPairedImageDataset', **data, 'io_backend': {'type': 'disk'},
                                  'gt_size': 32, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0,
                                  'batch_size_per_gpu': 2, 'index_cache': str(folder / 'cache')},
                        'val': {'name': 'tinyval', 'type': 'PairedImageDataset', **data, 'io_backend': {'type': 'disk'}}},
           'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
           'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.9, 0.99]},
                     'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                     'total_iter': 2, 'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
           'val': {'val_freq': 2, 'save_img': False, 'routing': {'mode': 'wbsr'},
                   'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4}}},
           'logger': {'print_freq': 1, 'save_checkpoint_freq': 1, 'use_tb_logger': False}}
    if not train:
        opt['datasets'] = {'test_1': opt['datasets']['val']}
        del opt['train']
    for key, value in changes.items():
        *parents, last = key.split('.')
        node = opt
        for parent in parents:
            node = node[parent]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = folder / f'{stem}.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """A working folder with two image pairs (20 HES candidates each), experiments/ and results/ made under it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path, write_pair_folder(tmp_path / 'data', n=2)


class CountingOpen:
    """``open`` for one module that counts the bytes read through the files it opens."""

    def __init__(self) -> None:
        self.read = 0

    def __call__(self, *args, **kwargs):
        f = open(*args, **kwargs)
        counter, real_read = self, f.read

        def read(size=-1):
            data = real_read(size)
            counter.read += len(data)
            return data

        f.read = read
        return f


def padded_png(path: Path, size: int, side: int = 10) -> Path:
    """A valid ``side`` x ``side`` PNG followed by zeros up to ``size`` bytes (a sparse file: no disk used)."""
    cv2.imwrite(str(path), textured_image(side, side, seed=3))
    os.truncate(path, size)
    return path


def test_row1_a_padded_file_is_refused_by_its_size_before_it_is_read(tmp_path, checkpoint, capsys, monkeypatch):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    padded_png(inputs / 'padded.png', 1536 << 20)  # 1.5 GiB, a 10x10 image
    from wbsr_data import pairs
    counting = CountingOpen()
    monkeypatch.setattr(pairs, 'open', counting, raising=False)
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(checkpoint),
                       '--max-pixels', '10000']) == 1
    assert (f'padded.png: skipped ({inputs}/padded.png: the file is 1536.0 MiB, more than an image of --max-pixels '
            '10000 pixels can take (64.2 MiB); not read)') in capsys.readouterr().out
    assert counting.read == 0
    assert make_lr.main(['--hr', str(inputs), '--out', str(tmp_path / 'ds'), '--max-pixels', '10000']) == 2
    assert (f'wbsr-make-lr: skipped {inputs}/padded.png: the file is 1536.0 MiB, more than an image of --max-pixels '
            '10000 pixels can take (64.2 MiB); not read') in capsys.readouterr().err
    assert counting.read == 0 and not (tmp_path / 'ds').exists()  # no image written: no dataset tree left
    assert make_lr.main(['--hr', str(inputs), '--out', str(tmp_path / 'a' / 'b'), '--max-pixels', '10000']) == 2
    assert not (tmp_path / 'a').exists()
    # within --max-pixels' bound (16777216 pixels: 320 MiB), but not within what its header declares: only the
    # header is read
    padded_png(inputs / 'padded.png', 200 << 20)
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(checkpoint)]) == 1
    assert (f'padded.png: skipped ({inputs}/padded.png: the file is 200.0 MiB, more than its declared 10x10 pixels '
            'can take (64.0 MiB); not read)') in capsys.readouterr().out
    assert 0 < counting.read < 1 << 16


def nan_checkpoint(path: Path, value: float, name: str = 'body.1.conv1.weight') -> Path:
    net = randomise(tiny_srresnet())
    with torch.no_grad():
        dict(net.named_parameters())[name].view(-1)[3] = value
    return tiny_checkpoint(path, net=net)


def test_row2_a_non_finite_weight_is_refused_at_load_and_a_non_finite_output_is_not_an_image(
        tmp_path, run_folder, capsys, monkeypatch):
    inputs = write_images(tmp_path / 'in', ['a.png', 'b.png'])
    for value in (float('nan'), float('inf')):
        ckpt = nan_checkpoint(tmp_path / 'bad.pth', value)
        assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(ckpt)]) == 2
        assert one_line(capsys.readouterr().err) == (f'wbsr-infer: {ckpt}: the weight body.1.conv1.weight has NaN or '
                                                     'infinite values; the network would output garbage')
        test_file = option_file(tmp_path, 'nan', run_folder[1], train=False, **{'path.pretrain_network_g': str(ckpt)})
        code, err = run_cli(runners.test_main, ['-opt', str(test_file)], monkeypatch, capsys)
        assert (code, one_line(err)) == (2, f'wbsr-test: {ckpt}: the weight body.1.conv1.weight has NaN or infinite '
                                         'values; the network would output garbage')
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'results').exists()
    huge = randomise(tiny_srresnet())  # finite weights whose products overflow: the output is infinite
    with torch.no_grad():
        for p in huge.parameters():
            p.fill_(1e30)
    ckpt = tiny_checkpoint(tmp_path / 'huge.pth', net=huge)
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(ckpt)]) == 1
    printed = capsys.readouterr().out
    for name in ('a.png', 'b.png'):
        assert (f'{name}: skipped (the SR output has NaN or infinite values (the network overflows on this image); '
                'nothing written)') in printed
    assert f'wbsr-infer: 0 of 2 images written to {tmp_path}/out' in printed
    assert list((tmp_path / 'out').iterdir()) == []


@pytest.mark.parametrize('change', [{'num_block': 200000, 'depths': [1, 2, 200000]},
                                    {'num_feat': 4096, 'widths': [8, 12, 4096]}])
def test_row3_checkpoint_network_options_are_compared_with_its_weights_before_anything_is_allocated(
        tmp_path, monkeypatch, change):
    ckpt = tiny_checkpoint(tmp_path / 'lying.pth', network_opt=dict(TINY_NET, **change))
    devices = []
    build = infer.build_network

    def recording_build(opt):
        devices.append(str(torch.get_default_device()))
        return build(opt)

    monkeypatch.setattr(infer, 'build_network', recording_build)
    with pytest.raises(CorruptFileError) as refused:
        infer.load_model(str(ckpt))
    state = tiny_srresnet().state_dict()
    assert str(refused.value) == (f"{ckpt}: its 'wbsr' entry: its network options describe a network larger than its "
                                  f'weights ({len(state)} tensors, {sum(v.numel() for v in state.values())} values)')
    assert devices == ['meta']  # stopped while being built on the meta device: nothing was allocated


def test_row3_a_network_that_does_not_fit_is_refused_before_it_is_built_for_real(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / 'other.pth', network_opt=dict(TINY_NET, num_block=5, depths=[1, 2, 5]))
    devices = []
    build = infer.build_network
    monkeypatch.setattr(infer, 'build_network',
                        lambda opt: devices.append(str(torch.get_default_device())) or build(opt))
    with pytest.raises(CorruptFileError, match=r"its weights do not match its own network options: Missing key\(s\) "
                       r'in state_dict: "body.4.conv1.weight"'):
        infer.load_model(str(ckpt))
    assert devices == ['meta']


WRONG_TYPES = [
    ({'val.routing': {'mode': 'budget', 'budget': '0.5'}}, "val.routing.budget must be a finite number, got '0.5'"),
    ({'val.routing': {'mode': 'fixed', 'subnet': '1'}}, "val.routing.subnet must be an integer >= 0, got '1'"),
    ({'val.routing': {'mode': 'wbsr', 'tile_size': 1.5}}, 'val.routing.tile_size must be an integer >= 1, got 1.5'),
    ({'val.routing': {'mode': 'wbsr', 'tile_size': '32'}}, "val.routing.tile_size must be an integer >= 1, got '32'"),
    ({'train.optim_g.lr': '2e-4'}, "train.optim_g.lr must be a finite number >= 0, got the string '2e-4' (YAML reads "
     'a number like 2e-4 without a dot as text: write 2.0e-4)'),
    ({'train.optim_g.betas': [0.9, '0.99']}, "train.optim_g.betas[1] must be a finite number in [0, 1), got the string "
     "'0.99' (remove the quotes)"),
    ({'train.total_iter': 2.5}, 'train.total_iter must be an integer >= 1, got 2.5'),
    ({'train.scheduler.milestones': ['100']}, "train.scheduler.milestones[0] must be an integer >= 0, got the string "
     "'100' (remove the quotes)"),
    ({'train.wbsr': {'distill': float('nan')}}, 'train.wbsr.distill must be a finite number, got nan'),
    ({'train.wbsr': {'tile_size': 2}}, 'train.wbsr.tile_size must be an integer >= 3, got 2'),
    ({'manual_seed': 'abc'}, "manual_seed must be an integer >= 0, got 'abc'"),
    ({'datasets.train.batch_size_per_gpu': 2.0}, 'datasets.train.batch_size_per_gpu must be an integer >= 1, got 2.0'),
    ({'datasets.train.gt_size': '32'}, "datasets.train.gt_size must be an integer >= 1, got the string '32' (remove "
     'the quotes)'),
    ({'datasets.train.delta': True}, 'datasets.train.delta must be a finite number in (0, 1], got True'),
    ({'val.val_freq': 5000.5}, 'val.val_freq must be an integer >= 1, got 5000.5'),
    ({'network_g.num_feat': '16'}, "network_g.num_feat must be an integer >= 0, got the string '16' (remove the "
     'quotes)'),
    ({'network_g.num_fet': 16}, 'network_g.num_fet: not an option of WBSRSRResNet (did you mean num_feat?); its '
     'options: num_in_ch, num_out_ch, num_feat, num_block, upscale, widths, depths, tile_executor'),
    ({'val.routing': {'mode': 'alpha', 'alpha': float('inf')}}, 'val.routing.alpha must be a finite number, got inf'),
    ({'name': '../elsewhere'}, "name '../elsewhere': a path separator (or . / ..) in a name would write outside its "
     'folder'),
]


@pytest.mark.parametrize('changes,message', WRONG_TYPES, ids=[next(iter(c)) for c, _ in WRONG_TYPES])
def test_row4_numbers_of_the_wrong_type_are_refused_at_start_up(run_folder, monkeypatch, capsys, changes, message):
    folder, data = run_folder
    path = option_file(folder, 'typed', data, **changes)
    code, err = run_cli(runners.train_main, ['-opt', str(path)], monkeypatch, capsys)
    assert (code, one_line(err)) == (2, f'wbsr-train: {path}: {message}')
    assert not (folder / 'experiments').exists()  # refused before BasicSR made any folder


NETWORK_DEPENDENT = [
    ({'mode': 'budget', 'budget': 1e-9}, "val.routing.budget=1e-09 is below the cheapest subnet's cost share 0.235; "
     'no allocation can meet it'),
    ({'mode': 'calibrated', 'budget': 0.6}, 'val.routing.mode calibrated needs the measured error of every subnet on '
     'every difficulty class in the checkpoint (run wbsr-calibrate on it)'),
    ({'mode': 'fixed', 'subnet': 99}, 'val.routing.subnet=99 out of range 0..8'),
    ({'mode': 'wbsr', 'tile_size': 2}, 'val.routing.tile_size 2: regions under 3x3 LR pixels have no gradient, so wbsr '
     'mode would give every one the cheapest subnet; use 3 or more'),
]


@pytest.mark.parametrize('routing,message', NETWORK_DEPENDENT, ids=[r['mode'] for r, _ in NETWORK_DEPENDENT])
def test_row5_what_depends_on_the_network_is_refused_before_training(run_folder, monkeypatch, capsys, routing,
                                                                      message):
    folder, data = run_folder
    path = option_file(folder, 'routed', data, **{'val.routing': routing})
    code, err = run_cli(runners.train_main, ['-opt', str(path)], monkeypatch, capsys)
    assert (code, one_line(err)) == (2, f'wbsr-train: {path}: {message}')
    assert not (folder / 'experiments').exists()


def test_row5_basicsr_train_gets_the_same_refusal_from_the_model(tmp_path):
    """Under ``basicsr/train.py`` the model itself builds the router against the network at start-up."""
    opt = model_options(tmp_path, write_pair_folder(tmp_path / 'data', n=1))
    opt['val']['routing'] = {'mode': 'fixed', 'subnet': 99}
    with pytest.raises(ValueError, match=r'^val.routing.subnet=99 out of range 0..8$'):
        build_model(opt)


def test_row6_a_training_set_that_fills_no_batch_refuses_to_start(tmp_path, run_folder, monkeypatch, capsys,
                                                                   basicsr_log):
    folder, _ = run_folder
    one = write_pair_folder(folder / 'one', n=1, size=(64, 64))  # 3 x 3 crops of 32 at stride 16: 9 candidates
    path = option_file(folder, 'small', one, **{'datasets.train.batch_size_per_gpu': 16})
    code, err = run_cli(runners.train_main, ['-opt', str(path)], monkeypatch, capsys)
    assert (code, one_line(err)) == (2, f'wbsr-train: {path}: datasets.train: 9 candidate patches make no batch of '
                                     'batch_size_per_gpu=16 (the last, incomplete batch is dropped, so no training '
                                     'step would run); lower batch_size_per_gpu or add images')
    assert not (folder / 'experiments').exists()
    opt = model_options(tmp_path, one)  # basicsr/train.py: the model warns, and refuses to save an untrained latest
    opt['datasets']['train']['batch_size_per_gpu'] = 16
    model = build_model(opt)
    assert ('datasets.train: 9 candidate patches (1 images) make no batch of batch_size_per_gpu=16'
            in basicsr_log.text)
    with pytest.raises(ValueError, match=r'^the run ends without a training step \(datasets.train fills no batch of '
                       r'batch_size_per_gpu\); the untrained network is not saved as net_g_latest.pth$'):
        model.save(epoch=-1, current_iter=-1)  # what basicsr/train.py calls at "End of training"
    assert list(Path(opt['path']['models']).iterdir()) == []
    from basicsr.data import build_dataset  # basicsr/train.py builds the training set before its loop: refused there
    with pytest.raises(ValueError, match=r'^datasets.train: 9 candidate patches make no batch of batch_size_per_gpu=16'):
        build_dataset(dict(opt['datasets']['train'], phase='train'))


def test_row7_a_second_run_with_the_same_name_refuses_to_start_and_archives_nothing(run_folder, monkeypatch,
                                                                                     capsys):
    from wbsr_models.checks import RunLockedError, lock_run_folder
    folder, data = run_folder
    running = folder / 'experiments' / 'same'
    (running / 'models').mkdir(parents=True)
    (running / 'models' / 'net_g_1.pth').write_bytes(b'the first run is writing here')
    holder = subprocess.Popen([sys.executable, '-c', LOCK_HOLDER, str(folder / 'experiments' / '.same.lock')],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        path = option_file(folder, 'same', data)
        code, err = run_cli(runners.train_main, ['-opt', str(path)], monkeypatch, capsys)
        assert (code, one_line(err)) == (2, f'wbsr-train: {running} is in use by another run (process {holder.pid}): '
                                         'wait for it to end, or give this run another name')
        assert sorted(p.name for p in (folder / 'experiments').iterdir()) == ['.same.lock', 'same']
        assert (running / 'models' / 'net_g_1.pth').read_bytes() == b'the first run is writing here'
    finally:
        holder.kill()
        holder.wait()
    lock = lock_run_folder(str(running))  # a killed run's lock does not block: the kernel released it
    try:
        with pytest.raises(RunLockedError, match=f'^{running} is in use by another run \\(process {os.getpid()}\\)'):
            lock_run_folder(str(running))
    finally:
        lock.release()


@needs_hook
def test_basicsr_own_scripts_refuse_at_start_up_in_one_line_and_write_nothing(run_folder):
    """``python -m basicsr.train`` / ``basicsr.test`` on a WBSR option file run wbsr-train's start-up checks and lock
    (rows 4, 6, 7, 11 through BasicSR's own scripts): one line naming the file, exit 2, no folder made or archived."""
    folder, data = run_folder
    one = write_pair_folder(folder / 'one', n=1, size=(64, 64))
    cases = [('basicsr.train', option_file(folder, 'typed', data, **{'val.routing': {'mode': 'budget', 'budget': '0.5'}}),
              "val.routing.budget must be a finite number, got '0.5'"),
             ('basicsr.train', option_file(folder, 'small', one, **{'datasets.train.batch_size_per_gpu': 16}),
              'datasets.train: 9 candidate patches make no batch of batch_size_per_gpu=16'),
             ('basicsr.test', option_file(folder, 'noweights', data, train=False),
              'path.pretrain_network_g is not set: a test run would evaluate an untrained network')]
    env = {k: v for k, v in os.environ.items() if k != wbsr_hook.ENV_DISABLE}
    for module, path, message in cases:
        done = subprocess.run([sys.executable, '-m', module, '-opt', path.name], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        script = module.replace('.', '/') + '.py'
        assert done.returncode == 2 and 'Traceback' not in done.stderr, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()  # runpy's warning about BasicSR's layout is filtered out
        assert len(lines) == 1 and lines[0].startswith(f'{script}: {path.name}: {message}'), done.stderr
        assert not (folder / 'experiments').exists() and not (folder / 'results').exists()
    running = folder / 'experiments' / 'same'
    (running / 'models').mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, '-c', LOCK_HOLDER, str(folder / 'experiments' / '.same.lock')],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        done = subprocess.run([sys.executable, '-m', 'basicsr.train', '-opt', str(option_file(folder, 'same', data))],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            f'basicsr/train.py: {running} is in use by another run (process {holder.pid}): wait for it to end, or '
            'give this run another name']
        assert sorted(p.name for p in (folder / 'experiments').iterdir()) == ['.same.lock', 'same']
    finally:
        holder.kill()
        holder.wait()
    assert runners.names_wbsr_type({'network_g': {'type': 'MSRResNet'}, 'train': {'pixel_opt': {'type': 'BDLoss'}}})
    assert not runners.names_wbsr_type({'model_type': 'SRModel', 'network_g': {'type': 'MSRResNet'},
                                        'datasets': {'train': {'type': 'PairedImageDataset'}}})


LOCK_HOLDER = '''import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b'%d\\n' % os.getpid())
print('locked', flush=True)
time.sleep(600)
'''


@pytest.mark.parametrize('flags,message', [
    (['--alpha', 'inf'], '--alpha must be a finite number, got inf'),
    (['--alpha', 'nan'], '--alpha must be a finite number, got nan'),
    (['--alpha', '1e300'], '--alpha must be at most 1e+06, got 1e+300 (a larger value changes nothing but can '
     'overflow the allocation)'),
    (['--budget', 'nan'], '--budget must be a finite number, got nan'),
    (['--mode', 'arm', '--arm-eta', '1e308', '--arm-lut', 'x.npz'], '--arm-eta must be at most 1e+06, got 1e+308 (a '
     'larger value changes nothing but can overflow the allocation)'),
    (['--max-loss', '1e300'], '--max-loss must be at most 100, got 1e+300 (a larger value changes nothing but can '
     'overflow the allocation)'),
    (['--slope', '1e300'], '--slope must be at most 1e+06, got 1e+300 (a larger value changes nothing but can '
     'overflow the allocation)'),
    (['--slope', '0'], '--slope must be > 0, got 0.0'),
    (['--mode', 'calibrated'], '--mode calibrated: calibrated mode takes exactly one of --budget and --slope'),
])
def test_row8_trade_offs_must_be_finite_and_bounded(tmp_path, checkpoint, capsys, flags, message):
    inputs = write_images(tmp_path / 'in', ['a.png'])
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(checkpoint)] + flags) == 2
    assert one_line(capsys.readouterr().err) == f'wbsr-infer: {message}'
    assert not (tmp_path / 'out').exists()


def test_row9_calibrate_checks_its_flags_and_output_before_any_work(tmp_path, checkpoint, capsys, monkeypatch):
    from wbsr_models import calibrate
    data = write_pair_folder(tmp_path / 'data', n=1)
    read_only = read_only_folder(tmp_path)
    common = ['--model', str(checkpoint), '--data', str(Path(data['dataroot_gt']).parent)]
    refusals = [
        (['--out', str(tmp_path)], f'--out {tmp_path}: is a folder; give the file to write'),
        (['--out', str(read_only / 'x.pth')], f'--out {read_only}/x.pth: cannot write into {read_only} (Permission '
         'denied)'),
        (['--out', str(tmp_path / 'o.pth'), '--tile-size', '0'], '--tile-size must be >= 3, got 0 (regions under 3x3 LR '
         'pixels have no gradient to classify them by)'),
        (['--out', str(tmp_path / 'o.pth'), '--images', '-1'], '--images must be >= 1, got -1'),
        (['--out', str(tmp_path / 'o.pth'), '--epochs', '0'], '--epochs must be >= 1, got 0'),
        (['--out', str(tmp_path / 'o.pth'), '--transforms', '9'], '--transforms must be in 1..8, got 9'),
        (['--out', str(tmp_path / 'o.pth'), '--quality-only', '--predictor'], "--quality-only keeps the checkpoint's "
         'predictor: use it without --predictor, with --scheme tiles'),
    ]
    real_load = calibrate.__dict__.get('load_model')
    monkeypatch.setattr('wbsr_models.infer.load_model', lambda *a, **k: pytest.fail('the model was loaded'))
    for flags, message in refusals:
        assert calibrate.main(common + flags) == 2
        assert one_line(capsys.readouterr().err) == f'wbsr-calibrate: {message}'
    monkeypatch.undo()
    assert real_load is None
    plain = tmp_path / 'plain.pth'
    torch_save({'params': tiny_srresnet().state_dict()}, str(plain))
    assert calibrate.main(['--model', str(plain), '--data', common[3], '--out', str(tmp_path / 'o.pth')]) == 2
    assert one_line(capsys.readouterr().err) == (
        f'wbsr-calibrate: {plain}: no network options inside (not written by WBSRModel); wbsr-calibrate needs a '
        'checkpoint written by WBSRModel (network options and difficulty thresholds)')
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == '.pth') == ['plain.pth']


def test_row10_inspect_checks_its_count_and_output_before_building_the_index(run_folder, capsys, monkeypatch):
    from wbsr_data import inspect as hes_inspect
    folder, data = run_folder
    path = option_file(folder, 'inspect', data)
    (folder / 'file').write_text('x')
    read_only = read_only_folder(folder)
    monkeypatch.setattr(hes_inspect, 'load_or_build_index', lambda *a: pytest.fail('the index was built'))
    refusals = [
        (['--per-class', '-1'], '--per-class must be in 1..256, got -1'),
        (['--per-class', '100000'], '--per-class must be in 1..256, got 100000'),
        (['--out', str(folder / 'file')], f'--out {folder}/file: exists and is not a folder'),
        (['--out', str(read_only)], f'--out {read_only}: cannot write there (Permission denied)'),
    ]
    for flags, message in refusals:
        assert hes_inspect.main(['-opt', str(path)] + flags) == 2
        assert one_line(capsys.readouterr().err) == f'wbsr-inspect: {message}'
    bad = option_file(folder, 'inspect_bad', data, **{'datasets.train.gt_size': '32'})
    assert hes_inspect.main(['-opt', str(bad)]) == 2
    assert one_line(capsys.readouterr().err) == (f"wbsr-inspect: {bad}: datasets.train.gt_size must be an integer >= "
                                                 "1, got the string '32' (remove the quotes)")
    assert not (folder / 'hes_inspect').exists()


def test_row10_the_contact_sheet_is_as_wide_as_the_largest_class(run_folder, capsys):
    from wbsr_data import inspect as hes_inspect
    folder, data = run_folder
    path = option_file(folder, 'sheet', data)
    assert hes_inspect.main(['-opt', str(path), '--out', str(folder / 'o'), '--per-class', '256']) == 0
    counts = hes_inspect.load_or_build_index(hes_inspect.train_dataset_options(str(path))).class_counts()
    assert len(counts) == 10 and counts.sum() == 40 and 4 <= counts.max() < 10
    sheet = cv2.imread(str(folder / 'o' / 'hes_classes.png'))
    assert sheet.shape[1] == 90 + counts.max() * 100 + 4  # as many columns as the largest class, not 256


def test_row11_and_row12_a_test_run_needs_weights_and_names_without_separators(run_folder, checkpoint, monkeypatch,
                                                                               capsys, basicsr_log):
    folder, data = run_folder
    cases = [
        ({}, 'path.pretrain_network_g is not set: a test run would evaluate an untrained network; name the checkpoint '
         'to test'),
        ({'path.pretrain_network_g': str(checkpoint), 'val.suffix': '../../evil'},
         "val.suffix '../../evil': a path separator (or . / ..) in a name would write outside its folder"),
        ({'path.pretrain_network_g': str(checkpoint), 'datasets.test_1.name': 'a/b'},
         "datasets.test_1.name 'a/b': a path separator (or . / ..) in a name would write outside its folder"),
        ({'path.pretrain_network_g': str(checkpoint), 'val.save_img': True},
         'val.suffix is missing: with val.save_img a test run names every saved image with it (BasicSR looks it up '
         'at the first image); set it, or suffix: ~ for none'),
    ]
    for changes, message in cases:
        path = option_file(folder, 'tested', data, train=False, **changes)
        code, err = run_cli(runners.test_main, ['-opt', str(path)], monkeypatch, capsys)
        assert (code, one_line(err)) == (2, f'wbsr-test: {path}: {message}')
    assert not (folder / 'results').exists()
    build_model(model_options(folder, data, is_train=False))  # basicsr/test.py: the model says so in the log
    assert 'path.pretrain_network_g is not set: this test model has untrained weights' in basicsr_log.text


def test_row13_a_removed_output_folder_stops_the_run_and_counts_are_true(tmp_path, checkpoint, capsys, monkeypatch):
    inputs = write_images(tmp_path / 'in', ['a.png', 'b.png', 'c.png'])
    out = tmp_path / 'out'
    call = infer.Router.__call__

    def routed(router, lq, *args):
        if out.exists() and len(list(out.iterdir())) == 1:  # the second image: someone removes the folder
            shutil.rmtree(out)
        return call(router, lq, *args)

    monkeypatch.setattr(infer.Router, '__call__', routed)
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint)]) == 2
    assert one_line(capsys.readouterr().err) == (f'wbsr-infer: the output folder {out} was removed during the run; '
                                                 'stopped, 1 of 3 images had been written to it')
    assert not out.exists()  # not made again
    monkeypatch.undo()
    full_disk_for(monkeypatch, 'b_alloc.png')  # the map of the second image cannot be written
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint), '--save-map']) == 2
    assert one_line(capsys.readouterr().err) == (f'wbsr-infer: cannot write {out}/b_alloc.png (No space left on '
                                                 f'device); stopped, 1 of 3 images written to {out}')
    assert sorted(p.name for p in out.iterdir()) == ['a.png', 'a_alloc.png']  # b.png is not there without its map


def test_row13_make_lr_stops_when_an_output_folder_is_removed(tmp_path, capsys, monkeypatch):
    hr = write_images(tmp_path / 'hr', ['a.png', 'b.png'], size=(24, 24))
    out = tmp_path / 'ds'
    bicubic = make_lr.bicubic_lr

    def removing(img, scale):
        if (out / 'HR' / 'a.png').exists():
            shutil.rmtree(out / 'LR_bicubic')
        return bicubic(img, scale)

    monkeypatch.setattr(make_lr, 'bicubic_lr', removing)
    assert make_lr.main(['--hr', str(hr), '--out', str(out), '--scales', '2']) == 2
    assert one_line(capsys.readouterr().err) == (f'wbsr-make-lr: cannot write {out}/LR_bicubic/X2/b.png (its folder was '
                                                 'removed during the run); stopped, the 1 images written before are '
                                                 'complete')
    assert sorted(p.name for p in (out / 'HR').iterdir()) == ['a.png'] and not (out / 'LR_bicubic').exists()


def test_write_files_is_all_or_nothing_when_a_rename_fails(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if dst.endswith('second.png'):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(OSError) as failed:
        fileio.write_files({str(tmp_path / 'first.png'): b'1', str(tmp_path / 'second.png'): b'2'})
    assert failed.value.filename == str(tmp_path / 'second.png')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('entry,reason', [
    ({'axis': [float('nan'), 0.5, 0.5, 0.5]}, "the difficulty projection's mean and axis must be finite, the axis not "
     'zero'),
    ({'score_range': [float('nan'), 1.0]}, 'the difficulty score range must be finite and ordered, got (nan, 1.0)'),
    ({'score_range': [2.0, 1.0]}, 'the difficulty score range must be finite and ordered, got (2.0, 1.0)'),
])
def test_row14_damaged_thresholds_are_refused_by_infer_and_test(tmp_path, run_folder, monkeypatch, capsys, entry,
                                                                 reason):
    ckpt = tiny_checkpoint(tmp_path / 'thresholds.pth')
    saved = torch.load(str(ckpt), weights_only=True)
    saved['wbsr']['difficulty'].update(entry)
    torch_save(saved, str(ckpt))
    inputs = write_images(tmp_path / 'in', ['a.png'])
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(ckpt)]) == 2
    assert one_line(capsys.readouterr().err) == f'wbsr-infer: {ckpt}: bad difficulty thresholds ({reason})'
    path = option_file(tmp_path, 'thresholds', run_folder[1], train=False, **{'path.pretrain_network_g': str(ckpt)})
    code, err = run_cli(runners.test_main, ['-opt', str(path)], monkeypatch, capsys)
    assert (code, one_line(err)) == (2, f'wbsr-test: {ckpt}: {reason}')
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'results').exists()


def test_row15_fit_gmm_names_an_image_too_small_for_the_blur(tmp_path, capsys):
    fit_gmm = importlib.import_module('wbsr_losses.fit_gmm')  # the package exports a function of that name
    data = write_pair_folder(tmp_path / 'data', n=1)
    cv2.imwrite(str(Path(data['dataroot_gt']) / 'thin.png'), textured_image(2, 48, seed=1)[:1])  # 48 wide, 1 tall
    cv2.imwrite(str(Path(data['dataroot_lq']) / 'thin.png'), textured_image(2, 12, seed=1)[:1])
    opt = {'datasets': {'train': {'name': 't', 'type': 'HESPairedImageDataset', **data, 'io_backend': {'type': 'disk'},
                                  'gt_size': 32}},
           'train': {'pixel_opt': {'type': 'BDLoss', 'num_components': 2, 'gmm_pixels': 500}}}
    (tmp_path / 'gmm.yml').write_text(yaml.safe_dump(opt))
    assert fit_gmm.main(['-opt', str(tmp_path / 'gmm.yml'), '--out', str(tmp_path / 'g.npz')]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"wbsr-fit-gmm: error: {data['dataroot_gt']}/thin.png: 48x1 is too small for the detail label space "
        '(blur_sigma=1.5 needs more than 5 pixels a side); remove it or use label_space: rgb')
    for flags, message in ((['--out', str(tmp_path)], f'--out {tmp_path}: is a folder; give the file to write'),
                           (['--components', '0'], '--components must be >= 1, got 0')):
        assert fit_gmm.main(['-opt', str(tmp_path / 'gmm.yml')] + flags) == 2
        assert one_line(capsys.readouterr().err) == f'wbsr-fit-gmm: error: {message}'
    opt['train']['pixel_opt']['num_components'] = '2'
    (tmp_path / 'gmm.yml').write_text(yaml.safe_dump(opt))
    assert fit_gmm.main(['-opt', str(tmp_path / 'gmm.yml')]) == 2
    assert one_line(capsys.readouterr().err) == (f"wbsr-fit-gmm: error: {tmp_path}/gmm.yml: train.pixel_opt."
                                                 "num_components must be an integer >= 1, got the string '2' (remove "
                                                 'the quotes)')
    assert not (tmp_path / 'g.npz').exists()


def test_row15_empty_and_thin_training_images_are_refused_before_the_fit_and_before_training(run_folder,
                                                                                               monkeypatch, capsys):
    """An empty GT image stops wbsr-fit-gmm before the fit (its header check), and wbsr-train with a BDLoss fitted at
    start-up checks the GT sizes for the blur before BasicSR makes the experiment folder or the index cache."""
    fit_gmm = importlib.import_module('wbsr_losses.fit_gmm')
    folder, data = run_folder
    gt, lq = Path(data['dataroot_gt']), Path(data['dataroot_lq'])
    (gt / 'empty.png').write_bytes(b'')
    (lq / 'empty.png').write_bytes(b'')
    opt = {'datasets': {'train': {'name': 't', 'type': 'HESPairedImageDataset', **data, 'io_backend': {'type': 'disk'},
                                  'gt_size': 32}},
           'train': {'pixel_opt': {'type': 'BDLoss', 'num_components': 2, 'gmm_pixels': 500}}}
    (folder / 'gmm.yml').write_text(yaml.safe_dump(opt))
    monkeypatch.setattr(fit_gmm, 'fit_gmm', lambda *a, **k: pytest.fail('the fit started'))
    assert fit_gmm.main(['-opt', str(folder / 'gmm.yml'), '--out', str(folder / 'g.npz')]) == 2
    assert one_line(capsys.readouterr().err) == f'wbsr-fit-gmm: error: {gt}/empty.png: empty file, not an image'
    (gt / 'empty.png').unlink()
    (lq / 'empty.png').unlink()
    cv2.imwrite(str(gt / 'thin.png'), textured_image(4, 48, seed=1)[:4])  # 48 x 4: under the blur's 5 pixels
    cv2.imwrite(str(lq / 'thin.png'), textured_image(1, 12, seed=1)[:1])
    path = option_file(folder, 'bdthin', data, **{'train.pixel_opt': {'type': 'BDLoss', 'gmm_pixels': 500}})
    code, err = run_cli(runners.train_main, ['-opt', str(path)], monkeypatch, capsys)
    assert (code, one_line(err)) == (2, f'wbsr-train: {path}: {gt}/thin.png: 48x4 is too small for the detail label '
                                        'space (blur_sigma=1.5 needs more than 5 pixels a side); remove it or use '
                                        'label_space: rgb')
    assert not (folder / 'experiments').exists() and not (folder / 'cache').exists()


def test_row16_a_killed_write_leaves_a_temporary_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / 'net_calibrated.pth'
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()  # its process id now names no running writer
    alive = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    try:
        host = fileio._HOST
        killed = tmp_path / f'.{target.name}.{dead.pid}-{host}-0123abcd.tmp'
        killed.write_bytes(b'x' * 4096)
        killed_save = tmp_path / f'.{target.name}.{dead.pid}-{host}-4567abcd.tmp'  # a BasicSR save's folder
        (killed_save / 'inner').mkdir(parents=True)
        writing = tmp_path / f'.{target.name}.{alive.pid}-{host}-89abcdef.tmp'  # a write in progress elsewhere
        writing.write_bytes(b'y')
        other_host = tmp_path / f'.{target.name}.{dead.pid}-ffffff-00000000.tmp'
        other_host.write_bytes(b'z')
        old = tmp_path / f'.{target.name}.a1b2c3d4.tmp'  # an earlier version's name, untouched for two hours
        old.write_bytes(b'w')
        os.utime(old, (os.path.getmtime(old) - 7200,) * 2)
        torch_save({'params': {}}, str(target))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, writing.name, other_host.name])
    finally:
        alive.kill()
        alive.wait()


def animated(path: Path, fmt: str, frames: int = 3) -> Path:
    images = [Image.fromarray(textured_image(12, 10, seed=i)) for i in range(frames)]
    images[0].save(str(path), format=fmt, save_all=True, append_images=images[1:])
    return path


def test_row17_animations_and_pages_are_refused_and_tiles_need_three_pixels(tmp_path, checkpoint, capsys):
    inputs = write_images(tmp_path / 'in', ['still.png'])
    animated(inputs / 'anim.webp', 'WEBP')
    animated(inputs / 'pages.tiff', 'TIFF', frames=2)
    animated(inputs / 'apng.png', 'PNG')
    out = tmp_path / 'out'
    assert infer.main(['-i', str(inputs), '-o', str(out), '--model', str(checkpoint)]) == 1
    printed = capsys.readouterr().out
    for name, frames, fmt in (('anim.webp', 3, 'WEBP'), ('pages.tiff', 2, 'TIFF'), ('apng.png', 3, 'PNG')):
        assert (f'{name}: skipped ({inputs}/{name}: {frames} frames (an animation or a multi-page {fmt} file); only '
                'single-frame images are read, not the first frame of several)') in printed
    assert sorted(p.name for p in out.iterdir()) == ['still.png']
    assert make_lr.main(['--hr', str(inputs), '--out', str(tmp_path / 'ds'), '--scales', '2']) == 1
    assert f'wbsr-make-lr: skipped {inputs}/anim.webp: 3 frames' in capsys.readouterr().err
    common = ['-i', str(inputs / 'still.png'), '-o', str(tmp_path / 'o2'), '--model', str(checkpoint)]
    for flags, message in ((['--tile-size', '1'], '--tile-size 1: regions under 3x3 LR pixels have no gradient, so '
                             'wbsr mode would give every one the cheapest subnet; use 3 or more'),
                           (['--tile-size', '2', '--budget', '0.6'], '--tile-size 2: regions under 3x3 LR pixels have '
                            'no gradient, so budget mode would give every one the cheapest subnet; use 3 or more'),
                           (['--scheme', 'patches', '--patch-size', '2', '--step', '1'], '--patch-size 2: regions '
                            'under 3x3 LR pixels have no gradient, so wbsr mode would give every one the cheapest '
                            'subnet; use 3 or more')):
        assert infer.main(common + flags) == 2
        assert one_line(capsys.readouterr().err) == f'wbsr-infer: {message}'
    assert not (tmp_path / 'o2').exists()
    assert infer.main(common + ['--tile-size', '2', '--mode', 'full']) == 0  # one subnet on the whole image: fine


def test_an_output_name_longer_than_the_file_system_takes_is_refused_before_any_work(tmp_path, checkpoint, capsys):
    inputs = write_images(tmp_path / 'in', ['a.png'])
    suffix = 'x' * 240
    assert infer.main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', str(checkpoint), '--suffix',
                       suffix]) == 2
    assert one_line(capsys.readouterr().err) == (f'wbsr-infer: {tmp_path}/out/a{suffix}.png: the file name is longer '
                                                 'than 225 bytes; use a shorter --suffix')
    assert not (tmp_path / 'out').exists()


# ---- 9. the classes of rows 1, 13 and 17 in every reader and writer ----------------------------------------------
def test_test_sets_with_a_padded_or_animated_image_are_refused_by_name_before_the_run(run_folder, checkpoint,
                                                                                      monkeypatch, capsys):
    """BasicSR's PairedImageDataset reads whole files and keeps an animation's first frame: wbsr-test and wbsr-train
    check every file's size and header first (training set included); wbsr-calibrate's reader bounds its reads."""
    folder, data = run_folder
    lq = Path(data['dataroot_lq']) / 'img001.png'
    padded_png(lq, 200 << 20, side=20)  # a 20x20 image in a 200 MiB (sparse) file
    path = option_file(folder, 'padded', data, train=False, **{'path.pretrain_network_g': str(checkpoint)})
    code, err = run_cli(runners.test_main, ['-opt', str(path)], monkeypatch, capsys)
    assert (code, one_line(err)) == (2, f'wbsr-test: {path}: {lq}: the file is 200.0 MiB, more than its declared '
                                        '20x20 pixels can take (64.0 MiB); not read')
    animated(lq, 'PNG')
    code, err = run_cli(runners.test_main, ['-opt', str(path)], monkeypatch, capsys)
    assert (code, one_line(err)) == (2, f'wbsr-test: {path}: {lq}: 3 frames (an animation or a multi-page PNG '
                                        'file); only single-frame images are read, not the first frame of several')
    assert not (folder / 'results').exists()
    path = option_file(folder, 'animtrain', data)  # the training set: checked before BasicSR makes experiments/
    code, err = run_cli(runners.train_main, ['-opt', str(path)], monkeypatch, capsys)
    assert (code, one_line(err)) == (2, f'wbsr-train: {path}: {lq}: 3 frames (an animation or a multi-page PNG '
                                        'file); only single-frame images are read, not the first frame of several')
    assert not (folder / 'experiments').exists() and not (folder / 'cache').exists()
    from wbsr_models.evaluation import read_rgb_tensor
    padded_png(lq, 200 << 20, side=20)
    with pytest.raises(ValueError, match='the file is 200.0 MiB, more than its declared 20x20 pixels'):
        read_rgb_tensor(str(lq))


def test_a_failed_checkpoint_write_is_an_os_error_naming_the_file_and_leaves_the_target(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError of its zip writer; the atomic write turns it into an OSError
    naming the target (one line from every command), removes its temporary file and leaves the target as it was."""
    target = tmp_path / 'net.pth'
    torch_save({'a': torch.zeros(2)}, str(target))
    before = target.read_bytes()

    def full(obj, f):
        Path(f).write_bytes(b'partial')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 16128 vs 16016')

    monkeypatch.setattr(torch, 'save', full)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError) as caught:
        torch_save({'a': torch.ones(2)}, str(target))
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    assert runners._error_line(caught.value) == f'{target}: No space left on device'
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['net.pth']
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(1 << 30, 0, 1 << 30))
    with pytest.raises(OSError, match=r'cannot write \(\[enforce fail at inline_container.cc:672\]'):
        torch_save({'a': torch.ones(2)}, str(target))


def test_make_lr_leaves_no_empty_dataset_tree_when_every_image_is_refused(tmp_path, capsys):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    padded_png(inputs / 'padded.png', 1536 << 20)
    assert make_lr.main(['--hr', str(inputs), '--out', str(tmp_path / 'ds'), '--max-pixels', '10000']) == 2
    assert 'padded.png: the file is 1536.0 MiB' in capsys.readouterr().err
    assert not (tmp_path / 'ds').exists()  # the call made it: removed with the rest
    (tmp_path / 'mine').mkdir()  # a folder that was there before stays, empty as it was
    assert make_lr.main(['--hr', str(inputs), '--out', str(tmp_path / 'mine'), '--max-pixels', '10000']) == 2
    assert sorted(p.name for p in (tmp_path / 'mine').iterdir()) == []
