"""Identity of a dataset's content, for caches keyed by content.

Hashing every decoded image (``kdzoo.teachers.cache.dataset_checksum``)
reads and decodes the whole dataset on every run: hours for MS1M-sized
sets. A dataset may instead offer ``content_fingerprint()``, built here
from what its images are made from: the bytes of each source file (SHA-256),
its path relative to the files' common folder, the item order and labels,
and the decode settings (output size, Pillow version). No image is decoded.

Reading every byte on every run would still cost minutes for a large
dataset, so the digest is remembered in ``$KDZOO_CACHE/dataset_digests``
under a key of the same items' file metadata (absolute path, size,
modification and status-change times, inode): the files are read again
when any of those changes. A dataset copied, moved or re-provisioned (new
times, same bytes) therefore keeps its fingerprint and its teacher caches,
and a file rewritten with other bytes changes it, also when its old
modification time is put back (``cp -p``, ``rsync -t``: the status-change
time still moves). Files that change while they are read are not
remembered. ``rm -r $KDZOO_CACHE/dataset_digests`` forgets every digest.
"""
import hashlib
import json
import os
from typing import Dict, Iterable, List, Tuple

import PIL

from kdzoo.utils.errors import DataError
from kdzoo.utils.fileio import atomic_write_text, kdzoo_cache_dir

__all__ = ['files_fingerprint']

# bump when what the digest covers changes: remembered digests of the older
# form are then not used
DIGEST_VERSION = 1
_CHUNK = 1 << 20


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f'{path}: cannot be read ({e.strerror})') from None
    return f'{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}'


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(_CHUNK), b''):
                h.update(block)
    except OSError as e:
        raise DataError(f'{path}: cannot be read ({e.strerror})') from None
    return h.hexdigest()


def _metadata_key(header: bytes, paths: List[str],
                  items: List[Tuple[int, object]]) -> str:
    """SHA-256 of the items' file metadata (``_stat``) and extras."""
    stats = [_stat(path) for path in paths]
    h = hashlib.sha256(header)
    for index, extra in items:
        h.update(f'\n{paths[index]}|{stats[index]}|{extra}'.encode())
    return h.hexdigest()


def _relative_names(paths: List[str]) -> List[str]:
    """Each path relative to the files' common folder, '/'-separated (the
    absolute path where there is none, e.g. on two Windows drives)."""
    try:
        root = os.path.commonpath(paths)
        if len(paths) == 1:
            root = os.path.dirname(root)
        names = [os.path.relpath(path, root) for path in paths]
    except ValueError:
        names = list(paths)
    return [name.replace(os.sep, '/') for name in names]


def _content_digest(header: bytes, paths: List[str],
                    items: List[Tuple[int, object]]) -> str:
    """SHA-256 of the items' file bytes, relative paths and extras."""
    names = _relative_names(paths)
    digests = [_file_digest(path) for path in paths]
    h = hashlib.sha256(header)
    for index, extra in items:
        h.update(f'\n{names[index]}|{digests[index]}|{extra}'.encode())
    return h.hexdigest()


def files_fingerprint(kind: str, settings: dict,
                      items: Iterable[Tuple[str, object]]) -> str:
    """SHA-256 of ``kind``, ``settings`` (JSON) and, per item in order, its
    source file's bytes and path relative to the files' common folder plus
    ``extra`` (label, offset...).

    ``items`` yields ``(path, extra)``; a file is read once however many
    items it holds (RecordIO). The digest is remembered by the files'
    metadata (module docstring), so an unchanged dataset is not read again.
    """
    header = json.dumps(dict(kind=kind, pillow=PIL.__version__,
                             digest_version=DIGEST_VERSION, **settings),
                        sort_keys=True, default=str).encode()
    index_of: Dict[str, int] = {}
    paths: List[str] = []
    indexed = []
    for path, extra in items:
        index = index_of.get(path)
        if index is None:
            absolute = os.path.abspath(path)
            index = index_of[path] = len(paths)
            paths.append(absolute)
        indexed.append((index, extra))
    key = _metadata_key(header, paths, indexed)
    memo = os.path.join(kdzoo_cache_dir('dataset_digests'), key + '.txt')
    try:
        with open(memo) as f:
            digest = f.read().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = _content_digest(header, paths, indexed)
    if _metadata_key(header, paths, indexed) == key:  # unchanged meanwhile
        try:
            atomic_write_text(memo, digest + '\n')
        except OSError:  # a read-only cache: read the files again next time
            pass
    return digest
