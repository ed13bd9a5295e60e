"""``kdzoo compare``: run a suite of recipes on one protocol and tabulate.

A suite is a Python file defining ``runs``, a list of dicts:

- ``name``: the run's name (its work dir is ``<suite work dir>/<name>``);
- ``recipe``: recipe path, relative to the suite file or the current dir;
- ``cfg_options`` (optional): overrides; a string value may name another
  run's work dir as ``{run_name}``, e.g. the teacher checkpoint
  ``'{teacher}/backbone.pth'`` (that run must come earlier);
- ``role`` (optional): 'teacher' or 'student' (shown in the table);
- ``seeds`` (optional bool): whether the run is repeated per seed. Default:
  True for students, False for teachers (a teacher is trained once, with
  its recipe's seed, and shared by every student seed).

A recipe without ``train_dataloader`` (e.g. a pretrained teacher's
evaluation) is only tested.

and optionally ``work_dir``, ``columns`` (list of (title, metric key)),
``seeds`` (how many seeds, default 1; ``--seeds`` overrides), ``plot``
(``dict(protocol='cross_age', far=1e-3)``), ``baseline`` (the run every
student run is compared with, default ``student_alone`` when there is one),
``reference`` (a second run to compare with, e.g. ``'kd'``),
``contrasts`` (further pairs of runs, ``[('liaad', 'two_teacher', 'what
it isolates'), ...]``: a method against its own parts) and
``compare_keys`` (the metric keys of those paired differences; default
TAR@FAR=1e-3 of each protocol and the rank-1 columns).

Every cell carries its 95 % interval (test identities bootstrapped; with
several seeds, seeds too), and each student run's paired difference to the
baseline and the reference is marked better / worse / not distinguishable
(:mod:`kdzoo.evaluation.significance`).

Seeds: with N > 1 seeds, every repeated run is trained with
``randomness.seed`` = 0, 1, ..., N-1; seed 0 keeps the run's work dir
``<work_dir>/<name>`` (so a one-seed suite's runs are reused), seed k > 0
goes to ``<work_dir>/<name>/seed<k>``. A ``{name}`` placeholder names the
same seed's dir when that run is repeated too, else its single dir. The
data (``data_seed``) is the same for every seed.

A run whose ``results.json`` holds the same run hash (resolved config, so
the seed, plus the hashes of the runs it depends on) is reused, not
retrained. A run that was stopped before its ``results.json`` (the
machine restarted, the job was killed) trains from the start again, or,
with ``resume=True`` (``--resume``), continues from the newest complete
checkpoint it wrote, provided the config saved in that checkpoint is the
run's and the run started under the same run hash (``compare_run.json``,
written when a run starts; see :func:`_interrupted`); its record says so
(``resumed``) and its ``train_time_s`` adds the iteration time logged
before the stop. A reused run whose ``results.json`` predates the current
evaluation (``eval_version``) is evaluated again (test only, from its
``backbone.pth``).

Outputs in the work dir: ``comparison.md`` (table, ``mean ± std`` over
seeds, and the reproduction context), ``comparison.json`` (every run's
record with its curves, the per-name aggregates with intervals and paired
differences, and the context) and
``comparison.png`` (TAR-vs-FAR curves and TAR@FAR=1e-3 bars).
"""
import hashlib
import json
import os
import re
import time
from typing import Dict, List, Optional, Tuple

from mmengine.config import Config

from kdzoo.utils import (ConfigError, atomic_write_bytes, atomic_write_json,
                         atomic_write_text)
from kdzoo.engine.runner import (EVAL_VERSION, bootstrap_file, config_hash,
                                 load_recipe, test_recipe)

_PLACEHOLDER = re.compile(r'\{([A-Za-z_][A-Za-z0-9_]*)\}')
_SEED_KEY = 'randomness.seed'


def _resolve_recipe(recipe: str, suite_path: str) -> str:
    for base in (os.path.dirname(os.path.abspath(suite_path)), os.getcwd()):
        path = os.path.normpath(os.path.join(base, recipe))
        if os.path.isfile(path):
            return path
    raise ConfigError(f'{suite_path}: recipe {recipe!r} not found (relative '
                      'to the suite file or the current directory)')


