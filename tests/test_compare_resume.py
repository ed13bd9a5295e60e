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
from kdzoo.engine.checkpoint import find_resume_checkpoint, trained_before
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
    assert '(resumed after epoch 1)' in table


def test_a_checkpoint_of_another_configuration_is_not_resumed(
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
            'under another configuration (run hash); it trains from the '
            'start') in out
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
    assert ('[student_alone] a stopped run of the same configuration left '
            'epoch_1.pth; it trains from the start (--resume continues '
            'from it)') in out
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
    """A checkpoint no compare run stamped (``kdzoo train``, an older
    kdzoo) is resumed when the config saved in it is the run's."""
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
