"""``kdzoo compare`` with several seeds: mean ± std tables, one shared
teacher, reuse, TAR-vs-FAR curves in the records, the comparison plot and
the reproduction context.

One test trains for real (tiny SynthFaceAge, 3 short runs); the others swap
``train_recipe`` for a stub that returns made-up records, so they check the
suite logic in milliseconds.
"""
import json
import os
import shutil
import textwrap

import numpy as np
import pytest

import kdzoo  # noqa: F401
import kdzoo.commands.compare as suite_mod
import kdzoo.commands.compare_jobs as jobs_mod
from kdzoo.cli import main
from kdzoo.evaluation.plots import write_comparison_plot
from kdzoo.commands.report import aggregate, comparison_markdown

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPES = os.path.join(ROOT, 'recipes')
STUDENT = os.path.join(RECIPES, 'students', 'mbf_synthface_age.py')
TEACHER = os.path.join(RECIPES, 'teachers', 'iresnet_synthface_age.py')
KD = os.path.join(RECIPES, 'kd', 'angular_kd_synthface_age.py')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def read_json(path):
    with open(path) as f:
        return json.load(f)


def tiny(cache_dir):
    """Smaller than tests/test_cli.py's ``tiny``: 2 iterations per run."""
    options = {
        'train_dataloader.dataset.num_identities': 10,
        'train_dataloader.dataset.images_per_identity': 4,
        'train_dataloader.dataset.cache_dir': cache_dir,
        'train_dataloader.batch_size': 20,
        'model.student.head.num_classes': 10,
        # 20 identities: the minimum for 10 verification folds
        'test_dataloader.dataset.num_identities': 20,
        'test_dataloader.dataset.images_per_identity': 4,
        'test_dataloader.dataset.num_distractors': 5,
        'test_dataloader.dataset.cache_dir': cache_dir,
        'train_cfg.max_epochs': 1,
    }
    return [f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}'
            for k, v in options.items()]


def write_suite(path, runs_src, **top):
    extra = ''.join(f'{k} = {v!r}\n' for k, v in top.items())
    path.write_text(textwrap.dedent(runs_src) + extra)
    return str(path)