def _substitute(value, run_dirs: Dict[str, str], where: str, deps: set):
    if isinstance(value, str):
        def repl(m):
            name = m.group(1)
            if name not in run_dirs:
                raise ConfigError(f'{where}: {{{name}}} names no earlier run; '
                                  f'earlier runs: {list(run_dirs)}')
            deps.add(name)
            return run_dirs[name]
        return _PLACEHOLDER.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, run_dirs, where, deps)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, run_dirs, where, deps)
                           for v in value)
    return value


def load_suite(path: str) -> Config:
    if not os.path.isfile(path):
        raise ConfigError(f'suite file not found: {path!r}')
    suite = Config.fromfile(path)
    runs = suite.get('runs')
    if not runs:
        raise ConfigError(f'{path}: a suite must define runs=[dict(name=..., '
                          'recipe=...), ...]')
    names = set()
    for i, run in enumerate(runs):
        for key in ('name', 'recipe'):
            if key not in run:
                raise ConfigError(f'{path}: runs[{i}] lacks {key!r}')
        if run['name'] in names:
            raise ConfigError(f'{path}: duplicate run name {run["name"]!r}')
        names.add(run['name'])
        if not isinstance(run.get('seeds', True), bool):
            raise ConfigError(
                f'{path}: run {run["name"]!r}: seeds must be True (one run '
                f'per seed) or False (trained once), got {run["seeds"]!r}')
    return suite


def select_runs(suite: Config, path: str, names: List[str]) -> Config:
    """The suite cut down to the runs ``names`` plus what they need: the
    runs they read (``{name}`` placeholders, transitively) and the suite's
    baseline and reference runs (every paired difference is taken against
    them); contrasts and grid runs outside the selection are dropped.
    Prints what it added."""
    by_name = {r['name']: r for r in suite['runs']}
    for name in names:
        if name not in by_name:
            from kdzoo.utils.errors import did_you_mean
            raise ConfigError(f'--runs: {name!r} is no run of {path} (runs: '
                              f'{list(by_name)}).'
                              + did_you_mean(name, by_name))
    keep = set(names)
    baseline, reference = _comparison_runs(suite, path)
    added = {n: 'the baseline' if n == baseline else 'the reference'
             for n in (baseline, reference) if n and n not in keep}
    keep |= set(added)
    todo = list(keep)
    while todo:  # the runs a kept run reads, and the runs they read
        deps = set()
        _substitute(dict(by_name[todo.pop()].get('cfg_options') or {}),
                    {n: n for n in by_name}, path, deps)
        for dep in deps - keep:
            added[dep] = 'read by a selected run'
            keep.add(dep)
            todo.append(dep)
    for name, why in added.items():
        print(f'[{name}] kept: {why}')
    cut = Config(suite.to_dict())
    cut.runs = [r for r in suite['runs'] if r['name'] in keep]
    if suite.get('contrasts'):
        cut.contrasts = [c for c in suite['contrasts']
                         if c[0] in keep and c[1] in keep]
    if (suite.get('grid') or {}).get('runs'):
        cut.grid = dict(suite['grid'], runs={
            k: v for k, v in suite['grid']['runs'].items() if k in keep})
    return cut


def _num_seeds(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'{where}: seeds must be an integer >= 1 (seeds '
                          f'0..N-1), got {value!r}')
    return value


def _sets_seed(options: dict) -> bool:
    return _SEED_KEY in options or 'seed' in (options.get('randomness')
                                              or {})


