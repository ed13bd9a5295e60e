"""Engine: KD checkpoints, resume through the allow-list, atomic writes,
resume-checkpoint selection and the schedule that follows max_epochs.

Runs use tiny SynthFaceAge splits (20 identities, 32 px) so each training is
a few seconds on a 2-core CPU.
"""
import glob
import json
import os
import pickle
import time

import pytest
import torch
from mmengine.hooks import Hook

import kdzoo  # noqa: F401
from kdzoo.cli import main
from kdzoo.engine import (AtomicLocalBackend, find_resume_checkpoint,
                          load_recipe, runner_checkpoint_policy, train_recipe)
from kdzoo.registry import HOOKS
from tiny_runs import as_cli, random_teacher
from tiny_runs import tiny_options as tiny

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPES = os.path.join(ROOT, 'recipes')
STUDENT = os.path.join(RECIPES, 'students', 'mbf_synthface_age.py')
KD = os.path.join(RECIPES, 'kd', 'angular_kd_synthface_age.py')


def load_runner_ckpt(path):
    with runner_checkpoint_policy():
        return torch.load(path, map_location='cpu', weights_only=True)


def scalars(work_dir):
    """Every logged training record of a run (mmengine's scalars.json)."""
    files = glob.glob(os.path.join(work_dir, '*', 'vis_data',
                                   'scalars.json'))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------- KD run
def test_kd_checkpoint_has_connectors_not_teachers(tmp_path, cache_dir):
    teacher = random_teacher(tmp_path / 'teacher.pth')
    work = str(tmp_path / 'kd')
    cfg = load_recipe(KD, tiny(cache_dir, **{
        'model.teachers.teacher_fr.checkpoint': teacher}), work)
    record = train_recipe(cfg, run_test=False)
    assert record['teachers'] == ['teacher_fr']

    ckpt = load_runner_ckpt(os.path.join(work, 'epoch_1.pth'))
    keys = list(ckpt['state_dict'])
    assert not [k for k in keys if k.startswith('teachers.')]
    assert [k for k in keys if k.startswith('connectors.proj_fr.')]
    assert [k for k in keys if k.startswith('student.backbone.')]
    assert ckpt['meta']['epoch'] == 1
    # the exported student is the backbone alone: no connector, no teacher
    backbone = torch.load(os.path.join(work, 'backbone.pth'),
                          weights_only=True)
    assert set(backbone) == {k[len('student.backbone.'):] for k in keys
                             if k.startswith('student.backbone.')}
    # the angular term was computed and logged next to the identity loss
    last = scalars(work)[-1]
    assert last['loss_ang'] > 0 and last['loss_cls'] > 0
    assert last['loss'] == pytest.approx(last['loss_ang'] + last['loss_cls'],
                                         rel=1e-4)


# --------------------------------------------------------------- resume
@HOOKS.register_module(force=True)
class InterruptAfterEpochTestHook(Hook):
    """Simulates Ctrl-C once epoch ``epoch`` is checkpointed (test only)."""

    priority = 'LOWEST'  # after CheckpointHook (VERY_LOW) has saved

    def __init__(self, epoch=1):
        self.epoch = epoch

    def after_train_epoch(self, runner):
        if runner.epoch + 1 >= self.epoch:
            raise KeyboardInterrupt


def _next_second():
    time.sleep(1.02 - time.time() % 1)


