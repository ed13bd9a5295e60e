"""``kdzoo list``: registered components with their one-line summary
(``--import`` a user's modules to list their plugins too)."""
import json

from kdzoo.registry import LISTABLE


def register(sub) -> None:
    p = sub.add_parser('list', help='registered components and their summary')
    p.add_argument('kind', nargs='?', choices=list(LISTABLE))
    p.add_argument('--json', action='store_true')
    p.add_argument('--import', dest='imports', nargs='+', metavar='MODULE',
                   help='import these modules first, so that the '
                   'components they register are listed too')
    p.set_defaults(func=run)


def run(args):
    import importlib

    from kdzoo.utils import ConfigError
    for module in args.imports or ():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(
                f'kdzoo list --import {module}: cannot import it ({e}); put '
                'the folder that holds it on PYTHONPATH (e.g. '
                'PYTHONPATH=. from your project folder)') from None
    kinds = [args.kind] if args.kind else list(LISTABLE)
    table = {}
    for kind in kinds:
        registry = LISTABLE[kind]
        table[kind] = {name: _first_line(cls) for name, cls in
                       sorted(registry.module_dict.items())}
    if args.json:
        print(json.dumps(table, indent=2))
        return
    from rich.table import Table
    from kdzoo.utils.console import console as rich_console
    console = rich_console()
    for kind, entries in table.items():
        t = Table(title=f'{kind} ({len(entries)})', title_justify='left',
                  show_header=False)
        t.add_column('name', style='bold cyan', no_wrap=True)
        t.add_column('summary')
        for name, doc in entries.items():
            t.add_row(name, doc)
        console.print(t)


def _first_line(cls) -> str:
    doc = (cls.__doc__ or '').strip()
    return doc.splitlines()[0].strip() if doc else ''
