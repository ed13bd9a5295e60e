"""``kdzoo train`` and ``kdzoo test``: a recipe through the training
runtime (``kdzoo.engine``), then its test metrics."""
import os

from .options import parse_key_values


def register(sub) -> None:
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
    p.set_defaults(func=run_train)

    p = sub.add_parser('test', help="evaluate a recipe's student")
    p.add_argument('recipe')
    p.add_argument('--checkpoint', help='runner checkpoint or backbone.pth')
    p.add_argument('--work-dir')
    p.add_argument('--cfg-options', nargs='+', metavar='KEY=VALUE')
    p.set_defaults(func=run_test)


def run_train(args):
    from kdzoo.engine import load_recipe, train_recipe
    from kdzoo.commands.report import print_metrics
    from kdzoo.utils.dist import process_group_closed
    cfg = load_recipe(args.recipe, parse_key_values(args.cfg_options),
                      args.work_dir)
    cfg.launcher = args.launcher
    with process_group_closed():
        record = train_recipe(cfg, resume=args.resume)
    print_metrics(record, title=f'{record["name"]}: test metrics')
    print(f'results: {os.path.join(cfg.work_dir, "results.json")}')


def run_test(args):
    from kdzoo.engine import load_recipe, test_recipe
    from kdzoo.commands.report import print_metrics
    cfg = load_recipe(args.recipe, parse_key_values(args.cfg_options),
                      args.work_dir)
    record = test_recipe(cfg, checkpoint=args.checkpoint)
    print_metrics(record, title=f'{record["name"]}: test metrics')
    print(f'results: {os.path.join(cfg.work_dir, "test_results.json")}')
