"""The speed benchmark scripts under tools/ run end to end on tiny inputs
and write their JSON (they measure speed; these tests check only that they
run and report what they say, never how fast)."""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_bin_dataset import encode, write_bin

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
# where kdzoo's malloc setting applies (kdzoo/utils/allocator.py)
TUNABLE = (platform.libc_ver()[0] == 'glibc'
           and 'malloc' not in os.environ.get('GLIBC_TUNABLES', ''))


def _image_folder(root, identities=3, per_identity=6, size=32):
    rng = np.random.default_rng(0)
    for i in range(identities):
        os.makedirs(root / f'id{i}')
        for j in range(per_identity):
            Image.fromarray(rng.integers(0, 256, (size, size, 3),
                                         dtype=np.uint8)).save(
                root / f'id{i}' / f'{j}.jpg')
    return str(root)


def _run(script, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools',
                                                        script), *args],
                          capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_end_to_end_bench_measures_both_sides(tmp_path):
    data = _image_folder(tmp_path / 'faces')
    out = tmp_path / 'e2e.json'
    proc = _run('bench_end_to_end.py', '--data-root', data,
                '--image-size', '32', '--batch-size', '4', '--warmup', '1',
                '--iters', '2', '--malloc', 'both', '--out', str(out),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = {(r['side'], r['malloc']): r for r in record['rows']}
    assert set(rows) == {(s, m) for s in ('plain', 'kdzoo')
                         for m in ('off', 'on')}
    for (side, malloc), row in rows.items():
        assert row['iters'] == 2 and row['images_per_s'] > 0
        assert 0 <= row['kernel_share'] <= 1
        assert row['peak_rss_mib'] > 0
        assert row['malloc_tuning'] is (malloc == 'on' and TUNABLE)
    assert set(record['ratios']) == {
        'kdzoo / plain images/s (malloc off)',
        'kdzoo / plain images/s (malloc on)'}
    assert 'kdzoo / plain images/s (malloc on)' in proc.stdout


def test_onnx_bench_compares_kdzoo_with_onnxruntime(tmp_path):
    pytest.importorskip('onnxruntime')
    from kdzoo.registry import BACKBONES
    net = BACKBONES.build(dict(type='IResNet', width_mult=0.25,
                               layers=(1, 1, 1, 1), embedding_size=8,
                               input_size=(32, 32))).eval()
    model = str(tmp_path / 'tiny.onnx')
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), model, dynamo=False,
                      input_names=['input'],
                      dynamic_axes={'input': {0: 'N'}})
    rng = np.random.default_rng(0)
    images = [encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
              for _ in range(12)]
    data = write_bin(tmp_path / 'tiny.bin', images, [True, False] * 3)
    out = tmp_path / 'onnx.json'
    proc = _run('bench_onnx.py', '--model', model, '--bin', data,
                '--batch-size', '4', '--repeats', '1', '--out', str(out),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record['images'] == 12
    assert set(record['settings']) == {
        'onnxruntime direct', 'kdzoo evaluate',
        'kdzoo evaluate (onnx2torch)', 'onnxruntime direct (cache batches)',
        'teacher cache build'}
    # kdzoo runs the same session on the same pixels: same embeddings
    assert record['max_relative_difference'] <= 1e-6
    assert set(record['ratios']) == {'kdzoo evaluate / direct',
                                     'teacher cache build / direct'}


def test_eval_bench_reports_every_setting_with_its_difference(tmp_path):
    out = tmp_path / 'eval.json'
    proc = _run('bench_eval.py', '--image-size', '32', '--batch-size', '4',
                '--width', '0.25', '--repeats', '1', '--out', str(out),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())['rows']
    assert set(rows) == {'as trained (fuse_bn=False)', 'channels-last only',
                         'BatchNorm folded only',
                         'kdzoo: folded + channels-last'}
    assert rows['as trained (fuse_bn=False)']['max_relative_difference'] == 0
    # the other settings compute the same embeddings up to float rounding
    for row in rows.values():
        assert row['images_per_s'] > 0
        assert row['max_relative_difference'] <= 2e-5
