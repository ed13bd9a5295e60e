"""``kdzoo compare SUITE --grid``: every point of each run's loss-weight
grid trained on the grid's options, the choice by the selection metric,
and grid.md saying what the suite runs now. Training is a stub whose
metric peaks at a known weight, so the choice is known in advance."""
import json
import math
import os

import pytest

import kdzoo  # noqa: F401
import kdzoo.commands.compare_jobs as jobs_mod
from kdzoo.cli import main
from kdzoo.commands.compare_grid import grid_points, point_label, run_grid
from kdzoo.utils import ConfigError
from test_compare import KD, STUDENT, write_suite

SELECT = 'val/TAR@FAR=1e-3'
WEIGHT = 'model.distill_losses.loss_ang.loss_weight'
BEST = 4.0  # the stub's metric peaks here


def stub_record(cfg, *args, **kwargs):
    """A record whose selection metric peaks at loss weight BEST and which
    carries what the run was trained with (to check the options)."""
    losses = cfg.model.get('distill_losses') or {}
    weight = losses['loss_ang']['loss_weight'] if 'loss_ang' in losses \
        else 1.0
    value = 0.5 - 0.01 * math.log(weight / BEST) ** 2
    return dict(
        name=cfg.experiment_name, seed=cfg.randomness.seed,
        config_hash='x', metrics={SELECT: value, 'val/accuracy': 90.0},
        curves={}, student_params=1, teachers=[], epochs=cfg.train_cfg
        .max_epochs, batch_size=8, train_time_s=1.0, test_time_s=0.5,
        work_dir=cfg.work_dir, device='cpu', weight=weight,
        cls_loss_weight=cfg.model.get('cls_loss_weight', 1.0))


SUITE = f'''
    runs = [
        dict(name='alone', recipe={STUDENT!r}),
        dict(name='kd', recipe={KD!r},
             cfg_options={{{WEIGHT!r}: 16.0}}),
        dict(name='kd_no_id', recipe={KD!r},
             cfg_options={{'model.cls_loss_weight': 0.0}}),
    ]
    grid = dict(
        select={SELECT!r},
        cfg_options={{'train_cfg.max_epochs': 2}},
        runs=dict(kd={{{WEIGHT!r}: [1.0, 4.0, 16.0]}},
                  kd_no_id=[{{{WEIGHT!r}: 2.0}}, {{{WEIGHT!r}: 8.0}}]))
    '''


@pytest.fixture
def trained(monkeypatch):
    calls = []
    monkeypatch.setattr(jobs_mod, 'train_recipe',
                        lambda cfg: calls.append(stub_record(cfg)) or
                        dict(calls[-1]))
    return calls


def test_grid_trains_every_point_and_records_the_choice(tmp_path, trained):
    suite = write_suite(tmp_path / 's.py', SUITE)
    work = str(tmp_path / 'w')
    rows = run_grid(suite, work_dir=work)
    got = sorted((c['name'], c['weight'], c['epochs'], c['cls_loss_weight'])
                 for c in trained)
    assert got == sorted(
        [(f'kd@loss_weight={w}', w, 2, 1.0) for w in (1.0, 4.0, 16.0)] +
        [(f'kd_no_id@loss_weight={w}', w, 2, 0.0) for w in (2.0, 8.0)])
    assert {r['run']: r['chosen'] for r in rows} == {
        'kd': {WEIGHT: 4.0}, 'kd_no_id': {WEIGHT: 2.0}}  # 2 nearer 4 in log
    grid_dir = os.path.join(work, 'grid')
    with open(os.path.join(grid_dir, 'grid.json')) as f:
        saved = json.load(f)
    assert saved['select'] == SELECT and saved['rows'][0]['run'] == 'kd'
    md = open(os.path.join(grid_dir, 'grid.md')).read()
    # the suite runs kd at 16.0 (its cfg_options) and kd_no_id at the
    # recipe's value: both differ from the choice
    (row,) = [ln for ln in md.splitlines()
              if ln.startswith('| kd | loss_weight=4.0 |')]
    assert '| yes | 16.0 |' in row
    (row,) = [ln for ln in md.splitlines()
              if ln.startswith('| kd_no_id | loss_weight=2.0 |')]
    assert '| yes |' in row
    assert 'differs from the choice: kd, kd_no_id.' in md
    # the grid's own comparison (intervals and all) sits beside it
    assert os.path.isfile(os.path.join(grid_dir, 'comparison.md'))

    # again: every grid run is reused; through the command line too
    trained.clear()
    assert main(['compare', suite, '--grid', '--work-dir', work]) == 0
    assert trained == []
    # the chosen point unfinished: --no-train chooses among the others
    os.remove(os.path.join(grid_dir, 'kd@loss_weight=4.0', 'results.json'))
    rows = run_grid(suite, work_dir=work, no_train=True)
    assert trained == []
    kd = next(r for r in rows if r['run'] == 'kd')
    assert [p['point'][WEIGHT] for p in kd['points']] == [1.0, 16.0]


