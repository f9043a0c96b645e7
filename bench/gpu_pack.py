"""What the GPU run needs on a machine that reaches no package index and does not see ``../shared``, in one folder.

    python bench/gpu_pack.py --shared ../shared/data --out .gpu_carry          # then: the device call it prints

The device tool sends the checkout and the ignored folders its call names in ``carry``, 64 MiB in all. This writes
into ``--out`` (an ignored folder of the checkout):

- ``wheels/``: what the GPU machine's Python lacks (its image holds torch, torchvision, OpenCV, scikit-image,
  scikit-learn, ...): BasicSR, built here into a pure-Python wheel, and lmdb for ``--target-python``;
  ``scripts/setup_env.sh`` installs them with ``WBSR_WHEELHOUSE`` (``bench/gpu_run.sh --wheels``);
- ``data/``: the benchmark images in the shared layout (``train/T91``, ``train/BSD200``, ``test/B100/HR``,
  ``test/Urban100/HR``), re-encoded as lossless WebP (about 30% smaller than their PNGs; each file is decoded
  again and checked to give the PNG's pixels exactly, else the PNG is copied), as many as fit: first the whole
  training pool (T91, then BSD200), then B100 and Urban100 images in name order, keeping the two sets' bytes
  even, until the next image would not fit;
- ``MANIFEST.json``: what was taken and left out, and the sizes.

The budget is 64 MiB minus what else travels (tracked and untracked, not ignored files of the checkout) minus a
1 MiB margin, or ``--max-mib``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from typing import Callable, Iterable, Optional, Sequence

import cv2
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
TRAVEL_LIMIT = 64 * MIB
MARGIN = 1 * MIB
TRAIN = ('train/T91', 'train/BSD200')
TEST = ('test/B100/HR', 'test/Urban100/HR')
IMAGE_GLOB = '*.png'


def tree_bytes(repo: str = REPO) -> int:
    """Bytes of what the device tool sends besides ``carry``: tracked and untracked, not ignored files."""
    names = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=repo, check=True,
                           capture_output=True).stdout.decode().split('\0')
    return sum(os.path.getsize(os.path.join(repo, n)) for n in names if n and os.path.isfile(os.path.join(repo, n)))


def encode(path: str) -> tuple[bytes, str]:
    """The smallest exact encoding of an image file: ``(bytes, extension)``, lossless WebP or the file itself.

    Exact means the project's own decoder (what ``wbsr-make-lr`` reads with) gives the same pixels.
    """
    from wbsr_data.pairs import decode_image
    with open(path, 'rb') as f:
        original = f.read()
    img = cv2.imdecode(np.frombuffer(original, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        return original, os.path.splitext(path)[1]
    ok, buf = cv2.imencode('.webp', img, [cv2.IMWRITE_WEBP_QUALITY, 101])  # > 100: lossless
    webp = buf.tobytes() if ok else b''
    if not webp or len(webp) >= len(original) or \
            not np.array_equal(decode_image(webp, path + '.webp'), decode_image(original, path)):
        return original, os.path.splitext(path)[1]
    return webp, '.webp'


def select(train: Sequence[str], tests: Sequence[Sequence[str]], budget: int,
           encoded: Callable[[str], int]) -> tuple[list[str], list[str]]:
    """Which files fit ``budget`` bytes: every training file first, then test files in order, the sets kept even.

    ``encoded(path)`` gives a file's packed size (encoding lazily: only what may fit is encoded). Returns the taken
    and the left-out paths.
    """
    taken, left, used = [], [], 0
    for path in train:
        size = encoded(path)
        if used + size <= budget:
            taken.append(path)
            used += size
        else:
            left.append(path)
    queues = [list(files) for files in tests]
    spent = [0] * len(queues)
    open_sets = [i for i, q in enumerate(queues) if q]
    while open_sets:
        i = min(open_sets, key=lambda k: spent[k])
        size = encoded(queues[i][0])
        if used + size > budget:
            left += queues[i]
            open_sets.remove(i)
            continue
        taken.append(queues[i].pop(0))
        used += size
        spent[i] += size
        if not queues[i]:
            open_sets.remove(i)
    return taken, left


def build_wheels(out: str, python: str, target_python: str) -> list[str]:
    """BasicSR as a pure-Python wheel (built here against this environment's torch) and lmdb for the target."""
    import basicsr
    os.makedirs(out, exist_ok=True)
    subprocess.run([python, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', out,
                    f'basicsr=={basicsr.__version__}'], check=True)
    platforms = [f'--platform=manylinux_2_{n}_x86_64' for n in (17, 24, 27, 28, 31, 34)] + \
        ['--platform=manylinux2014_x86_64']
    subprocess.run([python, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '-d', out,
                    f'--python-version={target_python}', '--implementation=cp', *platforms, 'lmdb'], check=True)
    return sorted(glob.glob(os.path.join(out, '*.whl')))


def pack(shared: str, out: str, budget: Optional[int], wheels: bool, python: str, target_python: str,
         progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write ``out/wheels``, ``out/data`` and ``out/MANIFEST.json``; returns the manifest."""
    os.makedirs(out, exist_ok=True)
    wheel_files = build_wheels(os.path.join(out, 'wheels'), python, target_python) if wheels else []
    wheel_bytes = sum(os.path.getsize(w) for w in wheel_files)
    if budget is None:
        budget = TRAVEL_LIMIT - tree_bytes() - MARGIN
    data_budget = budget - wheel_bytes
    cache: dict[str, tuple[bytes, str]] = {}

    def encoded(path: str) -> int:
        if path not in cache:
            cache[path] = encode(path)
            if progress:
                progress(path)
        return len(cache[path][0])

    def files(folder: str) -> list[str]:
        return sorted(glob.glob(os.path.join(shared, folder, IMAGE_GLOB)))

    train = [p for folder in TRAIN for p in files(folder)]
    tests = [files(folder) for folder in TEST]
    if not train and not any(tests):
        raise SystemExit(f'gpu_pack: no {IMAGE_GLOB} images under {shared}/{{{",".join(TRAIN + TEST)}}}')
    taken, left = select(train, tests, data_budget, encoded)
    counts: dict[str, dict] = {}
    for path in taken:
        data, ext = cache[path]
        folder = os.path.relpath(os.path.dirname(path), shared)
        target = os.path.join(out, 'data', folder, os.path.splitext(os.path.basename(path))[0] + ext)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, 'wb') as f:
            f.write(data)
        entry = counts.setdefault(folder, {'images': 0, 'bytes': 0, 'source_bytes': 0, 'left_out': 0})
        entry['images'] += 1
        entry['bytes'] += len(data)
        entry['source_bytes'] += os.path.getsize(path)
    for path in left:
        folder = os.path.relpath(os.path.dirname(path), shared)
        counts.setdefault(folder, {'images': 0, 'bytes': 0, 'source_bytes': 0, 'left_out': 0})['left_out'] += 1
    manifest = {'shared': os.path.abspath(shared), 'budget_bytes': budget,
                'wheels': [os.path.basename(w) for w in wheel_files], 'wheel_bytes': wheel_bytes,
                'data_bytes': sum(c['bytes'] for c in counts.values()),
                'sets': counts, 'left_out': [os.path.relpath(p, shared) for p in left]}
    with open(os.path.join(out, 'MANIFEST.json'), 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=2)
    return manifest


def device_call(out: str) -> str:
    rel = os.path.relpath(os.path.abspath(out), REPO)
    command = (f'bash bench/gpu_run.sh --wheels {rel}/wheels --data {rel}/data --out /tmp/gpu_run; s=$?; '
               'cp /tmp/gpu_run/results.tar.gz /tmp/gpu_run/net_g_gpu.pth "$OUT"/ 2>/dev/null; exit $s')
    return json.dumps({'command': command, 'carry': [rel], 'timeout_s': 540})


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shared', required=True, help='the benchmark images (../shared/data in development)')
    parser.add_argument('--out', default=os.path.join(REPO, '.gpu_carry'))
    parser.add_argument('--max-mib', type=float, help='budget for wheels + images (default: what is left of 64 MiB)')
    parser.add_argument('--no-wheels', action='store_true')
    parser.add_argument('--target-python', default='3.12', help="the GPU machine's Python (default: 3.12)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    budget = None if args.max_mib is None else int(args.max_mib * MIB)
    manifest = pack(args.shared, args.out, budget, not args.no_wheels, sys.executable, args.target_python,
                    progress=lambda p: print(f'gpu_pack: {p}', file=sys.stderr) if os.environ.get('VERBOSE') else None)
    for folder, c in sorted(manifest['sets'].items()):
        print(f"gpu_pack: {folder}: {c['images']} images, {c['bytes'] / MIB:.1f} MiB (PNG {c['source_bytes'] / MIB:.1f}"
              f" MiB), {c['left_out']} left out")
    print(f"gpu_pack: {manifest['data_bytes'] / MIB:.1f} MiB of images + {manifest['wheel_bytes'] / MIB:.1f} MiB of "
          f"wheels, budget {manifest['budget_bytes'] / MIB:.1f} MiB; device call:\n{device_call(args.out)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