def run_suite(path: str, work_dir: Optional[str] = None, force: bool = False,
              cfg_options: Optional[dict] = None,
              seeds: Optional[int] = None, jobs: int = 1,
              threads: Optional[int] = None, executor: str = 'local',
              executor_options: Optional[dict] = None,
              suite: Optional[Config] = None,
              no_train: bool = False,
              export_records: Optional[str] = None,
              resume: bool = False,
              runs: Optional[List[str]] = None) -> List[dict]:
    """Train what is missing, test everything, write and print the table.

    ``jobs`` > 1 trains independent runs in that many processes at once
    (:mod:`kdzoo.commands.compare_jobs`), each with ``threads`` torch threads
    (default: this process's threads divided by ``jobs``); ``threads`` with
    ``jobs=1`` sets the thread count of the sequential runs.
    ``executor='submitit'`` submits each run as a submitit job (Slurm)
    with ``executor_options``. Returns every run's record (one per run and
    seed, in suite order). ``suite``: run these runs instead of the file's
    (``kdzoo.commands.compare_grid``); recipes still resolve against
    ``path``. ``no_train``: tabulate the finished runs only (a suite part
    way through, e.g. while it trains elsewhere); the others are named and
    left out. ``export_records``: copy every tabulated run's record
    (``results.json``, ``bootstrap.npz``) and the comparison files into
    this folder, laid out as in ``work_dir`` (see
    :func:`export_run_records`). ``resume``: a stopped run continues from
    its last checkpoint (see the module docstring). ``runs``: only these
    of the suite's runs (:func:`select_runs`).
    """
    from kdzoo.commands.report import (aggregate, comparison_markdown,
                                         default_columns,
                                         default_compare_keys,
                                         print_comparison,
                                         reproduction_context)
    from kdzoo.evaluation.significance import (METHOD_NOTE, add_intervals,
                                              contrast_differences)
    from .compare_jobs import check_jobs, run_tasks
    suite = load_suite(path) if suite is None else suite
    if runs:
        suite = select_runs(suite, path, runs)
    baseline, reference = _comparison_runs(suite, path)  # before training
    contrasts = _contrasts(suite, path)
    num_seeds = _num_seeds(seeds if seeds is not None else
                           suite.get('seeds', 1),
                           '--seeds' if seeds is not None else path)
    jobs, threads = check_jobs(jobs, threads)
    if export_records and os.path.exists(export_records) and \
            not os.path.isdir(export_records):
        raise ConfigError(f'--export-records {export_records} is a file; '
                          'give a folder (new or holding earlier records)')
    if force and resume:
        raise ConfigError('--resume and --force exclude each other (--force '
                          'retrains every run from the start)')
    seed_list = list(range(num_seeds))
    if num_seeds > 1 and _sets_seed(cfg_options or {}):
        raise ConfigError(f'--cfg-options sets {_SEED_KEY} but --seeds '
                          f'{num_seeds} sets it per run (0..{num_seeds - 1})'
                          f'; drop one of them')
    work_dir = work_dir or suite.get('work_dir') or os.path.join(
        'work_dirs', os.path.splitext(os.path.basename(path))[0])
    t_start = time.time()
    # every run and seed, planned before any is trained: its resolved
    # config, content hash and the runs it reads (all known up front)
    tasks = _plan(suite, path, work_dir, force, cfg_options, num_seeds,
                  seed_list)
    if no_train:
        if force:
            raise ConfigError('--no-train and --force exclude each other')
        for task in tasks:
            if task['record'] is None:
                print(f'[{task["tag"]}] not finished: left out (--no-train)')
        tasks = [t for t in tasks if t['record'] is not None]
        if not tasks:
            raise ConfigError(f'{path}: no run of the suite has finished in '
                              f'{work_dir}; run it without --no-train')
        # the table, its context and the plot title name the seeds shown
        present = {t['key'][1] for t in tasks}
        seed_list = [s for s in seed_list if s in present] or seed_list[:1]
    repeated = num_seeds > 1 and len(seed_list) > 1
    reused = [t['run_dir'] for t in tasks if t['record'] is not None]
    for task in tasks:
        if task['record'] is not None:
            print(f'[{task["tag"]}] reusing finished run ({task["run_dir"]})')
            if task['record'].get('eval_version') != EVAL_VERSION:
                task['record'] = _evaluate_again(
                    task['cfg'], task['record'], task['run_dir'], task['tag'])
    _announce_interrupted(tasks, resume)
    # trained seed by seed (runs trained once first, then every run's seed
    # 0, then seed 1, ...): a long suite stopped part-way leaves whole seeds
    # finished, which the next call reuses and can already tabulate
    to_train = sorted((t for t in tasks if t['record'] is None),
                      key=lambda t: -1 if t['key'][1] is None
                      else t['key'][1])
    run_tasks(to_train, jobs, threads, executor, executor_options, work_dir)
    records = [t['record'] for t in tasks]
    parallel = dict(jobs=jobs, threads_per_run=threads) if (
        jobs > 1 or threads or executor != 'local') else {}
    if executor != 'local':
        parallel['executor'] = executor

    if num_seeds == 1:  # the recipes' own seeds (randomness.seed)
        seed_list = sorted({r.get('seed') for r in records}, key=str)
    entries = aggregate(records)
    columns = suite.get('columns') or default_columns(entries)
    compare_keys = list(suite.get('compare_keys') or
                        default_compare_keys(columns))
    add_intervals(entries, records, sorted({k for _, k in columns} |
                                           set(compare_keys)),
                  baseline=baseline, reference=reference)
    contrasted = contrast_differences(records, contrasts, compare_keys)
    plot_opts = dict(suite.get('plot') or {})
    suite_name = os.path.splitext(os.path.basename(path))[0]
    context = reproduction_context(
        records, suite=path, work_dir=work_dir, seeds=seed_list,
        repeated=repeated,
        seed_policy=('students: one run per seed; teachers and runs with '
                     'seeds=False: one run (their recipe seed), shared by '
                     'every seed') if repeated else 'one seed',
        wall_time_s=round(time.time() - t_start, 1), reused=reused,
        baseline=baseline, reference=reference, intervals=METHOD_NOTE,
        **parallel)
    png = os.path.join(work_dir, 'comparison.png')
    summary = dict(suite=path, work_dir=work_dir,
                   wall_time_s=context['wall_time_s'], seeds=seed_list,
                   runs=records, aggregate=entries, contrasts=contrasted,
                   context=context, plot=png)
    atomic_write_json(os.path.join(work_dir, 'comparison.json'), summary)
    atomic_write_text(os.path.join(work_dir, 'comparison.md'),
                      comparison_markdown(entries, columns, context,
                                          compare_keys, contrasted))
    from kdzoo.evaluation.plots import seeds_title, write_comparison_plot
    write_comparison_plot(entries, png,
                          seeds_title(suite_name, seed_list, repeated,
                                      trained_once=any(
                                          t['key'][1] is None
                                          for t in tasks)),
                          protocol=plot_opts.get('protocol'),
                          far=plot_opts.get('far', 1e-3))
    print_comparison(entries, columns, title=f'kdzoo compare: {path}',
                     context=context, compare_keys=compare_keys,
                     contrasts=contrasted)
    if export_records:
        n = export_run_records(work_dir, [t['run_dir'] for t in tasks],
                               export_records)
        print(f'records of {len(tasks)} runs ({n} files) copied to '
              f'{export_records}')
    print(f'table: {os.path.join(work_dir, "comparison.md")}  '
          f'json: {os.path.join(work_dir, "comparison.json")}  '
          f'plot: {png}  ({summary["wall_time_s"]:.0f} s)')
    return records


