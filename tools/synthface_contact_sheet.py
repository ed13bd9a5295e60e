"""Write a PNG contact sheet of SynthFaceAge faces for a person to inspect.

Top block: one row per identity, columns at increasing age, clean frontal
images (difficulty 0) so that only age changes along a row. Bottom block:
the same identities at one age with different nuisance draws (pose,
lighting, expression, occlusion, blur, noise) at the given difficulty.

    python tools/synthface_contact_sheet.py --colors 256 \
        --out docs/synthface_contact_sheet.png
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from kdzoo.datasets.synthface.generate import render_faces  # noqa: E402
from kdzoo.datasets.synthface.identities import identity_uids  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='docs/synthface_contact_sheet.png')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--split', default='train',
                   choices=['train', 'test', 'distractor'])
    p.add_argument('--identities', type=int, default=8)
    p.add_argument('--first', type=int, default=0,
                   help='index of the first identity shown')
    p.add_argument('--ages', default='5,10,15,20,30,40,50,60,70,80')
    p.add_argument('--size', type=int, default=64, help='image size')
    p.add_argument('--nuisance-rows', type=int, default=4,
                   help='identities repeated with nuisances')
    p.add_argument('--nuisance-age', type=int, default=35)
    p.add_argument('--difficulty', type=float, default=1.0)
    p.add_argument('--colors', type=int, default=0,
                   help='quantise the PNG to this many colours (smaller '
                   'file); 0 keeps full RGB')
    return p.parse_args(argv)


def grid(blocks, pad=2, gap=10, label_h=12, labels=()):
    """Stack image blocks (rows, cols, H, W, 3) vertically with a gap."""
    h, w = blocks[0].shape[2:4]
    cols = max(b.shape[1] for b in blocks)
    rows = sum(b.shape[0] for b in blocks)
    H = label_h + rows * (h + pad) + gap * (len(blocks) - 1) + pad
    W = cols * (w + pad) + pad
    sheet = np.full((H, W, 3), 255, np.uint8)
    y = label_h + pad
    for b in blocks:
        for r in range(b.shape[0]):
            for c in range(b.shape[1]):
                x = pad + c * (w + pad)
                sheet[y:y + h, x:x + w] = b[r, c]
            y += h + pad
        y += gap
    im = Image.fromarray(sheet)
    draw = ImageDraw.Draw(im)
    for c, text in enumerate(labels):
        draw.text((pad + c * (w + pad) + 2, 0), text, fill=(0, 0, 0))
    return im


def main(argv=None):
    a = parse_args(argv)
    ages = [int(x) for x in a.ages.split(',')]
    uids = identity_uids(a.split, a.first + a.identities)[a.first:]
    block1 = render_faces(a.seed, uids, ages, a.size, difficulty=0.0)
    nuis_uids = uids[:a.nuisance_rows]
    k = len(ages)
    blocks = [block1]
    if len(nuis_uids):
        blocks.append(render_faces(a.seed, nuis_uids, [a.nuisance_age] * k,
                                   a.size, difficulty=a.difficulty,
                                   image_index=np.arange(k)))
    im = grid(blocks, labels=[str(x) for x in ages])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    if a.colors:
        im = im.quantize(a.colors, method=Image.Quantize.MEDIANCUT,
                         dither=Image.Dither.NONE)
    im.save(a.out, optimize=True)
    print(f'wrote {a.out} ({os.path.getsize(a.out) // 1024} KB): '
          f'{len(uids)} identities x ages {ages}, then {len(nuis_uids)} '
          f'at age {a.nuisance_age} with nuisances (difficulty '
          f'{a.difficulty})')


if __name__ == '__main__':
    main()
