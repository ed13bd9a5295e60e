"""TensorBoard event files of a kdzoo run (kdzoo/engine/visualization.py):
every logged loss term and every test metric with its interval, read back
with TensorBoard's own event reader."""
import glob
import json
import os

import pytest
import torch

from kdzoo.cli import main
from kdzoo.engine import visualization
from kdzoo.utils import ConfigError
from tiny_runs import as_cli, random_teacher, tiny_options

RECIPES = os.path.join(os.path.dirname(__file__), '..', 'recipes')
KD = os.path.join(RECIPES, 'kd', 'angular_kd_synthface_age.py')
TEACHER_CKPT = 'model.teachers.teacher_fr.checkpoint'


def _events(work_dir):
    from tensorboard.backend.event_processing.event_accumulator import \
        EventAccumulator
    # one directory of event files (training, then the test metrics)
    (path, ) = glob.glob(os.path.join(work_dir, '*', 'vis_data'))
    assert glob.glob(os.path.join(path, 'events.out.tfevents.*'))
    acc = EventAccumulator(path, size_guidance={'scalars': 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)]
            for tag in acc.Tags()['scalars']}


def test_a_run_writes_every_loss_term_and_test_metric(tmp_path, cache_dir):
    pytest.importorskip('tensorboard')
    ckpt = random_teacher(tmp_path / 'teacher.pth')
    work = str(tmp_path / 'kd')
    options = tiny_options(cache_dir, **{
        TEACHER_CKPT: ckpt, 'default_hooks.logger.interval': 1})
    assert main(['train', KD, '--work-dir', work, '--cfg-options'] +
                as_cli(options)) == 0
    events = _events(work)
    with open(os.path.join(work, 'results.json')) as f:
        metrics = json.load(f)['metrics']
    # each loss term the distiller logs, every iteration (interval 1)
    (scalars_json, ) = glob.glob(os.path.join(work, '*', 'vis_data',
                                              'scalars.json'))
    with open(scalars_json) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    loss_keys = {k for row in logged for k in row if k.startswith('loss')}
    assert {'loss', 'loss_ang'} <= loss_keys
    for key in loss_keys | {'lr'}:
        assert len(events[key]) == 4, key  # 4 iterations
        logged_values = [row[key] for row in logged if key in row]
        assert events[key] == pytest.approx(logged_values, rel=1e-6), key
    # the test metrics with their intervals, as results.json has them
    key = 'cross_age/TAR@FAR=1e-2'
    assert events[f'test/{key}'] == pytest.approx([metrics[key]], rel=1e-6)
    low, high = metrics[f'{key}_ci95']
    assert events[f'test/{key}_ci95_low'] == pytest.approx([low], rel=1e-6)
    assert events[f'test/{key}_ci95_high'] == pytest.approx([high], rel=1e-6)
    numeric = {k for k, v in metrics.items() if isinstance(v, float)}
    assert {f'test/{k}' for k in numeric} <= set(events)


def test_scalars_split_intervals_and_drop_other_values():
    values = dict(a=1, b=torch.tensor(2.0), c='text', d=[1.0, 2.0],
                  e_ci95=[0.25, 0.5], f=True)
    assert visualization._scalars(values) == dict(
        a=1.0, b=2.0, e_ci95_low=0.25, e_ci95_high=0.5)


def test_auto_without_the_package_writes_json_only(monkeypatch):
    monkeypatch.setattr(visualization, 'tensorboard_installed', lambda: False)
    assert visualization.default_visualizer('auto') == dict(
        type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])
    assert len(visualization.default_visualizer(False)['vis_backends']) == 1
    with pytest.raises(ConfigError, match=r"tensorboard=True.*kdzoo\["):
        visualization.default_visualizer(True)
    with pytest.raises(ConfigError, match="tensorboard: expected 'auto'"):
        visualization.default_visualizer('yes')
