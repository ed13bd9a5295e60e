"""Tables of results: rich on the console, markdown in files.

A suite run with several seeds has several records (``results.json``) per
run name; :func:`aggregate` folds them into one entry per name whose cells
read ``mean ± std`` (sample standard deviation, ddof=1, over the seeds).
A name with a single record (one seed, or a teacher trained once and
shared by every student seed) shows its plain value.
"""
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kdzoo.utils.console import console

Column = Tuple[str, str]  # (title, metric key)

_RANK1 = re.compile(r'^(?P<proto>[^/]+)/rank1@(?P<k>\d+)$')


def default_columns(records: Sequence[dict]) -> List[Column]:
    """Accuracy and TAR@FAR 1e-3/1e-4 per protocol; rank-1 at most
    distractors per identification protocol."""
    keys = []
    for r in records:
        keys += [k for k in r.get('metrics', {}) if k not in keys]
    columns = []
    for key in keys:
        proto, _, name = key.partition('/')
        if name == 'accuracy':
            columns.append((f'{proto} acc %', key))
        elif name.startswith('TAR@FAR=') and name.endswith(('1e-3', '1e-4')):
            columns.append((f'{proto} {name.replace("TAR@FAR=", "TAR@")}',
                            key))
    ranks = {}
    for key in keys:
        m = _RANK1.match(key)
        if m and int(m.group('k')) >= ranks.get(m.group('proto'), (-1,))[0]:
            ranks[m.group('proto')] = (int(m.group('k')), key)
    for proto, (k, key) in ranks.items():
        columns.append((f'{proto} rank-1 ({k} distr.)', key))
    return columns


