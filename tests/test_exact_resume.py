"""Exact resume with random flips on: RNG states in checkpoints, and resume
in the middle of an epoch from an iteration checkpoint."""
import os
import random
import time

import numpy as np
import pytest
import torch
from mmengine.hooks import Hook

import kdzoo  # noqa: F401
from kdzoo.cli import main
from kdzoo.engine.exact_resume import get_rng_state, set_rng_state
from kdzoo.registry import HOOKS
from tiny_runs import as_cli
from tiny_runs import tiny_options as tiny

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
STUDENT = os.path.join(ROOT, 'recipes', 'students', 'mbf_synthface_age.py')


@HOOKS.register_module(force=True)
class InterruptAtIterTestHook(Hook):
    """Ctrl-C once iteration ``at`` (1-based) is trained and saved."""

    priority = 'LOWEST'  # after CheckpointHook (VERY_LOW) has saved

    def __init__(self, at):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 >= self.at:
            raise KeyboardInterrupt


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = get_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)  # move on
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == \
        expected


def _options(cache_dir, by_epoch, name, hooks=None, workers=0):
    # tiny: 120 images, batch 32 -> 4 iterations per epoch; random flips on
    options = tiny(cache_dir, epochs=2, test=False, **{
        'randomness.deterministic': True,
        'default_hooks.checkpoint.by_epoch': by_epoch,
        'default_hooks.checkpoint.max_keep_ckpts': -1,
        'train_dataloader.num_workers': workers,
        'experiment_name': name})
    if workers:
        # mmengine seeds each worker from (seed, rank, worker id) whenever
        # workers start, i.e. every epoch unless they persist
        options['train_dataloader.persistent_workers'] = False
    if hooks:
        options['custom_hooks'] = [{'type': 'RichProgressHook'},
                                   {'type': 'ExportStudentHook'}] + hooks
    return options


def _weights(work_dir):
    return torch.load(os.path.join(work_dir, 'backbone.pth'),
                      weights_only=True)


@pytest.mark.parametrize('by_epoch,at,workers', [
    (False, 6, 0), (True, 5, 0), (False, 4, 0), (False, 6, 2)], ids=[
    'mid_epoch', 'epoch_boundary', 'iter_checkpoint_at_epoch_end',
    'mid_epoch_2_workers'])
def test_resume_with_flips_matches_uninterrupted_run(tmp_path, cache_dir,
                                                     by_epoch, at, workers):
    straight = str(tmp_path / 'straight')
    resumed = str(tmp_path / 'resumed')
    assert main(['train', STUDENT, '--work-dir', straight, '--cfg-options']
                + as_cli(_options(cache_dir, by_epoch, f'straight{at}',
                                  workers=workers))) == 0
    interrupted = _options(cache_dir, by_epoch, f'interrupted{at}',
                           [{'type': 'InterruptAtIterTestHook', 'at': at}],
                           workers=workers)
    assert main(['train', STUDENT, '--work-dir', resumed, '--cfg-options']
                + as_cli(interrupted)) == 130
    saved = f'iter_{at}.pth' if not by_epoch else 'epoch_1.pth'
    assert os.path.isfile(os.path.join(resumed, saved))
    assert not os.path.exists(os.path.join(resumed, 'backbone.pth'))
    time.sleep(1.02 - time.time() % 1)  # a new log folder (per second)
    assert main(['train', STUDENT, '--work-dir', resumed, '--resume',
                 '--cfg-options'] +
                as_cli(_options(cache_dir, by_epoch, f'resumed{at}',
                                workers=workers))) == 0
    a, b = _weights(straight), _weights(resumed)
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_without_rng_states_a_flipped_resume_differs(tmp_path, cache_dir,
                                                     monkeypatch):
    """The check above can fail: drop the RNG states from checkpoints and
    the resumed run's flips, hence its weights, differ."""
    from kdzoo.engine import exact_resume
    monkeypatch.setattr(exact_resume.RngStateHook, 'before_save_checkpoint',
                        lambda self, runner, checkpoint: None)
    straight = str(tmp_path / 'straight')
    resumed = str(tmp_path / 'resumed')
    assert main(['train', STUDENT, '--work-dir', straight, '--cfg-options']
                + as_cli(_options(cache_dir, False, 'straight_norng'))) == 0
    assert main(['train', STUDENT, '--work-dir', resumed, '--cfg-options']
                + as_cli(_options(cache_dir, False, 'interrupted_norng', [
                    {'type': 'InterruptAtIterTestHook', 'at': 6}]))) == 130
    time.sleep(1.02 - time.time() % 1)
    assert main(['train', STUDENT, '--work-dir', resumed, '--resume',
                 '--cfg-options'] +
                as_cli(_options(cache_dir, False, 'resumed_norng'))) == 0
    a, b = _weights(straight), _weights(resumed)
    assert any(not torch.equal(a[k], b[k]) for k in a)