def test_resume_matches_uninterrupted_run(tmp_path, cache_dir, capsys):
    # No random flip: mmengine checkpoints do not hold numpy's global RNG,
    # which RandomHorizontalFlip draws from (num_workers=0), so with flips a
    # resumed run sees different augmentations from the uninterrupted one.
    options = tiny(cache_dir, epochs=2, **{
        'train_dataloader.dataset.pipeline': [{'type': 'PackFaceInputs'}],
        'randomness.deterministic': True})
    straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    # mmengine keys its logger/visualizer/message-hub instances by
    # experiment name + start second: runs in one process need distinct ones
    assert main(['train', STUDENT, '--work-dir', straight, '--cfg-options'] +
                as_cli(dict(options, experiment_name='straight'))) == 0

    hooks = [{'type': 'RichProgressHook'}, {'type': 'ExportStudentHook'},
             {'type': 'InterruptAfterEpochTestHook', 'epoch': 1}]
    interrupted = dict(options, custom_hooks=hooks,
                       experiment_name='interrupted')
    assert main(['train', STUDENT, '--work-dir', resumed, '--cfg-options'] +
                as_cli(interrupted)) == 130
    assert 'interrupted' in capsys.readouterr().err
    assert os.path.isfile(os.path.join(resumed, 'epoch_1.pth'))
    assert not os.path.exists(os.path.join(resumed, 'epoch_2.pth'))
    assert not os.path.exists(os.path.join(resumed, 'backbone.pth'))

    # torch >= 2.6 defaults to weights_only=True; the resume checkpoint holds
    # mmengine's HistoryBuffer and numpy objects, loadable only through the
    # allow-list: show that it is needed and that it suffices.
    ckpt_1 = os.path.join(resumed, 'epoch_1.pth')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt_1, map_location='cpu', weights_only=True)
    assert 'message_hub' in load_runner_ckpt(ckpt_1)

    _next_second()  # the resumed run's log folder is work_dir/<second>
    assert main(['train', STUDENT, '--work-dir', resumed, '--resume',
                 '--cfg-options'] + as_cli(options)) == 0
    assert load_runner_ckpt(os.path.join(resumed, 'epoch_2.pth'))[
        'meta']['epoch'] == 2
    # Only epoch 2 was trained again: one training record per epoch.
    assert [r['epoch'] for r in scalars(straight)] == [1, 2]
    resumed_logs = sorted(glob.glob(os.path.join(
        resumed, '*', 'vis_data', 'scalars.json')))
    with open(resumed_logs[-1]) as f:
        assert [json.loads(line)['epoch'] for line in f] == [2]

    a = torch.load(os.path.join(straight, 'backbone.pth'), weights_only=True)
    b = torch.load(os.path.join(resumed, 'backbone.pth'), weights_only=True)
    assert list(a) == list(b)
    for k in a:
        # CPU kernels are deterministic for a fixed thread count, so the
        # resumed run reproduces the straight run bit for bit.
        assert torch.equal(a[k], b[k]), k
    ra = json.load(open(os.path.join(straight, 'results.json')))
    rb = json.load(open(os.path.join(resumed, 'results.json')))
    assert ra['metrics'] == rb['metrics']
    assert rb['epochs'] == 2


class _Payload:
    """An arbitrary class: pickling it in a checkpoint means running code."""

    def __init__(self):
        self.x = 1


