"""``wbsr-infer``: upscale an image or a folder with a WBSR checkpoint through the dynamic-inference router.

    wbsr-infer -i inputs -o results --model net_g_latest.pth --budget 0.6 --save-map

The network is rebuilt from the checkpoint's own ``'wbsr'`` entry (network options, scale, difficulty
thresholds); for a plain BasicSR checkpoint pass the option file it was trained with (``-opt``). One line
per image gives the FLOPs (against the full network on the same patches, and run once on the whole image)
and the seconds.

Hostile input is refused with one line naming the file or flag, before any work where it can be: an output
folder that holds an input, two inputs that would be written under one name, a folder that cannot be
written, a corrupt checkpoint or option file, a checkpoint whose network options do not fit its weights (compared
before the network is built) or whose weights are not finite, flags that do not fit the mode or the network, a
missing GPU. Inside a folder, one bad image (unreadable, larger than ``--max-pixels`` by its header or by its file
size, an animation, out of memory, an SR output that is not finite) is skipped by name and the others are written;
the EXIF orientation is applied as image viewers apply it. An image counts as written when all its files are; an
output folder removed during the run stops it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.archs import build_network  # noqa: E402

import wbsr_models  # noqa: E402,F401  (registration)
from wbsr_data.difficulty import DifficultyProjection  # noqa: E402
from wbsr_data.fileio import (NAME_MAX, CorruptFileError, ensure_writable_dir, first_line, torch_load,  # noqa: E402
                              write_files)
from wbsr_data.make_lr import IMAGE_EXTENSIONS, encode_png, list_images, output_collisions  # noqa: E402
from wbsr_data.pairs import (FileTooLargeError, ImageFileError, ImageTooLargeError, decode_image,  # noqa: E402,F401
                             read_image_file)  # decode_image: re-exported

from .evaluation import keep_freed_memory  # noqa: E402
from .baselines import ArmTable  # noqa: E402
from .router import Router, RoutingOptions  # noqa: E402
from .routing.artefacts import RoutingArtefacts  # noqa: E402
from .routing.modes import MODES, OPTIONS, modes_reading  # noqa: E402
from .visualize import allocation_map, subnet_labels  # noqa: E402
from .checks import (OptionFileError, UsageError, check_finite_weights, check_network_fits,  # noqa: E402,F401
                     check_network_options, check_routing, read_option_file)

DEFAULT_MAX_PIXELS = 4096 * 4096  # LR pixels; the x4 output alone is then 3.2 GB as float32
BAND_PIXELS = 1 << 22  # output pixels converted to 8 bits at a time


class NonFiniteOutputError(RuntimeError):
    """The network's output for an image has NaN or infinite values (a black PNG otherwise)."""


