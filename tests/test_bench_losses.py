"""tools/bench_losses.py builds inputs for, and times, every registered loss
(at toy size: speed itself is never asserted)."""
import importlib.util
import json
import os

import kdzoo  # noqa: F401
from kdzoo.registry import LOSSES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def _bench_module():
    path = os.path.join(ROOT, 'tools', 'bench_losses.py')
    spec = importlib.util.spec_from_file_location('bench_losses', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_loss_is_timed_or_says_why(tmp_path, capsys):
    out = tmp_path / 'losses.json'
    assert _bench_module().main(['--batch', '16', '--dim', '32', '--repeats',
                                 '1', '--device', 'cpu', '--out',
                                 str(out)]) == 0
    record = json.loads(out.read_text())
    timed = {r['loss'] for r in record['results']}
    assert timed | set(record['skipped']) == set(LOSSES.module_dict)
    assert not timed & set(record['skipped'])
    assert 'KDLoss' in timed and 'AgeAdversarialLoss' in timed
    for row in record['results']:
        assert row['median_ms'] >= row['min_ms'] >= 0
    assert record['settings']['batch'] == 16
    printed = capsys.readouterr().out
    assert 'forward+backward' in printed and 'not timed' in printed
