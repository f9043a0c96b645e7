"""Safe, atomic reading and writing of everything the plugin stores.

Nothing here uses pickle: arrays go to ``.npz`` (loaded with ``allow_pickle=False``) with their metadata
as a JSON string inside, and checkpoints are loaded with ``torch.load(weights_only=True)``. Every write
goes to a temporary file in the target directory and is then renamed over the target, so a crash while
saving never leaves a broken file in place of a good one. A truncated, corrupt or foreign file is refused
with :class:`CorruptFileError`, which names it.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

META_KEY = '__meta__'


class CorruptFileError(ValueError):
    """A file the plugin reads is truncated, corrupt, unsafe or of the wrong kind."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f'{path}: {reason}')
        self.path = path
        self.reason = reason


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npz(path: str, arrays: Mapping[str, np.ndarray], meta: Optional[Mapping[str, Any]] = None) -> None:
    """Atomically write ``arrays`` and a JSON-able ``meta`` dict to the ``.npz`` file ``path``."""
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    if META_KEY in payload:
        raise ValueError(f'{META_KEY} is reserved')
    payload[META_KEY] = np.frombuffer(json.dumps(meta or {}, sort_keys=True).encode('utf-8'), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, **payload)


def load_npz(path: str, required: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an ``.npz`` written by :func:`save_npz`: ``(arrays, meta)``; refuse pickled or broken files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such file')
    with open(path, 'rb') as f:
        if f.read(4) != b'PK\x03\x04':  # np.load would try pickle on anything that is not a zip
            raise CorruptFileError(path, 'not an .npz file (no zip signature)')
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise CorruptFileError(path, f'refused, it holds pickled objects ({exc})') from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:
        raise CorruptFileError(path, f'not a readable .npz file ({exc})') from None
    if META_KEY not in arrays:
        raise CorruptFileError(path, 'no metadata: not written by this plugin')
    try:
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(path, f'unreadable metadata ({exc})') from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise CorruptFileError(path, f'missing arrays {missing}')
    return arrays, meta


def torch_save(obj: Any, path: str) -> None:
    """Atomically ``torch.save`` ``obj`` (tensors, numbers, strings, lists and dicts only) to ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path: str, map_location: Any = 'cpu') -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such file')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CorruptFileError(path, f'refused by the safe loader, it holds objects other than tensors and '
                               f'plain containers ({str(exc).splitlines()[0]})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CorruptFileError(path, f'truncated or corrupt checkpoint ({str(exc).splitlines()[0]})') from None


def save_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write('\n')