def network_option_problem(opt: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with ``network_g`` and ``scale`` in an option dict (``None`` if nothing is)."""
    net = opt.get('network_g')
    if net is None:
        return "no 'network_g' (the network's options)"
    if not isinstance(net, Mapping) or 'type' not in net:
        return "'network_g' must be a mapping with a 'type'"
    scale = opt.get('scale')
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        return f"'scale' must be a positive integer, got {scale!r}"
    upscale = net.get('upscale')
    if scale is not None and upscale is not None and upscale != scale:
        return f'scale is {scale} but network_g.upscale is {upscale}: they must agree'
    return None


def state_dict_mismatch(exc: RuntimeError) -> str:
    """The first line of a ``load_state_dict`` error that says what differs, and how many more there are."""
    details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    if not details:
        return first_line(exc)
    return details[0] + (f' (and {len(details) - 1} more)' if len(details) > 1 else '')


class LoadedModel(NamedTuple):
    """What :func:`load_model` reads from a checkpoint."""

    net: torch.nn.Module
    scale: int
    projection: Optional[DifficultyProjection]  # difficulty thresholds and projection, None for plain checkpoints
    routing: RoutingArtefacts  # class errors and error predictor, where the checkpoint has them


def load_model(checkpoint_path: str, option_file: Optional[str] = None, device: str = 'cpu', *,
               no_options_hint: str = 'pass -opt with the option file it was trained with') -> LoadedModel:
    """The network, its scale, its difficulty projection and its routing artefacts, from a checkpoint (and optionally
    its option file).

    The checkpoint is untrusted data: its network options are compared with its weights' names and shapes before the
    network is built (:func:`~wbsr_models.checks.check_network_fits`: options that outgrow the weights are refused
    without allocating them), its weights must be finite, and so must its thresholds, projection and routing
    artefacts. Every problem is one exception naming the file it comes from: :class:`CorruptFileError` for the
    checkpoint (also when its own ``'wbsr'`` entry does not fit its weights), :class:`OptionFileError` for
    the option file (broken YAML, no ``network_g``, ``scale`` against ``network_g.upscale``, options that do
    not match the checkpoint's weights), ``FileNotFoundError`` for a missing file. ``no_options_hint`` ends the
    error for a checkpoint without network options (a tool without ``-opt`` says what it needs instead).
    """
    checkpoint = torch_load(checkpoint_path)
    if not isinstance(checkpoint, dict):
        raise CorruptFileError(checkpoint_path, 'not a BasicSR checkpoint (a dict of state dicts)')
    extras = checkpoint.get('wbsr') or {}
    if not isinstance(extras, Mapping):
        raise CorruptFileError(checkpoint_path, "its 'wbsr' entry is not a mapping")
    if option_file:
        opt = read_option_file(option_file)
        problem = network_option_problem(opt) or (None if 'scale' in opt else "no 'scale'")
        if problem:
            raise OptionFileError(option_file, problem)
        network_opt, scale = dict(opt['network_g']), int(opt['scale'])
    else:
        network_opt, scale = extras.get('network'), extras.get('scale')
        if not network_opt or not scale:
            raise ValueError(f'{checkpoint_path}: no network options inside (not written by WBSRModel); '
                             f'{no_options_hint}')
        problem = network_option_problem({'network_g': network_opt, 'scale': scale})
        if problem:
            raise CorruptFileError(checkpoint_path, f"its 'wbsr' entry: {problem}")

    def options_error(reason: str) -> ValueError:
        if option_file:
            return OptionFileError(option_file, reason)
        return CorruptFileError(checkpoint_path, f"its 'wbsr' entry: {reason}")

    key = 'params_ema' if 'params_ema' in checkpoint else 'params'
    params = checkpoint.get(key)
    if not isinstance(params, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in params.items()):
        raise CorruptFileError(checkpoint_path, f"no {key!r} state dict (keys: {sorted(map(str, checkpoint))})")
    state = {k[7:] if k.startswith('module.') else k: v for k, v in params.items()}

    def mismatch(exc: RuntimeError) -> ValueError:
        if option_file:
            return OptionFileError(option_file, f'network_g does not match {checkpoint_path}: '
                                   f'{state_dict_mismatch(exc)}')
        return CorruptFileError(checkpoint_path, f'its weights do not match its own network options: '
                                f'{state_dict_mismatch(exc)}')

    try:  # before anything is built: the options' types, then their shapes against the weights (on 'meta')
        check_network_options(network_opt)
        problem = check_network_fits(network_opt, state, build_network)
    except ValueError as exc:
        raise options_error(first_line(exc)) from None
    if problem is not None:
        raise mismatch(problem)
    check_finite_weights(state, checkpoint_path)
    try:
        net = build_network(dict(network_opt))
    except Exception as exc:  # noqa: BLE001  (any failure to build from these options is an options error)
        raise options_error(f'cannot build network_g ({first_line(exc)})') from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise mismatch(exc) from None
    difficulty = extras.get('difficulty')
    try:
        projection = DifficultyProjection.from_dict(difficulty) if difficulty else None
    except Exception as exc:  # noqa: BLE001  (from_dict on a damaged entry can fail in many ways)
        raise CorruptFileError(checkpoint_path, f'bad difficulty thresholds ({first_line(exc)})') from None
    try:
        routing = RoutingArtefacts.from_checkpoint_entry(extras)
    except ValueError as exc:
        raise CorruptFileError(checkpoint_path, first_line(exc)) from None
    net.eval()
    # The scale the router uses must be the network's own (else: an index_add_ error in the middle of an image).
    # BasicSR's networks and the supernets keep it as ``upscale``; others are run once on an 8x8 image.
    upscale = getattr(net, 'upscale', None)
    if not isinstance(upscale, int) or isinstance(upscale, bool):
        try:
            with torch.no_grad():
                probe = net(torch.zeros(1, int(getattr(net, 'num_in_ch', 3)), 8, 8))
        except Exception as exc:  # noqa: BLE001
            raise options_error(f'network_g cannot run on an 8x8 image ({first_line(exc)})') from None
        if tuple(probe.shape[-2:]) != (8 * scale, 8 * scale):
            raise options_error(f'scale is {scale} but network_g turns 8x8 into {probe.shape[-1]}x{probe.shape[-2]}')
    elif upscale != scale:
        raise options_error(f'scale is {scale} but network_g upscales x{upscale}')
    if routing.predictor is not None:
        routing.predictor.to(device)
    return LoadedModel(net.to(device), int(scale), projection, routing)


def list_inputs(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return list_images(path)
    raise FileNotFoundError(f'-i {path}: no such file or folder')


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mode`` and one flag per mode-specific option, from the registry of routing modes."""
    parser.add_argument('--mode', default=None, choices=list(MODES),
                        help='routing mode (default: the mode a given option selects, e.g. budget with --budget, '
                        'learned with --max-loss, calibrated with --slope; with no option, the checkpoint\'s default '
                        'routing, which wbsr-calibrate --predictor chooses, else wbsr): '
                        + '; '.join(f'{n}: {m.summary}' for n, m in MODES.items()).replace('%', '%%'))
    for option in OPTIONS.values():
        kind = {'index': int, 'path': str, 'choice': str}.get(option.kind, float)
        readers = ', '.join(modes_reading(option.name))
        parser.add_argument(option.flag, dest=option.name, type=kind, default=None,
                            choices=option.choices or None,
                            help=f'{option.help} (modes: {readers})'.replace('%', '%%'))  # argparse formats help


def resolve_mode(args: argparse.Namespace) -> Optional[str]:
    """The routing mode from ``--mode`` and the mode-specific flags (``None``: neither is given, the checkpoint's
    default routing runs); flags that would be ignored are refused."""
    given = [name for name in OPTIONS if getattr(args, name, None) is not None]
    for name in given:
        setattr(args, name, OPTIONS[name].check(getattr(args, name), OPTIONS[name].flag))
    if args.mode is None and not given:
        return None
    if args.mode is None:
        implied = {OPTIONS[n].flag: OPTIONS[n].implies for n in given if OPTIONS[n].implies}
        if len(set(implied.values())) > 1:
            raise UsageError(f'{" and ".join(implied)} select different modes ({", ".join(implied.values())}); give '
                             'one of them')
        mode = next(iter(implied.values()), 'wbsr')
    else:
        mode = args.mode
    reads = MODES[mode].reads()
    for name in given:
        if name not in reads:
            readers = modes_reading(name)
            raise UsageError(f'{OPTIONS[name].flag} applies to --mode {" or ".join(readers)} only, not --mode {mode}')
    for name in MODES[mode].required:
        if name not in given:
            raise UsageError(f'--mode {mode} needs {OPTIONS[name].flag} ({OPTIONS[name].help})')
    try:
        MODES[mode].check_options(argparse.Namespace(**{n: getattr(args, n, None) for n in OPTIONS}), '--mode ' + mode)
    except ValueError as exc:
        raise UsageError(str(exc).replace('.budget', ' --budget')) from None
    return mode


def check_numbers(args: argparse.Namespace, mode: Optional[str] = None) -> None:
    """The flags' numbers by range (argparse has checked their types); with ``mode``, also the region size the mode
    needs and the bounds of its trade-off flags (:func:`~wbsr_models.checks.check_routing`)."""
    if args.tile_size < 1:
        raise UsageError(f'--tile-size must be >= 1, got {args.tile_size}')
    if args.patch_size < 1 or not 1 <= args.step <= args.patch_size:
        raise UsageError(f'need --patch-size >= 1 and 1 <= --step <= --patch-size, got {args.patch_size} and '
                         f'{args.step}')
    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.max_pixels < 1:
        raise UsageError(f'--max-pixels must be >= 1, got {args.max_pixels}')
    if os.sep in args.suffix or (os.altsep and os.altsep in args.suffix):
        raise UsageError(f'--suffix {args.suffix}: a path separator would write outside the output folder')
    if mode is not None:
        options = argparse.Namespace(mode=mode, scheme=args.scheme, tile_size=args.tile_size,
                                     patch_size=args.patch_size, **{n: getattr(args, n, None) for n in OPTIONS})
        try:
            check_routing(options, flag=lambda name: '--' + name.replace('_', '-'))
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def check_network_flags(net: torch.nn.Module, mode: str, args: argparse.Namespace) -> None:
    """Flags that depend on the network: the subnet index and a budget the cheapest subnet can meet."""
    num_subnets = int(getattr(net, 'num_subnets', 1))
    if args.subnet is not None and not 0 <= args.subnet < num_subnets:
        raise UsageError(f'--subnet {args.subnet}: this network has subnets 0..{num_subnets - 1}')
    if args.budget is not None:
        side = args.tile_size if args.scheme == 'tiles' else args.patch_size
        costs = net.subnet_flops((side, side)) if hasattr(net, 'subnet_flops') else [1]
        share = costs[0] / costs[-1]
        if args.budget < share:
            raise UsageError(f'--budget {args.budget} is below the cheapest subnet\'s cost, {share:.3f} of the full '
                             'network\'s')


def resolve_device(name: str) -> str:
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f'--device {name}: not a device (cpu, cuda, cuda:N or auto)') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f'--device {name}: there is no CUDA GPU on this machine; run on the CPU with --device cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)')
    elif device.type != 'cpu':
        try:
            torch.empty(1, device=device)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f'--device {name}: not usable here ({first_line(exc)}); use --device cpu') from None
    return str(device)


