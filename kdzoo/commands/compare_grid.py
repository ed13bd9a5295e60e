"""``kdzoo compare SUITE --grid``: the same small search over each method's
loss weights, on a validation split, before the comparison.

A suite may define ``grid``::

    grid = dict(
        select='val/TAR@FAR=1e-3',      # metric the choice maximises
        cfg_options={...},              # applied to every grid run: the
                                        # validation split, a shorter
                                        # schedule (never the test sets)
        runs=dict(
            angular_kd={'model.distill_losses.loss_ang.loss_weight':
                        [4.0, 16.0, 64.0]},
            rkd=[{'...w_dist': 5.0, '...w_angle': 10.0}, ...]),
        columns=['val/TAR@FAR=1e-3', 'val/accuracy'],  # optional
        work_dir='...',                 # default <suite work dir>/grid
    )

Each entry of ``runs`` names a run of the suite and gives its points:
either ``{key: [values]}`` (every combination of the values) or a list of
option dicts (one per point). Every point is trained once (seed of the
recipe, or ``--seeds``) as its own run ``<name>@<point>``, with the run's
``cfg_options``, then ``grid.cfg_options``, then the point on top, and
tested on what ``grid.cfg_options`` makes the test set. The runs are the
runs of an ordinary ``kdzoo compare`` (reused when finished, ``--jobs``),
so the grid's ``comparison.md`` carries intervals too.

The choice per run is the point with the highest mean ``select``; it is
written to ``grid.md`` / ``grid.json`` beside the value the suite runs
with now (its recipe and ``cfg_options``), so that a suite records both
the grid and the choice, and a stale choice shows. Each other point
carries its paired difference to the choice (same bootstrap draws and
seeds, as ``kdzoo compare``'s differences), so a reader sees which
points the validation split can tell apart; a choice at either end of
its run's values (one weight, or weights scaled together) that is better
than the next value is flagged: the best value may lie beyond the grid,
which should then be extended there.
"""
import copy
import itertools
import json
import os
import re
from typing import Dict, List, Optional

from mmengine.config import Config

from kdzoo.evaluation.significance import (METHOD_NOTE, VERDICTS,
                                          run_difference)
from kdzoo.utils import ConfigError, atomic_write_json, atomic_write_text

__all__ = ['grid_points', 'grid_suite', 'run_grid']

_UNSET = object()


def grid_points(spec, where: str) -> List[dict]:
    """A run's grid entry -> its points (option dicts), in order."""
    if isinstance(spec, dict):
        if not spec:
            raise ConfigError(f'{where}: the grid entry is empty; give '
                              '{key: [values]} or a list of option dicts')
        keys = list(spec)
        for key in keys:
            values = spec[key]
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(
                    f'{where}: grid values of {key!r} must be a non-empty '
                    f'list, got {values!r}')
        return [dict(zip(keys, combo))
                for combo in itertools.product(*(spec[k] for k in keys))]
    if isinstance(spec, (list, tuple)) and spec and all(
            isinstance(p, dict) and p for p in spec):
        return [dict(p) for p in spec]
    raise ConfigError(f'{where}: a grid entry is {{key: [values]}} or a '
                      f'non-empty list of option dicts, got {spec!r}')


def point_label(point: dict) -> str:
    """``loss_weight=16.0`` for a one-key point (the key's last part),
    ``w_dist=5.0,w_angle=10.0`` for several; safe as a folder name."""
    text = ','.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in point.items())
    return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', text)


def _grid_spec(suite: Config, path: str) -> dict:
    grid = suite.get('grid')
    if not grid:
        raise ConfigError(f'{path}: --grid needs the suite to define grid='
                          "dict(select=..., cfg_options=..., runs=dict("
                          "<run name>={key: [values]}))")
    names = [r['name'] for r in suite['runs']]
    runs = grid.get('runs')
    if not runs or not isinstance(runs, dict):
        raise ConfigError(f'{path}: grid.runs must map run names to their '
                          'points, e.g. dict(angular_kd={key: [1, 4, 16]})')
    for name in runs:
        if name not in names:
            from kdzoo.utils.errors import did_you_mean
            raise ConfigError(f'{path}: grid.runs names {name!r}, which is '
                              f'no run of the suite ({names}).'
                              + did_you_mean(name, names))
    select = grid.get('select')
    if not isinstance(select, str) or '/' not in select:
        raise ConfigError(f'{path}: grid.select must be the metric key the '
                          "choice maximises, e.g. 'val/TAR@FAR=1e-3'")
    return grid


