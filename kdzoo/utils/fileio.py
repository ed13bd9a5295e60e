"""Atomic file writes: write to a temporary file beside the target, then rename.

A reader never sees a half-written result or checkpoint: either the old file or
the complete new one.
"""
import contextlib
import io
import json
import os
import tempfile
from typing import Any, BinaryIO, Iterator, List

import torch


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file here (0o666 less the
    umask): for files made through ``mkstemp`` (0600) and renamed into
    place."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def kdzoo_cache_dir(name: str) -> str:
    """``$KDZOO_CACHE/<name>`` if set, else ``~/.cache/kdzoo/<name>``."""
    root = os.environ.get('KDZOO_CACHE') or os.path.join('~', '.cache',
                                                         'kdzoo')
    return os.path.join(os.path.expanduser(root), name)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync, then ``os.replace``)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory,
                               prefix='.' + os.path.basename(path) + '.',
                               suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode open() would
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + '\n')


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a truncated file at ``path``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_output_files(*paths: str) -> Iterator[List[BinaryIO]]:
    """Stream files that must appear together, e.g. ``.rec`` + ``.idx``.

    Yields binary file objects writing to temporary files beside ``paths``;
    on a clean exit they are fsynced and renamed in order, on an error all
    temporaries are removed. Should a later rename fail, the files already
    renamed are removed too, so no half set is left behind.
    """
    paths = [os.fspath(p) for p in paths]
    temps, handles = [], []
    try:
        for path in paths:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                dir=directory, prefix='.' + os.path.basename(path) + '.',
                suffix='.tmp')
            temps.append(tmp)
            handles.append(os.fdopen(fd, 'wb'))
        yield handles
        for f, tmp in zip(handles, temps):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.chmod(tmp, new_file_mode())
        done = []
        try:
            for tmp, path in zip(temps, paths):
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in done:
                os.unlink(path)
            raise
    finally:
        for f in handles:
            f.close()
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB blocks)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing).

    Processes (or threads) that open the same lock file wait for each other,
    so that work on a shared file (building a cache several runs need) is
    done by one of them while the others wait instead of repeating it. Where
    ``fcntl`` does not exist (Windows) this does not lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a+') as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
