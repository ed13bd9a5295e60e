"""``kdzoo compare --resume``: a run stopped part-way continues from its
newest checkpoint when it started under the same run hash, reaching the
uninterrupted run's result; otherwise it trains from the start and says
why."""
import filecmp
import json
import os
import shutil
import textwrap

import pytest

from kdzoo.cli import main
from kdzoo.commands import compare
from kdzoo.engine import runner
from kdzoo.engine.checkpoint import (find_resume_checkpoint, saved_config,
                                     trained_before)
from kdzoo.engine.runner import load_recipe
from tiny_runs import as_cli, tiny_options

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                       'recipes')
STUDENT = os.path.join(RECIPES, 'students', 'mbf_synthface_age.py')


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def finished(tmp_path_factory, cache_dir):
    """A one-run suite trained for 2 epochs without a stop: (suite, its
    --cfg-options arguments, work dir)."""
    root = tmp_path_factory.mktemp('resume')
    suite = root / 'suite.py'
    suite.write_text(textwrap.dedent(f'''
        runs = [dict(name='student_alone', recipe={STUDENT!r})]
        '''))
    options = ['--cfg-options'] + as_cli(tiny_options(cache_dir, epochs=2))
    work = str(root / 'finished')
    assert main(['compare', str(suite), '--work-dir', work,
                 '--threads', '1'] + options) == 0
    return str(suite), options, work


def _stopped_copy(work, dest):
    """The finished run as a stop after epoch 1 leaves it: no record, no
    exported weights, no epoch-2 checkpoint; ``last_checkpoint`` still
    names the original dir's epoch-2 file."""
    shutil.copytree(work, dest)
    run = os.path.join(dest, 'student_alone')
    for name in ('results.json', 'bootstrap.npz', 'backbone.pth',
                 'head.pth', 'epoch_2.pth'):
        os.remove(os.path.join(run, name))
    assert os.path.isfile(os.path.join(run, 'epoch_1.pth'))
    return run


def test_a_resumed_run_reaches_the_uninterrupted_result(finished, tmp_path,
                                                        capsys):
    suite, options, work = finished
    capsys.readouterr()
    run = _stopped_copy(work, str(tmp_path / 'stopped'))
    # the pointer names the original's epoch_2.pth; the copy has none of
    # its own, so its newest complete checkpoint is its epoch_1.pth
    assert find_resume_checkpoint(run, repair_pointer=False) == \
        os.path.join(run, 'epoch_1.pth')
    # in a worker process (--jobs 2), at the uninterrupted run's threads
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'stopped'),
                 '--resume', '--jobs', '2', '--threads', '1'] +
                options) == 0
    out = capsys.readouterr().out
    assert '[student_alone] resuming a stopped run from epoch_1.pth' in out
    a = _read(os.path.join(work, 'student_alone', 'results.json'))
    b = _read(os.path.join(run, 'results.json'))
    assert b['metrics'] == a['metrics']
    assert b['run_hash'] == a['run_hash']
    assert filecmp.cmp(os.path.join(work, 'student_alone', 'backbone.pth'),
                       os.path.join(run, 'backbone.pth'), shallow=False)
    assert 'resumed' not in a
    assert b['resumed']['checkpoint'] == 'epoch_1.pth'
    assert (b['resumed']['epoch'], b['resumed']['iter']) == (1, 4)
    logged = b['resumed']['train_time_s']
    assert logged > 0 and b['train_time_s'] > logged
    table = open(os.path.join(str(tmp_path / 'stopped'),
                              'comparison.md')).read()
    assert '(resumed from epoch_1.pth)' in table


def test_a_checkpoint_of_another_run_hash_is_not_resumed(
        finished, tmp_path, capsys):
    suite, options, work = finished
    capsys.readouterr()
    run = _stopped_copy(work, str(tmp_path / 'other'))
    marker = os.path.join(run, 'compare_run.json')
    data = _read(marker)
    data['run_hash'] = '0' * 64
    with open(marker, 'w') as f:
        json.dump(data, f)
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'other'),
                 '--resume', '--threads', '1'] + options) == 0
    out = capsys.readouterr().out
    assert ('[student_alone] not resumed from epoch_1.pth: it was written '
            'under another run hash (a run it reads has changed); it trains '
            'from the start') in out
    b = _read(os.path.join(run, 'results.json'))
    assert 'resumed' not in b
    # trained from the start with the same seed: the uninterrupted result
    a = _read(os.path.join(work, 'student_alone', 'results.json'))
    assert b['metrics'] == a['metrics']
    assert _read(marker)['run_hash'] == b['run_hash']


def test_without_resume_a_stopped_run_starts_over_and_says_so(
        finished, tmp_path, capsys):
    suite, options, work = finished
    capsys.readouterr()
    run = _stopped_copy(work, str(tmp_path / 'again'))
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'again'),
                 '--threads', '1'] + options) == 0
    out = capsys.readouterr().out
    assert ('[student_alone] a stopped run left epoch_1.pth; it trains '
            'from the start (--resume continues from it when this '
            'configuration wrote it)') in out
    assert 'resumed' not in _read(os.path.join(run, 'results.json'))


def test_trained_before_sums_the_logged_iteration_times(finished):
    _, _, work = finished
    run = os.path.join(work, 'student_alone')
    one = trained_before(os.path.join(run, 'epoch_1.pth'))
    two = trained_before(os.path.join(run, 'epoch_2.pth'))
    assert (one['epoch'], one['iter'], two['epoch'], two['iter']) == \
        (1, 4, 2, 8)
    assert 0 < one['train_time_s'] < two['train_time_s']
    # no more than the whole run's wall time of training
    record = _read(os.path.join(run, 'results.json'))
    assert two['train_time_s'] <= record['train_time_s']


