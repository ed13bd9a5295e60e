"""Evaluation speed of the student: ``FaceDistiller.embed`` (image + mirror,
eval mode) with the backbone as trained and with the BatchNorm-folded,
channels-last copy kdzoo evaluates with (kdzoo/distillers/inference.py),
plus each half alone; images/s (flip-sum) and the embeddings' largest
difference. Prints a table, writes JSON.

    python tools/bench_eval.py [--image-size 112] [--batch-size 256]
        [--width 0.5] [--repeats 3] [--out bench_eval.json]
"""
import argparse
import copy
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--image-size', type=int, default=112)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--width', type=float, default=0.5)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--out', default='bench_eval.json')
    args = p.parse_args(argv)
    import kdzoo  # noqa: F401  (registers everything)
    from kdzoo.distillers import FaceDistiller
    from kdzoo.distillers.inference import folded_copy
    from kdzoo.utils.environment import cpu_capability, cpu_description
    size = args.image_size
    torch.manual_seed(0)
    model = FaceDistiller(student=dict(backbone=dict(
        type='MobileFaceNet', width_mult=args.width, embedding_size=128,
        input_size=(size, size))))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model.train()
        model.student.backbone(torch.randn(64, 3, size, size))
    model.eval()
    x = torch.randn(args.batch_size, 3, size, size)
    plain = model.student.backbone
    channels_last = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    folded = folded_copy(plain).to(memory_format=torch.contiguous_format)
    cl = x.contiguous(memory_format=torch.channels_last)

    def flip_sum(net, inputs):
        return net(inputs) + net(torch.flip(inputs, dims=[3]))

    def embed(fuse):
        model.test_cfg['fuse_bn'] = fuse
        return model.embed(x)

    settings = {
        'as trained (fuse_bn=False)': lambda: embed(False),
        'channels-last only': lambda: flip_sum(channels_last, cl),
        'BatchNorm folded only': lambda: flip_sum(folded, x),
        'kdzoo: folded + channels-last': lambda: embed(True),
    }
    rows = {}
    with torch.no_grad():
        ref = embed(False)
        for name, fn in settings.items():
            out = fn()  # warm-up (and the copy's build)
            best = float('inf')
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            rows[name] = dict(
                images_per_s=round(args.batch_size / best, 1),
                max_relative_difference=float(
                    (out - ref).abs().max() / ref.abs().max()))
    record = dict(cpu=cpu_description(), cpu_capability=cpu_capability(),
                  threads=torch.get_num_threads(), image_size=size,
                  batch_size=args.batch_size, width=args.width, rows=rows)
    print(f'{record["cpu"]} ({record["cpu_capability"]}, '
          f'{record["threads"]} threads), MobileFaceNet width {args.width}, '
          f'{size} px, batch {args.batch_size}, flip-sum')
    for name, row in rows.items():
        print(f'{name:32s} {row["images_per_s"]:8.1f} images/s   '
              f'max |diff|/scale {row["max_relative_difference"]:.1e}')
    from kdzoo.utils import atomic_write_json
    atomic_write_json(args.out, record)
    print(f'json: {args.out}')


if __name__ == '__main__':
    main()
