"""``kdzoo compare``: run a suite of recipes on one protocol and tabulate.

A suite is a Python file defining ``runs``, a list of dicts:

- ``name``: the run's name (its work dir is ``<suite work dir>/<name>``);
- ``recipe``: recipe path, relative to the suite file or the current dir;
- ``cfg_options`` (optional): overrides; a string value may name another
  run's work dir as ``{run_name}``, e.g. the teacher checkpoint
  ``'{teacher}/backbone.pth'`` (that run must come earlier);
- ``role`` (optional): 'teacher' or 'student' (shown in the table).

and optionally ``work_dir`` and ``columns`` (list of (title, metric key)).
A run whose ``results.json`` holds the same run hash (resolved config plus
the hashes of the runs it depends on) is reused, not retrained.
"""
import hashlib
import os
import re
import time
from typing import Dict, List, Optional

from mmengine.config import Config

from kdzoo.utils import ConfigError, atomic_write_json, atomic_write_text
from .runner import config_hash, load_recipe, train_recipe

_PLACEHOLDER = re.compile(r'\{([A-Za-z_][A-Za-z0-9_]*)\}')


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
    return suite


def run_suite(path: str, work_dir: Optional[str] = None, force: bool = False,
              cfg_options: Optional[dict] = None) -> List[dict]:
    """Train what is missing, test everything, write and print the table."""
    from kdzoo.evaluation.report import print_comparison, comparison_markdown
    suite = load_suite(path)
    work_dir = work_dir or suite.get('work_dir') or os.path.join(
        'work_dirs', os.path.splitext(os.path.basename(path))[0])
    t_start = time.time()
    run_dirs, run_hashes, records = {}, {}, []
    for run in suite['runs']:
        name = run['name']
        run_dir = os.path.join(work_dir, name)
        deps = set()
        options = dict(cfg_options or {})
        options.update(_substitute(dict(run.get('cfg_options') or {}),
                                   run_dirs, f'{path}: run {name!r}', deps))
        cfg = load_recipe(_resolve_recipe(run['recipe'], path), options,
                          run_dir)
        cfg.experiment_name = name
        run_hash = hashlib.sha256(
            (config_hash(cfg) + ''.join(run_hashes[d] for d in sorted(deps)))
            .encode()).hexdigest()
        record = None if force else _finished(run_dir, run_hash)
        if record is None:
            record = train_recipe(cfg)
            record['run_hash'] = run_hash
            record['recipe'] = run['recipe']
            record['role'] = run.get('role', 'student')
            atomic_write_json(os.path.join(run_dir, 'results.json'), record)
        else:
            print(f'[{name}] reusing finished run ({run_dir})')
        run_dirs[name], run_hashes[name] = run_dir, run_hash
        records.append(record)
    columns = suite.get('columns')
    summary = dict(suite=path, work_dir=work_dir,
                   wall_time_s=round(time.time() - t_start, 1),
                   runs=records)
    atomic_write_json(os.path.join(work_dir, 'comparison.json'), summary)
    atomic_write_text(os.path.join(work_dir, 'comparison.md'),
                      comparison_markdown(records, columns))
    print_comparison(records, columns, title=f'kdzoo compare: {path}')
    print(f'table: {os.path.join(work_dir, "comparison.md")}  '
          f'json: {os.path.join(work_dir, "comparison.json")}  '
          f'({summary["wall_time_s"]:.0f} s)')
    return records


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
