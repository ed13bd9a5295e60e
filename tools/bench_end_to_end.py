"""Whole training runs, kdzoo against a plain PyTorch loop, on a real image
folder: images/s, CPU user/kernel time and page faults.

Both sides train the same student (the real-faces recipe's MobileFaceNet
with a CosFace head, from ``recipes/real_faces/student_alone.py``) on the
same image folder (one folder per identity, decoded with PIL each time an
image is drawn, random horizontal flip), with the same batch, DataLoader
workers, SGD (lr 0.1 with the recipe's linear warm-up, momentum 0.9,
weight decay 5e-4), gradient clipping at norm 5 and seed:

- ``kdzoo``: ``kdzoo train`` of the recipe (runner, hooks, logging,
  progress bar, the distiller's data path), its dataset cut to the
  iterations measured (``indices``) so the epoch ends there;
- ``plain``: a loop written here as a user would: a ``Dataset`` over the
  files, ``DataLoader``, backbone, an inline CosFace, ``loss.backward()``,
  ``clip_grad_norm_``, ``optimizer.step()``.

Each side runs in its own process, one at a time. After ``--warmup``
iterations the process (and its DataLoader workers) is measured for
``--iters`` iterations: wall time, user and system CPU seconds, minor page
faults (``/proc``), and the process's peak resident memory. ``--malloc
on`` is kdzoo's default process setting (``kdzoo/utils/allocator.py``) on
both sides, ``off`` glibc's defaults (``both``: each). Prints a table, writes JSON.

    python tools/bench_end_to_end.py [--data-root DIR] [--image-size 112]
        [--batch-size 128] [--warmup 5] [--iters 40] [--workers 0]
        [--malloc both] [--out bench_end_to_end.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPE = os.path.join(ROOT, 'recipes', 'real_faces', 'student_alone.py')
DEFAULT_DATA = os.path.join(ROOT, '..', 'shared', 'data', 'train',
                            'celeba299', 'images')
_TICKS = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


# ------------------------------------------------------------ measuring
def _proc_stat(pid):
    """(utime s, stime s, minor faults) of one process, or None."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        return None
    # fields[0] is the state (field 3); minflt is field 10, utime 14,
    # stime 15 (1-based, man 5 proc)
    return (int(fields[11]) / _TICKS, int(fields[12]) / _TICKS,
            int(fields[7]))


def _children(pid):
    out = []
    try:
        for tid in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{tid}/children') as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def usage():
    """CPU seconds and faults of this process and its live descendants
    (DataLoader workers)."""
    total = [0.0, 0.0, 0]
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        stat = _proc_stat(pid)
        if stat is not None:
            total = [a + b for a, b in zip(total, stat)]
        todo += _children(pid)
    return dict(time=time.perf_counter(), user=total[0], system=total[1],
                faults=total[2])


def measured(start, end, iters, batch_size):
    wall = end['time'] - start['time']
    user, system = end['user'] - start['user'], end['system'] - start['system']
    return dict(
        iters=iters, seconds=round(wall, 3),
        s_per_iter=round(wall / iters, 4),
        images_per_s=round(iters * batch_size / wall, 2),
        user_cpu_s_per_s=round(user / wall, 3),
        system_cpu_s_per_s=round(system / wall, 3),
        kernel_share=round(system / max(user + system, 1e-9), 3),
        minor_faults_per_s=round((end['faults'] - start['faults']) / wall))


# ------------------------------------------------------------ the two sides
def _recipe_options(args, work_dir):
    size = args.image_size
    return {
        'train_dataloader.dataset.data_root': args.data_root,
        'train_dataloader.dataset.image_size': size,
        'train_dataloader.dataset.indices':
            (args.warmup + args.iters) * args.batch_size,
        'train_dataloader.batch_size': args.batch_size,
        'train_dataloader.num_workers': args.workers,
        'model.student.backbone.input_size': (size, size),
        'train_cfg.max_epochs': 1,
        'randomness.seed': args.seed,
        'test_dataloader': None, 'test_cfg': None, 'test_evaluator': None,
    }


_MARKS = {}


def _register_meter():
    """A hook that marks the start and end of the measured iterations;
    registered by name (a recipe holds names, not classes)."""
    from mmengine.hooks import Hook

    from kdzoo.registry import HOOKS

    class EndToEndMeter(Hook):
        priority = 'LOWEST'  # after logging and the progress bar

        def __init__(self, warmup, iters):
            self.warmup, self.iters = warmup, iters

        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None):
            done = runner.iter + 1
            if done == self.warmup:
                _MARKS['start'] = usage()
            elif done == self.warmup + self.iters:
                _MARKS['end'] = usage()

    HOOKS.register_module(name='EndToEndMeter', module=EndToEndMeter,
                          force=True)


def run_kdzoo(args):
    from kdzoo.engine.runner import load_recipe, train_recipe
    _register_meter()
    with tempfile.TemporaryDirectory() as work:
        cfg = load_recipe(RECIPE, _recipe_options(args, work), work)
        cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [
            dict(type='EndToEndMeter', warmup=args.warmup, iters=args.iters)]
        train_recipe(cfg, run_test=False)
    return measured(_MARKS['start'], _MARKS['end'], args.iters,
                    args.batch_size)


