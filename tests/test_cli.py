"""The ``kdzoo`` command line: train, evaluate, compare, list, and the
one-line errors for bad recipes and arguments.

Training runs use tiny SynthFaceAge splits (20 identities, 32 px, 1 epoch),
so each takes a few seconds on a 2-core CPU.
"""
import io
import json
import os
import platform
import pickle
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import kdzoo  # noqa: F401
from kdzoo.cli import main
from kdzoo.evaluation import roc_auc, tar_at_far, verification_accuracy
from kdzoo.registry import BACKBONES
from kdzoo.utils.environment import cpu_capability, cpu_description
from tiny_runs import (STUDENT_BACKBONE, TEACHER_BACKBONE, as_cli,
                       random_teacher, tiny_options)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPES = os.path.join(ROOT, 'recipes')
STUDENT = os.path.join(RECIPES, 'students', 'mbf_synthface_age.py')
TEACHER = os.path.join(RECIPES, 'teachers', 'iresnet_synthface_age.py')
KD = os.path.join(RECIPES, 'kd', 'angular_kd_synthface_age.py')


def tiny(cache_dir, epochs=1, **extra):
    return as_cli(tiny_options(cache_dir, epochs, **extra))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def scalars(work_dir):
    import glob
    (path, ) = glob.glob(os.path.join(work_dir, '*', 'vis_data',
                                      'scalars.json'))
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def one_line_error(capsys, *needles):
    """stderr is exactly one 'kdzoo <cmd>: error: ...' line with needles."""
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('kdzoo ') and ': error: ' in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------- train
def test_train_student_writes_results_and_exports(tmp_path, cache_dir,
                                                  capsys):
    work = str(tmp_path / 'student')
    assert main(['train', STUDENT, '--work-dir', work, '--cfg-options'] +
                tiny(cache_dir)) == 0
    out = capsys.readouterr().out
    assert f'results: {os.path.join(work, "results.json")}' in out

    record = read_json(os.path.join(work, 'results.json'))
    metrics = record['metrics']
    for key in ('cross_age/TAR@FAR=1e-2', 'cross_age/accuracy',
                'cross_age/roc_auc', 'standard/accuracy',
                'standard/TAR@FAR=1e-2', 'cross_age/rank1@0',
                'cross_age/rank1@20', 'cross_age/num_negatives'):
        assert key in metrics, sorted(metrics)
        if key.endswith(('TAR@FAR=1e-2', 'accuracy', 'rank1@20')):
            lo, hi = metrics[f'{key}_ci95']  # identity-bootstrap interval
            assert lo <= metrics[key] <= hi
    assert 0.0 <= metrics['cross_age/accuracy'] <= 100.0
    for key, value in metrics.items():
        if key.endswith(('roc_auc', '1e-2')) or '/rank1@' in key and \
                not key.endswith('_ci95'):
            assert 0.0 <= value <= 1.0, key
    # all pairs of the tiny split's test images: a few thousand negatives
    # at most, so FAR 1e-4 (< 10 negatives above) is left out
    assert metrics['cross_age/num_negatives'] * 1e-4 < 10
    assert 'cross_age/TAR@FAR=1e-4' not in metrics
    assert os.path.isfile(os.path.join(work, 'bootstrap.npz'))
    assert record['epochs'] == 1 and record['batch_size'] == 32
    assert record['teachers'] == [] and record['seed'] == 0
    # the machine the figures come from (float results depend on the CPU's
    # kernels and the thread count)
    assert record['cpu_model'] == cpu_description()
    assert record['cpu_capability'] == cpu_capability()
    assert record['num_threads'] == torch.get_num_threads()
    # main() tuned malloc where it can (kdzoo/utils/allocator.py)
    assert record['malloc_tuning'] is (
        platform.libc_ver()[0] == 'glibc'
        and os.environ.get('KDZOO_MALLOC_TUNING', '1') != '0'
        and 'malloc' not in os.environ.get('GLIBC_TUNABLES', ''))
    if not torch.cuda.is_available():
        assert record['device'].startswith(f'cpu ({cpu_description()}, ')

    backbone = torch.load(os.path.join(work, 'backbone.pth'),
                          weights_only=True)
    head = torch.load(os.path.join(work, 'head.pth'), weights_only=True)
    net = BACKBONES.build(STUDENT_BACKBONE)
    assert list(backbone) == list(net.state_dict())
    net.load_state_dict(backbone, strict=True)
    assert record['student_params'] == sum(p.numel()
                                           for p in net.parameters())
    assert tuple(head['weight'].shape) == (20, 64)  # num_classes x emb
    # the export is the final trained network: the runner checkpoint's
    # student.backbone.* tensors, prefix stripped
    from kdzoo.engine import runner_checkpoint_policy
    with runner_checkpoint_policy():
        ckpt = torch.load(os.path.join(work, 'epoch_1.pth'),
                          map_location='cpu', weights_only=True)
    prefix = 'student.backbone.'
    final = {k[len(prefix):]: v for k, v in ckpt['state_dict'].items()
             if k.startswith(prefix)}
    assert list(final) == list(backbone)
    assert all(torch.equal(final[k], backbone[k]) for k in backbone)
    # the resume pointer names the checkpoint
    with open(os.path.join(work, 'last_checkpoint')) as f:
        assert f.read().strip() == os.path.join(work, 'epoch_1.pth')
    # the test split's metrics were computed from the exported backbone:
    # `kdzoo test --checkpoint backbone.pth` reproduces them exactly
    assert main(['test', STUDENT, '--work-dir', str(tmp_path / 'retest'),
                 '--checkpoint', os.path.join(work, 'backbone.pth'),
                 '--cfg-options'] + tiny(cache_dir)) == 0
    again = read_json(str(tmp_path / 'retest' / 'test_results.json'))
    scalar = {k: v for k, v in metrics.items() if not k.endswith('_ci95')}
    assert {k: v for k, v in again['metrics'].items() if k in scalar} == \
        pytest.approx(scalar, abs=1e-9)
    assert {k: v for k, v in again['metrics'].items()
            if k.endswith('_ci95')} == {k: v for k, v in metrics.items()
                                        if k.endswith('_ci95')}


