"""Fault injection: non-finite losses and gradients, SIGKILL and resume, bad
data files, configuration errors.

Faults covered elsewhere (not repeated here):

- truncated newest checkpoint skipped on resume, unit level:
  ``test_engine.py::test_find_resume_checkpoint_skips_truncated_newest``
  (here it is also exercised end to end after a SIGKILL);
- pickled code in a runner checkpoint refused:
  ``test_engine.py::test_allowlist_refuses_pickled_code``; in a teacher
  checkpoint: ``test_distiller.py::test_pickled_code_is_refused`` (here only
  the CLI's one-line exit);
- corrupt ``.bin`` structure / unsafe pickle / undecodable image, dataset
  level: ``test_bin_dataset.py`` (here only through ``kdzoo test``);
- unknown backbone / dataset / loss type, missing recipe, failed
  custom_imports: ``test_cli.py``.

End-to-end runs use tiny SynthFaceAge splits (20 identities, 32 px), a few
seconds each on a 2-core CPU.
"""
import glob
import itertools
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from PIL import Image
from torch import nn

import kdzoo  # noqa: F401
from kdzoo.cli import main
from kdzoo.engine import numerics
from kdzoo.engine.numerics import (GUARDED_WRAPPERS, GuardedAmpOptimWrapper,
                                   GuardedOptimWrapper, NonFiniteLossError,
                                   NonFiniteLossCheckMixin,
                                   check_finite_losses)
from kdzoo.engine.optimizer import TrainableOptimWrapperConstructor
from kdzoo.losses.base import BaseDistillLoss
from kdzoo.registry import BACKBONES, LOSSES
from kdzoo.utils import ConfigError, KdzooError
from tiny_runs import TEACHER_BACKBONE, as_cli, tiny_options

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPES = os.path.join(ROOT, 'recipes')
STUDENT = os.path.join(RECIPES, 'students', 'mbf_synthface_age.py')
KD = os.path.join(RECIPES, 'kd', 'angular_kd_synthface_age.py')
NAN = float('nan')


# ================================================================ helpers
def tiny(cache_dir, epochs=1, test=False, **extra):
    return tiny_options(cache_dir, epochs, test, **extra)


def one_line_error(capsys, *needles):
    """stderr is exactly one 'kdzoo <cmd>: error: ...' line with needles."""
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('kdzoo ') and ': error: ' in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


_HUBS = itertools.count()


def fresh_hub(epoch=0, it=0):
    """A new current MessageHub (what a runner creates) at epoch/iter."""
    hub = MessageHub.get_instance(f'test_faults_{next(_HUBS)}')
    hub.update_info('epoch', epoch)
    hub.update_info('iter', it)
    return hub


def guarded(module, **kwargs):
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    return GuardedOptimWrapper(optimizer=opt, **kwargs)


def snapshot(module, wrapper):
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    momentum = {id(p): s['momentum_buffer'].clone()
                for p, s in wrapper.optimizer.state.items()
                if s.get('momentum_buffer') is not None}
    return weights, momentum


def assert_unchanged(module, wrapper, snap):
    weights, momentum = snap
    for k, v in module.state_dict().items():
        assert torch.equal(v, weights[k]), k
    now = {id(p): s['momentum_buffer'] for p, s in
           wrapper.optimizer.state.items()
           if s.get('momentum_buffer') is not None}
    assert now.keys() == momentum.keys()
    for k in now:
        assert torch.equal(now[k], momentum[k])
    for p in module.parameters():  # gradients were discarded
        assert p.grad is None or not p.grad.any()


@pytest.fixture
def warnings_log(monkeypatch):
    logged = []
    monkeypatch.setattr(numerics, 'print_log',
                        lambda msg, **kw: logged.append(msg))
    return logged


