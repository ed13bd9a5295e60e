"""Keep glibc malloc from handing activation buffers back to the kernel.

A CPU training step allocates and frees the same large tensors (activations,
gradients) every iteration. With glibc's defaults, freed memory at the top
of the heap above ``M_TRIM_THRESHOLD`` is returned to the kernel and large
blocks are served by ``mmap``; both make the next step fault every page in
again: on a 2-core CPU a 112 px real-face training run spent 28 % of its
CPU time in the kernel (164,000 minor page faults/s) and ran at 0.65x a
plain PyTorch loop; with this setting under 1 % (about 1,000/s) and as fast
as the plain loop (see docs/speed.md).

:func:`tune_allocator` sets, through ``mallopt``:

- ``M_MMAP_MAX`` 0: no block is served by ``mmap``, so the large
  activation buffers (a 112 px batch of 128 has several of 50-100 MiB,
  above glibc's largest mmap threshold of 32 MiB) are reused from the heap
  instead of being mapped, faulted in and unmapped every step;
- ``M_MMAP_THRESHOLD`` 32 MiB (glibc's largest; it also turns off the
  dynamic threshold, which starts at 128 KiB; it matters only where a user
  raises ``M_MMAP_MAX`` again);
- ``M_TRIM_THRESHOLD`` 1 GiB (keep up to 1 GiB of freed top-of-heap);
- ``M_TOP_PAD`` 256 MiB (grow the heap in large steps).

The cost is resident memory: up to ~1.3 GiB freed by the process may stay
mapped to it. ``kdzoo`` commands call it at start-up, before any tensor is
made; forked DataLoader workers inherit the setting (it lives in the
process's memory), and processes started by ``torchrun -m kdzoo.cli`` or by
``kdzoo compare --jobs`` run the same start-up. Turn it off with
``KDZOO_MALLOC_TUNING=0`` in the environment; it is skipped where the C
library is not glibc (macOS, musl, Windows) and where the user already
tunes malloc through ``GLIBC_TUNABLES``.
"""
import ctypes
import os
import platform
from typing import Dict, Optional

__all__ = ['tune_allocator', 'malloc_tuning', 'MALLOC_SETTINGS', 'ENV_SWITCH']

ENV_SWITCH = 'KDZOO_MALLOC_TUNING'

# mallopt parameter numbers from glibc's <malloc.h> and the values set.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
MALLOC_SETTINGS = {
    'M_MMAP_MAX': (_M_MMAP_MAX, 0),
    'M_MMAP_THRESHOLD': (_M_MMAP_THRESHOLD, 32 << 20),
    'M_TRIM_THRESHOLD': (_M_TRIM_THRESHOLD, 1 << 30),
    'M_TOP_PAD': (_M_TOP_PAD, 256 << 20),
}

_applied: Optional[Dict[str, object]] = None


def _disabled_by_env() -> bool:
    value = os.environ.get(ENV_SWITCH, '1').strip().lower()
    return value in ('0', 'false', 'no', 'off')


def tune_allocator(force: bool = False) -> Dict[str, object]:
    """Apply :data:`MALLOC_SETTINGS` once per process where it applies.

    Returns what happened: ``{'applied': bool, 'reason': str}`` plus, when
    applied, each parameter's value. ``force`` re-applies in a process that
    already did (tests)."""
    global _applied
    if _applied is not None and not force:
        return _applied
    result: Dict[str, object] = dict(applied=False)
    libc_name, _ = platform.libc_ver()
    if _disabled_by_env():
        result['reason'] = f'{ENV_SWITCH}={os.environ[ENV_SWITCH]}'
    elif libc_name != 'glibc':
        result['reason'] = (f'C library is {libc_name or "not glibc"}; '
                            'mallopt tuning is glibc-only')
    elif 'malloc' in os.environ.get('GLIBC_TUNABLES', ''):
        result['reason'] = 'GLIBC_TUNABLES already tunes malloc'
    else:
        mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
        if mallopt is None:
            result['reason'] = 'the C library has no mallopt'
        else:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            failed = [name for name, (param, value) in MALLOC_SETTINGS.items()
                      if mallopt(param, value) != 1]
            if failed:
                result['reason'] = f'mallopt refused {", ".join(failed)}'
            else:
                result.update(applied=True, reason='glibc mallopt',
                              **{name: value for name, (_, value)
                                 in MALLOC_SETTINGS.items()})
    _applied = result
    return result


def malloc_tuning() -> bool:
    """Whether this process runs with :data:`MALLOC_SETTINGS` (recorded in
    results.json: page faults change a run's speed, not its numbers)."""
    return bool(_applied and _applied.get('applied'))
