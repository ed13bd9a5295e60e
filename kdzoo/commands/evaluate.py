"""``kdzoo evaluate``: a pretrained model on InsightFace ``.bin`` sets."""
import os
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from kdzoo.utils import ConfigError, atomic_write_json, load_module_weights
from kdzoo.utils.console import ProgressBar


def build_pretrained(model: str, backbone_cfg: Optional[dict] = None):
    """An ``.onnx`` file (run in onnxruntime; input H×W taken from the file
    where fixed), or a ``.pth`` state dict with a backbone config."""
    from kdzoo.registry import BACKBONES
    if not os.path.isfile(model):
        raise ConfigError(f'--model: file not found: {model!r}')
    if model.endswith('.onnx'):
        return BACKBONES.build(dict(type='OnnxBackbone', file=model,
                                    input_size=None, runtime='onnxruntime'))
    if backbone_cfg is None:
        raise ConfigError(f'--model {model!r} is a weights file: say which '
                          'backbone it is, e.g. --backbone \'{"type": '
                          '"IResNet", "depth": 50}\'')
    network = BACKBONES.build(backbone_cfg)
    load_module_weights(network, model, what='--model weights')
    return network


@torch.no_grad()
def embed_dataset(network, dataset, flip: bool = True, batch_size: int = 128,
                  mean: float = 127.5, std: float = 128.0, device=None,
                  progress: Optional[str] = None):
    """Flip-sum embeddings of every image: a list of {'index','embedding'}."""
    from mmengine.dataset import default_collate
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    network = network.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=default_collate,
                        num_workers=0)  # decoding is cheap; avoid contention
    outputs = []
    bar = ProgressBar(progress, len(loader))
    for batch in loader:
        x = (batch['inputs'].to(device).float() - mean) / std
        if next(network.parameters(), None) is not None:  # a torch net
            x = x.contiguous(memory_format=torch.channels_last)
        emb = network(x)
        if flip:
            emb = emb + network(torch.flip(x, dims=[3]))
        emb = emb.float().cpu()
        outputs += [dict(index=int(i), embedding=e)
                    for i, e in zip(batch['data_samples']['index'], emb)]
        bar.advance()
    bar.stop()
    return outputs


def evaluate_pretrained(model: str, bins: Sequence[str],
                        backbone_cfg: Optional[dict] = None,
                        flip: bool = True, out: Optional[str] = None,
                        batch_size: int = 128, mean: float = 127.5,
                        std: float = 128.0, network=None) -> dict:
    """Evaluate on each ``.bin``; print a table; optionally write JSON.

    ``network``: the model already built from ``model`` (else built here).

    JSON layout: ``{<bin stem>: {"accuracy": %, "accuracy_std": %,
    "threshold": ..., "roc_auc": ..., "num_positives": ...,
    "num_negatives": ..., "tar_at_far": {"1e-3": ...}, "ci95":
    {"accuracy": [lo, hi], "TAR@FAR=1e-3": [lo, hi]}, "bootstrap": {"unit":
    "identity" | "pair", ...}}}``. With a labels sidecar beside the
    ``.bin`` (``kdzoo pack labels``), TAR@FAR is scored over all pairs of
    its distinct images and the intervals resample identities.
    """
    from kdzoo.datasets import InsightFaceBinDataset
    from kdzoo.evaluation.metrics import FaceVerificationMetric
    if network is None:
        network = build_pretrained(model, backbone_cfg)
    # Every file is read and checked before any embedding: a set that
    # cannot be scored (e.g. small_lfw.bin, positive pairs only) is refused
    # up front, not after minutes of work.
    datasets = [InsightFaceBinDataset(ann_file=path) for path in bins]
    for dataset in datasets:
        dataset.check_verification()
    results = {}
    for dataset in datasets:
        protocol = next(iter(dataset.metainfo['verification']))
        outputs = embed_dataset(network, dataset, flip, batch_size, mean,
                                std, progress=f'embed {protocol}')
        metric = FaceVerificationMetric()
        metric.dataset_meta = dataset.metainfo
        metric.process({}, outputs)
        flat = metric.compute_metrics(metric.results)
        entry = dict(tar_at_far={})
        for key, value in flat.items():
            name = key.split('/', 1)[1]
            if name.startswith('TAR@FAR='):
                entry['tar_at_far'][name[len('TAR@FAR='):]] = value
            else:
                entry[name] = value
        # 95 % intervals: over identities when the .bin has a labels
        # sidecar, else over pairs (metric.bootstrap_info says which)
        entry['ci95'] = {key.split('/', 1)[1][:-len('_ci95')]: ci
                         for key, ci in metric.intervals.items()}
        entry['bootstrap'] = metric.bootstrap_info.get(protocol, {})
        results[protocol] = entry
    _print(results, model, flip)
    if out:
        atomic_write_json(out, results)
        print(f'results: {out}')
    return results


def _print(results, model, flip):
    from rich.table import Table
    fars = sorted({f for r in results.values() for f in r['tar_at_far']},
                  key=float, reverse=True)
    table = Table(title=f'{os.path.basename(model)} '
                  f'({"flip-sum" if flip else "no flip"}, 10-fold)')
    for h in ['set', 'accuracy %', '± std', '95 % CI', 'threshold',
              'ROC AUC', 'pairs (+/-)'] + [f'TAR@FAR={f}' for f in fars]:
        table.add_column(h, justify='right')

    def tar(r, f):
        if f not in r['tar_at_far']:
            return '–'
        ci = r.get('ci95', {}).get(f'TAR@FAR={f}')
        return f'{r["tar_at_far"][f]:.4f}' + (
            f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '')

    for name, r in results.items():
        ci = r.get('ci95', {}).get('accuracy')
        table.add_row(name, f'{r["accuracy"]:.2f}', f'{r["accuracy_std"]:.2f}',
                      f'[{ci[0]:.2f}, {ci[1]:.2f}]' if ci else '–',
                      f'{r["threshold"]:.3f}', f'{r["roc_auc"]:.4f}',
                      f'{r.get("num_positives", 0):.0f} / '
                      f'{r.get("num_negatives", 0):.0f}',
                      *[tar(r, f) for f in fars])
    units = {r.get('bootstrap', {}).get('unit') for r in results.values()}
    if units - {None}:
        table.caption = ('95 % CI: percentile bootstrap over ' + ' / '.join(
            sorted(f'{u}s' for u in units if u)) + ' (identities where a '
            'labels sidecar gives them)')
    from kdzoo.utils.console import console
    console().print(table)


# ------------------------------------------------------------ command line
def register(sub) -> None:
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
    p.set_defaults(func=run)


def run(args):
    from kdzoo.utils import ConfigError, atomic_write_json
    if not args.bin and not args.ijb:
        raise ConfigError('evaluate needs --bin FILE (InsightFace .bin set, '
                          'repeatable) and/or --ijb ROOT (IJB-B/C folder '
                          'with meta/ and loose_crop/)')
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
