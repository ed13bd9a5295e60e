"""Array-level SynthFace generation (no dataset class, no cache).

:func:`render_faces` draws chosen identities at chosen ages (used by the
contact-sheet tool and tests); :func:`generate_split` produces a whole split
as the dataset stores it.
"""
from typing import Dict, Optional, Sequence

import numpy as np

from .identities import (identity_uids, resolve, sample_ages,
                         sample_identities, sample_nuisance)
from .render import render

__all__ = ['render_faces', 'generate_split']


def render_faces(seed: int, uids: Sequence[int], ages, image_size: int = 112,
                 difficulty=1.0, image_index: Optional[Sequence[int]] = None,
                 num_threads: Optional[int] = None) -> np.ndarray:
    """Images of identities ``uids`` at ``ages``.

    Args:
        uids: identity uids (see :func:`~.identities.identity_uids`).
        ages: (len(uids), k) years, or (k,) applied to every identity.
        difficulty: nuisance strength (float or dict); 0 gives clean frontal
            images.
        image_index: (k,) which per-image nuisance draw of the identity each
            column uses (default 0..k-1).

    Returns:
        uint8 array (len(uids), k, H, W, 3).
    """
    uids = np.asarray(uids, dtype=np.int64)
    ages = np.asarray(ages, dtype=np.float64)
    if ages.ndim == 1:
        ages = np.broadcast_to(ages, (len(uids), len(ages)))
    k = ages.shape[1]
    jj = np.arange(k) if image_index is None else np.asarray(image_index)
    ident = sample_identities(seed, uids)
    raw = sample_nuisance(seed, uids, int(jj.max()) + 1)
    U = raw['U'][:, jj].reshape(len(uids) * k, -1)
    N = raw['N'][:, jj].reshape(len(uids) * k, -1)
    P = resolve(ident, np.repeat(np.arange(len(uids)), k), ages.reshape(-1),
                U, N, difficulty)
    imgs = render(P, image_size, num_threads=num_threads)
    return imgs.reshape(len(uids), k, *imgs.shape[1:])


def split_layout(seed: int, split: str, num_identities: int,
                 images_per_identity: int, age_range, num_distractors: int = 0,
                 images_per_distractor: int = 1) -> Dict[str, np.ndarray]:
    """Per-image uid, identity label, age and image index of a split
    (cheap: no rendering). Test identities come first, then distractors."""
    uids = identity_uids(split, num_identities)
    ages = sample_ages(seed, uids, images_per_identity, age_range)
    n_img = images_per_identity
    out = dict(
        uid=np.repeat(uids, n_img),
        label=np.repeat(np.arange(num_identities, dtype=np.int64), n_img),
        age=ages.reshape(-1),
        image_index=np.tile(np.arange(n_img, dtype=np.int64), num_identities),
        distractor=np.zeros(num_identities * n_img, bool))
    if num_distractors:
        duids = identity_uids('distractor', num_distractors)
        dages = sample_ages(seed, duids, images_per_distractor, age_range)
        m = images_per_distractor
        extra = dict(
            uid=np.repeat(duids, m),
            label=num_identities + np.repeat(
                np.arange(num_distractors, dtype=np.int64), m),
            age=dages.reshape(-1),
            image_index=np.tile(np.arange(m, dtype=np.int64),
                                num_distractors),
            distractor=np.ones(num_distractors * m, bool))
        out = {k: np.concatenate([out[k], extra[k]]) for k in out}
    return out


def generate_split(layout: Dict[str, np.ndarray], seed: int, image_size: int,
                   difficulty=1.0, num_threads: Optional[int] = None,
                   out: Optional[np.ndarray] = None) -> np.ndarray:
    """Render every image of ``layout`` (:func:`split_layout`) -> uint8
    (n, H, W, 3), written into ``out`` if given."""
    uid = layout['uid']
    uniq, inv = np.unique(uid, return_inverse=True)
    ident = sample_identities(seed, uniq)
    n_per = np.bincount(inv)
    raw = sample_nuisance(seed, uniq, int(n_per.max()))
    U = raw['U'][inv, layout['image_index']]
    N = raw['N'][inv, layout['image_index']]
    P = resolve(ident, inv, layout['age'], U, N, difficulty)
    return render(P, image_size, num_threads=num_threads, out=out)