def _plan(suite: Config, path: str, work_dir: str, force: bool,
          cfg_options: Optional[dict], num_seeds: int,
          seed_list: List[int]) -> List[dict]:
    """One task per run and seed, in suite order: ``key`` (name, seed),
    ``tag``, ``run_dir``, ``recipe`` (resolved path), ``options``,
    ``cfg``, ``run_hash``, ``deps`` (keys of the tasks whose outputs it
    reads), ``role``, ``recipe_label`` and ``record`` (the finished run's,
    or None: to be trained)."""
    # name -> {seed: dir/hash}; seed None: a run trained once
    run_dirs: Dict[str, dict] = {}
    hashes: Dict[str, dict] = {}
    stored: Dict[str, dict] = {}  # the hash a reused run was found under
    tasks = []
    for run in suite['runs']:
        name = run['name']
        role = run.get('role', 'student')
        repeated = num_seeds > 1 and run.get('seeds', role != 'teacher')
        if repeated and _sets_seed(dict(run.get('cfg_options') or {})):
            raise ConfigError(
                f'{path}: run {name!r} sets {_SEED_KEY} in its cfg_options '
                f'but is repeated over --seeds {num_seeds}; give it '
                'seeds=False or drop the seed override')
        dirs_by_seed, hashes_by_seed, stored_by_seed = {}, {}, {}
        for seed in (seed_list if repeated else [None]):
            run_dir = os.path.join(work_dir, name) if not seed else \
                os.path.join(work_dir, name, f'seed{seed}')
            deps = set()
            options = dict(cfg_options or {})
            options.update(_substitute(
                dict(run.get('cfg_options') or {}),
                {n: _for_seed(d, seed) for n, d in run_dirs.items()},
                f'{path}: run {name!r}', deps))
            if seed is not None:
                options[_SEED_KEY] = seed
            recipe = _resolve_recipe(run['recipe'], path)
            cfg = load_recipe(recipe, options, run_dir)
            cfg.experiment_name = name
            run_hash, *legacy = _run_hashes(
                cfg, {_for_seed(run_dirs[d], seed): d for d in deps},
                ''.join(_for_seed(hashes[d], seed) for d in sorted(deps)),
                ''.join(_for_seed(stored[d], seed) for d in sorted(deps)))
            record = None if force else _finished(
                run_dir, (run_hash, *legacy))
            stored_hash = record['run_hash'] if record else run_hash
            if record and stored_hash != run_hash:
                _restamp(run_dir, record, run_hash)
            tasks.append(dict(
                key=(name, seed), run_dir=run_dir, recipe=recipe,
                options=options, cfg=cfg, run_hash=run_hash, role=role,
                recipe_label=run['recipe'],
                tag=name if seed is None else f'{name} seed {seed}',
                deps=sorted((d, _seed_key(run_dirs[d], seed)) for d in deps),
                record=record, resume=None))
            dirs_by_seed[seed] = run_dir
            # what runs depending on this one chain on: its current hash,
            # and (for records stamped under an older rule) the hash it was
            # found under
            hashes_by_seed[seed] = run_hash
            stored_by_seed[seed] = stored_hash
        run_dirs[name], hashes[name] = dirs_by_seed, hashes_by_seed
        stored[name] = stored_by_seed
    return tasks


