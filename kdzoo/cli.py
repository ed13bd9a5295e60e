"""The ``kdzoo`` command line: train, test, evaluate, compare, list."""
import argparse
import json
import os
import sys

from kdzoo.utils import KdzooError


def _parse_cfg_options(pairs, option: str = '--cfg-options'):
    """``k=v`` pairs -> dict; values parsed as Python/JSON literals."""
    import ast
    options = {}
    for pair in pairs or []:
        if '=' not in pair:
            raise KdzooError(f'{option} expects key=value, got {pair!r}')
        key, value = pair.split('=', 1)
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def cmd_train(args):
    from kdzoo.engine import load_recipe, train_recipe
    from kdzoo.commands.report import print_metrics
    cfg = load_recipe(args.recipe, _parse_cfg_options(args.cfg_options),
                      args.work_dir)
    cfg.launcher = args.launcher
    record = train_recipe(cfg, resume=args.resume)
    print_metrics(record, title=f'{record["name"]}: test metrics')
    print(f'results: {os.path.join(cfg.work_dir, "results.json")}')


def cmd_test(args):
    from kdzoo.engine import load_recipe, test_recipe
    from kdzoo.commands.report import print_metrics
    cfg = load_recipe(args.recipe, _parse_cfg_options(args.cfg_options),
                      args.work_dir)
    record = test_recipe(cfg, checkpoint=args.checkpoint)
    print_metrics(record, title=f'{record["name"]}: test metrics')
    print(f'results: {os.path.join(cfg.work_dir, "test_results.json")}')


def cmd_evaluate(args):
    from kdzoo.commands.evaluate import evaluate_pretrained
    from kdzoo.utils import ConfigError, atomic_write_json
    if not args.bin and not args.ijb:
        raise ConfigError('evaluate needs --bin FILE (InsightFace .bin set, '
                          'repeatable) and/or --ijb ROOT (IJB-B/C folder '
                          'with meta/ and loose_crop/)')
    from kdzoo.commands.evaluate import build_pretrained
    from kdzoo.utils import json_option
    network = build_pretrained(args.model,
                               json_option('--backbone', args.backbone))
    results = {}
    if args.bin:  # written at once: kept if IJB fails later
        results = evaluate_pretrained(
            args.model, args.bin, flip=not args.no_flip, out=args.out,
            batch_size=args.batch_size, mean=args.mean, std=args.std,
            network=network)
    if args.ijb:
        from kdzoo.evaluation.ijb import evaluate_ijb
        results[args.ijb_target] = evaluate_ijb(
            network, args.ijb, args.ijb_target, flip=not args.no_flip,
            use_detector_score=not args.no_detector_score,
            batch_size=args.batch_size, out=args.out, mean=args.mean,
            std=args.std, num_workers=args.workers)
        if args.bin and args.out:  # one JSON for the .bin sets and IJB
            atomic_write_json(args.out, results)


def cmd_export(args):
    from kdzoo.commands.export import export_student
    result = export_student(args.run_dir, args.format, out=args.out,
                            checkpoint=args.checkpoint, opset=args.opset)
    check = result.get('onnxruntime_check')
    if check:
        per_batch = ', '.join(f'batch {n}: {v["max_abs_diff"]:.3g}'
                              for n, v in check['batches'].items())
        print(f'onnxruntime vs PyTorch max |diff|: {per_batch} (relative '
              f'{check["relative_diff"]:.3g} of output scale '
              f'{check["output_scale"]:.3g}; tolerance '
              f'{check["tolerance_relative"]:g})')
    print(f'student backbone from {result["checkpoint"]}')
    print(f'exported: {result["path"]}')
    print(f'sidecar: {result["sidecar_path"]}')


def cmd_compare(args):
    from kdzoo.commands.compare import run_suite
    run_suite(args.suite, work_dir=args.work_dir, force=args.force,
              cfg_options=_parse_cfg_options(args.cfg_options),
              seeds=args.seeds, jobs=args.jobs, threads=args.threads,
              executor=args.executor,
              executor_options=_parse_cfg_options(args.executor_options,
                                                  '--executor-options'))


