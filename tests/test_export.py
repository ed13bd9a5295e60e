"""``kdzoo export``: a run's student backbone as .pth (arcface_torch layout)
or .onnx (dynamic batch, checked in onnxruntime), with a sidecar JSON.

One tiny angular-KD run (student + connector + head + random teacher, 1
epoch, a few seconds) is trained per module and exported several ways.
"""
import hashlib
import io
import json
import os
import pickle
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import kdzoo  # noqa: F401
from kdzoo.cli import main
from kdzoo.engine import load_recipe, runner_checkpoint_policy, train_recipe
from kdzoo.registry import BACKBONES
from kdzoo.version import __version__
from tiny_runs import STUDENT_BACKBONE, random_teacher, tiny_options

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
KD = os.path.join(ROOT, 'recipes', 'kd', 'angular_kd_synthface_age.py')
PREFIX = 'student.backbone.'


@pytest.fixture(scope='module')
def run(tmp_path_factory, cache_dir):
    """Work dir of a finished tiny KD run (epoch_1.pth, backbone.pth)."""
    root = tmp_path_factory.mktemp('export_run')
    teacher = random_teacher(root / 'teacher.pth')
    work = str(root / 'kd')
    cfg = load_recipe(KD, tiny_options(cache_dir, test=False, **{
        'model.teachers.teacher_fr.checkpoint': teacher}), work)
    train_recipe(cfg, run_test=False)
    return work


def runner_state(path):
    with runner_checkpoint_policy():
        return torch.load(path, map_location='cpu',
                          weights_only=True)['state_dict']


def student_of(state):
    """A fresh student backbone holding ``state``'s student.backbone.*."""
    backbone = BACKBONES.build(STUDENT_BACKBONE).eval()
    backbone.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()
                              if k.startswith(PREFIX)}, strict=True)
    return backbone