def test_suite_recording_the_choice_is_not_stale(tmp_path, trained):
    src = SUITE.replace(f"{WEIGHT!r}: 16.0", f"{WEIGHT!r}: 4.0")
    suite = write_suite(tmp_path / 's.py', src.replace(
        "kd_no_id=[{" + repr(WEIGHT) + ": 2.0}, {" + repr(WEIGHT) +
        ": 8.0}]", "kd_no_id={" + repr(WEIGHT) + ": [16.0]}"))
    run_grid(suite, work_dir=str(tmp_path / 'w'))
    md = open(tmp_path / 'w' / 'grid' / 'grid.md').read()
    assert 'differs from the choice: none.' in md


def test_grid_points_and_labels():
    assert grid_points({'a.x': [1, 2], 'b.y': [3]}, 'w') == [
        {'a.x': 1, 'b.y': 3}, {'a.x': 2, 'b.y': 3}]
    assert grid_points([{'a': 1}, {'a': 2, 'b': 0}], 'w') == [
        {'a': 1}, {'a': 2, 'b': 0}]
    assert point_label({'m.loss.w_dist': 5.0, 'm.loss.w_angle': 1e-3}) == \
        'w_dist=5.0,w_angle=0.001'
    assert point_label({'k': 'a b/c'}) == 'k=a_b_c'
    for bad in ({}, {'a': []}, {'a': 3}, [], [{}], 'a'):
        with pytest.raises(ConfigError, match='grid'):
            grid_points(bad, 'suite.py: grid.runs.kd')


@pytest.mark.parametrize('grid,message', [
    (None, r'--grid needs the suite to define grid='),
    ("dict(select='val/a', runs=dict(kdd={'x': [1]}))",
     r"grid.runs names 'kdd', which is no run.*Did you mean: 'kd'"),
    ("dict(select='val/a', runs=[])", r'grid.runs must map run names'),
    ("dict(select='acc', runs=dict(kd={'x': [1]}))",
     r'grid.select must be the metric key'),
])
def test_grid_spec_errors(tmp_path, capsys, grid, message):
    src = SUITE.split('    grid = ')[0] + (f'    grid = {grid}\n'
                                          if grid else '')
    suite = write_suite(tmp_path / 's.py', src)
    with pytest.raises(ConfigError, match=message):
        run_grid(suite, work_dir=str(tmp_path / 'w'))
    assert not os.path.exists(tmp_path / 'w')


def test_missing_selection_metric_names_the_run_and_the_fix(tmp_path,
                                                            trained):
    suite = write_suite(tmp_path / 's.py',
                        SUITE.replace(repr(SELECT), "'lfw/accuracy'"))
    with pytest.raises(ConfigError, match=r"grid run 'kd@loss_weight=1.0' "
                       r"has no 'lfw/accuracy'.*set grid.select"):
        run_grid(suite, work_dir=str(tmp_path / 'w'))


@pytest.fixture
def trained_with_replicates(monkeypatch):
    """As ``trained``, and each run writes bootstrap replicates of the
    selection metric: its value plus independent noise (sd 1e-3), so that
    points 0.019 apart are told apart and equal points are not."""
    import zlib

    import numpy as np

    def train(cfg):
        record = stub_record(cfg)
        os.makedirs(cfg.work_dir, exist_ok=True)
        rng = np.random.default_rng(zlib.crc32(cfg.experiment_name.encode()))
        np.savez(os.path.join(cfg.work_dir, 'bootstrap.npz'), **{
            SELECT: record['metrics'][SELECT] + rng.normal(0, 1e-3, 1000)})
        return record
    monkeypatch.setattr(jobs_mod, 'train_recipe', train)


