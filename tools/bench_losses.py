"""Time forward+backward of every registered distillation loss.

    python tools/bench_losses.py [--batch 256] [--dim 512] [--device cpu,cuda]
                                 [--repeats 10] [--out work_dirs/bench/losses.json]

Inputs follow the loss-zoo argument names: embeddings B×D, logits B×C
(C=1000), feature maps B×128×7×7, labels with 4 images per identity,
dataset indices. Prints a table (median ms per forward+backward) and writes
JSON with the device, versions and settings. Speed lives here, never in
tests.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import kdzoo
from kdzoo.losses.base import loss_signature
from kdzoo.registry import LOSSES
from kdzoo.utils import atomic_write_json

NUM_CLASSES = 1000
FEAT_SHAPE = (128, 7, 7)


def loss_configs(dim: int, batch: int, head_file: str) -> dict:
    """Constructor arguments per loss (defaults unless the loss needs more)."""
    return {
        'CRDLoss': dict(num_data=max(8 * batch, 20000), nce_k=4096),
        'MarginDistillationLoss': dict(head_checkpoint=head_file),
        'AdaDistillLoss': dict(num_classes=NUM_CLASSES, embedding_size=dim),
    }


def make_inputs(names, batch, dim, device, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    values = {}
    for name in names:
        if name in ('s_logits', 't_logits'):
            values[name] = randn(batch, NUM_CLASSES) * 8
        elif name in ('s_emb', 't_emb', 's_emb_1', 't_emb_1', 's_emb_2',
                      't_emb_2'):
            values[name] = randn(batch, dim)
        elif name in ('s_feat', 't_feat'):
            values[name] = randn(batch, *FEAT_SHAPE).relu()
        elif name == 'labels':
            values[name] = (torch.arange(batch) // 4 % NUM_CLASSES).to(device)
        elif name == 'ages':
            values[name] = torch.randint(5, 81, (batch,),
                                         generator=generator).to(device)
        elif name == 'indices':
            values[name] = torch.randperm(batch, generator=generator).to(
                device)
    for name in ('s_logits', 's_emb', 's_feat', 's_emb_1', 's_emb_2'):
        if name in values:
            values[name].requires_grad_(True)
    return values


def time_loss(loss, inputs, repeats, device):
    def step():
        for v in inputs.values():
            v.grad = None
        out = loss(**inputs)
        out.backward()

    def sync():
        if device.startswith('cuda'):
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=256)
    parser.add_argument('--dim', type=int, default=512)
    parser.add_argument('--device', default=None,
                        help="comma list; default 'cpu' plus 'cuda' if "
                        'available')
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--only', default=None,
                        help='comma list of loss names')
    parser.add_argument('--out', default='work_dirs/bench/losses.json')
    args = parser.parse_args(argv)
    devices = (args.device.split(',') if args.device else
               ['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
    names = sorted(LOSSES.module_dict)
    if args.only:
        names = [n for n in names if n in args.only.split(',')]

    rows, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        head_file = os.path.join(tmp, 'head.pth')
        torch.save({'weight': torch.randn(NUM_CLASSES, args.dim)}, head_file)
        configs = loss_configs(args.dim, args.batch, head_file)
        for device in devices:
            for name in names:
                torch.manual_seed(0)
                cls = LOSSES.get(name)
                if hasattr(cls, 'attach_teachers'):
                    # runs a teacher network: its cost is the teacher's
                    skipped[name] = ('runs the frozen teacher\'s stages; '
                                     'timed as part of training')
                    continue
                loss = cls(**configs.get(name, {})).to(device).train()
                params = list(loss_signature(loss).parameters)
                g = torch.Generator().manual_seed(0)
                inputs = make_inputs(params, args.batch, args.dim, device, g)
                if hasattr(loss, 'check_shapes'):
                    loss.check_shapes({k: v.shape for k, v in inputs.items()})
                    # as in training: checked once, not at every step
                    loss.inputs_checked = True
                loss = loss.to(device)
                median, best = time_loss(loss, inputs, args.repeats, device)
                rows.append(dict(loss=name, device=device,
                                 median_ms=round(median, 3),
                                 min_ms=round(best, 3)))
                print(f'{name:24s} {device:5s} {median:9.2f} ms',
                      file=sys.stderr)

    from rich.table import Table
    from kdzoo.utils.console import console
    table = Table(title=f'forward+backward, B={args.batch}, D={args.dim}, '
                  f'C={NUM_CLASSES}, maps {FEAT_SHAPE}')
    for col in ('loss', 'device', 'median ms', 'min ms'):
        table.add_column(col, justify='left' if col in ('loss', 'device')
                         else 'right')
    for r in rows:
        table.add_row(r['loss'], r['device'], f"{r['median_ms']:.2f}",
                      f"{r['min_ms']:.2f}")
    console().print(table)
    for name, why in skipped.items():
        print(f'not timed: {name} ({why})')
    record = dict(
        settings=dict(batch=args.batch, dim=args.dim,
                      num_classes=NUM_CLASSES, feat_shape=FEAT_SHAPE,
                      repeats=args.repeats),
        machine=dict(cpu=platform.processor() or platform.machine(),
                     cores=os.cpu_count(), threads=torch.get_num_threads(),
                     cuda=(torch.cuda.get_device_name(0)
                           if torch.cuda.is_available() else None)),
        versions=dict(torch=torch.__version__, kdzoo=kdzoo.__version__,
                      python=platform.python_version()),
        results=rows, skipped=skipped)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_json(args.out, record)
    print(f'json: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