# --------------------------------------------------------------- errors
def test_unknown_backbone_type_one_line_suggestion(tmp_path, capsys):
    rc = main(['train', STUDENT, '--work-dir', str(tmp_path), '--cfg-options',
               "model.student.backbone.type=MobileFaceNett"])
    assert rc == 2
    one_line_error(capsys, "'MobileFaceNet'", 'model.student.backbone',
                   "'MobileFaceNett'")
    assert os.listdir(tmp_path) == []  # nothing built, nothing written


def test_unknown_dataset_type(tmp_path, capsys):
    rc = main(['train', STUDENT, '--work-dir', str(tmp_path), '--cfg-options',
               'train_dataloader.dataset.type=SynthFaceAgee'])
    assert rc == 2
    one_line_error(capsys, 'train_dataloader.dataset', "'SynthFaceAge'",
                   'dataset')


def test_unknown_loss_type_in_kd_recipe(tmp_path, capsys):
    rc = main(['train', KD, '--work-dir', str(tmp_path), '--cfg-options',
               'model.distill_losses.loss_ang.type=AngularDistilationLoss'])
    assert rc == 2
    one_line_error(capsys, 'model.distill_losses.loss_ang',
                   "'AngularDistillationLoss'")


def test_empty_scheduler_phase_names_the_key(tmp_path, capsys):
    # a recipe whose cosine phase begins where the 1-epoch run ends
    recipe = tmp_path / 'one_epoch.py'
    recipe.write_text(textwrap.dedent(f"""
        _base_ = [{os.path.abspath(STUDENT)!r}]
        param_scheduler = [
            dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0,
                 end=1, convert_to_iter_based=True),
            dict(type='CosineAnnealingLR', by_epoch=True, begin=1, end=1,
                 convert_to_iter_based=True)]
        train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1)
    """))
    work = tmp_path / 'work'
    assert main(['train', str(recipe), '--work-dir', str(work)]) == 2
    one_line_error(capsys, 'param_scheduler[1] (CosineAnnealingLR)',
                   'begin=1 and end=1', 'train_cfg.max_epochs=1')
    assert not work.exists()