def _pack_labels(args):
    from kdzoo.datasets import pack
    from kdzoo.utils import ConfigError
    given = [o for o, v in (('--lfw-pairs', args.lfw_pairs),
                            ('--cfp-protocol', args.cfp_protocol),
                            ('--pairs', args.pairs)) if v]
    if len(given) != 1:
        raise ConfigError('kdzoo pack labels needs exactly one of '
                          '--lfw-pairs FILE, --cfp-protocol DIR or --pairs '
                          f'FILE (got {", ".join(given) or "none"})')
    if args.cfp_split and not args.cfp_protocol:
        raise ConfigError('--cfp-split goes with --cfp-protocol DIR')
    if args.lfw_pairs:
        source = args.lfw_pairs
        identities, keys = pack.lfw_pairs_labels(source)
    elif args.cfp_protocol:
        split = (args.cfp_split or 'FF').upper()
        source = os.path.join(args.cfp_protocol, f'Split/{split}')
        identities, keys = pack.cfp_protocol_labels(args.cfp_protocol, split)
    else:
        source = args.pairs
        identities, keys = pack.pairs_file_labels(source)
    done = pack.write_bin_labels(args.bin, identities, keys, out=args.out,
                                 source=source)
    print(_labels_summary(done, args.bin))


def _labels_summary(done, bin_path):
    return (f'labelled {done["images"]} images of {bin_path}: '
            f'{done["distinct_images"]} distinct of {done["identities"]} '
            f'identities ({done["positive_pairs"]} positive and '
            f'{done["negative_pairs"]} negative pairs among them) -> '
            f'{done["path"] if "path" in done else done["labels"]}')


def cmd_pack(args):
    from kdzoo.utils import check_size
    from kdzoo.datasets.pack import pack_image_folder, pack_pairs
    if args.format == 'labels':
        return _pack_labels(args)
    size = args.image_size
    size = check_size(f'kdzoo pack {args.format}: --image-size',
                      size[0] if size and len(size) == 1 else size,
                      name='image_size', allow_none=True)
    if args.format == 'rec':
        prefix = args.out_prefix
        if os.path.isdir(prefix) or prefix.endswith(('/', os.sep)):
            prefix = os.path.join(prefix, 'train')  # InsightFace's names
        rec, idx = prefix + '.rec', prefix + '.idx'
        done = pack_image_folder(
            args.image_folder, rec, idx, size, args.quality,
            max_identities=args.max_identities,
            min_images_per_identity=args.min_images,
            max_images_per_identity=args.max_images)
        print(f'packed {done["num_images"]} images of '
              f'{done["num_identities"]} identities -> {rec}, {idx}')
    else:
        done = pack_pairs(args.pairs, args.root, args.out, size,
                          args.quality, labels=args.labels)
        print(f'packed {done["num_pairs"]} pairs ({done["num_same"]} same, '
              f'{done["num_images"]} images) -> {args.out}')
        if args.labels:
            print(_labels_summary(done, args.out))


def cmd_bench(args):
    from kdzoo.commands.bench import run_cli
    run_cli(args)