class _Getattr:
    """Pickles as ``getattr(obj, name)``, the form HistoryBuffer uses."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return (getattr, (self.obj, self.name))


def _fake_runner_ckpt(epoch, **extra):
    return dict(meta=dict(epoch=epoch),
                state_dict={'w': torch.full((2, ), float(epoch))},
                message_hub={'log_scalars': {}}, **extra)


def test_find_resume_checkpoint_skips_truncated_newest(tmp_path):
    assert find_resume_checkpoint(str(tmp_path)) is None
    e1, e2 = str(tmp_path / 'epoch_1.pth'), str(tmp_path / 'epoch_2.pth')
    torch.save(_fake_runner_ckpt(1), e1)
    torch.save(_fake_runner_ckpt(2), e2)
    with open(e2, 'rb') as f:
        data = f.read()
    with open(e2, 'wb') as f:  # killed while writing
        f.write(data[:len(data) // 2])
    pointer = tmp_path / 'last_checkpoint'
    pointer.write_text(e2)
    assert find_resume_checkpoint(str(tmp_path)) == e1
    assert pointer.read_text() == e1  # the pointer is repaired

    # without a pointer: the newest complete one by number (epoch_10, not
    # epoch_3 as name order would give); garbage (epoch_11) skipped
    pointer.unlink()
    (tmp_path / 'epoch_11.pth').write_bytes(b'not a checkpoint')
    torch.save(_fake_runner_ckpt(3), str(tmp_path / 'epoch_3.pth'))
    e10 = str(tmp_path / 'epoch_10.pth')
    torch.save(_fake_runner_ckpt(10), e10)
    assert find_resume_checkpoint(str(tmp_path)) == e10
    assert pointer.read_text() == e10
    # a pointer to a complete file is trusted as is
    pointer.write_text(e1)
    assert find_resume_checkpoint(str(tmp_path)) == e1


def test_allowlist_refuses_pickled_code(tmp_path):
    bad = str(tmp_path / 'epoch_5.pth')
    torch.save(_fake_runner_ckpt(5, evil=_Payload()), bad)
    with pytest.raises(pickle.UnpicklingError):
        load_runner_ckpt(bad)
    # getattr is allowed only for HistoryBuffer's statistics methods, as
    # mmengine's HistoryBuffer pickles them; any other attribute is refused
    from mmengine.logging.history_buffer import HistoryBuffer
    import numpy as np
    fine = str(tmp_path / 'getattr_ok.pth')
    torch.save(dict(state_dict={}, m=_Getattr(HistoryBuffer, 'mean')), fine)
    assert load_runner_ckpt(fine)['m'] is HistoryBuffer.mean
    for obj, name in [(HistoryBuffer, '__init__'), (HistoryBuffer, 'update'),
                      (np.ndarray, 'tofile')]:
        sneaky = str(tmp_path / 'getattr_bad.pth')
        torch.save(dict(state_dict={}, m=_Getattr(obj, name)), sneaky)
        with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
            load_runner_ckpt(sneaky)
    # numpy objects (as mmengine stores) are on the allow-list
    ok = str(tmp_path / 'epoch_4.pth')
    torch.save(_fake_runner_ckpt(4, arr=np.arange(3), s=np.float64(1.5)), ok)
    loaded = load_runner_ckpt(ok)
    assert loaded['arr'].tolist() == [0, 1, 2] and loaded['s'] == 1.5
    # and resume never picks the unsafe file even though it is newest
    assert find_resume_checkpoint(str(tmp_path)) == ok


# --------------------------------------------------------------- atomic IO
def _leftovers(directory):
    return [p for p in os.listdir(directory) if p.endswith('.tmp')]


def test_atomic_backend_put_replaces_atomically(tmp_path, monkeypatch):
    backend = AtomicLocalBackend()
    target = tmp_path / 'epoch_1.pth'
    backend.put(b'old content', target)
    assert target.read_bytes() == b'old content'
    backend.put(b'new content', target)
    assert target.read_bytes() == b'new content'
    backend.put_text('text \u00e9', tmp_path / 'last_checkpoint')
    assert (tmp_path / 'last_checkpoint').read_text('utf-8') == 'text \u00e9'
    assert _leftovers(tmp_path) == []
    # the file gets the mode a plain open() would give, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask

    def fail(src, dst):
        assert os.path.getsize(src) == len(b'half-written new')
        raise OSError('disk full')

    monkeypatch.setattr(os, 'replace', fail)
    with pytest.raises(OSError, match='disk full'):
        backend.put(b'half-written new', target)
    assert target.read_bytes() == b'new content'
    assert _leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ['epoch_1.pth', 'last_checkpoint']

    # a write interrupted before the rename (e.g. Ctrl-C) is cleaned up too
    monkeypatch.undo()
    monkeypatch.setattr(os, 'fsync', lambda fd: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        backend.put(b'x' * 1000, target)
    assert target.read_bytes() == b'new content'
    assert _leftovers(tmp_path) == []


def test_atomic_backend_is_what_the_checkpoint_hook_uses():
    cfg = load_recipe(STUDENT)
    assert cfg.default_hooks.checkpoint.backend_args == dict(
        backend='kdzoo_atomic')
    from mmengine.fileio import get_file_backend
    assert isinstance(get_file_backend(
        'x.pth', backend_args=dict(backend='kdzoo_atomic')),
        AtomicLocalBackend)


# --------------------------------------------------------------- schedule
def _cosine(cfg):
    (sched, ) = [s for s in cfg.param_scheduler
                 if s.type == 'CosineAnnealingLR']
    return sched


def test_sync_schedule_moves_cosine_end():
    base = load_recipe(STUDENT)
    assert base.train_cfg.max_epochs == 20 and _cosine(base).end == 20

    cfg = load_recipe(STUDENT, {'train_cfg.max_epochs': 3})
    assert cfg.train_cfg.max_epochs == 3
    assert _cosine(cfg).end == 3 and _cosine(cfg).begin == 1
    warmup = [s for s in cfg.param_scheduler if s.type == 'LinearLR'][0]
    assert (warmup.begin, warmup.end) == (0, 1)  # not tied to max_epochs

    # max_epochs=1 ends the run with the warm-up: the cosine phase
    # (begin=1) would be an empty window mmengine rejects, so it is dropped
    cfg = load_recipe(STUDENT, {'train_cfg.max_epochs': 1})
    assert [s.type for s in cfg.param_scheduler] == ['LinearLR']

    # other overrides leave the schedule alone
    cfg = load_recipe(STUDENT, {'train_dataloader.batch_size': 8})
    assert _cosine(cfg).end == 20

    # an explicit end given together with max_epochs is not overridden
    # (it no longer equals the old max_epochs)
    cfg = load_recipe(STUDENT, {'train_cfg.max_epochs': 5,
                                'param_scheduler': [
                                    dict(type='CosineAnnealingLR',
                                         by_epoch=True, begin=0, end=4)]})
    assert _cosine(cfg).end == 4


def test_sync_schedule_moves_t_max():
    from mmengine.config import Config
    from kdzoo.engine.runner import _sync_schedule
    cfg = Config(dict(train_cfg=dict(max_epochs=10), param_scheduler=[
        dict(type='CosineAnnealingLR', by_epoch=True, begin=2, end=10,
             T_max=8),
        dict(type='LinearLR', by_epoch=False, begin=0, end=10)]))
    cfg.train_cfg.max_epochs = 4
    _sync_schedule(cfg, 10)
    assert cfg.param_scheduler[0].end == 4
    assert cfg.param_scheduler[0].T_max == 2
    assert cfg.param_scheduler[1].end == 10  # iteration-based: untouched


# --------------------------------------------------------------- test_cfg
@pytest.mark.parametrize('flip', [True, False])
def test_recipe_test_cfg_flip(flip):
    """A recipe's ``model.test_cfg = dict(flip=...)`` (as in
    recipes/eval/sirius_onnx_lfw.py) builds and decides the embedding."""
    from kdzoo.distillers import FaceDistiller
    backbone = dict(type='MobileFaceNet', width_mult=0.125,
                    blocks=(1, 1, 1, 1), embedding_size=64,
                    input_size=(32, 32))
    model = FaceDistiller(student=dict(backbone=backbone),
                          test_cfg=dict(flip=flip)).eval()
    assert model.test_cfg == dict(flip=flip)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.student.backbone(x)
        mirrored = model.student.backbone(torch.flip(x, dims=[3]))
    expected = plain + mirrored if flip else plain
    assert torch.allclose(model.embed(x), expected, atol=1e-6)


# --------------------------------------------------------------- machine
def test_cpu_model_is_read_from_cpuinfo(tmp_path, monkeypatch):
    from kdzoo.utils import environment
    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\n'
                    'model name\t: AMD EPYC 7B13  64-Core Processor\n\n'
                    'processor\t: 1\nmodel name\t: AMD EPYC 7B13\n')
    assert environment._cpuinfo_model_name(str(info)) == \
        'AMD EPYC 7B13 64-Core Processor'
    assert environment._cpuinfo_model_name(str(tmp_path / 'none')) is None
    # no /proc/cpuinfo (macOS, Windows): the platform's own names
    monkeypatch.setattr(environment, '_cpuinfo_model_name', lambda: None)
    monkeypatch.setattr(environment.platform, 'processor', lambda: 'arm')
    assert environment.cpu_description() == 'arm'
    monkeypatch.setattr(environment.platform, 'processor', lambda: '')
    monkeypatch.setattr(environment.platform, 'machine', lambda: 'x86_64')
    assert environment.cpu_description() == 'x86_64'


def test_cpu_capability_is_torchs_or_none(monkeypatch):
    from kdzoo.utils.environment import cpu_capability
    assert cpu_capability() == torch.backends.cpu.get_cpu_capability()

    def unavailable():
        raise RuntimeError('no capability')
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability',
                        unavailable)
    assert cpu_capability() is None


def test_results_environment_names_the_cpu(monkeypatch):
    from kdzoo.engine import runner
    monkeypatch.setattr(runner.torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(runner.os, 'cpu_count', lambda: 2)
    monkeypatch.setattr(runner, 'cpu_description', lambda: 'AMD EPYC 7B13')
    monkeypatch.setattr(runner, 'cpu_capability', lambda: 'AVX512')
    env = runner._environment()
    assert env['device'] == 'cpu (AMD EPYC 7B13, 2 cores, AVX512)'
    assert env['cpu_model'] == 'AMD EPYC 7B13'
    assert env['cpu_capability'] == 'AVX512'
    assert env['num_threads'] == torch.get_num_threads()
    assert env['torch'] == torch.__version__
    monkeypatch.setattr(runner, 'cpu_capability', lambda: None)
    env = runner._environment()
    assert env['device'] == 'cpu (AMD EPYC 7B13, 2 cores)'
    assert env['cpu_capability'] is None