# ------------------------------------------------------------ real training
def test_two_seeds_mean_std_curves_context_plot_reuse(tmp_path, monkeypatch,
                                                       capsys):
    """Two real tiny trainings (the student at seeds 0 and 1); a teacher
    run is trained once (the stubbed tests below check that, to keep this
    test at two trainings)."""
    cache = str(tmp_path / 'cache')
    suite = write_suite(tmp_path / 'tiny_suite.py', f'''
        runs = [dict(name='student', recipe={STUDENT!r})]
        ''')
    work = str(tmp_path / 'work')
    calls = []
    real_train = jobs_mod.train_recipe

    def counting_train(cfg, *a, **k):
        calls.append((cfg.experiment_name, cfg.randomness.seed, cfg.work_dir))
        return real_train(cfg, *a, **k)

    monkeypatch.setattr(jobs_mod, 'train_recipe', counting_train)
    args = ['compare', suite, '--work-dir', work, '--seeds', '2',
            '--cfg-options'] + tiny(cache)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert calls == [('student', 0, os.path.join(work, 'student')),
                     ('student', 1, os.path.join(work, 'student', 'seed1'))]

    per_seed = [read_json(os.path.join(d, 'results.json'))
                for d in (os.path.join(work, 'student'),
                          os.path.join(work, 'student', 'seed1'))]
    assert [r['seed'] for r in per_seed] == [0, 1]
    assert per_seed[0]['run_hash'] != per_seed[1]['run_hash']
    key = 'cross_age/accuracy'
    values = np.array([r['metrics'][key] for r in per_seed])
    summary = read_json(os.path.join(work, 'comparison.json'))
    assert summary['seeds'] == [0, 1]
    assert [(r['name'], r['seed']) for r in summary['runs']] == \
        [('student', 0), ('student', 1)]
    # the seed changes the training
    assert per_seed[0]['metrics'] != per_seed[1]['metrics']
    agg = {e['name']: e for e in summary['aggregate']}
    assert agg['student']['n'] == 2
    assert agg['student']['metrics'][key] == pytest.approx(values.mean())
    assert agg['student']['metrics_std'][key] == \
        pytest.approx(np.std(values, ddof=1))

    # curves (all pairs of the test identities' images): the points of the
    # log FAR grid up to 1e-2 with >= 10 negatives above the threshold
    grid = np.logspace(-6, 0, 25)
    for r in summary['runs']:
        for proto in ('standard', 'cross_age'):
            n_neg = r['metrics'][f'{proto}/num_negatives']
            c = r['curves'][proto]
            assert c['far'] == pytest.approx(
                [f for f in grid if f <= 1e-2 + 1e-12 and f * n_neg >= 10])
            assert len(c['far']) == len(c['tar']) >= 1
            assert all(0.0 <= t <= 1.0 for t in c['tar'])
            # the grid point 1e-2 agrees with the TAR@FAR=1e-2 metric
            assert c['far'][-1] == pytest.approx(0.01)
            assert c['tar'][-1] == r['metrics'][f'{proto}/TAR@FAR=1e-2']
            # every reported key has its interval, and it holds the value
            lo, hi = r['metrics'][f'{proto}/TAR@FAR=1e-2_ci95']
            assert lo <= r['metrics'][f'{proto}/TAR@FAR=1e-2'] <= hi
            assert r['bootstrap'][proto]['unit'] == 'identity'
            assert r['bootstrap'][proto]['count'] == 20
    mean_curve = agg['student']['curves']['cross_age']['tar']
    assert mean_curve == pytest.approx(np.mean(
        [r['curves']['cross_age']['tar'] for r in per_seed], axis=0))

    # reproduction context: per run seed, epochs, batch, times; versions
    ctx = summary['context']
    assert ctx['seeds'] == [0, 1] and ctx['reused'] == []
    assert [(r['name'], r['seed'], r['epochs'], r['batch_size'])
            for r in ctx['runs']] == [('student', 0, 1, 20),
                                      ('student', 1, 1, 20)]
    assert all(r['train_time_s'] > 0 for r in ctx['runs'])
    import mmengine
    import torch
    assert ctx['versions']['torch'] == torch.__version__
    assert ctx['versions']['mmengine'] == mmengine.__version__
    assert ctx['device'] == per_seed[0]['device']

    with open(os.path.join(work, 'comparison.md')) as f:
        md = f.read()
    row = [ln for ln in md.splitlines() if ln.startswith('| student |')]
    assert len(row) == 1
    std = np.std(values, ddof=1)
    ci = agg['student']['ci95'][key]
    assert ci[0] < values.mean() < ci[1]
    assert f' {values.mean():.2f} ± {std:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] ' \
        in row[0]
    assert ' 0,1 ' in row[0]
    assert 'seeds: 0 / 1' in md and 'mmengine' in md
    assert 'kdzoo compare' in out and '±' in out  # the rich table

    png = os.path.join(work, 'comparison.png')
    with open(png, 'rb') as f:
        assert f.read(8) == PNG_MAGIC
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] > im.size[1] > 200
    assert not [n for n in os.listdir(work) if n.endswith('.tmp')]

    # second call: everything reused, nothing trained or re-evaluated
    def no_training(*a, **k):
        raise AssertionError('nothing should be trained or re-tested')

    monkeypatch.setattr(jobs_mod, 'train_recipe', no_training)
    monkeypatch.setattr(jobs_mod, 'test_recipe', no_training)
    monkeypatch.setattr(suite_mod, 'test_recipe', no_training)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count('reusing finished run') == 2
    again = read_json(os.path.join(work, 'comparison.json'))
    assert again['runs'] == summary['runs']
    assert len(again['context']['reused']) == 2

    # the runs' records alone (no checkpoints, logs or configs), exported
    # and moved elsewhere, are a work dir the same table is rebuilt from
    kept = tmp_path / 'kept'
    assert main(args + ['--no-train', '--export-records', str(kept)]) == 0
    assert 'records of 2 runs (7 files) copied' in capsys.readouterr().out
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob('*')
                  if p.is_file()) == sorted(
        ['comparison.json', 'comparison.md', 'comparison.png'] +
        [os.path.join(*parts) for parts in (
            ('student', 'results.json'), ('student', 'bootstrap.npz'),
            ('student', 'seed1', 'results.json'),
            ('student', 'seed1', 'bootstrap.npz'))])
    moved = str(tmp_path / 'moved')
    shutil.move(str(kept), moved)
    shutil.rmtree(work)  # the records' stored work_dir no longer exists
    rebuilt_args = args[:args.index('--work-dir') + 1] + [moved] + \
        args[args.index('--work-dir') + 2:] + ['--no-train']
    assert main(rebuilt_args) == 0
    assert capsys.readouterr().out.count('reusing finished run') == 2
    rebuilt = read_json(os.path.join(moved, 'comparison.json'))
    assert [r['work_dir'] for r in rebuilt['runs']] == [
        os.path.join(moved, 'student'),
        os.path.join(moved, 'student', 'seed1')]
    assert [dict(r, work_dir=None) for r in rebuilt['runs']] == \
        [dict(r, work_dir=None) for r in summary['runs']]
    # intervals and differences come from the moved replicates
    assert rebuilt['aggregate'] == again['aggregate']
    assert rebuilt['aggregate'][0]['ci95'][key] == ci


# ------------------------------------------------------- stubbed training
def fake_record(cfg, *args, **kwargs):
    """What train_recipe returns, with metrics made up from the seed."""
    seed = (cfg.get('randomness') or {}).get('seed')
    base = 0.5 + 0.1 * seed + (0.2 if 'teacher' in cfg.experiment_name
                               else 0.0)
    return dict(
        name=cfg.experiment_name, seed=seed, config_hash='x', metrics={
            'cross_age/accuracy': 100 * base,
            'cross_age/TAR@FAR=1e-3': base / 2},
        curves={'cross_age': dict(far=[1e-3, 1e-2, 1.0],
                                  tar=[base / 2, base, 1.0])},
        student_params=1000, teachers=[], epochs=1, batch_size=8,
        train_time_s=1.0, test_time_s=0.5, work_dir=cfg.work_dir,
        device='cpu', torch='t', mmengine='m', kdzoo='k', python='p',
        checkpoint=cfg.get('model', {}).get('teachers', {})
        .get('teacher_fr', {}).get('checkpoint'))


