"""The malloc tuning kdzoo applies at start-up (kdzoo/utils/allocator.py).

The behavioural check counts minor page faults of a churn loop that mimics a
training step (buffers allocated, written and freed per round). With 24
one-MiB buffers, glibc's defaults give the freed top of the heap back to
the kernel every round and fault all 24 MiB in again (~6,100 faults a
round, 122,240 over 20 rounds here); with two 64 MiB buffers (above glibc's
largest mmap threshold, like a 112 px batch's activations) every block is
mapped and unmapped (~32,800 faults a round). Tuned, the memory stays in
the heap and the rounds fault nothing. The test asks for a factor of 10
between the two, far from both.
"""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from kdzoo.utils import allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                                reason='mallopt tuning applies to glibc only')

_CHURN = textwrap.dedent('''
    import ctypes, os, resource, sys
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    mode = sys.argv[1]
    size, count = int(sys.argv[2]) << 20, int(sys.argv[3])
    if mode != 'default':
        from kdzoo.utils.allocator import tune_allocator
        print('applied', tune_allocator()['applied'], flush=True)

    def rounds(n):
        for _ in range(n):
            ptrs = [libc.malloc(size) for _ in range(count)]
            for p in ptrs:
                ctypes.memset(p, 1, size)
            for p in reversed(ptrs):
                libc.free(p)

    def faults():
        rounds(2)  # first touches of the heap are not churn
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        rounds(20)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    if mode == 'forked':  # a DataLoader worker: forked after start-up
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, str(faults()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print('faults', os.read(read, 64).decode())
    else:
        print('faults', faults())
''')


@pytest.fixture(autouse=True)
def _keep_this_process_state():
    """The tests below re-run tune_allocator with patched platforms; the
    process keeps the state kdzoo's own start-up gave it."""
    state = allocator._applied
    yield
    allocator._applied = state


def _faults(mode, env=None, mib=1, count=24):
    out = subprocess.run(
        [sys.executable, '-c', _CHURN, mode, str(mib), str(count)],
        capture_output=True, text=True,
        env=dict(os.environ, **(env or {})), check=True).stdout
    lines = dict(line.split(' ', 1) for line in out.strip().splitlines())
    return int(lines['faults']), lines.get('applied')


def _huge_pages_always() -> bool:
    """With transparent huge pages 'always', the heap faults in 2 MiB at a
    time: the churn is ~500x fewer faults and this count cannot show it."""
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return '[always]' in f.read()
    except OSError:
        return False


@glibc_only
@pytest.mark.parametrize('mib,count', [(1, 24), (64, 2)],
                         ids=['heap-top', 'above-mmap-threshold'])
def test_tuning_stops_the_churn_and_reaches_forked_workers(mib, count):
    if _huge_pages_always():
        pytest.skip('transparent huge pages are always on here')
    default, _ = _faults('default', mib=mib, count=count)
    tuned, applied = _faults('tuned', {allocator.ENV_SWITCH: '1'}, mib, count)
    forked, _ = _faults('forked', {allocator.ENV_SWITCH: '1'}, mib, count)
    assert applied == 'True'
    # the untuned loop does churn: about every page of every round
    assert default > 20 * count * mib * 256 // 2
    assert tuned * 10 < default
    assert forked * 10 < default


@glibc_only
def test_the_environment_switch_turns_it_off():
    if _huge_pages_always():
        pytest.skip('transparent huge pages are always on here')
    off, applied = _faults('tuned', {allocator.ENV_SWITCH: '0'})
    default, _ = _faults('default')
    assert applied == 'False'
    assert off > default // 2


@glibc_only
def test_applied_values_are_reported(monkeypatch):
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
    result = allocator.tune_allocator(force=True)
    assert result['applied'] is True
    for name, (_, value) in allocator.MALLOC_SETTINGS.items():
        assert result[name] == value


def test_skipped_cleanly_where_the_c_library_is_not_glibc(monkeypatch):
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    monkeypatch.setattr(allocator.platform, 'libc_ver', lambda: ('', ''))
    result = allocator.tune_allocator(force=True)
    assert result['applied'] is False
    assert 'glibc-only' in result['reason']


def test_a_users_own_glibc_tunables_are_left_alone(monkeypatch):
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    monkeypatch.setattr(allocator.platform, 'libc_ver',
                        lambda: ('glibc', '2.36'))
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.trim_threshold=1')
    result = allocator.tune_allocator(force=True)
    assert result == dict(applied=False,
                          reason='GLIBC_TUNABLES already tunes malloc')


def test_the_cli_applies_it_before_running_a_command(monkeypatch):
    from kdzoo import cli
    calls = []
    monkeypatch.setattr(allocator, 'tune_allocator',
                        lambda: calls.append(1) or {})
    assert cli.main(['list', 'losses']) == 0
    assert calls == [1]
