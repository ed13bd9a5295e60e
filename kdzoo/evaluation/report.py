"""Tables of results: rich on the console, markdown in files."""
import re
from typing import List, Optional, Sequence, Tuple

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


def _fmt(value: Optional[float], key: str) -> str:
    if value is None:
        return '–'
    if key.endswith(('accuracy', 'accuracy_std')):
        return f'{value:.2f}'
    return f'{value:.4f}' if abs(value) <= 1.0 else f'{value:.2f}'


def _rows(records, columns):
    for r in records:
        metrics = r.get('metrics', {})
        yield [r.get('name', '?'), r.get('role', ''),
               f'{r.get("student_params", 0) / 1e6:.3f}'] + [
                   _fmt(metrics.get(key), key) for _, key in columns] + [
                       f'{r.get("train_time_s", 0):.0f}']


def _header(columns):
    return ['run', 'role', 'params (M)'] + [t for t, _ in columns] + \
        ['train s']


def comparison_markdown(records: Sequence[dict],
                        columns: Optional[Sequence[Column]] = None) -> str:
    columns = list(columns or default_columns(records))
    header = _header(columns)
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(row) + ' |'
              for row in _rows(records, columns)]
    if records:
        r = records[0]
        lines.append('')
        lines.append(f'device: {r.get("device")}; torch {r.get("torch")}; '
                     f'kdzoo {r.get("kdzoo")}; seed {r.get("seed")}; batch '
                     f'{r.get("batch_size")}; epochs per run: ' + ', '.join(
                         f'{x.get("name")}={x.get("epochs")}'
                         for x in records))
    return '\n'.join(lines) + '\n'


def console():
    """A rich console; wide when writing to a file or a CI log."""
    from rich.console import Console
    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_comparison(records: Sequence[dict],
                     columns: Optional[Sequence[Column]] = None,
                     title: str = 'comparison') -> None:
    from rich.table import Table
    columns = list(columns or default_columns(records))
    table = Table(title=title)
    for i, h in enumerate(_header(columns)):
        table.add_column(h, justify='left' if i < 2 else 'right')
    for row in _rows(records, columns):
        table.add_row(*row)
    console().print(table)


def print_metrics(record: dict, title: str = 'metrics') -> None:
    """Print one run's metrics as a two-column rich table."""
    from rich.table import Table
    table = Table(title=title)
    table.add_column('metric')
    table.add_column('value', justify='right')
    for key, value in record.get('metrics', {}).items():
        table.add_row(key, _fmt(value, key))
    console().print(table)