KD_SUITE = f'''
    runs = [
        dict(name='teacher', role='teacher', recipe={TEACHER!r}, seeds=TS),
        dict(name='alone', recipe={STUDENT!r}),
        dict(name='kd', recipe={KD!r}, cfg_options={{
            'model.teachers.teacher_fr.checkpoint':
                '{{teacher}}/backbone.pth'}}),
        dict(name='once', recipe={STUDENT!r}, seeds=False),
    ]
    '''


@pytest.mark.parametrize('teacher_seeds', [None, True])
def test_seeded_dependencies_and_run_dirs(tmp_path, monkeypatch,
                                          teacher_seeds):
    calls = []
    monkeypatch.setattr(jobs_mod, 'train_recipe',
                        lambda cfg: calls.append(fake_record(cfg)) or
                        dict(calls[-1]))
    src = KD_SUITE.replace(', seeds=TS', '' if teacher_seeds is None else
                           f', seeds={teacher_seeds}')
    suite = write_suite(tmp_path / 's.py', src, seeds=3)  # suite default
    work = str(tmp_path / 'w')
    records = suite_mod.run_suite(suite, work_dir=work)
    got = [(r['name'], r['seed'], os.path.relpath(r['work_dir'], work))
           for r in records]
    t_seeds = [0, 1, 2] if teacher_seeds else [0]
    assert got == [('teacher', s, 'teacher' if not s else f'teacher/seed{s}')
                   for s in t_seeds] + [
        ('alone', 0, 'alone'), ('alone', 1, 'alone/seed1'),
        ('alone', 2, 'alone/seed2'), ('kd', 0, 'kd'),
        ('kd', 1, 'kd/seed1'), ('kd', 2, 'kd/seed2'), ('once', 0, 'once')]
    # trained seed by seed, runs trained once first
    once = ['once'] + (['teacher'] if not teacher_seeds else [])
    per_seed = (['teacher'] if teacher_seeds else []) + ['alone', 'kd']
    assert [c['name'] for c in calls] == \
        sorted(once, key=['teacher', 'once'].index) + per_seed * 3
    assert [c['seed'] for c in calls[len(once):]] == \
        [s for s in range(3) for _ in per_seed]
    kd_ckpts = [os.path.relpath(c['checkpoint'], work) for c in calls
                if c['name'] == 'kd']
    assert kd_ckpts == ([f'teacher{"/seed%d" % s if s else ""}/backbone.pth'
                         for s in range(3)] if teacher_seeds else
                        ['teacher/backbone.pth'] * 3)
    hashes = [r['run_hash'] for r in records]
    assert len(set(hashes)) == len(hashes)  # the seed is in the hash

    md = open(os.path.join(work, 'comparison.md')).read()
    (row, ) = [ln for ln in md.splitlines() if ln.startswith('| alone |')]
    acc = [50.0, 60.0, 70.0]
    assert f' {np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f} ' in row
    (row, ) = [ln for ln in md.splitlines() if ln.startswith('| once |')]
    assert '±' not in row and ' 50.00 ' in row

    # --seeds 1 later: the seed-0 runs are the one-seed runs, reused
    calls.clear()
    suite_mod.run_suite(suite, work_dir=work, seeds=1)
    assert calls == []


def test_rerun_with_stub_trains_nothing(tmp_path, monkeypatch):
    n = []
    monkeypatch.setattr(jobs_mod, 'train_recipe',
                        lambda cfg: n.append(1) or fake_record(cfg))
    suite = write_suite(tmp_path / 's.py', KD_SUITE.replace(', seeds=TS', ''))
    work = str(tmp_path / 'w')
    assert main(['compare', suite, '--work-dir', work, '--seeds', '2']) == 0
    assert len(n) == 1 + 2 + 2 + 1
    n.clear()
    assert main(['compare', suite, '--work-dir', work, '--seeds', '2']) == 0
    assert n == []
    # --force retrains all
    assert main(['compare', suite, '--work-dir', work, '--seeds', '2',
                 '--force']) == 0
    assert len(n) == 6


