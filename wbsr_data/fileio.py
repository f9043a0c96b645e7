"""Safe, atomic reading and writing of everything the plugin stores.

Nothing here uses pickle: arrays go to ``.npz`` (loaded with ``allow_pickle=False``) with their metadata
as a JSON string inside, and checkpoints are loaded with ``torch.load(weights_only=True)``. Every write
goes to a temporary file in the target directory and is then renamed over the target, so a crash while
saving never leaves a broken file in place of a good one; the file gets the permissions of any new file
under the process's umask (0644 under umask 022), so a team sharing an experiments folder can read it.
A truncated, corrupt or foreign file is refused with :class:`CorruptFileError`, which names it.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import warnings
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


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name when the message is empty."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _new_temp_file(directory: str, name: str) -> str:
    """Create an empty, uniquely named file in ``directory``, mode 0666 less the umask (like any new file).

    ``tempfile.mkstemp`` would create it 0600 whatever the umask, and the rename would carry that over.
    """
    for _ in range(100):
        tmp = os.path.join(directory, f'.{name}.{secrets.token_hex(4)}.tmp')
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f'{directory}: no free temporary file name for {name}')


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _new_temp_file(directory, os.path.basename(path))
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
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    Whatever goes wrong while reading the file (a truncated zip, a flipped byte in the pickle, an empty or
    text file: torch raises anything from ``RuntimeError`` to ``IndexError``, ``UnicodeDecodeError`` or
    ``struct.error``) is a :class:`CorruptFileError` naming the file. The caller checks the structure.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such file')
    if os.path.getsize(path) == 0:
        raise CorruptFileError(path, 'empty file')
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 160" on a damaged pickle header
            warnings.simplefilter('ignore')
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CorruptFileError(path, f'refused by the safe loader, it holds objects other than tensors and '
                               f'plain containers ({first_line(exc)})') from None
    except Exception as exc:  # noqa: BLE001  (any parse failure of an untrusted file means a corrupt file)
        detail = first_line(exc)
        if not isinstance(exc, (RuntimeError, OSError)) and detail != type(exc).__name__:
            detail = f'{type(exc).__name__}: {detail}'  # "KeyError: 101" says more than "101"
        raise CorruptFileError(path, f'truncated or corrupt checkpoint ({detail})') from None


def write_bytes(path: str, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def ensure_writable_dir(path: str, flag: str) -> None:
    """Create the folder ``path`` if needed and check that a file can be created in it.

    Raises ``OSError`` with a one-line message naming ``flag`` and the path: an existing file in its place,
    a read-only or permission-denied folder. Run before any work, so a bad output folder costs nothing.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f'{flag} {path}: exists and is not a folder')
    try:
        os.makedirs(path, exist_ok=True)
        os.remove(_new_temp_file(path, 'write-check'))
    except OSError as exc:
        raise OSError(f'{flag} {path}: cannot write there ({exc.strerror or first_line(exc)})') from None


def save_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write('\n')