def read_json(path):
    with open(path) as f:
        return json.load(f)


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert 'Traceback' not in err and len(lines) == 1, err
    assert lines[0].startswith('kdzoo export: error: '), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def fake_run(root, config_text, files=()):
    """A run dir with a hand-written config and copies of ``files``."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'recipe.py'), 'w') as f:
        f.write(config_text)
    for src, name in files:
        shutil.copy(src, os.path.join(root, name))
    return str(root)


STUDENT_ONLY_CONFIG = f'''
model = dict(type='FaceDistiller',
             data_preprocessor=dict(type='FaceDataPreprocessor',
                                    mean=[120.0, 110.0, 100.0], std=64.0),
             student=dict(backbone={STUDENT_BACKBONE!r}))
'''


# ------------------------------------------------------------------ pth
def test_pth_is_the_student_backbone_alone(run, tmp_path, capsys):
    out = str(tmp_path / 'student.pth')
    assert main(['export', run, '--format', 'pth', '--out', out]) == 0
    assert f'exported: {out}' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ['student.pth', 'student.pth.json']

    exported = torch.load(out, weights_only=True)
    state = runner_state(os.path.join(run, 'epoch_1.pth'))
    # the checkpoint holds more than the backbone: the test can tell
    assert any(k.startswith('student.head.') for k in state)
    assert any(k.startswith('connectors.proj_fr.') for k in state)
    fresh = BACKBONES.build(STUDENT_BACKBONE)
    assert list(exported) == list(fresh.state_dict())  # arcface_torch keys
    assert set(exported) == {k[len(PREFIX):] for k in state
                             if k.startswith(PREFIX)}
    for key, value in exported.items():
        assert torch.equal(value, state[PREFIX + key]), key
    assert not [k for k in exported if k.startswith(
        ('student.', 'backbone.', 'head.', 'connectors.', 'teachers.',
         'module.'))]
    # the run's own ExportStudentHook copy holds the same tensors
    hook_copy = torch.load(os.path.join(run, 'backbone.pth'),
                           weights_only=True)
    assert all(torch.equal(hook_copy[k], v) for k, v in exported.items())

    fresh.load_state_dict(exported, strict=True)
    fresh.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), student_of(state)(x))

    side = read_json(out + '.json')
    assert side['format'] == 'pth' and side['file'] == 'student.pth'
    assert side['embedding_size'] == 64 and side['input_size'] == [32, 32]
    assert side['input']['mean'] == [127.5] * 3
    assert side['input']['std'] == [128.0] * 3
    assert side['backbone'] == json.loads(json.dumps(STUDENT_BACKBONE))
    assert side['source_run'] == os.path.abspath(run)
    assert side['checkpoint'] == os.path.abspath(
        os.path.join(run, 'epoch_1.pth'))
    assert side['config'] == os.path.abspath(
        os.path.join(run, 'angular_kd_synthface_age.py'))
    assert (side['checkpoint_epoch'], side['checkpoint_iter']) == (1, 4)
    assert side['kdzoo_version'] == __version__
    with open(out, 'rb') as f:
        assert side['sha256'] == hashlib.sha256(f.read()).hexdigest()


def test_newest_complete_checkpoint_and_default_output(run, tmp_path,
                                                       capsys):
    state = runner_state(os.path.join(run, 'epoch_1.pth'))
    with runner_checkpoint_policy():
        ckpt = torch.load(os.path.join(run, 'epoch_1.pth'),
                          weights_only=True)
    ckpt['state_dict'] = {k: v + 1 if k.startswith(PREFIX) and
                          v.is_floating_point() else v
                          for k, v in state.items()}
    ckpt['meta']['epoch'] = 2
    work = fake_run(tmp_path / 'run', STUDENT_ONLY_CONFIG,
                    [(os.path.join(run, 'epoch_1.pth'), 'epoch_1.pth')])
    torch.save(ckpt, os.path.join(work, 'epoch_2.pth'))
    with open(os.path.join(work, 'epoch_3.pth'), 'wb') as f:
        f.write(b'truncated')  # a checkpoint cut off mid-write: skipped

    pointer = os.path.join(work, 'last_checkpoint')
    with open(pointer, 'w') as f:
        f.write(os.path.join(work, 'epoch_3.pth'))
    assert main(['export', work, '--format', 'pth']) == 0
    with open(pointer) as f:  # export reads the run dir, never edits it
        assert f.read() == os.path.join(work, 'epoch_3.pth')
    out = os.path.join(work, 'export', 'student_epoch_2.pth')
    assert f'exported: {out}' in capsys.readouterr().out
    exported = torch.load(out, weights_only=True)
    for key, value in exported.items():
        assert torch.equal(value, ckpt['state_dict'][PREFIX + key]), key
    side = read_json(out + '.json')
    assert side['checkpoint_epoch'] == 2
    # the data preprocessor's normalisation, a scalar std made per channel
    assert side['input']['mean'] == [120.0, 110.0, 100.0]
    assert side['input']['std'] == [64.0] * 3

    # --checkpoint picks another one; a bare backbone.pth works too
    assert main(['export', work, '--format', 'pth', '--checkpoint',
                 os.path.join(run, 'backbone.pth'), '--out',
                 str(tmp_path / 'b.pth')]) == 0
    exported = torch.load(tmp_path / 'b.pth', weights_only=True)
    for key, value in exported.items():
        assert torch.equal(value, state[PREFIX + key]), key
    assert read_json(str(tmp_path / 'b.pth.json'))['checkpoint_epoch'] \
        is None


# ----------------------------------------------------------------- onnx
def test_onnx_matches_pytorch_at_several_batch_sizes(run, tmp_path, capsys):
    out = str(tmp_path / 'student.onnx')
    assert main(['export', run, '--format', 'onnx', '--out', out]) == 0
    printed = capsys.readouterr().out
    assert 'batch 1:' in printed and 'batch 3:' in printed
    assert sorted(os.listdir(tmp_path)) == ['student.onnx',
                                            'student.onnx.json']

    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    (inp, ), (outp, ) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ('input', 'embedding')
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    assert inp.type == 'tensor(float)'
    reference = student_of(runner_state(os.path.join(run, 'epoch_1.pth')))
    for n in (1, 3, 5):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            expected = reference(x).numpy()
        got = session.run(['embedding'], {'input': x.numpy()})[0]
        assert got.shape == (n, 64)
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    side = read_json(out + '.json')
    assert side['format'] == 'onnx' and side['opset'] == 17
    assert (side['input_name'], side['output_name']) == ('input', 'embedding')
    assert side['input']['mean'] == [127.5] * 3
    check = side['onnxruntime_check']
    assert sorted(check['batches']) == ['1', '3']
    assert check['tolerance_relative'] == 1e-4
    assert check['relative_diff'] <= 1e-4
    assert check['max_abs_diff'] == max(
        b['max_abs_diff'] for b in check['batches'].values())


def test_onnx_mismatch_fails_and_writes_nothing(run, tmp_path, capsys,
                                                monkeypatch):
    from kdzoo.commands import export
    real = export._onnx_bytes

    def perturbed(backbone, input_size, opset):  # a graph of other weights
        other = BACKBONES.build(STUDENT_BACKBONE).eval()
        return real(other, input_size, opset)

    monkeypatch.setattr(export, '_onnx_bytes', perturbed)
    out = str(tmp_path / 'student.onnx')
    assert main(['export', run, '--format', 'onnx', '--out', out]) == 2
    one_line_error(capsys, 'ONNX export check failed', 'tolerance 0.0001')
    assert os.listdir(tmp_path) == []


def test_evaluate_runs_on_the_onnx_export(run, tmp_path, capsys):
    onnx_path = str(tmp_path / 'student.onnx')
    pth_path = str(tmp_path / 'student.pth')
    assert main(['export', run, '--format', 'onnx', '--out', onnx_path]) == 0
    assert main(['export', run, '--format', 'pth', '--out', pth_path]) == 0
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)
    issame = [bool(i % 2) for i in range(40)]
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format='PNG')
        blobs.append(buf.getvalue())
    bin_path = str(tmp_path / 'tiny.bin')
    with open(bin_path, 'wb') as f:
        pickle.dump((blobs, issame), f)

    # independent expectation: flip-sum cosine scores, Mann-Whitney AUC
    reference = student_of(runner_state(os.path.join(run, 'epoch_1.pth')))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 128
    with torch.no_grad():
        emb = reference(x) + reference(torch.flip(x, dims=[3]))
    emb = torch.nn.functional.normalize(emb.double(), dim=1)
    scores = (emb[0::2] * emb[1::2]).sum(1).numpy()
    pos = scores[np.array(issame)]
    neg = scores[~np.array(issame)]
    auc = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])

    results = {}
    for name, extra in (('onnx', ['--model', onnx_path]),
                        ('pth', ['--model', pth_path, '--backbone',
                                 json.dumps(STUDENT_BACKBONE)])):
        out = str(tmp_path / f'{name}.json')
        assert main(['evaluate', '--bin', bin_path, '--out', out] +
                    extra) == 0
        results[name] = read_json(out)['tiny']
    capsys.readouterr()
    assert results['onnx']['roc_auc'] == pytest.approx(auc, abs=1e-9)
    assert results['pth']['roc_auc'] == pytest.approx(auc, abs=1e-9)
    assert results['onnx']['accuracy'] == results['pth']['accuracy']


# --------------------------------------------------------------- errors
def test_errors_are_one_line(run, tmp_path, capsys):
    missing = str(tmp_path / 'nope')
    assert main(['export', missing, '--format', 'pth']) == 2
    one_line_error(capsys, 'run dir not found', missing)

    empty = tmp_path / 'empty'
    empty.mkdir()
    assert main(['export', str(empty), '--format', 'pth']) == 2
    one_line_error(capsys, 'no config in run dir', str(empty))

    no_ckpt = fake_run(tmp_path / 'no_ckpt', STUDENT_ONLY_CONFIG)
    assert main(['export', no_ckpt, '--format', 'onnx']) == 2
    one_line_error(capsys, 'no checkpoint in run dir', '--checkpoint')

    assert main(['export', run, '--format', 'onx']) == 2
    one_line_error(capsys, "unknown export format 'onx'", "'onnx'")

    headless = fake_run(tmp_path / 'headless', '''
model = dict(type='FaceDistiller', student=dict(
    head=dict(type='CosFace', embedding_size=64, num_classes=20)))
''', [(os.path.join(run, 'epoch_1.pth'), 'epoch_1.pth')])
    assert main(['export', headless, '--format', 'pth']) == 2
    one_line_error(capsys, 'model.student.backbone is missing',
                   'recipe.py')

    # a checkpoint carrying pickled objects is refused, not executed
    evil = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'payload': Payload()}, evil)
    assert main(['export', run, '--format', 'pth', '--checkpoint',
                 evil]) == 2
    one_line_error(capsys, evil, 'weights_only=True')

    # weights that do not fit the recipe's student
    wrong = str(tmp_path / 'wrong.pth')
    torch.save(BACKBONES.build(dict(STUDENT_BACKBONE, embedding_size=32))
               .state_dict(), wrong)
    assert main(['export', run, '--format', 'pth', '--checkpoint',
                 wrong]) == 2
    err = capsys.readouterr().err  # load_into lists the mismatches
    assert 'Traceback' not in err
    assert 'do not fit MobileFaceNet' in err and 'shape mismatch' in err
    assert not os.path.exists(os.path.join(run, 'export', 'student_wrong.pth'))


class Payload:
    """Stands for arbitrary pickled code in a checkpoint."""
