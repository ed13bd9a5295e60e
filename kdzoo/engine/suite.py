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
``seeds`` (how many seeds, default 1; ``--seeds`` overrides) and ``plot``
(``dict(protocol='cross_age', far=1e-3)``).

Seeds: with N > 1 seeds, every repeated run is trained with
``randomness.seed`` = 0, 1, ..., N-1; seed 0 keeps the run's work dir
``<work_dir>/<name>`` (so a one-seed suite's runs are reused), seed k > 0
goes to ``<work_dir>/<name>/seed<k>``. A ``{name}`` placeholder names the
same seed's dir when that run is repeated too, else its single dir. The
data (``data_seed``) is the same for every seed.

A run whose ``results.json`` holds the same run hash (resolved config, so
the seed, plus the hashes of the runs it depends on) is reused, not
retrained. A reused run whose ``results.json`` predates the TAR-vs-FAR
curves is evaluated again (test only, from its ``backbone.pth``) to add
them.

Outputs in the work dir: ``comparison.md`` (table, ``mean ± std`` over
seeds, and the reproduction context), ``comparison.json`` (every run's
record with its curves, the per-name aggregates and the context) and
``comparison.png`` (TAR-vs-FAR curves and TAR@FAR=1e-3 bars).
"""
import hashlib
import os
import re
import time
from typing import Dict, List, Optional

from mmengine.config import Config

from kdzoo.utils import ConfigError, atomic_write_json, atomic_write_text
from .runner import config_hash, load_recipe, test_recipe, train_recipe

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
              seeds: Optional[int] = None) -> List[dict]:
    """Train what is missing, test everything, write and print the table.

    Returns every run's record (one per run and seed, in suite order).
    """
    from kdzoo.evaluation.report import (aggregate, comparison_markdown,
                                         print_comparison,
                                         reproduction_context)
    suite = load_suite(path)
    num_seeds = _num_seeds(seeds if seeds is not None else
                           suite.get('seeds', 1),
                           '--seeds' if seeds is not None else path)
    seed_list = list(range(num_seeds))
    if num_seeds > 1 and _sets_seed(cfg_options or {}):
        raise ConfigError(f'--cfg-options sets {_SEED_KEY} but --seeds '
                          f'{num_seeds} sets it per run (0..{num_seeds - 1})'
                          f'; drop one of them')
    work_dir = work_dir or suite.get('work_dir') or os.path.join(
        'work_dirs', os.path.splitext(os.path.basename(path))[0])
    t_start = time.time()
    # name -> {seed: dir/hash}; seed None: a run trained once
    run_dirs: Dict[str, dict] = {}
    run_hashes: Dict[str, dict] = {}
    records, reused = [], []
    for run in suite['runs']:
        name = run['name']
        role = run.get('role', 'student')
        repeated = num_seeds > 1 and run.get('seeds', role != 'teacher')
        if repeated and _sets_seed(dict(run.get('cfg_options') or {})):
            raise ConfigError(
                f'{path}: run {name!r} sets {_SEED_KEY} in its cfg_options '
                f'but is repeated over --seeds {num_seeds}; give it '
                'seeds=False or drop the seed override')
        dirs_by_seed, hashes_by_seed = {}, {}
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
            cfg = load_recipe(_resolve_recipe(run['recipe'], path), options,
                              run_dir)
            cfg.experiment_name = name
            run_hash = hashlib.sha256(
                (config_hash(cfg) + ''.join(
                    _for_seed(run_hashes[d], seed) for d in sorted(deps)))
                .encode()).hexdigest()
            record = None if force else _finished(run_dir, run_hash)
            tag = name if seed is None else f'{name} seed {seed}'
            if record is None:
                # a recipe without training data is evaluated as it is
                # (a pretrained teacher's reference row)
                record = train_recipe(cfg) if cfg.get('train_dataloader') \
                    else test_recipe(cfg)
                record['run_hash'] = run_hash
                record['recipe'] = run['recipe']
                record['role'] = role
                atomic_write_json(os.path.join(run_dir, 'results.json'),
                                  record)
            else:
                print(f'[{tag}] reusing finished run ({run_dir})')
                reused.append(run_dir)
                if 'curves' not in record:
                    record = _add_curves(cfg, record, run_dir, tag)
            dirs_by_seed[seed], hashes_by_seed[seed] = run_dir, run_hash
            records.append(record)
        run_dirs[name], run_hashes[name] = dirs_by_seed, hashes_by_seed

    if num_seeds == 1:  # the recipes' own seeds (randomness.seed)
        seed_list = sorted({r.get('seed') for r in records}, key=str)
    entries = aggregate(records)
    columns = suite.get('columns')
    plot_opts = dict(suite.get('plot') or {})
    suite_name = os.path.splitext(os.path.basename(path))[0]
    context = reproduction_context(
        records, suite=path, work_dir=work_dir, seeds=seed_list,
        repeated=num_seeds > 1,
        seed_policy=('students: one run per seed; teachers and runs with '
                     'seeds=False: one run (their recipe seed), shared by '
                     'every seed') if num_seeds > 1 else 'one seed',
        wall_time_s=round(time.time() - t_start, 1), reused=reused)
    png = os.path.join(work_dir, 'comparison.png')
    summary = dict(suite=path, work_dir=work_dir,
                   wall_time_s=context['wall_time_s'], seeds=seed_list,
                   runs=records, aggregate=entries, context=context,
                   plot=png)
    atomic_write_json(os.path.join(work_dir, 'comparison.json'), summary)
    atomic_write_text(os.path.join(work_dir, 'comparison.md'),
                      comparison_markdown(entries, columns, context))
    from kdzoo.evaluation.plots import seeds_title, write_comparison_plot
    write_comparison_plot(entries, png,
                          seeds_title(suite_name, seed_list, num_seeds > 1),
                          protocol=plot_opts.get('protocol'),
                          far=plot_opts.get('far', 1e-3))
    print_comparison(entries, columns, title=f'kdzoo compare: {path}',
                     context=context)
    print(f'table: {os.path.join(work_dir, "comparison.md")}  '
          f'json: {os.path.join(work_dir, "comparison.json")}  '
          f'plot: {png}  ({summary["wall_time_s"]:.0f} s)')
    return records


def _for_seed(by_seed: dict, seed):
    """A dependency's dir/hash for ``seed``: the same seed's when it is
    repeated, else its single (or seed-0) run."""
    if seed in by_seed:
        return by_seed[seed]
    return by_seed[None] if None in by_seed else by_seed[0]


def _add_curves(cfg: Config, record: dict, run_dir: str, tag: str) -> dict:
    """Evaluate a finished run that predates the TAR-vs-FAR curves (test
    only, from its exported ``backbone.pth``) and add its curves."""
    ckpt = os.path.join(run_dir, 'backbone.pth')
    if not cfg.get('test_dataloader') or not os.path.isfile(ckpt):
        return record
    print(f'[{tag}] evaluating again for the TAR-vs-FAR curves')
    tested = test_recipe(cfg, checkpoint=ckpt)
    record = dict(record, curves=tested.get('curves', {}))
    atomic_write_json(os.path.join(run_dir, 'results.json'), record)
    return record


def _finished(run_dir: str, run_hash: str) -> Optional[dict]:
    import json
    path = os.path.join(run_dir, 'results.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if record.get('run_hash') == run_hash else None