def test_without_its_marker_the_checkpoint_config_decides(finished, tmp_path,
                                                          capsys):
    """A checkpoint no compare run stamped (``kdzoo train``, a kdzoo before
    the stamp) is resumed when the config saved in it is the run's, and so
    is a stamped one only then."""
    suite, options, work = finished
    capsys.readouterr()
    same = _stopped_copy(work, str(tmp_path / 'same'))
    os.remove(os.path.join(same, 'compare_run.json'))
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'same'),
                 '--resume', '--threads', '1'] + options) == 0
    assert '[student_alone] resuming a stopped run from epoch_1.pth' in \
        capsys.readouterr().out
    assert _read(os.path.join(same, 'results.json'))['metrics'] == \
        _read(os.path.join(work, 'student_alone', 'results.json'))['metrics']

    other = _stopped_copy(work, str(tmp_path / 'other_lr'))
    os.remove(os.path.join(other, 'compare_run.json'))
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'other_lr'),
                 '--resume', '--threads', '1'] + options +
                ['optim_wrapper.optimizer.lr=0.05']) == 0
    assert ('[student_alone] not resumed from epoch_1.pth: the '
            "configuration saved in it differs from the run's; it trains "
            'from the start') in capsys.readouterr().out
    assert 'resumed' not in _read(os.path.join(other, 'results.json'))


def test_a_resumed_record_adds_the_time_logged_before_the_stop(
        finished, tmp_path, capsys, monkeypatch):
    suite, options, work = finished
    run = _stopped_copy(work, str(tmp_path / 'timed'))
    real = trained_before

    def logged_1000_s(path):
        return dict(real(path), train_time_s=1000.0)
    monkeypatch.setattr(runner, 'trained_before', logged_1000_s)
    # in this process (--jobs 1), where the patch applies
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'timed'),
                 '--resume', '--threads', '1'] + options) == 0
    record = _read(os.path.join(run, 'results.json'))
    assert record['resumed']['train_time_s'] == 1000.0
    assert 1000.0 < record['train_time_s'] < 1000.0 + 600


def test_which_checkpoints_a_resume_refuses(finished, tmp_path, cache_dir):
    _, _, work = finished
    run = _stopped_copy(work, str(tmp_path / 'refused'))
    cfg = load_recipe(STUDENT, tiny_options(cache_dir, epochs=2), run)
    run_hash = _read(os.path.join(work, 'student_alone',
                                  'results.json'))['run_hash']
    ckpt = os.path.join(run, 'epoch_1.pth')

    def why_not(reads_runs=False):
        return compare._interrupted(run, run_hash, cfg,
                                    reads_runs)['why_not']
    assert why_not() is None
    # written before the run's last start: a stale earlier attempt
    marker = os.path.join(run, 'compare_run.json')
    stamp = _read(marker)
    later = os.path.getmtime(ckpt) + 60
    with open(marker, 'w') as f:
        json.dump(dict(stamp, started=later), f)
    os.utime(marker, (later, later))
    assert why_not() == 'it predates the last start of this run'
    # unstamped: resumed unless the run reads other runs' outputs
    os.remove(marker)
    assert why_not() is None
    assert why_not(reads_runs=True).startswith('no compare_run.json says')
    # a stamp that is not the marker's form counts as none
    with open(marker, 'w') as f:
        f.write('[1, 2]')
    assert why_not() is None
    # the saved config of another recipe setting
    other = load_recipe(STUDENT, tiny_options(cache_dir, epochs=3), run)
    assert compare._interrupted(run, run_hash, other, False)['why_not'] == \
        "the configuration saved in it differs from the run's"
    assert compare._interrupted(str(tmp_path / 'none'), run_hash, cfg,
                                False) is None


def test_a_saved_config_is_parsed_never_run(tmp_path):
    import torch
    path = str(tmp_path / 'epoch_1.pth')

    def save(text):
        torch.save(dict(meta=dict(cfg=text), state_dict={}), path)
    save("a = dict(type='X', lr=-0.1, dims=(1, 2), keys=['k'],\n"
         "         m={'x': None})\n")
    assert saved_config(path) == dict(a=dict(type='X', lr=-0.1, dims=(1, 2),
                                             keys=['k'], m=dict(x=None)))
    flag = tmp_path / 'ran'
    save(f"a = open({str(flag)!r}, 'w')\n")
    with pytest.raises(ValueError, match='line 1: Call is not plain data'):
        saved_config(path)
    assert not flag.exists()
    save('import os\n')
    with pytest.raises(ValueError, match='not an assignment'):
        saved_config(path)
    save('a = (\n')
    with pytest.raises(ValueError, match='line 1'):
        saved_config(path)
    torch.save(dict(meta={}, state_dict={}), path)
    assert saved_config(path) is None


def test_the_pointer_names_a_file_outside_the_work_dir(tmp_path, finished):
    """Checkpoints a hook wrote to its out_dir: the pointer's own path
    when the work dir has no file of that name."""
    _, _, work = finished
    elsewhere = tmp_path / 'out_dir'
    elsewhere.mkdir()
    ckpt = str(elsewhere / 'epoch_2.pth')
    shutil.copy(os.path.join(work, 'student_alone', 'epoch_2.pth'), ckpt)
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'last_checkpoint').write_text(ckpt)
    assert find_resume_checkpoint(str(run), repair_pointer=False) == ckpt


def test_resume_and_force_exclude_each_other(finished, capsys):
    suite, options, work = finished
    capsys.readouterr()
    assert main(['compare', suite, '--work-dir', work, '--resume',
                 '--force'] + options) == 2
    assert '--resume and --force exclude each other' in \
        capsys.readouterr().err