def plan_outputs(files: Sequence[str], input_arg: str, out: str, suffix: str,
                 save_map: bool) -> list[tuple[str, Optional[str]]]:
    """``(SR path, map path or None)`` per input; refuses, before any work, a plan that loses a file."""
    if os.path.isdir(out):
        folders = {os.path.dirname(os.path.abspath(p)) for p in files}
        for folder in folders:
            if os.path.samefile(folder, out):
                raise UsageError(f'-o {out} is the folder the inputs are read from ({input_arg}): outputs would '
                                 'replace or mix with the inputs; choose another output folder')

    def names(path: str) -> list[str]:
        stem = os.path.splitext(os.path.basename(path))[0] + suffix
        return [f'{stem}.png'] + ([f'{stem}_alloc.png'] if save_map else [])

    for path in files[:1]:
        for name in names(path):
            if len(os.fsencode(name)) > NAME_MAX - 30:  # the temporary file's name adds up to 30 bytes
                raise UsageError(f'{os.path.join(out, name)}: the file name is longer than {NAME_MAX - 30} bytes; '
                                 'use a shorter --suffix')
    clashes = output_collisions(files, names)
    if clashes:
        more = f' (and {len(clashes) - 3} more)' if len(clashes) > 3 else ''
        raise UsageError(f'{"; ".join(clashes[:3])}{more} in {out}: rename them or use --suffix; nothing was written')
    inputs = {(st.st_dev, st.st_ino) for st in map(os.stat, files)}
    plan = []
    for path in files:
        targets = [os.path.join(out, name) for name in names(path)]
        for target in targets:
            if os.path.exists(target) and (os.stat(target).st_dev, os.stat(target).st_ino) in inputs:
                raise UsageError(f'{target} is one of the inputs (a link to it): it would be overwritten; choose '
                                 'another output folder')
        plan.append((targets[0], targets[1] if save_map else None))
    return plan


