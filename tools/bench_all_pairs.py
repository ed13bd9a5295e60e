"""Benchmark: all-pairs verification scoring and its identity bootstrap.

Scores every pair of a synthetic labelled set (SynthFaceAge-like: N images,
12 per identity, ages 5-80, 128-d embeddings) with
``kdzoo.evaluation.all_pairs.score_all_pairs``, then runs the identity
bootstrap, and measures wall time and peak traced memory (numpy's
allocations, tracemalloc). Side by side, a plain reference: the whole N x N
similarity matrix in float32, masked and sorted (what one writes without
blocks), for the same set; it must give the same TARs.

    python tools/bench_all_pairs.py [--images 20000] [--replicates 1000]
        [--no-reference] [--out bench_all_pairs.json]

Prints a table and writes the JSON atomically.
"""
import argparse
import os
import platform
import sys
import time
import tracemalloc

import numpy as np


def make_set(n_images: int, per_id: int = 12, dim: int = 128, seed=0):
    rng = np.random.default_rng(seed)
    num_ids = n_images // per_id
    labels = np.repeat(np.arange(num_ids), per_id)
    ages = np.tile(np.round(np.linspace(5, 80, per_id)), num_ids)
    emb = rng.normal(size=(num_ids, dim))[labels] + 1.2 * rng.normal(
        size=(len(labels), dim))
    return emb.astype(np.float32), labels, ages


def measure(fn):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, wall, peak


def reference(emb, labels, ages, gap, fars):
    from kdzoo.evaluation.verification import tar_at_far
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    iu = np.triu_indices(len(x), 1)
    s = sim[iu]
    del sim
    same = labels[iu[0]] == labels[iu[1]]
    if gap is not None:
        ok = np.abs(ages[iu[0]] - ages[iu[1]]) >= gap
        s, same = s[ok], same[ok]
    return tar_at_far(s, same, fars, min_false_accepts=10)


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    from kdzoo.evaluation.all_pairs import score_all_pairs
    from kdzoo.evaluation.bootstrap import (bootstrap_tar, identity_weights,
                                            percentile_interval)
    from kdzoo.utils import atomic_write_json
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=20000)
    p.add_argument('--replicates', type=int, default=1000)
    p.add_argument('--no-reference', action='store_true')
    p.add_argument('--out', default='bench_all_pairs.json')
    args = p.parse_args(argv)
    emb, labels, ages = make_set(args.images)
    fars = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    rows = []
    for proto, gap in (('standard', None), ('cross_age', 30)):
        res, t_score, m_score = measure(lambda: score_all_pairs(
            emb, labels, None if gap is None else ages, gap))
        tars = res.tar_at_far(fars)
        w = identity_weights(res.num_identities, args.replicates)
        reps, t_boot, m_boot = measure(lambda: bootstrap_tar(res, w, fars))
        row = dict(protocol=proto, images=len(emb),
                   positives=res.num_positives,
                   negatives=res.num_negatives,
                   score_s=round(t_score, 2),
                   score_peak_mib=round(m_score / 2 ** 20, 1),
                   bootstrap_s=round(t_boot, 2),
                   bootstrap_peak_mib=round(m_boot / 2 ** 20, 1),
                   tar={f'{f:g}': tars[f] for f in tars},
                   ci95={f'{f:g}': percentile_interval(reps[f])
                         for f in reps})
        if not args.no_reference:
            ref, t_ref, m_ref = measure(lambda: reference(
                emb, labels, ages, gap, fars))
            row.update(reference_s=round(t_ref, 2),
                       reference_peak_mib=round(m_ref / 2 ** 20, 1),
                       same_tar=ref == tars)
        rows.append(row)
    print(f'{"protocol":<10} {"images":>7} {"negatives":>12} {"score s":>8} '
          f'{"peak MiB":>9} {"boot s":>7} {"ref s":>7} {"ref MiB":>8} '
          f'{"same TAR":>8}')
    for r in rows:
        print(f'{r["protocol"]:<10} {r["images"]:>7} {r["negatives"]:>12} '
              f'{r["score_s"]:>8} {r["score_peak_mib"]:>9} '
              f'{r["bootstrap_s"]:>7} {r.get("reference_s", "–")!s:>7} '
              f'{r.get("reference_peak_mib", "–")!s:>8} '
              f'{r.get("same_tar", "–")!s:>8}')
    import torch
    out = dict(rows=rows, replicates=args.replicates,
               cpu=platform.processor() or platform.machine(),
               cores=os.cpu_count(), numpy=np.__version__,
               torch=torch.__version__)
    atomic_write_json(args.out, out)
    print(f'json: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