# ================================================================ the guard
def test_skip_drops_step_counts_and_stops_after_max_consecutive(
        warnings_log):
    hub = fresh_hub()
    lin = nn.Linear(3, 2)
    wrapper = guarded(lin, max_consecutive=3)
    assert (wrapper.nonfinite, wrapper.check_grads) == ('skip', True)
    x = torch.randn(4, 3)
    wrapper.update_params(lin(x).pow(2).mean())  # finite: steps
    snap = snapshot(lin, wrapper)
    assert snap[1], 'momentum buffers exist after the first step'

    hub.update_info('iter', 1)
    wrapper.update_params(lin(x).sum() * NAN)
    assert_unchanged(lin, wrapper, snap)
    assert hub.get_info('nonfinite_skipped') == 1
    assert hub.get_scalar('train/nonfinite_skipped').current() == 1
    assert len(warnings_log) == 1
    assert 'non-finite total loss (loss=nan) at epoch 1, iteration 2' in \
        warnings_log[0]
    assert '1 skipped so far, 1 in a row' in warnings_log[0]

    wrapper.update_params(lin(x).pow(2).mean())  # finite again: steps
    assert not torch.equal(lin.weight, snap[0]['weight'])
    assert wrapper.consecutive_nonfinite == 0

    snap = snapshot(lin, wrapper)
    wrapper.update_params(lin(x).sum() * float('inf'))
    wrapper.update_params(lin(x).sum() * NAN)
    with pytest.raises(NonFiniteLossError) as exc:
        wrapper.update_params(lin(x).sum() * NAN)
    assert_unchanged(lin, wrapper, snap)
    assert isinstance(exc.value, KdzooError)
    msg = str(exc.value)
    assert '3 optimizer steps in a row' in msg
    assert "nonfinite='skip', max_consecutive=3" in msg
    assert 'lr' in msg and 'bfloat16' in msg and 'clip_grad' in msg
    assert '\n' not in msg
    assert hub.get_info('nonfinite_skipped') == 4


def test_stop_raises_before_the_step():
    fresh_hub(epoch=2, it=40)
    lin = nn.Linear(3, 2)
    wrapper = guarded(lin, nonfinite='stop')
    snap = snapshot(lin, wrapper)
    with pytest.raises(NonFiniteLossError) as exc:
        wrapper.update_params(lin(torch.randn(4, 3)).sum() * NAN)
    for k, v in lin.state_dict().items():  # not stepped
        assert torch.equal(v, snap[0][k])
    msg = str(exc.value)
    assert 'at epoch 3, iteration 41' in msg
    assert "nonfinite='stop'" in msg and "nonfinite='skip'" in msg
    assert 'optim_wrapper.optimizer.lr' in msg and 'loss_weight' in msg


def test_nonfinite_gradient_with_finite_loss(warnings_log):
    hub = fresh_hub()
    x = torch.randn(4, 3)
    for mode in ('stop', 'skip'):
        lin = nn.Linear(3, 2)
        handle = lin.weight.register_hook(
            lambda g: torch.full_like(g, NAN))
        wrapper = guarded(lin, nonfinite=mode)
        snap = snapshot(lin, wrapper)
        loss = lin(x).pow(2).mean()
        assert torch.isfinite(loss)
        if mode == 'stop':
            with pytest.raises(NonFiniteLossError,
                               match=r'non-finite gradients \(norm nan; '
                               r'NaN/Inf in 1 of 2 parameter tensors\) '
                               r'with a finite loss at epoch 1, iteration 1'):
                wrapper.update_params(loss)
        else:
            wrapper.update_params(loss)
            assert_unchanged(lin, wrapper, snap)
            assert hub.get_info('nonfinite_skipped') == 1
            assert 'non-finite gradients' in warnings_log[-1]
        handle.remove()
    # check_grads=False: the unguarded behaviour the check exists for
    lin = nn.Linear(3, 2)
    lin.weight.register_hook(lambda g: torch.full_like(g, NAN))
    guarded(lin, check_grads=False).update_params(lin(x).pow(2).mean())
    assert torch.isnan(lin.weight).all()


