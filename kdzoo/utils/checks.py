"""Argument checks for every kdzoo component, in one message style.

Each check returns the normalised value or raises :class:`ConfigError`
(``ValueError`` for tensors that arrive at run time) reading
``"<owner>: <name> must be <what>, got <value>"``, where ``owner`` is the
class or option that received the value. Components import these instead of
writing their own.
"""
import contextlib
import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

from .errors import ConfigError

__all__ = ['is_finite_number', 'is_int', 'check_number', 'check_int',
           'check_size', 'check_class_labels', 'no_autocast']


def _where(owner: Optional[str], name: str) -> str:
    return f'{owner}: {name}' if owner else name


def is_finite_number(value) -> bool:
    """A finite int or float (bools and numpy scalars of those count)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(owner: Optional[str], name: str, value, low=None, high=None,
                 low_open: bool = False, high_open: bool = False,
                 what: str = '') -> float:
    """``float(value)`` if it is a finite number in the range, else
    ``ConfigError`` naming owner, argument, range, ``what`` it means and the
    value. ``low_open``/``high_open`` exclude the bound."""
    ok = is_finite_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = '' if low is None else f"{'>' if low_open else '>='} {low}"
        hi = '' if high is None else f"{'<' if high_open else '<='} {high}"
        rng = ' and '.join(x for x in (lo, hi) if x)
        raise ConfigError(f'{_where(owner, name)} must be a finite number'
                          f"{' ' + rng if rng else ''}"
                          f"{' (' + what + ')' if what else ''}, got "
                          f'{value!r}')
    return float(value)


def check_int(owner: Optional[str], name: str, value, low: int = 1,
              what: str = '', allow_none: bool = False) -> Optional[int]:
    """``int(value)`` if it is an integer >= ``low`` (or ``None`` when
    ``allow_none``), else ``ConfigError``."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < low:
        raise ConfigError(f'{_where(owner, name)} must be an integer >= {low}'
                          f"{' or None' if allow_none else ''}"
                          f"{' (' + what + ')' if what else ''}, got "
                          f'{value!r}')
    return int(value)


def check_size(owner: Optional[str], value, name: str = 'input_size',
               divisor: int = 1,
               allow_none: bool = False) -> Optional[Tuple[int, int]]:
    """``(H, W)`` from an int or a pair of positive integers, each a
    multiple of ``divisor`` (a network's total stride), else
    ``ConfigError``; ``None`` stays ``None`` when ``allow_none``."""
    if value is None and allow_none:
        return None
    if is_int(value):
        value = (value, value)
    ok = isinstance(value, Sequence) and not isinstance(value, str) \
        and len(value) == 2 and all(is_int(v) and v > 0 for v in value)
    if not ok:
        raise ConfigError(f'{_where(owner, name)} must be an int or (h, w) of '
                          f'positive integers, got {value!r}')
    size = (int(value[0]), int(value[1]))
    if any(v % divisor for v in size):
        raise ConfigError(
            f'{_where(owner, name)} {size} must be divisible by {divisor} '
            f'(the network downsamples by {divisor}); e.g. '
            f'{tuple(max(divisor, v // divisor * divisor) for v in size)}')
    return size


def check_class_labels(owner: str, labels, num_classes: int,
                       batch: Optional[int] = None) -> torch.Tensor:
    """``labels`` as int64 if they are integer class indices in
    ``[0, num_classes)`` (and ``(batch,)`` when given), else ``ValueError``
    (they arrive with the data, at run time)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype == torch.bool \
            or labels.is_floating_point() or labels.is_complex():
        got = labels.dtype if isinstance(labels, torch.Tensor) else \
            type(labels).__name__
        raise ValueError(f'{owner}: labels must be an integer tensor of class '
                         f'indices in [0, {num_classes}), got {got}')
    if batch is not None and (labels.dim() != 1 or labels.shape[0] != batch):
        raise ValueError(f'{owner}: labels must have shape ({batch},), one '
                         f'class index per sample, got '
                         f'{tuple(labels.shape)}')
    if labels.numel():
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f'{owner}: labels must lie in [0, {num_classes}) (there are '
                f'{num_classes} classes), got label {bad}; check that the '
                'head / class centres cover every identity of the dataset')
    return labels.long()


def no_autocast(device_type: str):
    """A context that turns autocast off on ``device_type`` (a no-op for
    device types autocast does not know)."""
    available = getattr(torch.amp, 'is_autocast_available', None)
    if available is not None and not available(device_type):
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
