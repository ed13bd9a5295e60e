"""Taps: named tensors a loss can bind to, recorded by forward hooks.

A tap is written ``<source>.<target>[:input]``:

- ``source`` is ``student``, a teacher's name from the recipe, or ``data``;
- for a model, ``target`` is ``embedding`` (the backbone's output),
  ``logits`` (the head's margin-free ``s*cos``), ``stage1``..``stage4`` (the
  backbone's stage outputs) or any module path inside the backbone/teacher
  network, e.g. ``layer3.1.conv2``; ``:input`` records the module's first
  input instead of its output;
- for ``data``: ``label``, ``age`` or ``index`` (per-sample ints).

Recorded tensors live only for one training step.
"""
import contextlib
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from kdzoo.utils import ConfigError, did_you_mean

DATA_KEYS = ('label', 'age', 'index')
SPECIAL_TARGETS = ('embedding', 'logits')
_STAGE = re.compile(r'^stage(\d+)$')


@dataclass(frozen=True)
class Tap:
    """One parsed tap: where the tensor comes from and how it is recorded."""
    text: str  # as written in the recipe
    source: str  # 'student' | teacher name | 'data'
    target: str  # 'embedding' | 'logits' | data key | module path
    record_input: bool = False

    @property
    def is_module(self) -> bool:
        return self.source != 'data' and self.target not in SPECIAL_TARGETS


def parse_tap(text: str, sources: List[str], where: str) -> Tap:
    """Parse ``text``; ``sources`` are the valid model names (student first)."""
    if not isinstance(text, str) or '.' not in text:
        raise ConfigError(
            f'{where}: tap {text!r} must look like "<source>.<target>", e.g. '
            f'"student.embedding" or "{sources[-1]}.stage3"; sources: '
            f'{sources + ["data"]}')
    record_input = text.endswith(':input')
    body = text[:-len(':input')] if record_input else text
    source, target = body.split('.', 1)
    if source not in sources and source != 'data':
        raise ConfigError(f'{where}: unknown tap source {source!r} in '
                          f'{text!r}; known sources: {sources + ["data"]}.'
                          + did_you_mean(source, sources + ['data']))
    if source == 'data':
        if target not in DATA_KEYS or record_input:
            raise ConfigError(f'{where}: {text!r}: data taps are '
                              f'{["data." + k for k in DATA_KEYS]}')
    elif target in SPECIAL_TARGETS and record_input:
        raise ConfigError(f'{where}: {text!r}: ":input" applies to module '
                          f'paths, not to {target!r}')
    return Tap(text=text, source=source, target=target,
               record_input=record_input)


def resolve_module_path(tap: Tap, network: nn.Module,
                        stage_paths, where: str) -> str:
    """Map ``stageN`` to a module path and check the path exists."""
    path = tap.target
    m = _STAGE.match(path)
    if m:
        i = int(m.group(1))
        if not 1 <= i <= len(stage_paths):
            raise ConfigError(
                f'{where}: {tap.text!r}: {tap.source} has '
                f'{len(stage_paths)} known stages {list(stage_paths)}; give '
                'the model stage_paths or use a module path')
        path = stage_paths[i - 1]
    names = dict(network.named_modules())
    if path not in names or path == '':
        near = did_you_mean(path, [n for n in names if n]) or (
            ' Did you mean one of its top-level modules: '
            f'{[n for n, _ in network.named_children()]}?')
        raise ConfigError(
            f'{where}: {tap.text!r}: no module {path!r} in {tap.source} '
            f'({type(network).__name__}).{near} Stages: '
            f'{list(stage_paths)}; list all paths with '
            f'[n for n, _ in model.named_modules()].')
    return path


class TapRecorder:
    """Forward hooks that store tapped module inputs/outputs for one step."""

    def __init__(self):
        self.records: Dict[str, torch.Tensor] = {}
        self._handles = []
        self.active = False

    def add(self, key: str, module: nn.Module, record_input: bool) -> None:
        def hook(_module, args, output):
            if not self.active:
                return
            value = args[0] if record_input else output
            if not isinstance(value, torch.Tensor):
                raise TypeError(f'tap {key!r} recorded a {type(value)}, not a '
                                'tensor; tap a module whose '
                                f'{"input" if record_input else "output"} '
                                'is a tensor')
            self.records[key] = value

        self._handles.append(module.register_forward_hook(hook))

    @contextlib.contextmanager
    def recording(self):
        """Record while the block runs (one step's forward passes), then
        pause: later passes through tapped modules (a loss running a
        teacher's stages) do not overwrite the records, which stay until
        :meth:`clear`."""
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def get(self, key: str) -> Optional[torch.Tensor]:
        return self.records.get(key)

    def clear(self) -> None:
        self.records.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
