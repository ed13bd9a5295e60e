"""The ``kdzoo`` command line. Each command lives in ``kdzoo.commands``
(``train``/``test``, ``evaluate``, ``export``, ``compare``, ``pack``,
``list``, ``bench``): its module adds its arguments and runs it; this
module builds the parser, runs the command and turns kdzoo's errors into
one line and exit code 2."""
import argparse
import importlib
import sys

from kdzoo.utils import KdzooError

# kdzoo.commands.<module> for each command, in --help order
COMMAND_MODULES = ('train', 'evaluate', 'export', 'compare', 'pack',
                   'listing', 'bench')


def build_parser():
    from kdzoo.version import __version__
    parser = argparse.ArgumentParser(
        prog='kdzoo', description='Knowledge distillation for face '
        'recognition: train, evaluate and compare recipes.')
    parser.add_argument('--version', action='version',
                        version=f'kdzoo {__version__}')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='show the full mmengine log on the console')
    sub = parser.add_subparsers(dest='command', required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f'kdzoo.commands.{name}').register(sub)
    return parser


def main(argv=None):
    from kdzoo.utils.allocator import tune_allocator
    tune_allocator()  # before the first tensor; KDZOO_MALLOC_TUNING=0: off
    import kdzoo  # noqa: F401  (registers everything)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        import logging
        from kdzoo.engine import KdzooRunner
        KdzooRunner.console_level = logging.INFO
    try:
        args.func(args)
    except KdzooError as e:
        if args.verbose and e.__cause__ is not None:
            import traceback
            traceback.print_exception(e.__cause__)
        print(f'kdzoo {args.command}: error: {_one_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    return 0


def _one_line(error: Exception) -> str:
    """The error's own message, without a DataLoader worker's traceback.

    An error raised in a worker process comes back as ``Caught X in
    DataLoader worker process N. Original Traceback ...`` whose last line is
    ``module.X: <message>``.
    """
    text = str(error)
    if 'Original Traceback' in text:
        last = text.strip().splitlines()[-1]
        prefix = f'{type(error).__module__}.{type(error).__name__}: '
        text = last[len(prefix):] if last.startswith(prefix) else last
    return text


if __name__ == '__main__':
    sys.exit(main())