def test_records_reading_a_checkpoint_are_reused_at_another_path(
        tmp_path, monkeypatch):
    """A run that reads another run's checkpoint ('{teacher}/backbone.pth')
    is found again from a copy of the work dir elsewhere; records stamped
    under the older, path-dependent hash are reused where they were
    trained and re-stamped there, after which their copies travel too."""
    monkeypatch.setattr(jobs_mod, 'train_recipe', fake_record)
    suite = write_suite(tmp_path / 's.py', KD_SUITE.replace(', seeds=TS', ''))
    first = str(tmp_path / 'first')
    suite_mod.run_suite(suite, work_dir=first, seeds=2)

    def no_training(cfg):
        raise AssertionError(f'{cfg.experiment_name} trained again')

    monkeypatch.setattr(jobs_mod, 'train_recipe', no_training)
    copy = str(tmp_path / 'copy')
    shutil.copytree(first, copy)
    records = suite_mod.run_suite(suite, work_dir=copy, seeds=2)
    assert len(records) == 6

    # the older rule: the teacher's path inside the student's hash
    kd_json = os.path.join(first, 'kd', 'seed1', 'results.json')
    current = read_json(kd_json)['run_hash']
    tasks = suite_mod._plan(suite_mod.load_suite(suite), suite, first,
                            False, None, 2, [0, 1])
    (kd, ) = [t for t in tasks if t['key'] == ('kd', 1)]
    (teacher, ) = [t for t in tasks if t['key'] == ('teacher', None)]
    path_hash = suite_mod._run_hashes(kd['cfg'], {}, teacher['run_hash'],
                                      teacher['run_hash'])[0]
    assert path_hash != current == kd['run_hash']
    old = read_json(kd_json)
    old['run_hash'] = path_hash
    with open(kd_json, 'w') as f:
        json.dump(old, f)
    moved = str(tmp_path / 'moved')
    shutil.copytree(first, moved)
    calls = []
    monkeypatch.setattr(jobs_mod, 'train_recipe',
                        lambda cfg: calls.append(cfg.experiment_name) or
                        fake_record(cfg))
    suite_mod.run_suite(suite, work_dir=moved, seeds=2)
    assert calls == ['kd']  # an old stamp is not found elsewhere ...
    monkeypatch.setattr(jobs_mod, 'train_recipe', no_training)
    suite_mod.run_suite(suite, work_dir=first, seeds=2)  # ... but here
    assert read_json(kd_json)['run_hash'] == current  # and re-stamped
    again = str(tmp_path / 'again')
    shutil.copytree(first, again)
    assert len(suite_mod.run_suite(suite, work_dir=again, seeds=2)) == 6


def test_no_train_tabulates_the_finished_runs_only(tmp_path, monkeypatch,
                                                  capsys):
    n = []
    monkeypatch.setattr(jobs_mod, 'train_recipe',
                        lambda cfg: n.append(1) or fake_record(cfg))
    suite = write_suite(tmp_path / 's.py', KD_SUITE.replace(', seeds=TS', ''))
    work = str(tmp_path / 'w')
    assert main(['compare', suite, '--work-dir', work, '--no-train']) == 2
    assert 'no run of the suite has finished' in capsys.readouterr().err
    assert main(['compare', suite, '--work-dir', work, '--seeds', '2']) == 0
    os.remove(os.path.join(work, 'kd', 'seed1', 'results.json'))
    n.clear()
    records = suite_mod.run_suite(suite, work_dir=work, seeds=2,
                                  no_train=True)
    assert n == []
    assert "[kd seed 1] not finished: left out (--no-train)" in \
        capsys.readouterr().out
    assert sorted((r['name'], r['seed']) for r in records) == [
        ('alone', 0), ('alone', 1), ('kd', 0), ('once', 0), ('teacher', 0)]
    md = open(os.path.join(work, 'comparison.md')).read()
    (row,) = [ln for ln in md.splitlines() if ln.startswith('| kd |')]
    assert '±' not in row  # one seed of kd left
    assert read_json(os.path.join(work, 'comparison.json'))['seeds'] == [0, 1]
    # with every run's seed 1 gone, the table says it shows seed 0 only
    os.remove(os.path.join(work, 'alone', 'seed1', 'results.json'))
    suite_mod.run_suite(suite, work_dir=work, seeds=2, no_train=True)
    summary = read_json(os.path.join(work, 'comparison.json'))
    assert summary['seeds'] == [0]
    assert summary['context']['seed_policy'] == 'one seed'
    assert 'seeds: 0 / 1' not in open(os.path.join(work,
                                                   'comparison.md')).read()
    assert main(['compare', suite, '--work-dir', work, '--no-train',
                 '--force']) == 2
    assert 'exclude each other' in capsys.readouterr().err

    # exporting into a folder of earlier records: the same files replaced,
    # others kept (later seeds are added to one folder)
    kept = tmp_path / 'kept'
    (kept / 'older').mkdir(parents=True)
    (kept / 'older' / 'results.json').write_text('{}')
    (kept / 'kd').mkdir()
    (kept / 'kd' / 'results.json').write_text('stale')
    suite_mod.run_suite(suite, work_dir=work, seeds=2, no_train=True,
                        export_records=str(kept))
    assert (kept / 'older' / 'results.json').read_text() == '{}'
    assert read_json(kept / 'kd' / 'results.json')['run_hash'] == \
        read_json(os.path.join(work, 'kd', 'results.json'))['run_hash']
    assert not (kept / 'kd' / 'seed1').exists()  # not finished, not copied
    assert main(['compare', suite, '--work-dir', work, '--no-train',
                 '--export-records', str(kept / 'older' / 'results.json')]
                ) == 2
    assert 'is a file; give a folder' in capsys.readouterr().err