def test_accumulation_drops_the_whole_window():
    hub = fresh_hub()
    lin = nn.Linear(3, 2)
    wrapper = guarded(lin, accumulative_counts=2)
    x = torch.randn(4, 3)
    snap = snapshot(lin, wrapper)
    wrapper.update_params(lin(x).sum() * NAN)  # micro-batch 1: bad
    wrapper.update_params(lin(x).pow(2).mean())  # micro-batch 2: fine
    assert_unchanged(lin, wrapper, snap)
    assert hub.get_info('nonfinite_skipped') == 1
    wrapper.update_params(lin(x).pow(2).mean())
    assert torch.equal(lin.weight, snap[0]['weight'])  # mid-window
    wrapper.update_params(lin(x).pow(2).mean())
    assert not torch.equal(lin.weight, snap[0]['weight'])
    assert hub.get_info('nonfinite_skipped') == 1


class TwoTermModel(BaseModel):
    """loss_a always finite; loss_b NaN when ``bad``; acc is not a loss."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.bad = False

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.lin(inputs).mean()
        return dict(loss_a=out.abs() + 1, loss_b=out * (NAN if self.bad
                                                        else 0.5),
                    acc=torch.tensor(NAN))


class MixedTwoTermModel(NonFiniteLossCheckMixin, TwoTermModel):
    pass


def test_loss_terms_named_via_parse_losses(warnings_log):
    fresh_hub(epoch=0, it=6)
    model = TwoTermModel()
    wrapper = guarded(model)
    data = dict(inputs=torch.randn(4, 3))
    log_vars = model.train_step(data, wrapper)
    # the guard wrapped this instance's parse_losses on first use
    assert 'parse_losses' in vars(model)
    assert set(log_vars) == {'loss', 'loss_a', 'loss_b', 'acc'}
    assert not warnings_log

    model.bad = True
    snap = snapshot(model, wrapper)
    log_vars = model.train_step(data, wrapper)
    assert_unchanged(model, wrapper, snap)
    (msg, ) = warnings_log
    assert 'non-finite loss term loss_b=nan (finite: loss_a=' in msg
    assert 'in TwoTermModel at epoch 1, iteration 7' in msg
    # the skipped step's NaN terms stay out of the logged loss averages;
    # finite terms and non-loss entries are logged as usual
    assert set(log_vars) == {'loss_a', 'acc'}

    # a model with the mixin is not patched; 'stop' names the term too
    fresh_hub(epoch=1, it=9)
    mixed = MixedTwoTermModel()
    mixed.bad = True
    with pytest.raises(NonFiniteLossError, match=r'loss term loss_b=nan '
                       r'\(finite: loss_a=.*\) in MixedTwoTermModel '
                       r'at epoch 2, iteration 10'):
        mixed.train_step(data, guarded(mixed, nonfinite='stop'))
    assert 'parse_losses' not in vars(mixed)


def test_check_finite_losses():
    hub = fresh_hub()
    ok = dict(loss_a=torch.tensor(1.0), loss_l=[torch.ones(2), torch.ones(3)],
              acc=torch.tensor(NAN))
    assert check_finite_losses(ok) == {}
    assert hub.get_info('nonfinite_terms') is None
    bad = dict(ok, loss_l=[torch.ones(2), torch.tensor([1.0, float('inf')])],
               loss_c=torch.tensor([NAN, 1.0]))
    out = check_finite_losses(bad, where='Net')
    assert list(out) == ['loss_l', 'loss_c']
    assert out['loss_l'] == float('inf') and np.isnan(out['loss_c'])
    info = hub.get_info('nonfinite_terms')
    assert info['where'] == 'Net'
    assert info['terms']['loss_a'] == 1.0  # every term, for the report


def test_constructor_builds_guarded_wrappers_and_checks_args():
    fresh_hub()
    lin = nn.Linear(3, 2)
    sgd = dict(type='SGD', lr=0.1)
    for cfg in (dict(optimizer=sgd), dict(type='OptimWrapper', optimizer=sgd),
                dict(type=numerics.OptimWrapper, optimizer=sgd)):
        wrapper = TrainableOptimWrapperConstructor(cfg)(lin)
        assert type(wrapper) is GuardedOptimWrapper
        assert (wrapper.nonfinite, wrapper.max_consecutive) == ('skip', 5)
    wrapper = TrainableOptimWrapperConstructor(dict(
        optimizer=sgd, nonfinite='stop', max_consecutive=2,
        clip_grad=dict(max_norm=1.0)))(lin)
    assert (wrapper.nonfinite, wrapper.max_consecutive) == ('stop', 2)
    assert wrapper.clip_grad_kwargs == dict(max_norm=1.0)
    # AMP maps to the AMP guard (built on CUDA only: see the gpu test)
    assert GUARDED_WRAPPERS['AmpOptimWrapper'] is GuardedAmpOptimWrapper
    assert GuardedAmpOptimWrapper._check_grads_default is False
    # registered in kdzoo's optim-wrapper registry
    built = numerics.OPTIM_WRAPPERS.build(dict(
        type='GuardedOptimWrapper', nonfinite='stop',
        optimizer=torch.optim.SGD(lin.parameters(), lr=0.1)))
    assert type(built) is GuardedOptimWrapper and built.nonfinite == 'stop'

    bad_args = [(dict(nonfinite='sometimes'), r"nonfinite must be one of "
                 r"\('skip', 'stop'\), got 'sometimes'"),
                (dict(max_consecutive=0), 'max_consecutive must be an '
                 'integer >= 1, got 0'),
                (dict(max_consecutive=True), 'max_consecutive.*got True'),
                (dict(max_consecutive='5'), "max_consecutive.*got '5'"),
                (dict(check_grads='yes'), "check_grads.*got 'yes'")]
    for kwargs, match in bad_args:
        with pytest.raises(ConfigError, match='GuardedOptimWrapper: ' +
                           match):
            TrainableOptimWrapperConstructor(dict(optimizer=sgd,
                                                  **kwargs))(lin)
    with pytest.raises(ConfigError, match=r"optim_wrapper.optimizer: type "
                       r"'SGDD' is not a registered optimizer. Did you mean: "
                       r"'SGD'"):
        TrainableOptimWrapperConstructor(dict(optimizer=dict(type='SGDD')))
    with pytest.raises(ConfigError, match=r"optim_wrapper: SGD.__init__\(\) "
                       r"got an unexpected keyword argument 'momentun'"):
        TrainableOptimWrapperConstructor(dict(
            optimizer=dict(sgd, momentun=0.9)))(lin)


@pytest.mark.gpu
def test_amp_guard_on_cuda_skips_nonfinite_loss():
    hub = fresh_hub()
    lin = nn.Linear(3, 2).cuda()
    wrapper = GuardedAmpOptimWrapper(
        optimizer=torch.optim.SGD(lin.parameters(), lr=0.1), dtype='float16',
        loss_scale=1.0)
    assert wrapper.check_grads is False  # GradScaler handles gradients
    x = torch.randn(4, 3, device='cuda')
    before = lin.weight.detach().clone()
    with wrapper.optim_context(lin):
        loss = lin(x).float().pow(2).mean() * NAN
    wrapper.update_params(loss)
    assert torch.equal(lin.weight, before)
    assert hub.get_info('nonfinite_skipped') == 1
    with wrapper.optim_context(lin):
        loss = lin(x).float().pow(2).mean()
    wrapper.update_params(loss)
    assert not torch.equal(lin.weight, before)
    assert torch.isfinite(lin.weight).all()


# ================================================================ NaN runs
@LOSSES.register_module(force=True)
class NaNAtIterTestLoss(BaseDistillLoss):
    """Test only: tiny embedding penalty, NaN at the given iterations."""

    def __init__(self, nan_iters=(1, ), loss_weight=1.0):
        super().__init__(loss_weight)
        self.nan_iters = tuple(nan_iters)

    def forward(self, s_emb):
        it = MessageHub.get_current_instance().get_info('iter', -1)
        value = s_emb.float().pow(2).mean() * 1e-3 * self.loss_weight
        return value * NAN if it in self.nan_iters else value


def nan_loss(*nan_iters):
    return {'nan': dict(type='NaNAtIterTestLoss', nan_iters=list(nan_iters),
                        inputs=dict(s_emb='student.embedding'))}


def test_nan_loss_stop_exits_2_naming_the_term(tmp_path, cache_dir, capsys):
    work = str(tmp_path / 'stop')
    options = tiny(cache_dir, **{'model.distill_losses': nan_loss(1),
                                 'optim_wrapper.nonfinite': 'stop',
                                 'experiment_name': 'nan_stop'})
    assert main(['train', STUDENT, '--work-dir', work, '--cfg-options'] +
                as_cli(options)) == 2
    one_line_error(capsys, 'kdzoo train: error: non-finite loss term '
                   'loss_nan=nan (finite: loss_cls=', 'in FaceDistiller at '
                   'epoch 1, iteration 2/4;', 'optim_wrapper.optimizer.lr',
                   'bfloat16', 'clip_grad')
    assert not glob.glob(os.path.join(work, '*.pth'))


def test_nan_loss_skip_finishes_with_fewer_steps(tmp_path, cache_dir):
    from kdzoo.engine import KdzooRunner, load_recipe, \
        runner_checkpoint_policy
    work = str(tmp_path / 'skip')
    # AdamW keeps a per-parameter step counter; the default policy is skip
    cfg = load_recipe(STUDENT, tiny(cache_dir, **{
        'model.distill_losses': nan_loss(1, 2),
        'optim_wrapper.optimizer': dict(_delete_=True, type='AdamW',
                                        lr=1e-3),
        'experiment_name': 'nan_skip'}), work)
    runner = KdzooRunner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 4  # the loop ran every iteration
    steps = {int(s['step']) for s in
             runner.optim_wrapper.optimizer.state.values()}
    assert steps == {4 - 2}
    assert runner.message_hub.get_info('nonfinite_skipped') == 2

    backbone = torch.load(os.path.join(work, 'backbone.pth'),
                          weights_only=True)
    assert all(torch.isfinite(v).all() for v in backbone.values()
               if v.is_floating_point())
    with runner_checkpoint_policy():
        ckpt = torch.load(os.path.join(work, 'epoch_1.pth'),
                          weights_only=True)
    assert ckpt['message_hub']['runtime_info']['nonfinite_skipped'] == 2
    (log, ) = glob.glob(os.path.join(work, '*', '*.log'))
    with open(log) as f:
        warned = [ln for ln in f if 'skipped the optimizer step' in ln]
    assert len(warned) == 2
    assert 'loss_nan=nan' in warned[0] and 'iteration 2/4 ' in warned[0]
    assert 'iteration 3/4 ' in warned[1] and '2 in a row' in warned[1]
    (scalars, ) = glob.glob(os.path.join(work, '*', 'vis_data',
                                         'scalars.json'))
    with open(scalars) as f:
        last = [json.loads(ln) for ln in f if ln.strip()][-1]
    assert last['nonfinite_skipped'] == 2
    assert np.isfinite(last['loss']) and np.isfinite(last['loss_nan'])


# ================================================================ SIGKILL
PAUSE_HOOK = '''
"""Test only: pause at a global iteration so the test can SIGKILL us."""
import os
import time

from mmengine.hooks import Hook

from kdzoo.registry import HOOKS


@HOOKS.register_module()
class PauseAtIterFaultHook(Hook):
    """Write ``marker`` and sleep before global iteration ``at`` (test)."""

    def __init__(self, at, marker):
        self.at, self.marker = at, marker

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter == self.at:
            with open(self.marker, 'w') as f:
                f.write(str(os.getpid()))
            time.sleep(600)
'''


def _wait_for(path, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path) or proc.poll() is not None:
            return os.path.exists(path)
        time.sleep(0.1)
    return False


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, cache_dir):
    # deterministic data order without random flips, as in
    # test_engine.py::test_resume_matches_uninterrupted_run
    base = tiny(cache_dir, epochs=2, **{
        'train_dataloader.dataset.pipeline': [{'type': 'PackFaceInputs'}],
        'randomness.deterministic': True})
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    assert main(['train', STUDENT, '--work-dir', straight, '--cfg-options'] +
                as_cli(dict(base, experiment_name='straight'))) == 0

    plugins = tmp_path / 'plugins'
    plugins.mkdir()
    (plugins / 'kdzoo_fault_pause_hook.py').write_text(PAUSE_HOOK)
    marker = str(tmp_path / 'paused')
    pause = dict(base, custom_imports=dict(
        imports=['kdzoo_fault_pause_hook'], allow_failed_imports=False),
        custom_hooks=[{'type': 'RichProgressHook'},
                      {'type': 'ExportStudentHook'},
                      # epoch 2, second iteration: after epoch_1.pth
                      {'type': 'PauseAtIterFaultHook', 'at': 5,
                       'marker': marker}])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(plugins), ROOT] + [p for p in [os.environ.get('PYTHONPATH')]
                                if p]))
    with open(tmp_path / 'killed.out', 'wb') as out:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'kdzoo.cli', 'train', STUDENT,
             '--work-dir', killed, '--cfg-options'] + as_cli(pause),
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            paused = _wait_for(marker, proc, timeout=120)
            assert paused, (tmp_path / 'killed.out').read_text()
            assert os.path.isfile(os.path.join(killed, 'epoch_1.pth'))
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not os.path.exists(os.path.join(killed, 'backbone.pth'))
    assert not os.path.exists(os.path.join(killed, 'epoch_2.pth'))

    # on storage without atomic renames the kill could also have torn a
    # newer checkpoint that last_checkpoint already names: resume must
    # fall back to the newest complete one (epoch_1)
    e1 = os.path.join(killed, 'epoch_1.pth')
    e2 = os.path.join(killed, 'epoch_2.pth')
    with open(e1, 'rb') as f:
        data = f.read()
    with open(e2, 'wb') as f:
        f.write(data[:len(data) // 2])
    with open(os.path.join(killed, 'last_checkpoint'), 'w') as f:
        f.write(e2)

    time.sleep(1.02 - time.time() % 1)  # a new log folder (per second)
    assert main(['train', STUDENT, '--work-dir', killed, '--resume',
                 '--cfg-options'] +
                as_cli(dict(base, experiment_name='resumed'))) == 0
    a = torch.load(os.path.join(straight, 'backbone.pth'), weights_only=True)
    b = torch.load(os.path.join(killed, 'backbone.pth'), weights_only=True)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = sorted(glob.glob(os.path.join(killed, '*', 'vis_data',
                                         'scalars.json')))
    with open(logs[-1]) as f:  # the resumed run trained epoch 2 only
        assert [json.loads(ln)['epoch'] for ln in f if ln.strip()] == [2]


# ================================================================ bad data
def _jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        buf, format='JPEG')
    return buf.getvalue()


def _bin_test_options(path, workers=0, name='bin'):
    return {'test_dataloader.dataset': dict(
        _delete_=True, type='InsightFaceBinDataset', ann_file=str(path)),
        'test_dataloader.num_workers': workers,
        'test_dataloader.batch_size': 4,
        'test_evaluator': [dict(type='FaceVerificationMetric')],
        'experiment_name': name}


def _bad_bins(tmp_path):
    blobs = [_jpeg(i) for i in range(8)]
    odd = tmp_path / 'odd.bin'
    odd.write_bytes(pickle.dumps((blobs[:7], [True, False, True])))
    trunc = tmp_path / 'trunc.bin'
    torn = list(blobs)
    torn[5] = torn[5][:40]  # a truncated JPEG: fails when decoded
    trunc.write_bytes(pickle.dumps((torn, [True, False, True, False])))
    return dict(odd=(odd, ['odd.bin', '7 images, an odd count']),
                trunc=(trunc, ['trunc.bin', 'image 5 cannot be decoded']))


@pytest.mark.parametrize('case', ['odd', 'trunc'])
def test_bad_bin_file_one_line_error(tmp_path, capsys, case):
    path, needles = _bad_bins(tmp_path)[case]
    assert main(['test', STUDENT, '--work-dir', str(tmp_path / 'w'),
                 '--cfg-options'] + as_cli(_bin_test_options(
                     path, name=f'bin_{case}'))) == 2
    one_line_error(capsys, 'kdzoo test: error:', *needles)


def test_bad_bin_in_dataloader_worker_one_line_error(tmp_path, capsys):
    path, needles = _bad_bins(tmp_path)['trunc']
    assert main(['test', STUDENT, '--work-dir', str(tmp_path / 'w'),
                 '--cfg-options'] + as_cli(_bin_test_options(
                     path, workers=2, name='bin_workers'))) == 2
    one_line_error(capsys, 'kdzoo test: error:', *needles)


# ================================================================ config
@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp('teachers')
    torch.manual_seed(1)
    ok = str(root / 'teacher.pth')
    torch.save(BACKBONES.build(TEACHER_BACKBONE).state_dict(), ok)

    class _Exploit:
        def __reduce__(self):
            return (print, ('this would run code', ))

    evil = str(root / 'evil.pth')
    with open(evil, 'wb') as f:
        pickle.dump({'state_dict': {}, 'x': _Exploit()}, f)
    return dict(ok=ok, evil=evil, missing=str(root / 'missing.pth'))


CONFIG_FAULTS = [
    pytest.param(STUDENT, {'optim_wrapper.optimizer.type': 'SGDD'},
                 ['optim_wrapper.optimizer', "'SGDD'", "'SGD'"],
                 id='optimizer-type'),
    pytest.param(STUDENT, {'optim_wrapper.optimizer.momentun': 0.9},
                 ['optim_wrapper', "'momentun'"], id='optimizer-arg'),
    pytest.param(STUDENT, {'optim_wrapper.nonfinite': 'sometimes'},
                 ['optim_wrapper.nonfinite', "'sometimes'"],
                 id='nonfinite-value'),
    pytest.param(KD, {'model.teachers.teacher_fr.checkpoint': 'ok',
                      'model.distill_losses.loss_ang.power': 2},
                 ['model.distill_losses.loss_ang', "'power'",
                  'Accepted arguments'], id='loss-plugin-arg'),
    pytest.param(KD, {'model.teachers.teacher_fr.checkpoint': 'missing'},
                 ['missing.pth', 'not found'], id='teacher-ckpt-missing'),
    pytest.param(KD, {'model.teachers.teacher_fr.checkpoint': 'evil'},
                 ['evil.pth', 'weights_only'], id='teacher-ckpt-pickle'),
    pytest.param(STUDENT, {'model.student.backbone.widht_mult': 0.5},
                 ['model.student.backbone', "'widht_mult'"],
                 id='backbone-arg'),
    pytest.param(STUDENT, {'train_dataloader.dataset.num_identitys': 5},
                 ['train_dataloader.dataset', "'num_identitys'"],
                 id='dataset-arg'),
    pytest.param(STUDENT, {'param_scheduler': [
        {'type': 'CosineAnnealingLRR', 'T_max': 2}]},
        ['param_scheduler', "'CosineAnnealingLRR'"], id='scheduler-type'),
    pytest.param(STUDENT, {'load_from': 'missing'}, ['missing.pth'],
                 id='load-from-missing'),
]


@pytest.mark.parametrize('recipe, options, needles', CONFIG_FAULTS)
def test_config_fault_one_line_exit_2(tmp_path, capsys, teachers, recipe,
                                      options, needles):
    options = {k: teachers.get(v, v) if isinstance(v, str) else v
               for k, v in options.items()}
    options['experiment_name'] = f'cfg_{tmp_path.name}'
    assert main(['train', recipe, '--work-dir', str(tmp_path / 'w'),
                 '--cfg-options'] + as_cli(options)) == 2
    one_line_error(capsys, 'kdzoo train: error:', *needles)


def test_test_command_missing_checkpoint(tmp_path, capsys, teachers):
    assert main(['test', STUDENT, '--work-dir', str(tmp_path),
                 '--checkpoint', teachers['missing']]) == 2
    one_line_error(capsys, 'kdzoo test: error:', 'missing.pth', 'not found')