def grid_suite(suite: Config, path: str,
               work_dir: Optional[str]) -> Config:
    """The suite of the grid's runs (one per run and point), as
    ``kdzoo compare`` runs it; ``grid_points`` lists what each trains."""
    grid = _grid_spec(suite, path)
    by_name = {r['name']: r for r in suite['runs']}
    common = dict(grid.get('cfg_options') or {})
    runs, plan = [], []
    for name, spec in grid['runs'].items():
        run = by_name[name]
        for point in grid_points(spec, f'{path}: grid.runs.{name}'):
            options = copy.deepcopy(dict(run.get('cfg_options') or {}))
            options.update(copy.deepcopy(common))
            options.update(point)
            grid_name = f'{name}@{point_label(point)}'
            runs.append(dict(name=grid_name, recipe=run['recipe'],
                             cfg_options=options))
            plan.append(dict(run=name, name=grid_name, point=point))
    select = grid['select']
    columns = list(grid.get('columns') or [select])
    base_dir = work_dir or suite.get('work_dir') or os.path.join(
        'work_dirs', os.path.splitext(os.path.basename(path))[0])
    return Config(dict(
        runs=runs, work_dir=grid.get('work_dir') or os.path.join(
            base_dir, 'grid'),
        columns=[(c, c) for c in columns], compare_keys=[select],
        plot=dict(protocol=select.split('/')[0], far=1e-3),
        grid_plan=plan, grid_select=select))


def _current_value(run: dict, key: str, path: str):
    """What the suite's run trains with now for ``key`` (its recipe and
    cfg_options), or _UNSET."""
    from kdzoo.commands.compare import _resolve_recipe
    recipe = _resolve_recipe(run['recipe'], path)
    cfg = Config.fromfile(recipe, import_custom_modules=False)
    options = dict(run.get('cfg_options') or {})
    if key in options:
        return options[key]
    node = cfg.to_dict()
    for part in key.split('.'):
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


def choose(plan: List[dict], entries: List[dict], select: str,
           path: str, records: Optional[List[dict]] = None) -> List[dict]:
    """One row per grid run: its points with mean ``select`` (and 95 %
    interval where known) and the chosen point; with the per-seed
    ``records``, each other point's paired difference chosen - point
    (``vs_chosen``) and ``at_edge``: True when the choice is the smallest
    or largest point and better than the next point in value, False when
    not, None when that cannot be told (points that do not lie on one
    axis, or no bootstrap replicates)."""
    by_name = {e['name']: e for e in entries}
    rows: Dict[str, dict] = {}
    for item in plan:
        entry = by_name.get(item['name'])
        metrics = (entry or {}).get('metrics', {})
        if select not in metrics:
            raise ConfigError(
                f'{path}: grid run {item["name"]!r} has no {select!r} '
                f'(its metrics: {sorted(metrics)[:12]}); set grid.select to '
                'one of them, or make grid.cfg_options test on the split '
                'it names')
        row = rows.setdefault(item['run'], dict(run=item['run'], points=[]))
        row['points'].append(dict(
            point=item['point'], name=item['name'],
            value=metrics[select],
            ci95=(entry.get('ci95') or {}).get(select)))
    groups: Dict[str, List[dict]] = {}
    for r in records or []:
        groups.setdefault(r.get('name'), []).append(r)
    for row in rows.values():
        points = row['points']
        best = max(points, key=lambda p: p['value'])
        row['chosen'] = best['point']
        for p in points:
            p['vs_chosen'] = None if p is best or not groups else \
                run_difference(groups.get(best['name'], []),
                               groups.get(p['name'], []), select)
        row['at_edge'] = _at_edge(points, best)
    return list(rows.values())


def _on_one_axis(points: List[dict]) -> Optional[List[dict]]:
    """The points ordered along their one axis (every key's values
    strictly monotone in the first key's: one weight, or weights scaled
    together), or None (a product of keys, repeated or non-numeric
    values)."""
    keys = list(points[0]['point'])
    if any(list(p['point']) != keys for p in points):
        return None
    try:
        order = sorted(points, key=lambda p: float(p['point'][keys[0]]))
        columns = [[float(p['point'][k]) for p in order] for k in keys]
    except (TypeError, ValueError):
        return None
    for col in columns:  # each strictly monotone along the first key
        steps = [b - a for a, b in zip(col, col[1:])]
        if not (all(d > 0 for d in steps) or all(d < 0 for d in steps)):
            return None
    return order