def test_old_results_are_evaluated_again(tmp_path, monkeypatch):
    """A finished run from before the current evaluation (no curves, no
    intervals: no eval_version) is tested again (not retrained); the next
    call reuses it as is."""
    monkeypatch.setattr(jobs_mod, 'train_recipe',
                        lambda cfg: {k: v for k, v in fake_record(cfg).items()
                                     if k != 'curves'})
    tested = []

    def fake_test(cfg, checkpoint=None):
        tested.append(checkpoint)
        return fake_record(cfg)

    monkeypatch.setattr(suite_mod, 'test_recipe', fake_test)
    suite = write_suite(tmp_path / 's.py', f'''
        runs = [dict(name='alone', recipe={STUDENT!r})]
        ''')
    work = str(tmp_path / 'w')
    suite_mod.run_suite(suite, work_dir=work)
    assert 'curves' not in read_json(os.path.join(work, 'alone',
                                                  'results.json'))
    # no backbone.pth: nothing to evaluate, the run is shown without curve
    suite_mod.run_suite(suite, work_dir=work)
    assert tested == []
    ckpt = os.path.join(work, 'alone', 'backbone.pth')
    open(ckpt, 'wb').close()
    suite_mod.run_suite(suite, work_dir=work)
    assert tested == [ckpt]
    record = read_json(os.path.join(work, 'alone', 'results.json'))
    assert record['curves']['cross_age']['far'] == [1e-3, 1e-2, 1.0]
    suite_mod.run_suite(suite, work_dir=work)
    assert tested == [ckpt]


@pytest.mark.parametrize('argv, message', [
    (['--seeds', '0'], 'seeds must be an integer >= 1'),
    (['--seeds', '2', '--cfg-options', 'randomness.seed=5'],
     '--cfg-options sets randomness.seed'),
    (['--grid', '--export-records', 'kept'],
     '--export-records goes with a comparison, not --grid'),
])
def test_argument_errors(tmp_path, capsys, argv, message):
    suite = write_suite(tmp_path / 's.py', f'''
        runs = [dict(name='alone', recipe={STUDENT!r})]
        ''')
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'w')] +
                argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_suite_entry_errors(tmp_path, capsys):
    suite = write_suite(tmp_path / 's.py', f'''
        runs = [dict(name='alone', recipe={STUDENT!r}, seeds='yes')]
        ''')
    assert main(['compare', suite]) == 2
    assert "seeds must be True" in capsys.readouterr().err
    suite = write_suite(tmp_path / 's.py', f'''
        runs = [dict(name='alone', recipe={STUDENT!r},
                     cfg_options={{'randomness.seed': 3}})]
        ''')
    assert main(['compare', suite, '--seeds', '2',
                 '--work-dir', str(tmp_path / 'w')]) == 2
    err = capsys.readouterr().err
    assert "run 'alone' sets randomness.seed" in err and 'seeds=False' in err


def test_reference_must_name_a_run(tmp_path, capsys):
    suite = write_suite(tmp_path / 's.py', f'''
        runs = [dict(name='alone', recipe={STUDENT!r}),
                dict(name='kd', recipe={STUDENT!r})]
        ''', reference='kdd')
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'w')]) == 2
    err = capsys.readouterr().err
    assert "reference='kdd' names no run of the suite" in err
    assert "Did you mean: 'kd'" in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1


def _bootstrap_record(tmp_path, name, seed, value, reps):
    from kdzoo.engine.runner import bootstrap_file
    d = tmp_path / f'{name}{seed}'
    d.mkdir()
    np.savez(bootstrap_file(str(d / 'results.json')), **{'p/k': reps})
    return dict(name=name, role='student', seed=seed, work_dir=str(d),
                metrics={'p/k': value})


def test_paired_differences_and_intervals(tmp_path):
    from kdzoo.commands.report import aggregate
    from kdzoo.evaluation.significance import add_intervals
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.02, size=(3, 1000))  # shared test-set draws
    recs = []
    for seed in range(3):
        # b = a + 0.05 on every replicate; c = a + tiny
        base = 0.3 + 0.01 * seed
        recs += [_bootstrap_record(tmp_path, 'a', seed, base,
                                   base + noise[seed]),
                 _bootstrap_record(tmp_path, 'b', seed, base + 0.05,
                                   base + 0.05 + noise[seed]),
                 _bootstrap_record(tmp_path, 'c', seed, base + 1e-4,
                                   base + 1e-4 + noise[seed] +
                                   rng.normal(0, 0.01, 1000))]
    entries = aggregate(recs)
    add_intervals(entries, recs, ['p/k'], baseline='a', reference='c')
    e = {x['name']: x for x in entries}
    d = e['b']['differences']['a']['p/k']
    assert d['diff'] == pytest.approx(0.05) and d['verdict'] == 'better'
    assert d['ci95'][0] == pytest.approx(0.05) and d['seeds'] == 3
    d = e['a']['differences']['c']['p/k']
    assert d['verdict'] == 'not distinguishable'
    assert d['ci95'][0] < 0 < d['ci95'][1]
    assert e['c']['differences']['a']['p/k']['verdict'] == \
        'not distinguishable'
    # one seed: the interval of the difference is the identity bootstrap's
    one = [r for r in recs if r['seed'] == 0]
    entries = aggregate(one)
    add_intervals(entries, one, ['p/k'], baseline='a')
    e = {x['name']: x for x in entries}
    samples_c = np.load(os.path.join(one[2]['work_dir'], 'bootstrap.npz'))
    samples_a = np.load(os.path.join(one[0]['work_dir'], 'bootstrap.npz'))
    diff = samples_c['p/k'] - samples_a['p/k']
    assert e['c']['differences']['a']['p/k']['ci95'] == pytest.approx(
        list(np.percentile(diff, [2.5, 97.5])))
    assert e['a']['ci95']['p/k'] == pytest.approx(
        list(np.percentile(samples_a['p/k'], [2.5, 97.5])))
    assert 'differences' in e['a'] and e['a']['differences'] == {}