# written in a run's dir when it starts: which run hash it trains, and when
RUN_MARKER = 'compare_run.json'


def _interrupted(run_dir: str, run_hash: str, cfg: Config,
                 reads_runs: bool) -> Optional[dict]:
    """What a stopped run left in ``run_dir``: None when it holds no
    complete runner checkpoint, else ``checkpoint`` (its newest) and
    ``why_not``, None when a resume may continue from it: the config saved
    in the checkpoint hashes as ``cfg`` does (where and under which name
    it logs aside), and either the run that wrote it started under
    ``run_hash`` (``compare_run.json``) and wrote it after starting, or,
    unstamped (a run started by ``kdzoo train``, or by a kdzoo before the
    stamp), the run reads no other run, whose content its config does not
    show."""
    from kdzoo.engine.checkpoint import find_resume_checkpoint, saved_config
    if not os.path.isdir(run_dir):
        return None
    ckpt = find_resume_checkpoint(run_dir, repair_pointer=False)
    if ckpt is None:
        return None
    marker_path = os.path.join(run_dir, RUN_MARKER)
    try:
        with open(marker_path) as f:
            marker = json.load(f)
        started = min(float(marker['started']),
                      os.path.getmtime(marker_path))
    except (OSError, ValueError, TypeError, KeyError):
        marker = None
    try:
        saved = saved_config(ckpt)
    except ValueError as e:
        return dict(checkpoint=ckpt, why_not='its saved configuration is '
                    f'not plain data ({e})')
    why_not = None
    if not saved:
        why_not = 'it holds no saved configuration'
    elif _resume_hash(Config(saved)) != _resume_hash(cfg):
        why_not = "the configuration saved in it differs from the run's"
    elif marker is not None:
        if marker.get('run_hash') != run_hash:
            why_not = ('it was written under another run hash (a run it '
                       'reads has changed)')
        elif os.path.getmtime(ckpt) < started:
            why_not = 'it predates the last start of this run'
    elif reads_runs:
        why_not = (f'no {RUN_MARKER} says which run hash wrote it, and the '
                   "run reads other runs' outputs")
    return dict(checkpoint=ckpt, why_not=why_not)


