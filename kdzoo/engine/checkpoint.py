"""The runner's own checkpoints: atomic writes and an explicit load policy.

torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the
non-tensor objects mmengine 0.10.7 stores in resume checkpoints (the message
hub's ``HistoryBuffer``, numpy scalars/arrays). kdzoo does not switch the
policy off: it loads its own checkpoints with ``weights_only=True`` plus this
allow-list of the exact classes those checkpoints hold, so a checkpoint that
carries anything else (e.g. code) is still refused.
"""
import ast
import contextlib
import glob
import os
import pickle
import re
from typing import Optional

import numpy as np
import torch
from mmengine.fileio import register_backend
from mmengine.fileio.backends import LocalBackend
from mmengine.logging.history_buffer import HistoryBuffer

from kdzoo.utils import atomic_write_bytes, atomic_write_text


def _numpy_globals():
    names = [np.ndarray, np.dtype]
    names += [type(np.dtype(t)) for t in (
        'float16', 'float32', 'float64', 'int8', 'int16', 'int32', 'int64',
        'uint8', 'uint16', 'uint32', 'uint64', 'bool')]
    try:  # the array reconstructor moved in numpy 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    names += [_reconstruct, scalar]
    return names


# mmengine's HistoryBuffer.__getstate__ stores its statistics methods, which
# pickle as ``getattr(HistoryBuffer, 'min')`` etc. Allowing the real
# ``getattr`` would let a file reach any attribute of any allowed object, so
# ``builtins.getattr`` resolves to this function, which returns exactly those
# methods and refuses everything else.
_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')


def _history_buffer_getattr(obj, name):
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({getattr(obj, "__name__", type(obj).__name__)}, '
        f'{name!r}): runner checkpoints may only name HistoryBuffer '
        f'statistics {_HISTORY_BUFFER_METHODS}')


RUNNER_CHECKPOINT_ALLOWLIST = [
    HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')
] + _numpy_globals()


@contextlib.contextmanager
def runner_checkpoint_policy():
    """Load runner checkpoints with weights_only=True + the allow-list."""
    with torch.serialization.safe_globals(RUNNER_CHECKPOINT_ALLOWLIST):
        yield


def load_runner_checkpoint(path: str):
    """A runner checkpoint's contents, on the CPU, under this policy."""
    with runner_checkpoint_policy():
        return torch.load(path, map_location='cpu', weights_only=True)


@register_backend('kdzoo_atomic')
class AtomicLocalBackend(LocalBackend):
    """mmengine local file backend whose writes are atomic (temp + rename)."""

    def put(self, obj: bytes, filepath) -> None:
        atomic_write_bytes(str(filepath), obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write_bytes(str(filepath), obj.encode(encoding))


_CKPT_NUMBER = re.compile(r'(?:epoch|iter)_(\d+)\.pth$')


def _loadable(path: str) -> bool:
    try:
        ckpt = load_runner_checkpoint(path)
        return isinstance(ckpt, dict) and 'state_dict' in ckpt
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def checkpoint_files(work_dir: str) -> list:
    """The runner checkpoints (``epoch_N.pth``, ``iter_N.pth``) in
    ``work_dir``, highest N first; not opened."""
    candidates = []
    for path in glob.glob(os.path.join(work_dir, '*.pth')):
        m = _CKPT_NUMBER.search(os.path.basename(path))
        if m:
            candidates.append((int(m.group(1)), path))
    return [path for _, path in sorted(candidates, reverse=True)]


def find_resume_checkpoint(work_dir: str,
                           repair_pointer: bool = True) -> Optional[str]:
    """The newest complete checkpoint in ``work_dir``, or ``None``.

    ``last_checkpoint`` is trusted only if the file it names loads (looked
    up in ``work_dir``, whatever folder the pointer names, unless
    ``work_dir`` holds no checkpoint at all); otherwise
    ``epoch_*.pth``/``iter_*.pth`` are tried newest first, so a run killed
    while writing resumes from the last checkpoint that was fully written.
    With ``repair_pointer`` (resume), ``last_checkpoint`` is then rewritten
    to name that file; readers (``kdzoo export``) leave the run dir as is.
    """
    pointer = os.path.join(work_dir, 'last_checkpoint')
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        # the pointer holds the path the run was written under: a work dir
        # copied or moved since reads its own file of that name, not the
        # original's; the path itself only when the work dir holds no
        # checkpoint (they went to the checkpoint hook's out_dir)
        own = checkpoint_files(work_dir)
        for path in (os.path.join(work_dir, os.path.basename(named)),
                     None if own else named) if named else ():
            if path and os.path.isfile(path) and _loadable(path):
                return path
    for path in checkpoint_files(work_dir):
        if _loadable(path):
            if repair_pointer:
                atomic_write_text(pointer, path)
            return path
    return None


def trained_before(path: str) -> dict:
    """What a runner checkpoint says of the training before it: its file
    name, ``epoch``, ``iter`` and ``train_time_s``, the sum of the iteration
    times mmengine's ``IterTimerHook`` logged up to it (``train/time`` in
    the message hub; None when the checkpoint has none). The sum leaves out
    runner building and checkpoint writing (and mmengine keeps at most
    1,000,000 iteration times), so it is a lower bound of the wall time
    spent."""
    state = load_runner_checkpoint(path)
    meta = state.get('meta') or {}
    scalars = (state.get('message_hub') or {}).get('log_scalars') or {}
    times = scalars.get('train/time')
    seconds = None
    if isinstance(times, HistoryBuffer) and len(times.data[0]):
        seconds = round(float(np.sum(times.data[0])), 2)
    return dict(checkpoint=os.path.basename(path), epoch=meta.get('epoch'),
                iter=meta.get('iter'), train_time_s=seconds)


def saved_config(path: str) -> Optional[dict]:
    """The config an mmengine runner saved in its checkpoint
    (``meta.cfg``, the text of ``Config.pretty_text``) as plain data, or
    None when it holds none. The text is parsed, not executed: anything
    but assignments of literals, lists, tuples, dicts and ``dict(...)``
    raises ValueError."""
    state = load_runner_checkpoint(path)
    text = (state.get('meta') or {}).get('cfg')
    if not isinstance(text, str):
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ValueError(f'line {e.lineno}: {e.msg}') from None
    out = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f'line {node.lineno}: not an assignment of '
                             'plain data')
        out[node.targets[0].id] = _plain(node.value)
    return out


def _plain(node):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_plain(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_plain(k): _plain(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id == 'dict' and not node.args and \
            all(kw.arg for kw in node.keywords):
        return {kw.arg: _plain(kw.value) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _plain(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    raise ValueError(f'line {node.lineno}: {type(node).__name__} is not '
                     'plain data')