def test_contrasts_are_paired_differences_between_named_runs(tmp_path):
    from kdzoo.commands.report import aggregate, comparison_markdown
    from kdzoo.evaluation.significance import (add_intervals,
                                               contrast_differences)
    noise = np.random.default_rng(1).normal(0, 0.02, size=(2, 1000))
    recs = []
    for seed in range(2):
        base = 0.3 + 0.01 * seed
        recs += [_bootstrap_record(tmp_path, 'full', seed, base + 0.04,
                                   base + 0.04 + noise[seed]),
                 _bootstrap_record(tmp_path, 'part', seed, base,
                                   base + noise[seed])]
    got = contrast_differences(recs, [('full', 'part', 'the extra term'),
                                      ('part', 'full', '')], ['p/k', 'q'])
    (a, b) = got
    assert (a['a'], a['b'], a['label']) == ('full', 'part', 'the extra term')
    assert list(a['differences']) == ['p/k']  # no replicates of 'q'
    d = a['differences']['p/k']
    assert d['diff'] == pytest.approx(0.04) and d['verdict'] == 'better'
    assert d['ci95'] == pytest.approx([0.04, 0.04]) and d['seeds'] == 2
    assert b['differences']['p/k']['verdict'] == 'worse'
    entries = aggregate(recs)
    add_intervals(entries, recs, ['p/k'])
    md = comparison_markdown(entries, [('k', 'p/k')], {}, ['p/k'], got)
    (row,) = [ln for ln in md.splitlines() if ln.startswith('| full − part')]
    assert row.startswith('| full − part | the extra term | +0.0400 [')
    assert row.endswith('better |')
    assert md.count('percentile bootstrap') == 1  # one method note


@pytest.mark.parametrize('contrasts, message', [
    ("[('kd', 'kdd')]", "contrasts[0] names 'kdd', which is no run"),
    ("[('kd', 'kd')]", "contrasts[0] compares 'kd' with itself"),
    ("['kd']", 'contrasts[0] must be (run a, run b)'),
])
def test_contrasts_must_name_two_runs(tmp_path, capsys, contrasts, message):
    suite = write_suite(tmp_path / 's.py', f'''
        runs = [dict(name='alone', recipe={STUDENT!r}),
                dict(name='kd', recipe={STUDENT!r})]
        contrasts = {contrasts}
        ''')
    assert main(['compare', suite, '--work-dir', str(tmp_path / 'w')]) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert not os.path.exists(tmp_path / 'w')  # refused before training


# ------------------------------------------------- aggregation and figure
def _records():
    recs = []
    for name, role, accs in (('teacher', 'teacher', [90.0]),
                             ('kd', 'student', [80.0, 83.0, 84.5]),
                             ('alone', 'student', [70.0, 71.0])):
        for seed, acc in enumerate(accs):
            recs.append(dict(
                name=name, role=role, seed=seed, student_params=2e5,
                metrics={'cross_age/accuracy': acc,
                         'cross_age/TAR@FAR=1e-3': acc / 200},
                curves={'cross_age': dict(far=[1e-3, 1e-1, 1.0],
                                          tar=[acc / 200, acc / 100, 1.0])},
                epochs=2, batch_size=16, train_time_s=10.0 + seed,
                test_time_s=1.0, device='cpu', torch='2', mmengine='0.10',
                kdzoo='0.1', python='3', work_dir=f'w/{name}/{seed}'))
    return recs


def test_aggregate_matches_numpy_and_markdown_cells():
    entries = aggregate(_records())
    assert [(e['name'], e['n']) for e in entries] == \
        [('teacher', 1), ('kd', 3), ('alone', 2)]
    kd = entries[1]
    accs = np.array([80.0, 83.0, 84.5])
    assert kd['metrics']['cross_age/accuracy'] == pytest.approx(accs.mean())
    assert kd['metrics_std']['cross_age/accuracy'] == \
        pytest.approx(np.std(accs, ddof=1))
    assert kd['curves']['cross_age']['tar'] == \
        pytest.approx([np.mean(accs / 200), np.mean(accs / 100), 1.0])
    assert kd['curves']['cross_age']['tar_std'][1] == \
        pytest.approx(np.std(accs / 100, ddof=1))
    assert kd['train_time_s'] == pytest.approx(11.0)
    md = comparison_markdown(entries)
    lines = md.splitlines()
    assert lines[0].startswith('| run | role | params (M) | seed |')
    (row, ) = [ln for ln in lines if ln.startswith('| kd |')]
    assert f'| {accs.mean():.2f} ± {np.std(accs, ddof=1):.2f} |' in row
    assert f'{np.mean(accs / 200):.4f} ± {np.std(accs / 200, ddof=1):.4f}' \
        in row
    (row, ) = [ln for ln in lines if ln.startswith('| teacher |')]
    assert '| 90.00 |' in row and '±' not in row
    # plain records (the old call) give the same table, plus the context
    md2 = comparison_markdown(_records())
    assert md2.startswith(md)
    assert '- device: cpu; torch 2; mmengine 0.10; kdzoo 0.1; python 3' in md2
    assert '- batch size: 16; epochs: 2' in md2
    assert '| kd (seed 2) | 2 | 16 | 12 | 1 | cpu | w/kd/2 |' in md2


