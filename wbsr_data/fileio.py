"""Safe, atomic reading and writing of everything the plugin stores.

Nothing here uses pickle: arrays go to ``.npz`` (loaded with ``allow_pickle=False``) with their metadata
as a JSON string inside, and checkpoints are loaded with ``torch.load(weights_only=True)``. Every write
goes to a temporary file in the target directory and is then renamed over the target, so a crash while
saving never leaves a broken file in place of a good one; the file gets the permissions of any new file
under the process's umask (0644 under umask 022), so a team sharing an experiments folder can read it.
A truncated, corrupt or foreign file is refused with :class:`CorruptFileError`, which names it.

Temporary files and folders are named ``.<target>.<pid>-<host>-<random>.tmp``: a write killed before its rename
(SIGKILL, power loss) leaves one behind, and the next write into that folder by a process of the plugin removes every such
leftover whose writer is no longer running (a write in progress in another process is never touched).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import time
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


#: Longest file name most file systems take (bytes); temporary names are shortened to fit it.
NAME_MAX = 255
#: ``.<name>.<pid>-<host>-<8 hex>.tmp``: what :func:`atomic_path` and :func:`new_temp_dir` create (``host``: 6 hex
#: digits of the machine's name, so that a folder shared between machines is judged by each for its own writers).
_TEMP_NAME = re.compile(r'^\.(?P<name>.*)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}\.tmp$', re.DOTALL)
#: ``.<name>.<8 characters>.tmp``: the names of earlier versions (no writer recorded).
_LEGACY_TEMP_NAME = re.compile(r'^\..*\.[0-9A-Za-z_]{8}\.tmp$', re.DOTALL)
#: Seconds after which a leftover whose writer cannot be asked (another machine's, an earlier version's) is stale.
UNKNOWN_WRITER_AGE = 3600.
#: Seconds between two sweeps of one folder by one process (a sweep lists the folder).
SWEEP_INTERVAL = 60.
_HOST = hashlib.sha1(socket.gethostname().encode('utf-8', 'surrogateescape')).hexdigest()[:6]
_swept: dict[str, float] = {}


def _temp_name(name: str) -> str:
    """``.<name>.<pid>-<host>-<8 hex>.tmp``, ``name`` shortened so that the whole fits :data:`NAME_MAX` bytes."""
    tail = f'.{os.getpid()}-{_HOST}-{secrets.token_hex(4)}.tmp'
    room = NAME_MAX - 1 - len(tail.encode())
    encoded = name.encode('utf-8', 'surrogateescape')
    if len(encoded) > room:
        name = encoded[:room].decode('utf-8', 'ignore')
    return f'.{name}{tail}'


def _writer_running(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (another user's counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_temps(directory: str) -> list[str]:
    """Remove the temporary files and folders that killed writes left in ``directory``; return their names.

    A leftover is one named as :func:`atomic_path` and :func:`new_temp_dir` name them whose writer (the process id in
    the name) is no longer running on this machine; one written from another machine, or named as earlier versions
    named them, counts once untouched for :data:`UNKNOWN_WRITER_AGE` seconds. Anything else, a write in progress in
    another process included, is left alone.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.endswith('.tmp') or not entry.name.startswith('.'):
            continue
        found = _TEMP_NAME.match(entry.name)
        try:
            if found and found.group('host') == _HOST:
                stale = not _writer_running(int(found.group('pid')))
            else:
                stale = (found or _LEGACY_TEMP_NAME.match(entry.name)) is not None and \
                    now - entry.stat(follow_symlinks=False).st_mtime > UNKNOWN_WRITER_AGE
            if not stale:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)
            removed.append(entry.name)
        except OSError:  # gone already (another process cleaned it), or not ours to remove
            continue
    return removed


def _sweep(directory: str) -> None:
    """:func:`remove_stale_temps` on ``directory``, at most every :data:`SWEEP_INTERVAL` seconds per process."""
    key = os.path.realpath(directory)
    now = time.monotonic()
    if now - _swept.get(key, -SWEEP_INTERVAL) >= SWEEP_INTERVAL:
        remove_stale_temps(directory)
        _swept[key] = now


def _new_temp_file(directory: str, name: str) -> str:
    """Create an empty, uniquely named file in ``directory``, mode 0666 less the umask (like any new file).

    ``tempfile.mkstemp`` would create it 0600 whatever the umask, and the rename would carry that over.
    """
    for _ in range(100):
        tmp = os.path.join(directory, _temp_name(name))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f'{directory}: no free temporary file name for {name}')