def run_plain(args):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from mmengine.config import Config
    from PIL import Image
    from torch import nn

    from kdzoo.registry import BACKBONES

    recipe = Config.fromfile(RECIPE)
    backbone_cfg = dict(recipe.model.student.backbone,
                        input_size=(args.image_size, args.image_size))
    head_cfg = recipe.model.student.head

    classes = sorted(d for d in os.listdir(args.data_root)
                     if os.path.isdir(os.path.join(args.data_root, d)))
    files = [(os.path.join(args.data_root, c, f), label)
             for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(args.data_root, c)))]
    files = files[:(args.warmup + args.iters) * args.batch_size]
    size = args.image_size

    class Faces(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            path, label = files[i]
            with Image.open(path) as im:
                im = im.convert('RGB')
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                img = np.asarray(im, dtype=np.uint8)
            if torch.rand(()) < 0.5:
                img = img[:, ::-1]
            return torch.from_numpy(img.transpose(2, 0, 1).copy()), label

    torch.manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        Faces(), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers)
    backbone = BACKBONES.build(backbone_cfg)
    weight = nn.Parameter(torch.randn(len(classes),
                                      head_cfg.embedding_size) * 0.01)
    params = list(backbone.parameters()) + [weight]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                weight_decay=5e-4)
    iters = len(loader)
    backbone.train()
    start = end = None
    for i, (images, labels) in enumerate(loader):
        # the recipe's warm-up: lr from 0.1 x 0.1 to 0.1 over the epoch
        for group in optimizer.param_groups:
            group['lr'] = 0.1 * (0.1 + 0.9 * i / iters)
        x = (images.float() - 127.5) / 128.0
        emb = backbone(x)
        cos = F.linear(F.normalize(emb), F.normalize(weight))
        logits = head_cfg.s * (cos - head_cfg.m * F.one_hot(
            labels, len(classes)))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        done = i + 1
        if done == args.warmup:
            start = usage()
        elif done == args.warmup + args.iters:
            end = usage()
    return measured(start, end, args.iters, args.batch_size)


def _side(args):
    from kdzoo.utils.allocator import tune_allocator
    tune_allocator()  # kdzoo's default; KDZOO_MALLOC_TUNING=0 turns it off
    import torch
    import kdzoo  # noqa: F401  (registers everything)
    record = run_kdzoo(args) if args.side == 'kdzoo' else run_plain(args)
    from kdzoo.utils.allocator import malloc_tuning
    import resource
    record.update(malloc_tuning=malloc_tuning(),
                  threads=torch.get_num_threads(),
                  # the process's largest resident set (KiB on Linux)
                  peak_rss_mib=round(resource.getrusage(
                      resource.RUSAGE_SELF).ru_maxrss / 1024))
    with open(args.result, 'w') as f:
        json.dump(record, f)


# ------------------------------------------------------------ driver
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-root', default=DEFAULT_DATA)
    p.add_argument('--image-size', type=int, default=112)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--iters', type=int, default=40)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--malloc', choices=('on', 'off', 'both'), default='both')
    p.add_argument('--sides', default='plain,kdzoo')
    p.add_argument('--out', default='bench_end_to_end.json')
    p.add_argument('--side', choices=('plain', 'kdzoo'), help='internal')
    p.add_argument('--result', help='internal')
    args = p.parse_args(argv)
    if args.side:
        return _side(args)
    if not os.path.isdir(args.data_root):
        sys.exit(f'bench_end_to_end: --data-root is not a folder: '
                 f'{args.data_root}')
    for option in ('warmup', 'iters', 'batch_size'):
        if getattr(args, option) < 1:
            sys.exit(f'bench_end_to_end: --{option.replace("_", "-")} must '
                     'be >= 1')
    mallocs = ['off', 'on'] if args.malloc == 'both' else [args.malloc]
    sides = args.sides.split(',')
    rows = []
    for malloc in mallocs:
        for side in sides:
            with tempfile.NamedTemporaryFile(suffix='.json') as tmp:
                cmd = [sys.executable, os.path.abspath(__file__), '--side',
                       side, '--result', tmp.name]
                for option in ('data_root', 'image_size', 'batch_size',
                               'warmup', 'iters', 'workers', 'seed'):
                    cmd += [f'--{option.replace("_", "-")}',
                            str(getattr(args, option))]
                env = dict(os.environ, KDZOO_MALLOC_TUNING='1' if malloc ==
                           'on' else '0')
                print(f'{side}, malloc tuning {malloc} ...', flush=True)
                subprocess.run(cmd, env=env, check=True,
                               stdout=subprocess.DEVNULL)
                with open(tmp.name) as f:
                    rows.append(dict(side=side, malloc=malloc,
                                     **json.load(f)))
    from kdzoo.utils.environment import cpu_capability, cpu_description
    ratios = {}
    for malloc in mallocs:
        got = {r['side']: r for r in rows if r['malloc'] == malloc}
        if {'plain', 'kdzoo'} <= set(got):
            ratios[f'kdzoo / plain images/s (malloc {malloc})'] = round(
                got['kdzoo']['images_per_s'] / got['plain']['images_per_s'],
                3)
    record = dict(cpu=cpu_description(), cpu_capability=cpu_capability(),
                  cores=os.cpu_count(), data_root=args.data_root,
                  image_size=args.image_size, batch_size=args.batch_size,
                  warmup=args.warmup, iters=args.iters, workers=args.workers,
                  rows=rows, ratios=ratios)
    cols = ('side', 'malloc', 'images_per_s', 's_per_iter',
            'user_cpu_s_per_s', 'system_cpu_s_per_s', 'kernel_share',
            'minor_faults_per_s', 'peak_rss_mib')
    print(f'{record["cpu"]} ({record["cores"]} cores, '
          f'{record["cpu_capability"]}), {args.image_size} px, batch '
          f'{args.batch_size}, {args.workers} workers, {args.iters} iters '
          f'after {args.warmup}')
    print(' | '.join(cols))
    for r in rows:
        print(' | '.join(str(r[c]) for c in cols))
    for k, v in ratios.items():
        print(f'{k}: {v:.3f}')
    from kdzoo.utils import atomic_write_json
    atomic_write_json(args.out, record)
    print(f'json: {args.out}')


if __name__ == '__main__':
    main()