def test_plot_two_panels_teacher_hatched_error_bars(tmp_path):
    entries = aggregate(_records())
    path = str(tmp_path / 'out' / 'comparison.png')
    fig = write_comparison_plot(entries, path, title='suite: 3 seeds')
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC
    assert os.listdir(tmp_path / 'out') == ['comparison.png']
    roc, bars = fig.axes[:2]
    assert len(fig.axes) == 2
    assert roc.get_xscale() == 'log'
    assert len(roc.get_lines()) == 3  # one curve per run
    assert fig._suptitle.get_text() == 'suite: 3 seeds'
    patches = bars.patches[:3]
    assert [p.get_height() for p in patches] == pytest.approx(
        [e['metrics']['cross_age/TAR@FAR=1e-3'] for e in entries])
    assert patches[0].get_hatch() == '//' and not patches[1].get_hatch()
    assert patches[0].get_facecolor() != patches[1].get_facecolor()
    # std error bars: one segment per bar, kd's the longest
    (errbar, ) = [c for c in bars.containers if hasattr(c, 'lines')]
    segs = errbar.lines[2][0].get_segments()
    lengths = [abs(s[1][1] - s[0][1]) for s in segs]
    assert lengths[0] == 0 and lengths[1] == pytest.approx(
        2 * np.std(np.array([80.0, 83.0, 84.5]) / 200, ddof=1))


def test_plot_many_runs_distinct_styles_stacked_legend_outside(tmp_path):
    """A baselines-sized suite: every student curve differs in colour or
    line style, panels stack, the legend sits outside the curve axes."""
    recs = []
    base = [r for r in _records() if r['name'] == 'kd'][0]
    for i in range(26):
        r = json.loads(json.dumps(base))
        r['name'], r['seed'] = f'run{i}', 0
        r['role'] = 'teacher' if i == 0 else 'student'
        recs.append(r)
    fig = write_comparison_plot(aggregate(recs), str(tmp_path / 'p.png'))
    roc, bars = fig.axes[:2]
    lines = roc.get_lines()
    assert len(lines) == 26
    students = [(ln.get_color(), ln.get_linestyle()) for ln in lines[1:]]
    assert len(set(map(str, students))) == 25
    assert lines[0].get_linestyle() == '--'
    # stacked: the bar axes lie below the curve axes
    assert bars.get_position().y1 <= roc.get_position().y0
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    legend_box = roc.get_legend().get_window_extent(renderer)
    assert legend_box.x0 >= roc.get_window_extent(renderer).x1 - 1


def test_plot_falls_back_to_a_measured_far(tmp_path):
    """Tiny test sets cannot measure TAR@FAR=1e-3: the bars use the lowest
    FAR every run measured."""
    recs = _records()
    for r in recs:
        r['metrics'] = {'cross_age/TAR@FAR=1e-1': 0.5,
                        'cross_age/TAR@FAR=2e-1': 0.6}
    fig = write_comparison_plot(aggregate(recs), str(tmp_path / 'p.png'))
    assert fig.axes[1].get_ylabel() == 'TAR@FAR=1e-1'


def test_plot_slants_long_names_and_title_names_teachers_only_when_present(
        tmp_path):
    """Four bars with long names would overlap side by side: they slant.
    The title mentions teachers' single seed only when a run was trained
    once."""
    from kdzoo.evaluation.plots import seeds_title
    recs = _records()
    long_name = 'two_teacher_angular_gated'
    for r in recs:
        r['name'] = r['name'] + '_' + long_name
    fig = write_comparison_plot(aggregate(recs), str(tmp_path / 'p.png'))
    assert {t.get_rotation() for t in fig.axes[1].get_xticklabels()} == {45}
    fig = write_comparison_plot(aggregate(_records()),
                                str(tmp_path / 'q.png'))
    assert {t.get_rotation() for t in fig.axes[1].get_xticklabels()} == {0}
    assert seeds_title('s', [0, 1, 2]) == \
        's: 3 seeds (0, 1, 2; teachers: one seed)'
    assert seeds_title('s', [0, 1, 2], trained_once=False) == \
        's: 3 seeds (0, 1, 2)'
    assert seeds_title('s', [0], trained_once=False) == 's: one seed (0)'