def new_temp_dir(target: str) -> str:
    """A new hidden folder beside ``target``, named as temporary files are, after removing stale leftovers there."""
    directory = os.path.dirname(os.path.abspath(target))
    _sweep(directory)
    for _ in range(100):
        folder = os.path.join(directory, _temp_name(os.path.basename(target)))
        try:
            os.mkdir(folder, 0o777)
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f'{directory}: no free temporary folder name for {os.path.basename(target)}')


@contextlib.contextmanager
def _temp_beside(path: str, create_folder: bool) -> Iterator[str]:
    """A new temporary file beside ``path``, removed on exit unless it was renamed meanwhile."""
    directory = os.path.dirname(os.path.abspath(path))
    if create_folder:
        os.makedirs(directory, exist_ok=True)
    elif not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, 'the folder does not exist (removed during the run?)', directory)
    _sweep(directory)
    tmp = _new_temp_file(directory, os.path.basename(path))
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str, create_folder: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it.

    The folder is created when missing, unless ``create_folder`` is false: then a missing folder (one removed while
    a tool writes into it) is a ``FileNotFoundError`` naming it, not silently made again. Temporary files that killed
    writes left in the folder are removed first (:func:`remove_stale_temps`).
    """
    with _temp_beside(path, create_folder) as tmp:
        yield tmp
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


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
    """Atomically ``torch.save`` ``obj`` (tensors, numbers, strings, lists and dicts only) to ``path``.

    A failed write is an :class:`OSError` naming ``path`` (``torch.save`` reports one, a full disk included, as a
    ``RuntimeError`` of its zip writer); the target is left as it was.
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            folder = os.path.dirname(os.path.abspath(path))
            if shutil.disk_usage(folder).free < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
            raise OSError(errno.EIO, f'cannot write ({first_line(exc)})', path) from None


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


def write_bytes(path: str, data: bytes, create_folder: bool = True) -> None:
    """Atomically write ``data`` to ``path`` (``create_folder``: as in :func:`atomic_path`)."""
    with atomic_path(path, create_folder) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def write_files(files: Mapping[str, bytes], create_folder: bool = True) -> None:
    """Write every ``path: bytes`` so that either all of them are in place or none that this call wrote.

    Every file goes to its temporary file first; the renames happen once all are on disk, and if one rename fails the
    files already renamed by this call are removed again. Used where one item is several files (an SR image and its
    allocation map, an HR image and its LR images), so that an item counted as written has all its files. An
    ``OSError`` has the file that failed as its ``filename``.
    """
    with contextlib.ExitStack() as stack:
        temps = {}
        path = ''
        try:
            for path, data in files.items():
                tmp = stack.enter_context(_temp_beside(path, create_folder))
                with open(tmp, 'wb') as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                temps[path] = tmp
        except OSError as exc:
            raise type(exc)(exc.errno, exc.strerror or first_line(exc), path) from None
        done: list[str] = []
        try:
            for path, tmp in temps.items():
                os.replace(tmp, path)
                done.append(path)
        except OSError as exc:
            for written in done:
                with contextlib.suppress(OSError):
                    os.remove(written)
            raise type(exc)(exc.errno, exc.strerror or first_line(exc), path) from None


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


def ensure_writable_file(path: str, flag: str) -> None:
    """Check, before any work and without creating anything, that the file ``path`` can be written.

    Raises ``OSError`` with a one-line message naming ``flag`` and the path: a folder in its place, a name longer than
    the file system takes, a folder (or the nearest existing folder above a missing one) that is a file or cannot be
    written into. A missing folder is fine: the write creates it.
    """
    if os.path.isdir(path):
        raise OSError(f'{flag} {path}: is a folder; give the file to write')
    if len(os.fsencode(os.path.basename(path))) > NAME_MAX:
        raise OSError(f'{flag} {path}: the file name is longer than {NAME_MAX} bytes')
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OSError(f'{flag} {path}: {existing} is a file, not a folder')
    try:
        os.remove(_new_temp_file(existing, 'write-check'))
    except OSError as exc:
        raise OSError(f'{flag} {path}: cannot write into {existing} ({exc.strerror or first_line(exc)})') from None


def save_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write('\n')