def to_uint8(output: torch.Tensor) -> np.ndarray:
    """``(1, C, H, W)`` RGB in [0, 1] to uint8 HxWx3 BGR (or HxW), converted in bands of rows.

    The same numbers as BasicSR's ``tensor2img`` (clamp, x255, round half to even), without its float
    copies of the whole image: besides ``output`` only the uint8 result and one band are held. An output with a
    NaN or an infinity is a :class:`NonFiniteOutputError` (clamping would make it a black or white image).
    """
    _, c, h, w = output.shape
    result = np.empty((h, w, 3) if c == 3 else (h, w), np.uint8)
    rows = max(1, BAND_PIXELS // max(1, w))
    for top in range(0, h, rows):
        band = output[0, :, top:top + rows].detach().float()
        if not bool(torch.isfinite(band).all()):
            raise NonFiniteOutputError('the SR output has NaN or infinite values (the network overflows on this '
                                       'image); nothing written')
        band = band.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        result[top:top + rows] = (band.flip(0).permute(1, 2, 0) if c == 3 else band[0]).numpy()
    return result


def _skip_reason(exc: BaseException) -> str:
    if isinstance(exc, (ImageTooLargeError, FileTooLargeError)):
        return exc.describe('--max-pixels')
    if isinstance(exc, NonFiniteOutputError):
        return str(exc)
    if isinstance(exc, ImageFileError):
        return str(exc)
    if isinstance(exc, MemoryError) or 'memory' in str(exc).lower() or 'alloc' in str(exc).lower():
        return f'out of memory ({first_line(exc)}); a lower --max-pixels skips such images up front'
    return first_line(exc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-i', '--input', required=True, help='an image or a folder of images')
    parser.add_argument('-o', '--output', default='results', help='output folder (default: results)')
    parser.add_argument('--model', required=True, help='checkpoint (.pth) written by WBSRModel')
    parser.add_argument('-opt', default=None, help='option file, for checkpoints without network options')
    add_routing_arguments(parser)
    parser.add_argument('--scheme', default='tiles', choices=['tiles', 'patches'],
                        help='tiles: one seamless pass over the image (default); patches: the papers\' overlapping '
                        'patches, run separately and averaged')
    parser.add_argument('--tile-size', type=int, default=32, help='tiles scheme: tile side, LR pixels (default: 32)')
    parser.add_argument('--patch-size', type=int, default=32, help='patches scheme: patch side (default: 32)')
    parser.add_argument('--step', type=int, default=28, help='patches scheme: step between patches (default: 28)')
    parser.add_argument('--batch-size', type=int, default=64, help='patches scheme: patches run at once')
    parser.add_argument('--max-pixels', type=int, default=DEFAULT_MAX_PIXELS,
                        help=f'skip LR images larger than this many pixels, checked before decoding '
                        f'(default: {DEFAULT_MAX_PIXELS} = 4096x4096)')
    parser.add_argument('--save-map', action='store_true', help='also write the subnet allocation map')
    parser.add_argument('--suffix', default='', help='appended to output file names')
    parser.add_argument('--device', default='auto', help='cpu, cuda or auto (default)')
    args = parser.parse_args(argv)
    created = not os.path.exists(args.output)
    try:
        mode = resolve_mode(args)
        check_numbers(args, mode or 'wbsr')  # no mode: a default cuts regions as Eq. 15 does
        device = resolve_device(args.device)
        files = list_inputs(args.input)
        if not files:
            raise UsageError(f'-i {args.input}: no images ({", ".join(IMAGE_EXTENSIONS)}) in this folder')
        plan = plan_outputs(files, args.input, args.output, args.suffix, args.save_map)
        ensure_writable_dir(args.output, '-o')
        net, scale, projection, routing = load_model(args.model, args.opt, device)
        keep_freed_memory(32 << 20)  # reuse memory across images; blocks over 32 MB go back (large inputs)
        check_network_flags(net, mode, args)
        options = RoutingOptions(mode=mode, scheme=args.scheme, tile_size=args.tile_size, patch_size=args.patch_size,
                                 step=args.step, batch_size=args.batch_size,
                                 **{name: getattr(args, name) for name in OPTIONS})
        arm_table = ArmTable.load(args.arm_lut) if args.arm_lut else None
        router = Router(net, options, scale, projection, arm_table, routing)
    except (OSError, ValueError) as exc:
        print(f'wbsr-infer: {exc}', file=sys.stderr)
        if created and os.path.isdir(args.output) and not os.listdir(args.output):
            os.rmdir(args.output)  # made by the write check of this run: leave nothing behind
        return 2
    if router.stored_default:  # not what a user of Eq. 15 expects: say so
        print(f'wbsr-infer: routing {router.describe()}')
    failed = written = 0
    for path, (out_path, map_path) in zip(tqdm(files, desc='wbsr-infer', unit='img', disable=None), plan):
        name = os.path.basename(path)
        notes: list[str] = []
        try:
            img = read_image_file(path, max_pixels=args.max_pixels, notes=notes)
            lq = torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).unsqueeze(0).to(device)
            start = time.perf_counter()
            result = router(lq)
            seconds = time.perf_counter() - start
            del lq
            sr = to_uint8(result.output)
            result.output = None  # the float output is the largest buffer: gone before the PNG is encoded
            png = encode_png(out_path, sr)
            del sr
            map_png = None
            if map_path:
                lq_img = (img * 255).round().astype(np.uint8)
                map_png = encode_png(map_path, allocation_map(lq_img, result, subnet_labels(net)))
        except (OSError, ImageFileError, RuntimeError, MemoryError) as exc:
            tqdm.write(f'{name}: skipped ({_skip_reason(exc)})')
            failed += 1
            continue
        outputs = {out_path: png, **({map_path: map_png} if map_path else {})}
        try:  # the image and its map together: an image counts as written when all its files are
            write_files(outputs, create_folder=False)
        except OSError as exc:  # a full disk or a vanished folder: every later image would fail the same way
            if not os.path.isdir(args.output):
                print(f'wbsr-infer: the output folder {args.output} was removed during the run; stopped, {written} '
                      f'of {len(files)} images had been written to it', file=sys.stderr)
            else:
                print(f'wbsr-infer: cannot write {exc.filename or out_path} ({exc.strerror or first_line(exc)}); '
                      f'stopped, {written} of {len(files)} images written to {args.output}', file=sys.stderr)
            return 2
        written += 1
        for text in notes:
            tqdm.write(f'{name}: {text}')
        h, w = img.shape[:2]
        same = f'{100 * result.ratio_regions:.1f}% of full on patches, ' if result.scheme == 'patches' else ''
        tqdm.write(f'{os.path.splitext(name)[0]}: {w}x{h} -> {w * scale}x{h * scale}  FLOPs {same}'
                   f'{100 * result.ratio_whole:.1f}% of full on the image, {result.flops / 1e9:.2f} G  '
                   f'{seconds:.2f} s')
    print(f'wbsr-infer: {written} of {len(files)} images written to {args.output}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