def _scalar(value) -> bool:
    """A metric value that averages (not an interval or a missing key)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_compare_keys(columns: Sequence[Column]) -> List[str]:
    """The keys paired differences are reported for: TAR@FAR=1e-3 of each
    protocol and the rank-1 columns (else every column)."""
    keys = [k for _, k in columns
            if k.endswith('/TAR@FAR=1e-3') or _RANK1.match(k)]
    return keys or [k for _, k in columns]


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean_curves(records: Sequence[dict]) -> Dict[str, dict]:
    """Per protocol, TAR averaged over the records at the FARs all of them
    measured (the same grid when the seeds share the test data)."""
    with_curves = [r.get('curves') or {} for r in records]
    protos = [p for p in with_curves[0]] if with_curves else []
    out = {}
    for proto in protos:
        per_run = []
        for curves in with_curves:
            c = curves.get(proto)
            if not c:
                break
            per_run.append({round(f, 12): t for f, t in zip(c['far'],
                                                            c['tar'])})
        else:
            fars = sorted(set.intersection(*(set(d) for d in per_run)))
            if not fars:
                continue
            tars = np.array([[d[f] for f in fars] for d in per_run])
            out[proto] = dict(
                far=fars, tar=tars.mean(0).tolist(),
                tar_std=(tars.std(0, ddof=1) if len(per_run) > 1 else
                         np.zeros(len(fars))).tolist())
    return out


def aggregate(records: Sequence[dict]) -> List[dict]:
    """One entry per run name (first-seen order) over its seeds' records.

    Entry keys: ``name``, ``role``, ``n`` (records), ``seeds``,
    ``student_params``, ``metrics`` (means), ``metrics_std`` (sample std,
    ddof=1; 0 when n == 1), ``metrics_values`` (per-seed lists),
    ``train_time_s``/``test_time_s`` (means), ``epochs``, ``batch_size`` and
    ``curves`` (``{protocol: {far, tar, tar_std}}``, mean over seeds).
    """
    groups: Dict[str, List[dict]] = {}
    for r in records:
        groups.setdefault(r.get('name', '?'), []).append(r)
    entries = []
    for name, rs in groups.items():
        keys = []
        for r in rs:
            keys += [k for k in r.get('metrics', {}) if k not in keys]
        values = {k: [float(r['metrics'][k]) for r in rs
                      if _scalar(r.get('metrics', {}).get(k))]
                  for k in keys}
        values = {k: v for k, v in values.items() if v}
        entries.append(dict(
            name=name, role=rs[0].get('role', ''), n=len(rs),
            seeds=[r.get('seed') for r in rs],
            student_params=rs[0].get('student_params', 0),
            metrics={k: float(np.mean(v)) for k, v in values.items()},
            metrics_std={k: _std(v) for k, v in values.items()},
            metrics_values=values,
            train_time_s=float(np.mean([r.get('train_time_s', 0)
                                        for r in rs])),
            test_time_s=float(np.mean([r.get('test_time_s', 0)
                                       for r in rs])),
            epochs=rs[0].get('epochs'), batch_size=rs[0].get('batch_size'),
            curves=_mean_curves(rs)))
    return entries


def _fmt(value: Optional[float], key: str) -> str:
    if value is None:
        return '–'
    if key.endswith(('accuracy', 'accuracy_std')):
        return f'{value:.2f}'
    return f'{value:.4f}' if abs(value) <= 1.0 else f'{value:.2f}'


def _cell(entry: dict, key: str) -> str:
    """``mean ± std`` when the entry has several seeds with this metric,
    then its 95 % interval ``[low, high]`` when it has one."""
    mean = entry.get('metrics', {}).get(key)
    values = entry.get('metrics_values', {}).get(key, ())
    text = _fmt(mean, key)
    if mean is not None and len(values) >= 2:
        text += f' ± {_fmt(entry["metrics_std"][key], key)}'
    ci = (entry.get('ci95') or {}).get(key)
    if mean is not None and ci:
        text += f' [{_fmt(ci[0], key)}, {_fmt(ci[1], key)}]'
    return text


def _seeds(entry: dict) -> str:
    return ','.join('–' if s is None else str(s)
                    for s in entry.get('seeds', [entry.get('seed')]))


def _entries(records: Sequence[dict]) -> List[dict]:
    """Aggregated entries (records that already are entries pass)."""
    if records and all('metrics_values' in r for r in records):
        return list(records)
    return aggregate(records)


def _rows(entries, columns):
    for e in entries:
        yield [e.get('name', '?'), e.get('role', ''),
               f'{e.get("student_params", 0) / 1e6:.3f}', _seeds(e)] + [
                   _cell(e, key) for _, key in columns] + [
                       f'{e.get("train_time_s", 0):.0f}']


def _header(columns):
    return ['run', 'role', 'params (M)', 'seed'] + \
        [t for t, _ in columns] + ['train s']


def _unique(values):
    """The one value when all agree, else the sorted distinct values."""
    distinct = sorted({str(v) for v in values})
    return distinct[0] if len(distinct) == 1 else distinct


def reproduction_context(records: Sequence[dict], **extra) -> dict:
    """Seeds, device, versions, batch size, epochs and wall time per run.

    ``extra`` (e.g. ``seeds``, ``wall_time_s`` of this invocation, ``reused``
    names) is merged in. Values that differ between runs are listed.
    """
    runs = [dict(name=r.get('name'), role=r.get('role', ''),
                 seed=r.get('seed'), epochs=r.get('epochs'),
                 batch_size=r.get('batch_size'),
                 train_time_s=r.get('train_time_s', 0.0),
                 test_time_s=r.get('test_time_s', 0.0),
                 wall_time_s=round(r.get('train_time_s', 0.0) +
                                   r.get('test_time_s', 0.0), 2),
                 device=r.get('device'), work_dir=r.get('work_dir'),
                 **({'resumed': r['resumed']} if r.get('resumed') else {}))
            for r in records]
    context = dict(
        device=_unique(r.get('device') for r in records),
        cpu_model=_unique(r.get('cpu_model') for r in records),
        cpu_capability=_unique(r.get('cpu_capability') for r in records),
        num_threads=_unique(r.get('num_threads') for r in records),
        malloc_tuning=_unique(r.get('malloc_tuning') for r in records),
        versions={k: _unique(r.get(k) for r in records)
                  for k in ('torch', 'mmengine', 'kdzoo', 'python')},
        batch_size=_unique(r.get('batch_size') for r in records),
        epochs=_unique(r.get('epochs') for r in records),
        run_time_total_s=round(sum(r['wall_time_s'] for r in runs), 1),
        runs=runs)
    context.update(extra)
    return context


def _context_lines(context: dict) -> List[str]:
    def show(v):
        return ' / '.join(map(str, v)) if isinstance(v, list) else str(v)
    seeds = context.get('seeds')
    lines = []
    if seeds is not None:
        lines.append(
            f'seeds: {show(seeds)}' + (
                ' (cells: mean ± sample std, ddof=1, over seeds; runs '
                'trained once, teachers by default, show their one value '
                'and are shared by every seed)'
                if context.get('repeated', len(seeds) > 1) else ''))
    v = context.get('versions', {})
    lines.append(f'device: {show(context.get("device"))}; torch '
                 f'{show(v.get("torch"))}; mmengine {show(v.get("mmengine"))}'
                 f'; kdzoo {show(v.get("kdzoo"))}; python '
                 f'{show(v.get("python"))}')
    if context.get('cpu_capability') not in (None, 'None'):
        lines.append(
            f'CPU: {show(context.get("cpu_model"))}, torch CPU capability '
            f'{show(context.get("cpu_capability"))}, '
            f'{show(context.get("num_threads"))} threads (exact digits '
            'depend on the CPU kernels and thread count; conclusions drawn '
            'from the intervals should not)')
    lines.append(f'batch size: {show(context.get("batch_size"))}; epochs: '
                 f'{show(context.get("epochs"))}')
    wall = f'wall time: {context.get("run_time_total_s", 0):.0f} s summed ' \
        'over runs (train + test)'
    if 'wall_time_s' in context:
        wall += f'; this invocation {context["wall_time_s"]:.0f} s'
        reused = context.get('reused') or []
        if reused:
            wall += f' ({len(reused)} of {len(context.get("runs", []))} ' \
                'runs reused)'
    lines.append(wall)
    return lines


_RUN_HEADER = ['run (seed)', 'epochs', 'batch', 'train s', 'test s',
               'device', 'work dir']


def _run_rows(context: dict):
    """One row per trained run; work dirs relative to the suite's."""
    reused = set(context.get('reused') or ())
    base = context.get('work_dir')
    for r in context.get('runs', []):
        where = str(r['work_dir'])
        if base and r['work_dir']:
            where = os.path.relpath(r['work_dir'], base)
        train = f'{r["train_time_s"]:.0f}'
        if r.get('resumed'):  # the time before the stop is logged time
            train += f' (resumed from {r["resumed"].get("checkpoint")})'
        yield [f'{r["name"]} (seed {r["seed"]})', str(r['epochs']),
               str(r['batch_size']), train,
               f'{r["test_time_s"]:.0f}', str(r['device']),
               where + (' (reused)' if r['work_dir'] in reused else '')]