# -------------------------------------------- the metric's TAR-vs-FAR curve
def test_verification_metric_keeps_curve_beside_scalar_metrics():
    from kdzoo.evaluation.metrics import FaceVerificationMetric
    from kdzoo.utils import ConfigError
    rng = np.random.default_rng(0)
    n_img, n_pairs = 60, 300
    emb = rng.normal(size=(n_img, 8)).astype(np.float32)
    labels = rng.integers(0, 6, n_img)
    pairs = rng.integers(0, n_img, size=(n_pairs, 2))
    issame = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    metric = FaceVerificationMetric(num_folds=2,
                                    curve_fars=(1e-3, 1e-2, 0.1, 0.5, 1.0))
    metric.dataset_meta = dict(verification=dict(
        p=dict(pairs=pairs, issame=issame, num_folds=2)))
    metric.process({}, [dict(index=i, embedding=emb[i])
                        for i in range(n_img)])
    out = metric.evaluate(n_img)
    assert all(isinstance(v, float) for v in out.values())  # scalars only
    # reference: accept when the cosine is above the (k+1)-th largest
    # negative score, k = floor(far * negatives), k >= 10 (a FAR is
    # reported only when at least 10 negatives lie above its threshold)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    scores = [float(unit[a] @ unit[b]) for a, b in pairs]
    neg = sorted((s for s, same in zip(scores, issame) if not same),
                 reverse=True)
    pos = [s for s, same in zip(scores, issame) if same]
    far_ref, tar_ref = [], []
    for far in (1e-3, 1e-2, 0.1, 0.5, 1.0):
        k = int(np.floor(far * len(neg) + 1e-9))
        if k < 10:
            continue
        thr = neg[k] if k < len(neg) else -np.inf
        far_ref.append(far)
        tar_ref.append(sum(s > thr for s in pos) / len(pos))
    # 1e-2 and 1e-3: fewer than 10 negatives above: left out
    assert 10 <= 0.1 * len(neg) and 1e-2 * len(neg) < 10
    assert metric.curves['p']['far'] == far_ref == [0.1, 0.5, 1.0]
    assert metric.curves['p']['tar'] == pytest.approx(tar_ref)
    assert out['p/TAR@FAR=1e-1'] == pytest.approx(tar_ref[0])
    assert 'p/TAR@FAR=1e-2' not in out
    assert out['p/num_negatives'] == len(neg)
    # no identities: the intervals come from a bootstrap over pairs
    assert metric.bootstrap_info['p']['unit'] == 'pair'
    lo, hi = metric.intervals['p/TAR@FAR=1e-1_ci95']
    assert lo <= out['p/TAR@FAR=1e-1'] <= hi
    with pytest.raises(ConfigError, match='curve_fars'):
        FaceVerificationMetric(curve_fars=(0.0, 0.1))


def test_run_without_training_data_is_only_tested(tmp_path, monkeypatch):
    """A pretrained model's reference row (recipe without train_dataloader)
    is evaluated with test_recipe, never trained."""
    trained, tested = [], []
    monkeypatch.setattr(jobs_mod, 'train_recipe',
                        lambda cfg: trained.append(cfg.experiment_name) or
                        fake_record(cfg))
    monkeypatch.setattr(jobs_mod, 'test_recipe',
                        lambda cfg: tested.append(cfg.experiment_name) or
                        dict(fake_record(cfg), train_time_s=0.0))
    eval_only = tmp_path / 'eval_only.py'
    eval_only.write_text(textwrap.dedent(f'''
        _base_ = [{STUDENT!r}]
        train_dataloader = None
        train_cfg = None
        optim_wrapper = None
        param_scheduler = None
        '''))
    suite = write_suite(tmp_path / 's.py', f'''
        runs = [dict(name='pretrained', role='teacher',
                     recipe={str(eval_only)!r}),
                dict(name='alone', recipe={STUDENT!r})]
        ''')
    records = suite_mod.run_suite(suite, work_dir=str(tmp_path / 'w'))
    assert tested == ['pretrained'] and trained == ['alone']
    assert [r['role'] for r in records] == ['teacher', 'student']


def test_runs_selects_part_of_a_suite_with_what_it_needs(tmp_path,
                                                         monkeypatch,
                                                         capsys):
    """``--runs``: the named runs, the runs they read and the baseline
    and reference runs; contrasts among the others are left out."""
    src = KD_SUITE.replace(', seeds=TS', '')
    suite = write_suite(tmp_path / 's.py', textwrap.dedent(src) +
                        textwrap.dedent('''
        runs.append(dict(name='kd2', recipe=runs[2]['recipe'],
                         cfg_options=runs[2]['cfg_options']))
        '''), baseline='alone',
        contrasts=[('kd', 'once'), ('kd2', 'kd'), ('kd', 'alone')])
    loaded = suite_mod.load_suite(suite)
    cut = suite_mod.select_runs(loaded, suite, ['kd'])
    assert [r['name'] for r in cut.runs] == ['teacher', 'alone', 'kd']
    assert [tuple(c) for c in cut.contrasts] == [('kd', 'alone')]
    out = capsys.readouterr().out
    assert '[alone] kept: the baseline' in out
    assert '[teacher] kept: read by a selected run' in out
    # the suite itself is left as it was
    assert len(loaded.runs) == 5 and len(loaded.contrasts) == 3
    with pytest.raises(suite_mod.ConfigError,
                       match=r"--runs: 'kd3' is no run of .*s\.py.*"
                             r"Did you mean: 'kd'"):
        suite_mod.select_runs(loaded, suite, ['kd3'])
    # through the command: only the selection is trained and tabulated
    monkeypatch.setattr(jobs_mod, 'train_recipe', fake_record)
    work = str(tmp_path / 'w')
    assert main(['compare', suite, '--work-dir', work, '--runs', 'once']) \
        == 0
    names = [e['name'] for e in
             read_json(os.path.join(work, 'comparison.json'))['aggregate']]
    assert names == ['alone', 'once']
