"""``kdzoo pack``: InsightFace data files from images (``rec``: a
RecordIO training set; ``bin``: a verification set from a pairs file;
``labels``: a ``.bin``'s identity labels), with the writers of
``kdzoo.datasets.pack``."""
import os


def register(sub) -> None:
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
    p.set_defaults(func=run)


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


def run(args):
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