def _md_table(header, rows) -> List[str]:
    return ['| ' + ' | '.join(header) + ' |',
            '|' + '|'.join('---' for _ in header) + '|'] + \
        ['| ' + ' | '.join(row) + ' |' for row in rows]


_DIFF_HEADER = ['run', 'metric']


def _signed(value: float, key: str) -> str:
    return ('+' if value >= 0 else '') + _fmt(value, key)


def _diff_rows(entries, keys, against):
    for e in entries:
        diffs = e.get('differences') or {}
        if not diffs:
            continue
        for key in keys:
            row = [e['name'], key]
            any_cell = False
            for ref in against:
                d = diffs.get(ref, {}).get(key)
                if d is None:
                    row.append('–')
                    continue
                any_cell = True
                lo, hi = d['ci95']
                row.append(f'{_signed(d["diff"], key)} [{_signed(lo, key)}, '
                           f'{_signed(hi, key)}] {d["verdict"]}')
            if any_cell:
                yield row


def _against(entries) -> List[str]:
    names = []
    for e in entries:
        names += [n for n in (e.get('differences') or {}) if n not in names]
    return names


def differences_markdown(entries: Sequence[dict], keys: Sequence[str]
                         ) -> List[str]:
    """Markdown lines of the paired differences (empty without any)."""
    from kdzoo.evaluation.significance import METHOD_NOTE
    against = _against(entries)
    rows = list(_diff_rows(entries, keys, against))
    if not rows:
        return []
    header = _DIFF_HEADER + [f'Δ vs {a} [95 % CI]' for a in against]
    return ['', '**Paired differences** (mean over common seeds)', ''] + \
        _md_table(header, rows) + ['', f'_{METHOD_NOTE}._']


def _contrast_rows(contrasts, keys):
    for c in contrasts or []:
        diffs = c.get('differences') or {}
        if not diffs:
            continue
        row = [f'{c["a"]} − {c["b"]}', c.get('label') or '']
        for key in keys:
            d = diffs.get(key)
            row.append('–' if d is None else (
                f'{_signed(d["diff"], key)} [{_signed(d["ci95"][0], key)}, '
                f'{_signed(d["ci95"][1], key)}] {d["verdict"]}'))
        yield row