def test_grid_gives_paired_differences_and_flags_a_choice_at_its_edge(
        tmp_path, trained_with_replicates):
    # kd: 1, 4, 16 around the peak at 4 (interior choice); kd_no_id:
    # 1 and 2, below the peak, so 2 wins at the grid's end
    src = SUITE.replace(
        "kd_no_id=[{" + repr(WEIGHT) + ": 2.0}, {" + repr(WEIGHT) +
        ": 8.0}]", "kd_no_id={" + repr(WEIGHT) + ": [1.0, 2.0]}")
    suite = write_suite(tmp_path / 's.py', src)
    rows = {r['run']: r for r in run_grid(suite,
                                          work_dir=str(tmp_path / 'w'))}
    kd = {p['point'][WEIGHT]: p for p in rows['kd']['points']}
    assert kd[4.0]['vs_chosen'] is None
    for w in (1.0, 16.0):
        d = kd[w]['vs_chosen']
        # 0.01 * ln(4)^2 below the peak
        assert d['diff'] == pytest.approx(0.01 * math.log(4) ** 2,
                                          abs=1e-12)
        assert d['verdict'] == 'better' and d['ci95'][0] > 0
    assert not rows['kd']['at_edge']
    assert rows['kd_no_id']['chosen'] == {WEIGHT: 2.0}
    assert rows['kd_no_id']['at_edge']
    md = open(tmp_path / 'w' / 'grid' / 'grid.md').read()
    assert 'better than the next value (the best may lie beyond; ' \
        'extend the grid there): kd_no_id.' in md
    (row,) = [ln for ln in md.splitlines()
              if ln.startswith('| kd | loss_weight=16.0 |')]
    assert '+0.0192 [' in row and 'better' in row


def _edge_rows(tmp_path, kd_points, no_id_points):
    src = SUITE.replace(
        f"kd={{{WEIGHT!r}: [1.0, 4.0, 16.0]}}", f"kd={kd_points}").replace(
        "kd_no_id=[{" + repr(WEIGHT) + ": 2.0}, {" + repr(WEIGHT) +
        ": 8.0}]", f"kd_no_id={no_id_points}")
    suite = write_suite(tmp_path / 's.py', src)
    rows = run_grid(suite, work_dir=str(tmp_path / 'w'))
    md = open(tmp_path / 'w' / 'grid' / 'grid.md').read()
    return {r['run']: r for r in rows}, md


def test_a_choice_at_the_edge_no_better_than_its_neighbour_is_not_flagged(
        tmp_path, trained_with_replicates):
    # 3.99 is 1.6e-8 below the peak's value at 4 (noise sd 1e-3): the
    # largest value wins on its mean but cannot be told from its
    # neighbour; kd_no_id: one point, nothing to compare
    rows, md = _edge_rows(tmp_path, {WEIGHT: [1.0, 3.99, 4.0]},
                          {WEIGHT: [2.0]})
    kd = {p['point'][WEIGHT]: p for p in rows['kd']['points']}
    assert rows['kd']['chosen'] == {WEIGHT: 4.0}
    assert kd[3.99]['vs_chosen']['verdict'] == 'not distinguishable'
    assert kd[1.0]['vs_chosen']['verdict'] == 'better'
    assert rows['kd']['at_edge'] is False
    assert rows['kd_no_id']['at_edge'] is False
    assert 'extend the grid there): none.' in md


def test_the_edge_is_by_value_at_either_end_and_unknown_off_one_axis(
        tmp_path, trained_with_replicates):
    # kd: listed out of order, peak beyond the smallest value (16 is the
    # largest value but listed first); kd_no_id: two keys varied
    # independently, so no axis to speak of an end along
    other = 'model.distill_losses.loss_ang.p'
    rows, md = _edge_rows(
        tmp_path, {WEIGHT: [16.0, 64.0, 8.0]},
        [{WEIGHT: 1.0, other: 2}, {WEIGHT: 2.0, other: 2},
         {WEIGHT: 2.0, other: 1}])
    assert rows['kd']['chosen'] == {WEIGHT: 8.0}
    assert rows['kd']['at_edge'] is True
    assert rows['kd_no_id']['at_edge'] is None
    assert 'extend the grid there): kd. Not known for kd_no_id' in md


def test_runs_limits_the_grid_to_the_selected_runs(tmp_path, trained):
    suite = write_suite(tmp_path / 's.py', SUITE)
    rows = run_grid(suite, work_dir=str(tmp_path / 'w'), runs=['kd_no_id'])
    assert [r['run'] for r in rows] == ['kd_no_id']
    assert sorted(c['name'] for c in trained) == [
        'kd_no_id@loss_weight=2.0', 'kd_no_id@loss_weight=8.0']