def cmd_list(args):
    import importlib

    import kdzoo  # noqa: F401
    from kdzoo.registry import LISTABLE
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
                       'verification sets and/or IJB-B/C')
    p.add_argument('--model', required=True, help='.onnx file, or .pth state '
                   'dict with --backbone')
    p.add_argument('--backbone', help='backbone config as JSON, e.g. '
                   '\'{"type": "IResNet", "depth": 50}\' (for .pth)')
    p.add_argument('--bin', action='append',
                   help='.bin file (repeatable)')
    p.add_argument('--ijb', metavar='ROOT', help='IJB-B/C 1:1 template '
                   'verification on ROOT/meta and ROOT/loose_crop '
                   '(docs/ijb.md)')
    p.add_argument('--ijb-target', choices=['ijbb', 'ijbc'], default='ijbc',
                   type=str.lower, help='which IJB protocol (default ijbc)')
    p.add_argument('--no-detector-score', action='store_true',
                   help='IJB: do not weight images by their faceness score')
    p.add_argument('--workers', type=int, default=0,
                   help='IJB: image loading processes (default 0)')
    p.add_argument('--no-flip', action='store_true',
                   help='embed the image only (default: image + mirror)')
    p.add_argument('--out', help='write the results as JSON here')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--mean', type=float, default=127.5,
                   help='input normalisation mean on 0-255 pixels')
    p.add_argument('--std', type=float, default=128.0,
                   help='input normalisation std on 0-255 pixels')
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser('export', help="write a run's student backbone as a "
                       '.pth state dict or an .onnx model (+ sidecar JSON)')
    p.add_argument('run_dir', metavar='RUN_DIR',
                   help='work dir of a `kdzoo train` run')
    p.add_argument('--format', required=True, metavar='{pth,onnx}')
    p.add_argument('--checkpoint', help='runner checkpoint or backbone.pth '
                   '(default: the newest complete one in RUN_DIR)')
    p.add_argument('--out', help='output file (default: '
                   'RUN_DIR/export/student_<checkpoint>.<format>)')
    p.add_argument('--opset', type=int, default=17,
                   help='ONNX opset version (onnx only)')
    p.set_defaults(func=cmd_export)

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
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser('pack', help='write InsightFace data files: a '
                       'RecordIO training set (.rec/.idx) from an image '
                       'folder, a .bin verification set from a pairs file, '
                       "or a .bin's identity labels")
    fmt = p.add_subparsers(dest='format', required=True)
    q = fmt.add_parser('rec', help='IMAGE_FOLDER/<identity>/<image> -> '
                       'OUT_PREFIX.rec + OUT_PREFIX.idx (a directory: '
                       'train.rec + train.idx in it)')
    q.add_argument('image_folder')
    q.add_argument('out_prefix')
    q.add_argument('--max-identities', type=int,
                   help='keep the first N identities (sorted folder names)')
    q.add_argument('--min-images', type=int, default=1,
                   help='drop identities with fewer images')
    q.add_argument('--max-images', type=int,
                   help='keep the first N images of each identity')
    r = fmt.add_parser('bin', help='pairs file ("path_a path_b 0|1" per '
                       'line, paths relative to --root) -> OUT.bin')
    r.add_argument('--pairs', required=True)
    r.add_argument('--root', required=True)
    r.add_argument('out')
    r.add_argument('--labels', action='store_true',
                   help='also write OUT.labels.tsv (identity = first folder '
                   'of each path, which must be <identity>/<image>)')
    lab = fmt.add_parser(
        'labels', help='identity and photo key of every image of a .bin -> '
        'BIN.labels.tsv (to score all pairs of its images), from LFW '
        'pairs.txt, the CFP protocol or a pairs file of <identity>/<image> '
        'paths')
    lab.add_argument('bin', metavar='BIN')
    lab.add_argument('--lfw-pairs', metavar='FILE',
                     help="LFW's pairs.txt (the order of lfw.bin)")
    lab.add_argument('--cfp-protocol', metavar='DIR',
                     help='CFP folder holding Protocol/ (or Protocol/ '
                     'itself)')
    lab.add_argument('--cfp-split', metavar='{FF,FP}',
                     help='CFP protocol of the .bin (default FF)')
    lab.add_argument('--pairs', metavar='FILE',
                     help='"path_a path_b 0|1" lines in .bin order with '
                     '<identity>/<image> paths (as for `kdzoo pack bin`)')
    lab.add_argument('--out', metavar='FILE',
                     help='write here instead of BIN.labels.tsv (then give '
                     'it to the dataset as labels_file)')
    for q in (q, r):
        q.add_argument('--image-size', type=int, nargs='+', metavar='N',
                       help='resize to N×N (or H W) pixels')
        q.add_argument('--quality', type=int, default=95,
                       help='JPEG quality for re-encoded images (JPEGs of '
                       'the right size are stored unchanged)')
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser('list', help='registered components and their summary')
    p.add_argument('kind', nargs='?', choices=list(LISTABLE))
    p.add_argument('--json', action='store_true')
    p.add_argument('--import', dest='imports', nargs='+', metavar='MODULE',
                   help='import these modules first, so that the '
                   'components they register are listed too')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('bench', help='training speed: student alone, with '
                       'one/two online teachers, two cached teachers, and a '
                       'plain PyTorch loop (images/s, ms/step, memory)')
    from kdzoo.commands.bench import add_bench_arguments
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
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
