"""ONNX inference speed: kdzoo against onnxruntime called directly.

On the same decoded images, in one run, side by side:

- ``onnxruntime direct``: a plain script's loop: normalise a uint8 batch,
  run the session on it and on its mirror, sum (what ``kdzoo evaluate``
  computes);
- ``kdzoo evaluate``: ``embed_dataset`` over the ``.bin`` with the model
  from ``build_pretrained`` (onnxruntime), decoding included;
- ``kdzoo evaluate (onnx2torch)``: the same with the graph converted to
  torch (how kdzoo ran ONNX files before; ``--skip-torch`` leaves it out);
- ``teacher cache build``: ``build_teacher_cache`` with an ``OnnxTeacher``
  (runtime 'auto': onnxruntime) on ready normalised batches, against the
  session called directly on the same batches and their mirrors.

Images/s count source images (each is embedded twice: plain and mirror).
Also checks that kdzoo's embeddings equal the direct ones.

    python tools/bench_onnx.py [--model F.onnx] [--bin lfw.bin]
        [--limit 2048] [--batch-size 128] [--out bench_onnx.json]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
SHARED = os.path.join(ROOT, '..', 'shared')


def _decode(dataset, limit):
    images = []
    for i in range(min(limit, len(dataset))):
        images.append(dataset[i]['inputs'].numpy())  # 3×H×W uint8 RGB
    return np.stack(images)


def _direct(session, images, batch_size, mean=127.5, std=128.0):
    """Flip-sum embeddings of uint8 images, the session called directly."""
    name = session.get_inputs()[0].name
    out = []
    for start in range(0, len(images), batch_size):
        x = (images[start:start + batch_size].astype(np.float32) - mean) / std
        emb = session.run(None, {name: x})[0]
        emb = emb + session.run(None, {name: np.ascontiguousarray(
            x[..., ::-1])})[0]
        out.append(emb.reshape(len(x), -1))
    return np.concatenate(out)


def _timed(fn, repeats):
    best, result = float('inf'), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.dataset[i]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default=os.path.join(
        SHARED, 'teachers', 'mobilefacenet_sirius.onnx'))
    p.add_argument('--bin', default=os.path.join(
        SHARED, 'data', 'verification', 'lfw.bin'))
    p.add_argument('--limit', type=int, default=2048,
                   help='images of the .bin to embed (default 2048)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--repeats', type=int, default=2,
                   help='timed passes per setting; the fastest counts')
    p.add_argument('--skip-torch', action='store_true',
                   help='leave out the onnx2torch setting (slow)')
    p.add_argument('--out', default='bench_onnx.json')
    args = p.parse_args(argv)

    from kdzoo.backbones.onnx_backbone import onnxruntime_session
    from kdzoo.datasets import InsightFaceBinDataset
    from kdzoo.commands.evaluate import build_pretrained, embed_dataset
    from kdzoo.registry import BACKBONES, TEACHERS
    from kdzoo.teachers.cache import build_teacher_cache
    from kdzoo.utils.environment import cpu_capability, cpu_description

    for path, option in ((args.model, '--model'), (args.bin, '--bin')):
        if not os.path.isfile(path):
            sys.exit(f'bench_onnx: {option} file not found: {path}')
    dataset = InsightFaceBinDataset(ann_file=args.bin)
    n = min(args.limit, len(dataset))
    images = _decode(dataset, n)
    session = onnxruntime_session(args.model)
    rows = {}

    t, direct = _timed(lambda: _direct(session, images, args.batch_size),
                       args.repeats)
    rows['onnxruntime direct'] = t

    subset = _Subset(dataset, n)
    network = build_pretrained(args.model)

    def kdzoo_embed(net):
        out = embed_dataset(net, subset, flip=True, batch_size=args.batch_size)
        return np.stack([o['embedding'].numpy() for o in out])

    t, ours = _timed(lambda: kdzoo_embed(network), args.repeats)
    rows['kdzoo evaluate'] = t
    agreement = float(np.abs(ours - direct).max() / np.abs(direct).max())
    if not args.skip_torch:
        converted = BACKBONES.build(dict(type='OnnxBackbone', file=args.model,
                                         input_size=None, runtime='torch'))
        t, _ = _timed(lambda: kdzoo_embed(converted), 1)
        rows['kdzoo evaluate (onnx2torch)'] = t

    # teacher cache build on ready batches vs the session on the same ones
    h, w = images.shape[-2:]
    teacher = TEACHERS.build(dict(type='OnnxTeacher', file=args.model,
                                  input_size=(h, w)))
    batches = [torch.from_numpy((images[s:s + args.batch_size].astype(
        np.float32) - 127.5) / 128.0)
        for s in range(0, n, args.batch_size)]
    name = session.get_inputs()[0].name

    def direct_batches():
        for x in batches:
            session.run(None, {name: x.numpy()})
            session.run(None, {name: torch.flip(x, dims=[3]).numpy()})

    with tempfile.TemporaryDirectory() as tmp:
        def cache_build():
            build_teacher_cache(
                teacher, ((x, len(x)) for x in batches), n,
                os.path.join(tmp, 'cache.npy'))
        rows['onnxruntime direct (cache batches)'], _ = _timed(
            direct_batches, args.repeats)
        rows['teacher cache build'], _ = _timed(cache_build, args.repeats)

    ref = dict(evaluate='onnxruntime direct',
               cache='onnxruntime direct (cache batches)')
    result = dict(
        model=args.model, bin=args.bin, images=n, batch_size=args.batch_size,
        threads=torch.get_num_threads(), cpu=cpu_description(),
        cpu_capability=cpu_capability(), max_relative_difference=agreement,
        settings={k: dict(seconds=round(v, 3), images_per_s=round(n / v, 1))
                  for k, v in rows.items()},
        ratios={'kdzoo evaluate / direct': round(
                    rows[ref['evaluate']] / rows['kdzoo evaluate'], 3),
                'teacher cache build / direct': round(
                    rows[ref['cache']] / rows['teacher cache build'], 3)})
    print(f'{n} images (+ mirrors) of {os.path.basename(args.bin)}, batch '
          f'{args.batch_size}, {result["threads"]} threads, {result["cpu"]}')
    print(f'{"setting":40s} {"s":>8s} {"images/s":>10s}')
    for k, v in result['settings'].items():
        print(f'{k:40s} {v["seconds"]:8.2f} {v["images_per_s"]:10.1f}')
    for k, v in result['ratios'].items():
        print(f'{k}: {v:.3f}x')
    print(f'kdzoo vs direct embeddings: max |diff| / max |emb| = '
          f'{agreement:.1e}')
    from kdzoo.utils import atomic_write_json
    atomic_write_json(args.out, result)
    print(f'json: {args.out}')


if __name__ == '__main__':
    main()
