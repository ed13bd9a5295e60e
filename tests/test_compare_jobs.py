"""``kdzoo compare --jobs N``: independent runs in N worker processes
(kdzoo/commands/compare_jobs.py) give the table of a sequential run with the
same thread count, start a run only after the runs it reads, and report a
failed run in one line."""
import filecmp
import json
import os
import re
import textwrap

import pytest

from kdzoo.cli import main
from kdzoo.commands.compare_jobs import check_jobs
from kdzoo.utils import ConfigError
from tiny_runs import as_cli, tiny_options

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                       'recipes')
STUDENT = os.path.join(RECIPES, 'students', 'mbf_synthface_age.py')
TEACHER = os.path.join(RECIPES, 'teachers', 'iresnet_synthface_age.py')
KD = os.path.join(RECIPES, 'kd', 'angular_kd_synthface_age.py')
NAMES = ('teacher', 'student_alone', 'angular_kd')


def _suite(path, kd_teacher='{teacher}/backbone.pth'):
    path.write_text(textwrap.dedent(f'''
        runs = [
            dict(name='teacher', role='teacher', recipe={TEACHER!r}),
            dict(name='student_alone', recipe={STUDENT!r}),
            dict(name='angular_kd', recipe={KD!r},
                 cfg_options={{'model.teachers.teacher_fr.checkpoint':
                               {kd_teacher!r}}}),
        ]
        '''))
    return str(path)


def _read(path):
    with open(path) as f:
        return json.load(f)


def _table_rows(work):
    """comparison.md's result tables: the per-run context table (times,
    work dirs) and every timing column left out."""
    with open(os.path.join(work, 'comparison.md')) as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith('|')]
    out, timed = [], []
    for line in lines:
        cells = [c.strip() for c in line.strip('|').split('|')]
        if cells[0] in ('run', 'run (seed)', 'run | metric'):
            header = cells
            timed = [i for i, c in enumerate(cells) if c.endswith(' s')]
        if header[0] == 'run (seed)':
            continue
        out.append([c for i, c in enumerate(cells) if i not in timed])
    return out


def test_two_jobs_give_the_sequential_table_at_the_same_threads(
        tmp_path, cache_dir, capsys):
    suite = _suite(tmp_path / 'suite.py')
    options = ['--cfg-options'] + as_cli(tiny_options(cache_dir))
    one = str(tmp_path / 'one')
    two = str(tmp_path / 'two')
    assert main(['compare', suite, '--work-dir', one, '--jobs', '1',
                 '--threads', '1'] + options) == 0
    capsys.readouterr()
    assert main(['compare', suite, '--work-dir', two, '--jobs', '2',
                 '--threads', '1'] + options) == 0
    out = capsys.readouterr().out
    events = re.findall(r'^\[(\w+)\] (started|finished)', out, re.M)
    # the teacher and the student alone start together; the KD run, which
    # reads the teacher's checkpoint, only after the teacher finished
    assert events[:2] == [('teacher', 'started'),
                          ('student_alone', 'started')]
    assert events.index(('angular_kd', 'started')) > \
        events.index(('teacher', 'finished'))
    for name in NAMES:
        a = _read(os.path.join(one, name, 'results.json'))
        b = _read(os.path.join(two, name, 'results.json'))
        assert a['metrics'] == b['metrics'], name
        if name != 'angular_kd':  # its config names the teacher's dir
            assert a['run_hash'] == b['run_hash'], name
        assert a['num_threads'] == b['num_threads'] == 1
        assert filecmp.cmp(os.path.join(one, name, 'backbone.pth'),
                           os.path.join(two, name, 'backbone.pth'),
                           shallow=False), name
        # the worker's console went to its log; its task file is gone
        assert os.path.isfile(os.path.join(two, name, 'compare_job.log'))
        assert not os.path.exists(os.path.join(two, name, 'compare_job.pkl'))
    assert _table_rows(one) == _table_rows(two)
    context = _read(os.path.join(two, 'comparison.json'))['context']
    assert context['jobs'] == 2 and context['threads_per_run'] == 1
    # finished runs are reused by the parallel executor too
    assert main(['compare', suite, '--work-dir', two, '--jobs', '2'] +
                options) == 0
    assert capsys.readouterr().out.count('reusing finished run') == 3


def test_a_failed_run_is_one_line_naming_it_and_its_log(tmp_path, cache_dir,
                                                        capsys):
    # the KD run's teacher checkpoint does not exist: its worker fails
    # while the independent runs finish and stay reusable
    missing = str(tmp_path / 'no_teacher.pth')
    suite = _suite(tmp_path / 'suite.py', kd_teacher=missing)
    work = str(tmp_path / 'w')
    rc = main(['compare', suite, '--work-dir', work, '--jobs', '2',
               '--threads', '1', '--cfg-options'] +
              as_cli(tiny_options(cache_dir)))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "run 'angular_kd' failed (exit 2)" in err[0]
    assert 'no_teacher.pth' in err[0]
    assert os.path.join(work, 'angular_kd', 'compare_job.log') in err[0]
    for name in ('teacher', 'student_alone'):
        assert os.path.isfile(os.path.join(work, name, 'results.json'))


def test_submitit_executor_runs_each_run_as_a_job(tmp_path, cache_dir,
                                                  capsys):
    """The cluster route through submitit, with its local cluster (the
    same jobs a Slurm cluster would get): the table equals the sequential
    run's at the same thread count."""
    pytest.importorskip('submitit')
    suite = _suite(tmp_path / 'suite.py')
    options = ['--cfg-options'] + as_cli(tiny_options(cache_dir))
    one, sub = str(tmp_path / 'one'), str(tmp_path / 'submitit')
    assert main(['compare', suite, '--work-dir', one, '--threads', '1'] +
                options) == 0
    assert main(['compare', suite, '--work-dir', sub, '--jobs', '2',
                 '--threads', '1', '--executor', 'submitit',
                 '--executor-options', 'cluster=local', 'timeout_min=20'] +
                options) == 0
    capsys.readouterr()
    assert _table_rows(one) == _table_rows(sub)
    assert os.path.isdir(os.path.join(sub, '.submitit'))
    context = _read(os.path.join(sub, 'comparison.json'))['context']
    assert context['executor'] == 'submitit'
    # options submitit does not know are refused in one line
    rc = main(['compare', suite, '--work-dir', str(tmp_path / 'bad'),
               '--executor', 'submitit', '--executor-options',
               'cluster=local', 'no_such_parameter=1'] + options)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--executor-options' in err[0]
    assert 'no_such_parameter' in err[0]


@pytest.mark.parametrize('jobs,threads', [(0, None), (2, 0), ('2', None),
                                          (True, None)])
def test_jobs_and_threads_must_be_positive_integers(jobs, threads):
    with pytest.raises(ConfigError, match='must be an integer >= 1'):
        check_jobs(jobs, threads)


def test_default_threads_divide_the_cores(monkeypatch):
    import torch
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 16)
    assert check_jobs(4, None) == (4, 4)
    assert check_jobs(32, None) == (32, 1)
    assert check_jobs(1, None) == (1, None)
    assert check_jobs(2, 3) == (2, 3)


def test_bad_jobs_on_the_command_line(tmp_path, capsys):
    suite = _suite(tmp_path / 'suite.py')
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'w'),
                 '--jobs', '0']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['kdzoo compare: error: --jobs must be an integer >= 1, '
                   'got 0']