def contrasts_markdown(contrasts: Optional[Sequence[dict]],
                       keys: Sequence[str]) -> List[str]:
    """Markdown lines of the suite's contrasts (empty without any)."""
    rows = list(_contrast_rows(contrasts, keys))
    if not rows:
        return []
    return ['', '**Contrasts** (paired, A − B, mean over common seeds)',
            ''] + _md_table(['A − B', 'what it isolates'] + list(keys), rows)


def comparison_markdown(records: Sequence[dict],
                        columns: Optional[Sequence[Column]] = None,
                        context: Optional[dict] = None,
                        compare_keys: Optional[Sequence[str]] = None,
                        contrasts: Optional[Sequence[dict]] = None) -> str:
    """The comparison table (one row per run name, ``mean ± std`` over
    seeds, 95 % intervals), the paired differences, the suite's contrasts
    and the reproduction context (per-run table)."""
    entries = _entries(records)
    columns = list(columns or default_columns(entries))
    lines = _md_table(_header(columns), _rows(entries, columns))
    keys = compare_keys or default_compare_keys(columns)
    diff_lines = differences_markdown(entries, keys)
    contrast_lines = contrasts_markdown(contrasts, keys)
    if contrast_lines:  # one method note, after both tables
        from kdzoo.evaluation.significance import METHOD_NOTE
        diff_lines = diff_lines[:-2] + contrast_lines + [
            '', f'_{METHOD_NOTE}._']
    lines += diff_lines
    plain = [r for r in records if 'metrics_values' not in r]
    if context is None and plain:  # entries alone do not hold the context
        context = reproduction_context(plain)
    if context:
        lines += ['', '**Reproduction context**', '']
        lines += [f'- {line}' for line in _context_lines(context)]
        if context.get('runs'):
            lines.append('')
            lines += _md_table(_RUN_HEADER, _run_rows(context))
    return '\n'.join(lines) + '\n'


def print_comparison(records: Sequence[dict],
                     columns: Optional[Sequence[Column]] = None,
                     title: str = 'comparison',
                     context: Optional[dict] = None,
                     compare_keys: Optional[Sequence[str]] = None,
                     contrasts: Optional[Sequence[dict]] = None) -> None:
    from rich.table import Table

    from kdzoo.evaluation.significance import METHOD_NOTE
    entries = _entries(records)
    columns = list(columns or default_columns(entries))
    table = Table(title=title)
    for i, h in enumerate(_header(columns)):
        table.add_column(h, justify='left' if i < 2 else 'right')
    for row in _rows(entries, columns):
        table.add_row(*row)
    out = console()
    out.print(table)
    against = _against(entries)
    rows = list(_diff_rows(entries, compare_keys or
                           default_compare_keys(columns), against))
    if rows:
        diff = Table(title='paired differences (mean over common seeds)',
                     caption=METHOD_NOTE)
        for h in _DIFF_HEADER + [f'Δ vs {a} [95 % CI]' for a in against]:
            diff.add_column(h)
        colors = {'better': 'green', 'worse': 'red'}
        for row in rows:
            diff.add_row(*row[:2], *[
                next((f'[{c}]{cell}[/{c}]' for v, c in colors.items()
                      if cell.endswith(v)), cell) for cell in row[2:]])
        out.print(diff)
    keys = compare_keys or default_compare_keys(columns)
    rows = list(_contrast_rows(contrasts, keys))
    if rows:
        table = Table(title='contrasts (paired, A − B)', caption=METHOD_NOTE)
        for h in ['A − B', 'what it isolates'] + list(keys):
            table.add_column(h)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    if context:
        runs = Table(title='runs', title_justify='left')
        for i, h in enumerate(_RUN_HEADER):
            runs.add_column(h, justify='right' if 1 <= i <= 4 else 'left')
        for row in _run_rows(context):
            runs.add_row(*row)
        out.print(runs)
        for line in _context_lines(context):
            out.print(line, highlight=False, markup=False)


def print_metrics(record: dict, title: str = 'metrics') -> None:
    """Print one run's metrics as a two-column rich table."""
    from rich.table import Table
    table = Table(title=title)
    table.add_column('metric')
    table.add_column('value', justify='right')
    metrics = record.get('metrics', {})
    for key, value in metrics.items():
        if not _scalar(value):
            continue
        ci = metrics.get(f'{key}_ci95')
        table.add_row(key, _fmt(value, key) + (
            f' [{_fmt(ci[0], key)}, {_fmt(ci[1], key)}]' if ci else ''))
    console().print(table)
