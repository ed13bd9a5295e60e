"""`kdzoo evaluate` refuses a .bin that cannot be scored (positive or
negative pairs missing, e.g. InsightFace's small_lfw.bin) before embedding
anything; such a file still loads as a plain dataset."""
import io
import json

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from kdzoo.cli import main
from kdzoo.datasets import InsightFaceBinDataset, write_bin
from kdzoo.registry import BACKBONES
from kdzoo.utils.errors import DataError


def jpeg(seed, size=(112, 112)):
    img = np.random.default_rng(seed).integers(0, 256, (*size, 3),
                                               dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


TINY_BACKBONE = dict(type='IResNet', width_mult=0.25, layers=(1, 1, 1, 1),
                     embedding_size=16, input_size=(112, 112))


def evaluate_refuses(tmp_path, capsys, monkeypatch, bin_path, counts):
    import kdzoo.commands.evaluate as pretrained

    def no_embedding(*args, **kwargs):
        raise AssertionError('embedded a set that cannot be scored')
    monkeypatch.setattr(pretrained, 'embed_dataset', no_embedding)
    model = str(tmp_path / 'model.pth')
    torch.save(BACKBONES.build(TINY_BACKBONE).state_dict(), model)
    assert main(['evaluate', '--model', model, '--backbone',
                 json.dumps(TINY_BACKBONE), '--bin', bin_path]) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'Traceback' not in err, err
    assert err.startswith(f'kdzoo evaluate: error: {bin_path}: {counts}; a '
                          'verification set needs both positive and negative '
                          'pairs'), err


def test_evaluate_refuses_a_one_sided_set_before_embedding(
        tmp_path, capsys, monkeypatch):
    path = str(tmp_path / 'same_only.bin')
    write_bin([(jpeg(1), jpeg(2))] * 3, [1, 1, 1], path)
    ds = InsightFaceBinDataset(path)  # still readable as a plain dataset
    assert len(ds) == 6 and ds[5]['inputs'].shape == (3, 112, 112)
    with pytest.raises(DataError, match='3 positive and 0 negative'):
        ds.check_verification()
    evaluate_refuses(tmp_path, capsys, monkeypatch, path,
                     '3 positive and 0 negative pairs')


def test_evaluate_refuses_small_lfw(tmp_path, capsys, monkeypatch):
    path = shared_path('data', 'verification', 'small_lfw.bin')
    evaluate_refuses(tmp_path, capsys, monkeypatch, path,
                     '10 positive and 0 negative pairs')


def test_evaluate_checks_every_file_before_embedding_any(
        tmp_path, capsys, monkeypatch):
    good = str(tmp_path / 'good.bin')
    write_bin([(jpeg(1), jpeg(2)), (jpeg(3), jpeg(3))], [0, 1], good)
    bad = str(tmp_path / 'diff_only.bin')
    write_bin([(jpeg(1), jpeg(2))] * 2, [0, 0], bad)
    import kdzoo.commands.evaluate as pretrained

    def no_embedding(*args, **kwargs):
        raise AssertionError('embedded before checking every file')
    monkeypatch.setattr(pretrained, 'embed_dataset', no_embedding)
    model = str(tmp_path / 'model.pth')
    torch.save(BACKBONES.build(TINY_BACKBONE).state_dict(), model)
    assert main(['evaluate', '--model', model, '--backbone',
                 json.dumps(TINY_BACKBONE), '--bin', good, '--bin',
                 bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'kdzoo evaluate: error: {bad}: 0 positive and 2 '
                          'negative pairs') and '\n' not in err
