"""Identity of a dataset's content, for caches keyed by content.

Hashing every decoded image (``kdzoo.teachers.cache.dataset_checksum``)
reads and decodes the whole dataset on every run: hours for MS1M-sized
sets. A dataset may instead offer ``content_fingerprint()``, built here
from what its images are made from: the bytes of each source file (SHA-256),
its path relative to the files' common folder, the item order and labels,
and the decode settings (output size, Pillow version). No image is decoded.

Reading every byte on every run would still cost minutes for a large
dataset, so the digest is remembered under a cheap key of the same items
(absolute paths, sizes and modification times) in
``$KDZOO_CACHE/dataset_digests``: the files are read again only when one of
those changes. A dataset copied, moved or re-provisioned (new mtimes, same
bytes) therefore keeps its fingerprint and its teacher caches; a file
rewritten with other bytes changes it.
"""
import hashlib
import json
import os
from typing import Iterable, List, Tuple

import PIL

from kdzoo.utils.errors import DataError
from kdzoo.utils.fileio import atomic_write_text, kdzoo_cache_dir

__all__ = ['files_fingerprint']

_CHUNK = 1 << 20


def _header(kind: str, settings: dict) -> bytes:
    return json.dumps(dict(kind=kind, pillow=PIL.__version__, **settings),
                      sort_keys=True, default=str).encode()


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f'{path}: cannot be read ({e.strerror})') from None
    return f'{st.st_size}|{st.st_mtime_ns}'


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(_CHUNK), b''):
                h.update(block)
    except OSError as e:
        raise DataError(f'{path}: cannot be read ({e.strerror})') from None
    return h.hexdigest()


def _metadata_key(header: bytes, items: List[Tuple[str, object]]) -> str:
    """SHA-256 of the items' absolute paths, sizes, mtimes and extras."""
    h = hashlib.sha256(header)
    seen = {}
    for path, extra in items:
        stat = seen.get(path)
        if stat is None:
            stat = seen[path] = _stat(path)
        h.update(f'\n{path}|{stat}|{extra}'.encode())
    return h.hexdigest()


def _content_digest(header: bytes, items: List[Tuple[str, object]]) -> str:
    """SHA-256 of the items' file bytes, relative paths and extras."""
    paths = sorted({path for path, _ in items})
    root = os.path.commonpath(paths) if paths else ''
    if len(paths) == 1:
        root = os.path.dirname(root)
    digests = {path: _file_digest(path) for path in paths}
    h = hashlib.sha256(header)
    for path, extra in items:
        h.update(f'\n{os.path.relpath(path, root)}|{digests[path]}|{extra}'
                 .encode())
    return h.hexdigest()


def files_fingerprint(kind: str, settings: dict,
                      items: Iterable[Tuple[str, object]]) -> str:
    """SHA-256 of ``kind``, ``settings`` (JSON) and, per item in order, its
    source file's bytes and path relative to the files' common folder plus
    ``extra`` (label, offset...).

    ``items`` yields ``(path, extra)``; a file is read once however many
    items it holds (RecordIO). The digest is remembered by the files'
    paths, sizes and mtimes (module docstring), so an unchanged dataset is
    not read again.
    """
    header = _header(kind, settings)
    items = [(os.path.abspath(path), extra) for path, extra in items]
    memo = os.path.join(kdzoo_cache_dir('dataset_digests'),
                        _metadata_key(header, items) + '.txt')
    try:
        with open(memo) as f:
            digest = f.read().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = _content_digest(header, items)
    try:
        atomic_write_text(memo, digest + '\n')
    except OSError:  # a read-only cache: read the files again next time
        pass
    return digest