def test_mmengine_build_error_names_the_key_and_leaves_nothing(
        tmp_path, cache_dir, capsys, monkeypatch):
    # every run below starts "in the same second": mmengine names a run's
    # logger, visualizer and log dir by its start time, so a retry would
    # get the failed run's back (writing into the removed log dir)
    import time
    second = time.strftime('%Y%m%d_%H%M%S')
    real = time.strftime
    monkeypatch.setattr(time, 'strftime', lambda fmt, *a: second
                        if fmt == '%Y%m%d_%H%M%S' else real(fmt, *a))
    # mmengine raises this while the runner builds its schedulers, after
    # the work dir and its log dir were made
    work = tmp_path / 'work'
    rc = main(['train', STUDENT, '--work-dir', str(work), '--cfg-options',
               'param_scheduler.0.start_factor=2'] + tiny(cache_dir))
    assert rc == 2
    one_line_error(capsys, 'param_scheduler: cannot be built: ValueError',
                   'Starting multiplicative factor', '--cfg-options')
    assert not work.exists()
    # in a work dir that held something before, only this run's additions go
    work.mkdir()
    (work / 'notes.txt').write_text('kept')
    assert main(['train', STUDENT, '--work-dir', str(work), '--cfg-options',
                 'param_scheduler.0.start_factor=2'] + tiny(cache_dir)) == 2
    assert os.listdir(work) == ['notes.txt']
    # and a correct run right after trains in the same work dir
    assert main(['train', STUDENT, '--work-dir', str(work), '--cfg-options']
                + tiny(cache_dir, test=False)) == 0
    assert os.path.isfile(work / 'backbone.pth')


def test_missing_recipe(tmp_path, capsys):
    missing = str(tmp_path / 'no_such_recipe.py')
    assert main(['train', missing]) == 2
    one_line_error(capsys, 'recipe not found', 'no_such_recipe.py')
    assert main(['test', missing]) == 2
    one_line_error(capsys, 'kdzoo test: error:', 'recipe not found')


PLUGIN = '''
"""A user's loss plugin (test)."""
import torch.nn.functional as F

from kdzoo.losses.base import BaseDistillLoss
from kdzoo.registry import LOSSES

SHAPES = []


@LOSSES.register_module()
class TmpPathCosineLoss(BaseDistillLoss):
    """Plugin loss from a tmp_path module: mean (1 - cos) (test only)."""

    def forward(self, s_emb, t_emb):
        SHAPES.append((tuple(s_emb.shape), tuple(t_emb.shape)))
        return self.loss_weight * (1 - F.cosine_similarity(s_emb, t_emb)).mean()
'''


def test_custom_imports_plugin_loss(tmp_path, cache_dir, capsys,
                                    monkeypatch):
    module = 'kdzoo_tmp_plugin_loss'
    plugins = tmp_path / 'plugins'
    plugins.mkdir()
    (plugins / f'{module}.py').write_text(PLUGIN)
    recipe = tmp_path / 'my_kd.py'
    recipe.write_text(textwrap.dedent(f'''
        _base_ = [{KD!r}]
        custom_imports = dict(imports=[{module!r}],
                              allow_failed_imports=False)
        model = dict(distill_losses=dict(
            _delete_=True,
            loss_cos=dict(type='TmpPathCosineLoss', loss_weight=2.0,
                          inputs=dict(s_emb=dict(tap='student.embedding',
                                                 connector='proj_fr'),
                                      t_emb='teacher_fr.embedding'))))
        '''))
    teacher = random_teacher(tmp_path / 'teacher.pth')
    options = tiny(cache_dir, **{
        'model.teachers.teacher_fr.checkpoint': teacher})
    work = str(tmp_path / 'work')

    # not importable yet: one line naming the module, no traceback
    assert main(['train', str(recipe), '--work-dir', work,
                 '--cfg-options'] + options) == 2
    one_line_error(capsys, 'custom_imports', module)

    monkeypatch.syspath_prepend(str(plugins))
    assert main(['train', str(recipe), '--work-dir', work,
                 '--cfg-options'] + options) == 0
    import importlib
    plugin = importlib.import_module(module)
    # 120 images / batch 32 = 4 iterations, each calling the plugin once
    assert plugin.SHAPES == [((32, 128), (32, 128))] * 3 + \
        [((24, 128), (24, 128))]
    last = scalars(work)[-1]
    assert 'loss_ang' not in last  # _delete_ replaced the recipe's loss
    assert 0 < last['loss_cos'] <= 4.0  # 2 * (1 - cos) in [0, 4]
    assert last['loss'] == pytest.approx(last['loss_cls'] + last['loss_cos'],
                                         rel=1e-4)
    capsys.readouterr()
    assert main(['list', 'losses', '--json']) == 0
    listed = json.loads(capsys.readouterr().out)['losses']
    assert listed['TmpPathCosineLoss'].startswith('Plugin loss from')


