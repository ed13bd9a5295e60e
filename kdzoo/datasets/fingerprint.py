"""Cheap identity of a dataset's content, for caches keyed by content.

Hashing every decoded image (``kdzoo.teachers.cache.dataset_checksum``) is
exact but reads the whole dataset on every run: hours for MS1M-sized sets.
A dataset may instead offer ``content_fingerprint()``: a SHA-256 of what
its images are made from -- each source file's path, size and modification
time (ns), the item order and labels, and the decode settings (output size,
Pillow version). A file rewritten in place gets a new mtime, hence a new
fingerprint; only a file restored with its old size *and* mtime would go
unnoticed (delete the cache then).
"""
import hashlib
import json
import os
from typing import Iterable, Tuple

import PIL

from kdzoo.utils.errors import DataError

__all__ = ['files_fingerprint']


def files_fingerprint(kind: str, settings: dict,
                      items: Iterable[Tuple[str, object]]) -> str:
    """SHA-256 of ``kind``, ``settings`` (JSON) and, per item in order, its
    source file's path, size and mtime plus ``extra`` (label, offset...).

    ``items`` yields ``(path, extra)``; a file is stat'ed once however many
    items it holds (RecordIO).
    """
    h = hashlib.sha256()
    h.update(json.dumps(dict(kind=kind, pillow=PIL.__version__,
                             **settings), sort_keys=True,
                        default=str).encode())
    seen = {}
    for path, extra in items:
        path = os.path.abspath(path)
        stat = seen.get(path)
        if stat is None:
            try:
                st = os.stat(path)
            except OSError as e:
                raise DataError(f'{path}: cannot be read ({e.strerror})') \
                    from None
            stat = seen[path] = f'{st.st_size}|{st.st_mtime_ns}'
        h.update(f'\n{path}|{stat}|{extra}'.encode())
    return h.hexdigest()
