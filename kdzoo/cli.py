"""The ``kdzoo`` command line: train, test, evaluate, compare, list."""
import argparse
import json
import os
import sys

from kdzoo.utils import KdzooError


def _parse_cfg_options(pairs):
    """``k=v`` pairs -> dict; values parsed as Python/JSON literals."""
    import ast
    options = {}
    for pair in pairs or []:
        if '=' not in pair:
            raise KdzooError(f'--cfg-options expects key=value, got {pair!r}')
        key, value = pair.split('=', 1)
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def cmd_train(args):
    from kdzoo.engine import load_recipe, train_recipe
    from kdzoo.evaluation.report import print_metrics
    cfg = load_recipe(args.recipe, _parse_cfg_options(args.cfg_options),
                      args.work_dir)
    cfg.launcher = args.launcher
    record = train_recipe(cfg, resume=args.resume)
    print_metrics(record, title=f'{record["name"]}: test metrics')
    print(f'results: {os.path.join(cfg.work_dir, "results.json")}')


def cmd_test(args):
    from kdzoo.engine import load_recipe, test_recipe
    from kdzoo.evaluation.report import print_metrics
    cfg = load_recipe(args.recipe, _parse_cfg_options(args.cfg_options),
                      args.work_dir)
    record = test_recipe(cfg, checkpoint=args.checkpoint)
    print_metrics(record, title=f'{record["name"]}: test metrics')
    print(f'results: {os.path.join(cfg.work_dir, "test_results.json")}')


def cmd_evaluate(args):
    from kdzoo.evaluation.pretrained import evaluate_pretrained
    backbone = json.loads(args.backbone) if args.backbone else None
    evaluate_pretrained(args.model, args.bin, backbone_cfg=backbone,
                        flip=not args.no_flip, out=args.out,
                        batch_size=args.batch_size, mean=args.mean,
                        std=args.std)


def cmd_compare(args):
    from kdzoo.engine.suite import run_suite
    run_suite(args.suite, work_dir=args.work_dir, force=args.force,
              cfg_options=_parse_cfg_options(args.cfg_options),
              seeds=args.seeds)


def cmd_list(args):
    import kdzoo  # noqa: F401
    from kdzoo.registry import LISTABLE
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
    from kdzoo.evaluation.report import console as rich_console
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


def build_parser():
    from kdzoo.registry import LISTABLE
    from kdzoo.version import __version__
    parser = argparse.ArgumentParser(
        prog='kdzoo', description='Knowledge distillation for face '
        'recognition: train, evaluate and compare recipes.')
    parser.add_argument('--version', action='version',
                        version=f'kdzoo {__version__}')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='show the full mmengine log on the console')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('train', help='train a recipe, then test it')
    p.add_argument('recipe')
    p.add_argument('--work-dir')
    p.add_argument('--cfg-options', nargs='+', metavar='KEY=VALUE',
                   help='override recipe keys, e.g. train_cfg.max_epochs=2')
    p.add_argument('--resume', action='store_true',
                   help='resume from the newest complete checkpoint in the '
                   'work dir')
    p.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                   help="'pytorch' under torchrun for distributed training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('test', help="evaluate a recipe's student")
    p.add_argument('recipe')
    p.add_argument('--checkpoint', help='runner checkpoint or backbone.pth')
    p.add_argument('--work-dir')
    p.add_argument('--cfg-options', nargs='+', metavar='KEY=VALUE')
    p.set_defaults(func=cmd_test)

    p = sub.add_parser('evaluate',
                       help='evaluate a pretrained model on InsightFace .bin '
                       'verification sets')
    p.add_argument('--model', required=True, help='.onnx file, or .pth state '
                   'dict with --backbone')
    p.add_argument('--backbone', help='backbone config as JSON, e.g. '
                   '\'{"type": "IResNet", "depth": 50}\' (for .pth)')
    p.add_argument('--bin', required=True, action='append',
                   help='.bin file (repeatable)')
    p.add_argument('--no-flip', action='store_true',
                   help='embed the image only (default: image + mirror)')
    p.add_argument('--out', help='write the results as JSON here')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--mean', type=float, default=127.5,
                   help='input normalisation mean on 0-255 pixels')
    p.add_argument('--std', type=float, default=128.0,
                   help='input normalisation std on 0-255 pixels')
    p.set_defaults(func=cmd_evaluate)

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
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser('list', help='registered components and their summary')
    p.add_argument('kind', nargs='?', choices=list(LISTABLE))
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=cmd_list)
    return parser


def main(argv=None):
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