# --------------------------------------------------------------- list
def test_list_json(capsys):
    assert main(['list', '--json']) == 0
    table = json.loads(capsys.readouterr().out)
    expected = dict(losses=['KDLoss', 'AngularDistillationLoss'],
                    backbones=['IResNet', 'MobileFaceNet'],
                    datasets=['SynthFaceAge', 'InsightFaceBinDataset'],
                    metrics=['FaceVerificationMetric',
                             'FaceIdentificationMetric'],
                    heads=['CosFace'], teachers=['CheckpointTeacher'],
                    connectors=['LinearProjector'],
                    hooks=['ExportStudentHook'])
    for kind, names in expected.items():
        for name in names:
            summary = table[kind][name]
            assert isinstance(summary, str) and summary.strip(), (kind, name)
            assert '\n' not in summary
    assert 'IResNet' not in table['losses']
    assert main(['list', 'losses']) == 0
    out = capsys.readouterr().out
    assert 'KDLoss' in out and 'AngularDistillationLoss' in out
    assert 'MobileFaceNet' not in out
    with pytest.raises(SystemExit) as e:
        main(['list', 'lossez'])
    assert e.value.code == 2


# --------------------------------------------------------------- evaluate
def _tiny_bin(path, cache_dir, n_pairs=40):
    """An InsightFace .bin of SynthFaceAge test faces: half same-identity
    pairs, JPEG-encoded, interleaved positive/negative."""
    from kdzoo.datasets import SynthFaceAge
    ds = SynthFaceAge(split='test', num_identities=20, images_per_identity=4,
                      num_distractors=0, image_size=32, cache_dir=cache_dir)
    by_label = {}
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        by_label.setdefault(info['label'], []).append(info['img'])
    labels = sorted(by_label)
    blobs, issame = [], []
    for p in range(n_pairs):
        a = labels[(p // 2) % len(labels)]
        if p % 2 == 0:  # same identity, youngest vs oldest image
            pair = (by_label[a][0], by_label[a][-1])
        else:
            b = labels[(p // 2 + 7) % len(labels)]
            pair = (by_label[a][1], by_label[b][2])
        for img in pair:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format='JPEG', quality=95)
            blobs.append(buf.getvalue())
        issame.append(p % 2 == 0)
    with open(path, 'wb') as f:
        pickle.dump((blobs, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    return blobs, np.array(issame)


def test_evaluate_pth_on_bin_matches_direct_computation(tmp_path, cache_dir,
                                                        capsys):
    bin_path = str(tmp_path / 'tiny.bin')
    blobs, issame = _tiny_bin(bin_path, cache_dir)
    backbone = dict(type='IResNet', width_mult=0.25, layers=(1, 1, 1, 1),
                    embedding_size=32, input_size=(32, 32))
    torch.manual_seed(3)
    net = BACKBONES.build(backbone)
    model = str(tmp_path / 'model.pth')
    torch.save(net.state_dict(), model)
    out = str(tmp_path / 'out.json')
    assert main(['evaluate', '--model', model, '--backbone',
                 json.dumps(backbone), '--bin', bin_path, '--out', out,
                 '--batch-size', '16']) == 0
    result = read_json(out)
    assert list(result) == ['tiny']
    entry = result['tiny']
    assert set(entry) == {'accuracy', 'accuracy_std', 'threshold', 'roc_auc',
                          'tar_at_far', 'num_positives', 'num_negatives',
                          'ci95', 'bootstrap'}
    # 20 negative pairs: FAR 1e-1 has 2 negatives above its threshold,
    # fewer than the 10 a reported TAR needs
    assert entry['num_negatives'] == 20 and entry['tar_at_far'] == {}
    # no labels sidecar: the accuracy's interval resamples pairs
    assert entry['bootstrap']['unit'] == 'pair'
    lo, hi = entry['ci95']['accuracy']
    assert lo <= entry['accuracy'] <= hi

    # the same numbers from first principles: decode, normalise, flip-sum
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert('RGB'))
                     for b in blobs])
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() - 127.5) / 128
    net.eval()
    with torch.no_grad():
        emb = (net(x) + net(torch.flip(x, dims=[3]))).numpy()
    e1, e2 = emb[0::2], emb[1::2]
    ref = verification_accuracy(e1, e2, issame, num_folds=10)
    assert entry['accuracy'] == pytest.approx(100 * ref.accuracy, abs=1e-9)
    assert entry['accuracy_std'] == pytest.approx(100 * ref.accuracy_std,
                                                  abs=1e-9)
    assert entry['threshold'] == pytest.approx(ref.threshold, abs=1e-9)
    n1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    n2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    cos = np.sum(n1 * n2, axis=1)
    assert entry['roc_auc'] == pytest.approx(roc_auc(cos, issame), abs=1e-6)
    assert tar_at_far(cos, issame, [0.1], min_false_accepts=10) == {}
    # the numbers are not degenerate ones any embedding would give (all
    # distances under the first threshold step, accuracy exactly 50)
    assert entry['threshold'] > 0.1 and entry['accuracy_std'] > 0
    assert entry['accuracy'] != 50.0 and entry['roc_auc'] != 0.5

    # without flip the embedding changes, and so does the result
    out2 = str(tmp_path / 'noflip.json')
    assert main(['evaluate', '--model', model, '--backbone',
                 json.dumps(backbone), '--bin', bin_path, '--out', out2,
                 '--no-flip']) == 0
    with torch.no_grad():
        plain = net(x).numpy()
    ref2 = verification_accuracy(plain[0::2], plain[1::2], issame)
    assert read_json(out2)['tiny']['accuracy'] == pytest.approx(
        100 * ref2.accuracy, abs=1e-9)


def test_evaluate_argument_errors(tmp_path, capsys):
    bin_path = str(tmp_path / 'x.bin')
    assert main(['evaluate', '--model', str(tmp_path / 'nope.pth'),
                 '--bin', bin_path]) == 2
    one_line_error(capsys, 'kdzoo evaluate: error:', '--model',
                   'not found')

    model = str(tmp_path / 'weights.pth')
    torch.save(BACKBONES.build(STUDENT_BACKBONE).state_dict(), model)
    assert main(['evaluate', '--model', model, '--bin', bin_path]) == 2
    one_line_error(capsys, '--backbone', 'weights.pth')

    # weights that do not fit the named backbone: the key/shape listing
    assert main(['evaluate', '--model', model, '--bin', bin_path,
                 '--backbone', json.dumps(TEACHER_BACKBONE)]) == 2
    err = capsys.readouterr().err
    assert 'do not fit IResNet' in err and 'Traceback' not in err


# --------------------------------------------------------------- compare
def _write_suite(path, teacher_options):
    path.write_text(textwrap.dedent(f'''
        runs = [
            dict(name='teacher', role='teacher', recipe={TEACHER!r},
                 cfg_options={teacher_options!r}),
            dict(name='student_alone', recipe={STUDENT!r}),
            dict(name='angular_kd', recipe={KD!r},
                 cfg_options={{'model.teachers.teacher_fr.checkpoint':
                               '{{teacher}}/backbone.pth'}}),
        ]
        '''))


def _mtimes(work):
    return {name: os.stat(os.path.join(work, name, 'results.json'))
            .st_mtime_ns for name in ('teacher', 'student_alone',
                                      'angular_kd')}


def _older_rule_hashes(suite, work, cfg_options):
    """Each run's content hash as kdzoo computed it while `tensorboard` was
    still part of it (the config's hash with the key, chained on the
    teacher's)."""
    import hashlib
    from mmengine.config import Config
    from kdzoo.commands.compare import _plan
    from kdzoo.engine.runner import config_hash
    tasks = _plan(Config.fromfile(suite), suite, work, True, cfg_options, 1,
                  [0])
    out = {}
    for task in tasks:
        name = task['key'][0]
        data = config_hash(task['cfg'], ('work_dir', 'resume', 'load_from',
                                         'launcher'))
        deps = ''.join(out[d] for d, _ in task['deps'])
        out[name] = hashlib.sha256((data + deps).encode()).hexdigest()
    return out


def test_compare_trains_reuses_and_tracks_dependencies(tmp_path, cache_dir,
                                                       capsys):
    suite = tmp_path / 'suite.py'
    _write_suite(suite, {})
    work = str(tmp_path / 'suite_work')
    args = ['compare', str(suite), '--work-dir', work,
            '--cfg-options'] + tiny(cache_dir)

    assert main(args) == 0
    out = capsys.readouterr().out
    assert 'reusing' not in out
    summary = read_json(os.path.join(work, 'comparison.json'))
    runs = {r['name']: r for r in summary['runs']}
    assert list(runs) == ['teacher', 'student_alone', 'angular_kd']
    assert [runs[n]['role'] for n in runs] == ['teacher', 'student',
                                               'student']
    assert runs['angular_kd']['teachers'] == ['teacher_fr']
    # the student is ~10x smaller than the teacher; KD keeps the student
    assert runs['angular_kd']['student_params'] == \
        runs['student_alone']['student_params'] < \
        runs['teacher']['student_params']
    for r in runs.values():
        assert 'cross_age/accuracy' in r['metrics']
    with open(os.path.join(work, 'comparison.md')) as f:
        table = f.read()
    lines = table.splitlines()
    assert lines[0].startswith('| run | role | params (M) |')
    assert 'cross_age acc %' in lines[0]
    for name in runs:
        row = [ln for ln in lines
               if ln.startswith(f'| {name} | {runs[name]["role"]} |')]
        assert len(row) == 1
        acc = runs[name]['metrics']['cross_age/accuracy']
        assert f' {acc:.2f} ' in row[0]
    # angular KD against the student alone, with its interval and verdict
    diff = [ln for ln in lines if ln.startswith('| angular_kd | cross_age/')]
    assert diff and all(ln.rstrip(' |').endswith(
        ('better', 'worse', 'not distinguishable')) for ln in diff)
    assert 'Δ vs student_alone [95 % CI]' in table
    first = _mtimes(work)
    first_hash = {n: r['run_hash'] for n, r in runs.items()}

    # unchanged suite: every run is reused, nothing is rewritten
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count('reusing finished run') == 3
    assert _mtimes(work) == first
    assert read_json(os.path.join(work, 'comparison.json'))['runs'] == \
        summary['runs']

    # where a run logs is not part of its content: TensorBoard switched
    # off in the teacher retrains nothing
    _write_suite(suite, {'tensorboard': False})
    assert main(args) == 0
    assert capsys.readouterr().out.count('reusing finished run') == 3
    assert _mtimes(work) == first

    # runs hashed by the older rule (with the `tensorboard` key) are still
    # found, and so are the runs that read them
    older = _older_rule_hashes(str(suite), work, tiny_options(cache_dir))
    assert older['teacher'] != first_hash['teacher']
    for name, run_hash in older.items():
        path = os.path.join(work, name, 'results.json')
        record = read_json(path)
        record['run_hash'] = run_hash
        with open(path, 'w') as f:
            json.dump(record, f)
    assert main(args) == 0
    assert capsys.readouterr().out.count('reusing finished run') == 3
    # ... but not a run whose hash matches neither rule
    record = read_json(os.path.join(work, 'student_alone', 'results.json'))
    record['run_hash'] = 'f' * 64
    with open(os.path.join(work, 'student_alone', 'results.json'), 'w') as f:
        json.dump(record, f)
    assert main(args) == 0
    assert '[student_alone] reusing' not in capsys.readouterr().out
    first = _mtimes(work)
    first_hash['student_alone'] = read_json(os.path.join(
        work, 'student_alone', 'results.json'))['run_hash']

    # the teacher changes: it and the KD run that depends on it retrain,
    # the independent student does not
    _write_suite(suite, {'optim_wrapper.optimizer.lr': 0.05})
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '[student_alone] reusing' in out
    assert '[teacher] reusing' not in out
    assert '[angular_kd] reusing' not in out
    third = _mtimes(work)
    assert third['student_alone'] == first['student_alone']
    assert third['teacher'] != first['teacher']
    assert third['angular_kd'] != first['angular_kd']
    runs3 = {r['name']: r for r in
             read_json(os.path.join(work, 'comparison.json'))['runs']}
    assert runs3['student_alone']['run_hash'] == first_hash['student_alone']
    assert runs3['teacher']['run_hash'] != first_hash['teacher']
    assert runs3['angular_kd']['run_hash'] != first_hash['angular_kd']
    # the KD run's own config is unchanged: only its dependency moved
    assert runs3['angular_kd']['config_hash'] == \
        runs['angular_kd']['config_hash']


def test_compare_placeholder_must_name_an_earlier_run(tmp_path, capsys):
    suite = tmp_path / 'bad_suite.py'
    suite.write_text(textwrap.dedent(f'''
        runs = [dict(name='kd', recipe={KD!r}, cfg_options={{
            'model.teachers.teacher_fr.checkpoint': '{{teachr}}/b.pth'}})]
        '''))
    assert main(['compare', str(suite), '--work-dir',
                 str(tmp_path / 'w')]) == 2
    one_line_error(capsys, '{teachr}', 'names no earlier run')


def test_evaluate_bad_backbone_json_is_one_line(capsys):
    from kdzoo.cli import main
    assert main(['evaluate', '--model', __file__, '--backbone', '{bad',
                 '--bin', 'x.bin']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1
    assert "--backbone: invalid JSON" in err and '"type": "IResNet"' in err