def _resume_hash(cfg: Config) -> str:
    """What must match between a checkpoint's saved config and a run's
    for a resume: the content hash without the run's name."""
    from kdzoo.engine.runner import HASH_IGNORED_KEYS
    return config_hash(cfg, HASH_IGNORED_KEYS + ('experiment_name',))


def _announce_interrupted(tasks: List[dict], resume: bool) -> None:
    """For each run to train that a stop left checkpoints of: with
    ``resume``, set the task's ``resume`` to the checkpoint it continues
    from, or say why it starts over; without, say that it starts over."""
    from kdzoo.engine.checkpoint import checkpoint_files
    for task in tasks:
        if task['record'] is not None:
            continue
        if not resume:
            files = checkpoint_files(task['run_dir'])
            if files:
                print(f'[{task["tag"]}] a stopped run left '
                      f'{os.path.basename(files[0])}; it trains from the '
                      'start (--resume continues from it when this '
                      'configuration wrote it)')
            continue
        stopped = _interrupted(task['run_dir'], task['run_hash'],
                               task['cfg'], bool(task['deps']))
        if not stopped:
            continue
        name = os.path.basename(stopped['checkpoint'])
        if stopped['why_not']:
            print(f'[{task["tag"]}] not resumed from {name}: '
                  f'{stopped["why_not"]}; it trains from the start')
        else:
            task['resume'] = stopped['checkpoint']
            print(f'[{task["tag"]}] resuming a stopped run from {name}')


# before `tensorboard` left the content hash (kdzoo.engine.runner's
# HASH_IGNORED_KEYS), runs were hashed with it: such runs are still reused
_OLDER_HASH_IGNORED = ('work_dir', 'resume', 'load_from', 'launcher')


def _run_hashes(cfg: Config, dep_dirs: Dict[str, str], dep_hashes: str,
                stored_dep_hashes: str) -> tuple:
    """A run's content hash, then the hashes the same run had under older
    rules (still reused). The content hash covers its config, with the
    folders of the runs it reads (``dep_dirs``: folder -> run name) written
    as ``{name}``, and those runs' hashes, so records copied to another
    work dir are still found. Older rules: the folders' paths in the hash
    (and the dependencies' hashes as stored then), and before that
    ``_OLDER_HASH_IGNORED``."""
    def sha(text):
        return hashlib.sha256(text.encode()).hexdigest()
    return (sha(config_hash(cfg, placeholders=dep_dirs) + dep_hashes),
            sha(config_hash(cfg) + stored_dep_hashes),
            sha(config_hash(cfg, _OLDER_HASH_IGNORED) + stored_dep_hashes))


def _restamp(run_dir: str, record: dict, run_hash: str) -> None:
    """Store the current content hash in a reused run's results.json
    (found under an older rule), so that its records, copied elsewhere,
    are found there too; a read-only work dir is left as it is."""
    path = os.path.join(run_dir, 'results.json')
    try:
        with open(path) as f:
            data = json.load(f)
        data['run_hash'] = run_hash
        atomic_write_json(path, data)
    except OSError:
        return
    record['run_hash'] = run_hash


def _seed_key(by_seed: dict, seed):
    """Which of a dependency's seeds ``seed`` reads (see _for_seed)."""
    if seed in by_seed:
        return seed
    return None if None in by_seed else 0


def _for_seed(by_seed: dict, seed):
    """A dependency's dir/hash for ``seed``: the same seed's when it is
    repeated, else its single (or seed-0) run."""
    return by_seed[_seed_key(by_seed, seed)]