def _at_edge(points: List[dict], best: dict) -> Optional[bool]:
    if len(points) < 2:
        return False
    order = _on_one_axis(points)
    if order is None:
        return None
    i = order.index(best)
    if i not in (0, len(order) - 1):
        return False
    nxt = order[1] if i == 0 else order[-2]
    if nxt['vs_chosen'] is None:
        return None
    return nxt['vs_chosen']['verdict'] == VERDICTS[0]


def grid_markdown(rows: List[dict], select: str, suite: Config,
                  path: str) -> str:
    by_name = {r['name']: r for r in suite['runs']}
    lines = [f'# Loss-weight grid of `{path}`', '',
             f'Chosen per run: the point with the highest `{select}` '
             '(validation split; mean over seeds, 95 % interval).', '',
             '| run | point | ' + select + ' | chosen − point '
             '(paired) | chosen | the suite runs |',
             '|---|---|---|---|---|---|']
    for row in rows:
        for p in row['points']:
            ci = p['ci95']
            value = f'{p["value"]:.4f}' + (
                f' [{ci[0]:.4f}, {ci[1]:.4f}]' if ci else '')
            now = []
            for key in p['point']:
                current = _current_value(by_name[row['run']], key, path)
                now.append('?' if current is _UNSET else str(current))
            chosen = 'yes' if p['point'] == row['chosen'] else ''
            diff = p.get('vs_chosen')
            diff = '' if not diff else (
                f'{diff["diff"]:+.4f} [{diff["ci95"][0]:+.4f}, '
                f'{diff["ci95"][1]:+.4f}] {diff["verdict"]}')
            lines.append(f'| {row["run"]} | {point_label(p["point"])} | '
                         f'{value} | {diff} | {chosen} | '
                         f'{", ".join(now)} |')
    stale = [row['run'] for row in rows if any(
        _current_value(by_name[row['run']], k, path) != v
        for k, v in row['chosen'].items())]
    edge = [row['run'] for row in rows if row.get('at_edge')]
    unknown = [row['run'] for row in rows if row.get('at_edge') is None]
    lines += ['', 'Runs whose suite value differs from the choice: '
              + (', '.join(stale) if stale else 'none') + '.', '',
              'Chosen at the smallest or largest value of the grid and '
              'better than the next value (the best may lie beyond; extend '
              'the grid there): ' + (', '.join(edge) if edge else 'none')
              + '.' + (f' Not known for {", ".join(unknown)} (points on '
                       'more than one axis, or no bootstrap replicates).'
                       if unknown else ''), '',
              METHOD_NOTE + '.', '']
    return '\n'.join(lines)


def run_grid(path: str, work_dir: Optional[str] = None, **kwargs) -> list:
    """Train and test every grid point (``kwargs`` as ``run_suite``), then
    write ``grid.md`` and ``grid.json`` in the grid's work dir and print
    the choice. Returns the choice rows."""
    from kdzoo.commands.compare import load_suite, run_suite, select_runs
    suite = load_suite(path)
    runs = kwargs.pop('runs', None)
    if runs:
        suite = select_runs(suite, path, runs)
    derived = grid_suite(suite, path, work_dir)
    run_suite(path, work_dir=derived.work_dir, suite=derived, **kwargs)
    with open(os.path.join(derived.work_dir, 'comparison.json')) as f:
        comparison = json.load(f)
    select = derived.grid_select
    finished = {e['name'] for e in comparison['aggregate']}
    plan = [p for p in derived.grid_plan if p['name'] in finished]
    rows = choose(plan, comparison['aggregate'], select, path,
                  comparison.get('runs'))
    md = grid_markdown(rows, select, suite, path)
    atomic_write_text(os.path.join(derived.work_dir, 'grid.md'), md)
    atomic_write_json(os.path.join(derived.work_dir, 'grid.json'),
                      dict(suite=path, select=select, rows=rows,
                           cfg_options=dict(suite.grid.get('cfg_options')
                                            or {})))
    print(md)
    print(f'grid: {os.path.join(derived.work_dir, "grid.md")}')
    return rows
