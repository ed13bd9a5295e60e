"""Loading third-party weights safely (``torch.load(weights_only=True)``).

Teacher and user weight files are untrusted: they are loaded on CPU with
``weights_only=True``, so a file carrying pickled code is refused instead of
executed. (The runner's own resume checkpoints go through the allow-list in
``kdzoo.engine.checkpoint``.)
"""
import os
import pickle
from collections import OrderedDict
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from .errors import CheckpointError

# Containers that wrap a state dict in common checkpoint layouts.
STATE_DICT_CONTAINER_KEYS = ('state_dict', 'model', 'model_state_dict',
                             'backbone', 'net')
# Prefixes stripped when every key carries them (DDP, wrappers, kdzoo runs).
DEFAULT_PREFIXES = ('module.', 'student.backbone.', 'backbone.', 'model.')


def load_weights_file(path: str, what: str = 'checkpoint') -> object:
    """``torch.load`` a weights file on CPU with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{what} file not found: {path!r}. Check the '
                              'path (relative paths are relative to the '
                              'current directory).')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'{what} {path!r} holds pickled Python objects besides tensors, '
            'and kdzoo loads weight files with weights_only=True so they '
            'cannot run code. If you trust the file, re-save only its '
            'weights: torch.save(torch.load(path, weights_only=False)'
            "['state_dict'], 'weights.pth'). Loader said: "
            f'{str(e).splitlines()[0]}') from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f'{what} {path!r} is not a readable PyTorch '
                              f'file (truncated or corrupt?): {e}') from None


def extract_state_dict(obj: object, path: str = '<memory>',
                       prefixes: Sequence[str] = DEFAULT_PREFIXES
                       ) -> Dict[str, torch.Tensor]:
    """Find the tensor dict in a loaded checkpoint and strip wrapper prefixes.

    Accepts a bare state dict or one nested under ``state_dict``/``model``/...
    A prefix is stripped only when it starts every key, repeatedly (so
    ``module.backbone.`` becomes bare keys).
    """
    state = obj
    for _ in range(3):
        if isinstance(state, dict) and state and all(
                isinstance(v, torch.Tensor) for v in state.values()):
            break
        if isinstance(state, dict):
            inner = next((state[k] for k in STATE_DICT_CONTAINER_KEYS
                          if isinstance(state.get(k), dict)), None)
            if inner is not None:
                state = inner
                continue
        raise CheckpointError(
            f'{path!r} holds no state dict (a dict of tensor names to '
            f'tensors); top-level keys: '
            f'{list(obj.keys())[:10] if isinstance(obj, dict) else type(obj)}')
    state = OrderedDict(state)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if state and all(k.startswith(prefix) for k in state):
                state = OrderedDict(
                    (k[len(prefix):], v) for k, v in state.items())
                changed = True
    return state


def select_prefix(state: Dict[str, torch.Tensor],
                  prefix: str) -> Dict[str, torch.Tensor]:
    """Keep the keys under ``prefix`` (stripped), e.g. a kdzoo run's head."""
    return OrderedDict((k[len(prefix):], v) for k, v in state.items()
                       if k.startswith(prefix))


def load_into(module: nn.Module, state: Dict[str, torch.Tensor],
              source: str, strict: bool = True,
              ignore: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module``; a clear error on key/shape mismatch.

    The error lists missing and unexpected keys (first few) and every shape
    mismatch, naming ``source`` (usually the file).
    """
    own = module.state_dict()
    ignore = tuple(ignore)
    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape))
                  for k in own if k in state and state[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f'weights in {source} do not fit {type(module).__name__}:']
        if missing:
            lines.append(f'  missing keys ({len(missing)}): {_head(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): '
                         f'{_head(unexpected)}')
        for k, got, want in mismatched[:10]:
            lines.append(f'  shape mismatch for {k}: file {got}, model {want}')
        lines.append('  Check that the backbone config (type, depth, '
                     'embedding_size, width_mult, input_size) matches the '
                     'one the weights were trained with.')
        raise CheckpointError('\n'.join(lines))
    module.load_state_dict(state, strict=False)


def _head(keys, n: int = 8) -> str:
    shown = ', '.join(keys[:n])
    return shown + (f', ... (+{len(keys) - n} more)' if len(keys) > n else '')


def load_module_weights(module: nn.Module, path: str,
                        what: str = 'checkpoint',
                        prefix: Optional[str] = None,
                        strict: bool = True) -> None:
    """Load a weights file into ``module`` (``weights_only=True``).

    ``prefix`` selects a sub-dict (e.g. ``'student.head.'``) before loading.
    """
    obj = load_weights_file(path, what)
    if prefix:
        state = select_prefix(extract_state_dict(obj, path, prefixes=()),
                              prefix)
        if not state:
            raise CheckpointError(f'{what} {path!r} has no keys under '
                                  f'{prefix!r}')
    else:
        state = extract_state_dict(obj, path)
    load_into(module, state, source=f'{what} {path!r}', strict=strict)