def _evaluate_again(cfg: Config, record: dict, run_dir: str,
                    tag: str) -> dict:
    """Evaluate a finished run whose results predate kdzoo's current
    evaluation (all-pairs TAR, intervals, bootstrap replicates): test only,
    from its exported ``backbone.pth`` (a recipe without training data as
    it is); metrics, curves and replicates are replaced."""
    ckpt = os.path.join(run_dir, 'backbone.pth')
    trained = bool(cfg.get('train_dataloader'))
    if not cfg.get('test_dataloader') or (trained and
                                          not os.path.isfile(ckpt)):
        return record
    print(f'[{tag}] evaluating again (results predate the current '
          'evaluation)')
    tested = test_recipe(cfg, checkpoint=ckpt if trained else None)
    record = dict(record, metrics=tested['metrics'],
                  curves=tested.get('curves', {}),
                  eval_version=EVAL_VERSION)
    if tested.get('bootstrap'):
        record['bootstrap'] = tested['bootstrap']
    src = bootstrap_file(os.path.join(run_dir, 'test_results.json'))
    if os.path.isfile(src):
        os.replace(src, bootstrap_file(os.path.join(run_dir,
                                                    'results.json')))
    atomic_write_json(os.path.join(run_dir, 'results.json'), record)
    return record


def _comparison_runs(suite: Config, path: str):
    """(baseline, reference) run names of the paired differences: the
    suite's ``baseline`` (default ``student_alone`` when the suite has such
    a run) and ``reference`` (optional); each must name a run."""
    names = [r['name'] for r in suite['runs']]
    out = []
    for key, default in (('baseline', 'student_alone'), ('reference', None)):
        value = suite.get(key)
        if value is None:
            out.append(default if default in names else None)
            continue
        if value not in names:
            from kdzoo.utils.errors import did_you_mean
            raise ConfigError(
                f'{path}: {key}={value!r} names no run of the suite; set it '
                f'to one of {names} or remove it.' + did_you_mean(value,
                                                                   names))
        out.append(value)
    return tuple(out)


def _contrasts(suite: Config, path: str) -> List[Tuple[str, str, str]]:
    """The suite's ``contrasts``: ``[(a, b), (a, b, label), ...]``, pairs
    of run names whose paired difference a - b the comparison reports (the
    ablations a reader asks for: a method against its own parts), as
    ``(a, b, label)``; each name must be a run of the suite."""
    spec = suite.get('contrasts') or []
    names = [r['name'] for r in suite['runs']]
    out = []
    for i, item in enumerate(spec):
        where = f'{path}: contrasts[{i}]'
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3) \
                or not all(isinstance(x, str) for x in item):
            raise ConfigError(f'{where} must be (run a, run b) or (run a, '
                              f'run b, label), got {item!r}')
        a, b = item[:2]
        for name in (a, b):
            if name not in names:
                from kdzoo.utils.errors import did_you_mean
                raise ConfigError(f'{where} names {name!r}, which is no run '
                                  f'of the suite ({names}).'
                                  + did_you_mean(name, names))
        if a == b:
            raise ConfigError(f'{where} compares {a!r} with itself')
        out.append((a, b, item[2] if len(item) == 3 else ''))
    return out


def _finished(run_dir: str, run_hash) -> Optional[dict]:
    """The run's results.json when it was trained from this content hash
    (or one of several: a tuple), else None. Its ``work_dir`` is set to
    ``run_dir``, where it was found: records moved or copied elsewhere
    (``--export-records``) read their bootstrap replicates from there."""
    path = os.path.join(run_dir, 'results.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    accepted = run_hash if isinstance(run_hash, tuple) else (run_hash,)
    if record.get('run_hash') not in accepted:
        return None
    record['work_dir'] = run_dir
    return record


# what a finished run leaves that the comparison reads: reusing a run needs
# results.json (its run hash), the paired differences need bootstrap.npz
RECORD_FILES = ('results.json', 'bootstrap.npz')
COMPARISON_FILES = ('comparison.md', 'comparison.json', 'comparison.png')


def export_run_records(work_dir: str, run_dirs: List[str], dest: str) -> int:
    """Copy the runs' records and the comparison files from ``work_dir``
    to ``dest``, each at its path relative to ``work_dir``; returns how
    many files were copied. Files already in ``dest`` are replaced one by
    one (atomically), others are kept, so records of later seeds can be
    added to the same folder.

    Such a folder (kept with a results page, say) is a work dir of its own:
    ``kdzoo compare SUITE --work-dir <a copy of it>`` reuses its runs by
    their content hash (``--no-train`` rebuilds the table and the paired
    differences without training; without it, only the missing runs or
    seeds are trained). It holds no checkpoints: a run whose config reads
    another run's checkpoint cannot be trained from it."""
    root = os.path.abspath(work_dir)
    copies = []
    for run_dir in run_dirs:  # inside work_dir (see _plan)
        rel = os.path.relpath(os.path.abspath(run_dir), root)
        copies += [os.path.join(rel, name) for name in RECORD_FILES
                   if os.path.isfile(os.path.join(run_dir, name))]
    copies += [n for n in COMPARISON_FILES
               if os.path.isfile(os.path.join(root, n))]
    if os.path.abspath(dest) == root:
        return 0
    for rel in copies:
        with open(os.path.join(root, rel), 'rb') as f:
            data = f.read()
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target) or '.', exist_ok=True)
        atomic_write_bytes(target, data)
    return len(copies)


# ------------------------------------------------------------ command line
def register(sub) -> None:
    p = sub.add_parser('compare', help='train what a suite needs, evaluate, '
                       'and tabulate (comparison.md/.json/.png)')
    p.add_argument('suite')
    p.add_argument('--work-dir')
    p.add_argument('--force', action='store_true',
                   help='retrain runs even if finished with the same config')
    p.add_argument('--seeds', type=int, metavar='N',
                   help='train every student run with randomness.seed '
                   '0..N-1 and report mean ± std (default: the suite\'s '
                   '`seeds`, else 1); teachers and runs with seeds=False '
                   'are trained once and shared by all seeds')
    p.add_argument('--cfg-options', nargs='+', metavar='KEY=VALUE',
                   help='overrides applied to every run of the suite')
    p.add_argument('--jobs', type=int, default=1, metavar='N',
                   help='train up to N independent runs at once, each in '
                   'its own process (default 1: one after another here)')
    p.add_argument('--threads', type=int, metavar='T',
                   help='torch threads per run (default: this machine\'s '
                   'threads divided by --jobs); CPU digits depend on it')
    p.add_argument('--executor', choices=('local', 'submitit'),
                   default='local', help="where runs execute: 'local' "
                   "processes, or one submitit job per run (Slurm)")
    p.add_argument('--executor-options', nargs='+', metavar='KEY=VALUE',
                   help='submitit parameters, e.g. slurm_partition=gpu '
                   'timeout_min=120 gpus_per_node=1 (cluster=local runs '
                   'the jobs here)')
    p.add_argument('--grid', action='store_true',
                   help="run the suite's loss-weight grid (its `grid`: "
                   'each point on the validation split) and write the '
                   'choice to grid.md, instead of the comparison')
    p.add_argument('--no-train', action='store_true',
                   help='train nothing: tabulate the runs (or grid points) '
                   'that have finished, name the others and leave them out')
    p.add_argument('--runs', nargs='+', metavar='NAME',
                   help="only these of the suite's runs (plus the runs "
                   'they read and the baseline and reference runs); '
                   'contrasts and grid runs of the others are left out')
    p.add_argument('--resume', action='store_true',
                   help='continue a run that was stopped part-way from its '
                   'newest complete checkpoint, when it started under the '
                   'same configuration (default: it trains from the start)')
    p.add_argument('--export-records', metavar='DIR',
                   help='copy each tabulated run\'s results.json and '
                   'bootstrap.npz and the comparison files to DIR, laid out '
                   'as in the work dir: a folder --work-dir can reuse later '
                   '(e.g. with --no-train) without the checkpoints')
    p.set_defaults(func=run)


def run(args):
    from .options import parse_key_values
    kwargs = dict(work_dir=args.work_dir, force=args.force,
                  cfg_options=parse_key_values(args.cfg_options),
                  seeds=args.seeds, jobs=args.jobs, threads=args.threads,
                  executor=args.executor,
                  executor_options=parse_key_values(args.executor_options,
                                                    '--executor-options'),
                  no_train=args.no_train, resume=args.resume,
                  runs=args.runs)
    if args.grid:
        if args.export_records:
            raise ConfigError('--export-records goes with a comparison, not '
                              '--grid (grid points are kept under the work '
                              "dir's grid/ folder)")
        from .compare_grid import run_grid
        return run_grid(args.suite, **kwargs)
    run_suite(args.suite, export_records=args.export_records, **kwargs)
