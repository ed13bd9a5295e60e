"""SynthFace parameter sampling: identities, ages, nuisances -> render params.

Every random number comes from a generator seeded by ``(seed, uid, stream)``
(numpy ``SeedSequence``), where ``uid`` is an integer identity id. Splits use
disjoint uid ranges (:func:`identity_uids`), so train, test and distractor
identities never coincide, and identity ``k`` of a split is the same person
whatever the number of identities or images asked for. Parameters are drawn
as fixed-length uniform/normal vectors per identity (and per image) and then
mapped to named values with vectorised numpy, so sampling costs about
60 microseconds per identity (all streams).

:func:`resolve` combines identity, age and nuisance into one flat table of
per-image drawing parameters (face units: the image spans [-1, 1]) that
:func:`kdzoo.datasets.synthface.render.render` draws.
"""
from typing import Dict, Mapping, Sequence

import numpy as np

__all__ = [
    'SPLIT_UID_BASE', 'NUISANCE_KEYS', 'identity_uids', 'sample_identities',
    'sample_ages', 'sample_nuisance', 'resolve', 'normalize_difficulty'
]

# uid = base + k. Ranges are disjoint (2**30 identities each).
SPLIT_UID_BASE = {'train': 0, 'test': 1 << 30, 'distractor': 2 << 30}

# Nuisance strengths a ``difficulty`` dict may set (each scales its group).
NUISANCE_KEYS = ('pose', 'lighting', 'expression', 'noise', 'blur',
                 'occlusion', 'background', 'age')

_STREAM_IDENTITY, _STREAM_IMAGES, _STREAM_AGES, _STREAM_NORMAL = 0, 1, 2, 3
_N_ID_U, _N_IMG_U, _N_IMG_N = 96, 48, 16

# Palettes (sRGB in [0, 1]).
_SKIN = np.array([[0.97, 0.83, 0.73], [0.91, 0.72, 0.60], [0.80, 0.59, 0.44],
                  [0.64, 0.44, 0.30], [0.46, 0.30, 0.20], [0.30, 0.19, 0.13]])
_HAIR = np.array([
    [0.07, 0.06, 0.06],  # black
    [0.20, 0.13, 0.08],  # dark brown
    [0.36, 0.23, 0.13],  # brown
    [0.56, 0.41, 0.25],  # light brown
    [0.86, 0.73, 0.46],  # blonde
    [0.52, 0.20, 0.08],  # auburn
    [0.78, 0.42, 0.18],  # ginger
])
# hair-colour probabilities for light and for dark skin (interpolated)
_HAIR_P_LIGHT = np.array([0.12, 0.25, 0.22, 0.14, 0.15, 0.06, 0.06])
_HAIR_P_DARK = np.array([0.70, 0.24, 0.05, 0.01, 0.0, 0.0, 0.0])
_IRIS = np.array([
    [0.22, 0.12, 0.06],  # dark brown
    [0.40, 0.24, 0.12],  # brown
    [0.50, 0.42, 0.20],  # hazel
    [0.30, 0.52, 0.30],  # green
    [0.30, 0.50, 0.78],  # blue
    [0.50, 0.56, 0.62],  # grey
])
_IRIS_P_LIGHT = np.array([0.15, 0.25, 0.15, 0.12, 0.23, 0.10])
_IRIS_P_DARK = np.array([0.75, 0.23, 0.02, 0.0, 0.0, 0.0])
_GREY = np.array([0.80, 0.80, 0.80])
_WHITE_HAIR = np.array([0.93, 0.93, 0.91])

# Hair styles: (volume, length v, fringe depth, side cover, curl) ranges.
HAIR_STYLES = ('short', 'medium', 'long', 'bob', 'buzz', 'curly', 'fringe')
_STYLE_P_M = np.array([0.38, 0.16, 0.04, 0.02, 0.20, 0.12, 0.08])
_STYLE_P_F = np.array([0.05, 0.18, 0.36, 0.16, 0.01, 0.12, 0.12])
#                     vol lo/hi     length lo/hi  fringe lo/hi  cover  curl
_STYLE_TABLE = np.array([
    [0.05, 0.10, -0.15, 0.05, 0.00, 0.06, 0.0, 0.0],   # short
    [0.08, 0.14, 0.25, 0.45, 0.00, 0.15, 1.0, 0.0],    # medium
    [0.07, 0.13, 0.95, 1.30, 0.00, 0.12, 1.0, 0.0],    # long
    [0.09, 0.15, 0.40, 0.60, 0.14, 0.26, 1.0, 0.0],    # bob
    [0.015, 0.03, -0.25, -0.10, 0.00, 0.0, 0.0, 0.0],  # buzz
    [0.18, 0.30, 0.10, 0.60, 0.00, 0.10, 1.0, 1.0],    # curly
    [0.07, 0.12, 0.10, 0.90, 0.16, 0.30, 1.0, 0.0],    # fringe
])
BEARD_STYLES = ('none', 'stubble', 'moustache', 'goatee', 'full', 'mo+goatee')


def identity_uids(split: str, n: int) -> np.ndarray:
    """uids of the first ``n`` identities of ``split`` ('train', 'test' or
    'distractor'); ranges of different splits are disjoint."""
    return SPLIT_UID_BASE[split] + np.arange(int(n), dtype=np.int64)


def normalize_difficulty(difficulty) -> Dict[str, float]:
    """A float (scales every nuisance) or a dict of :data:`NUISANCE_KEYS`
    (missing keys 1.0) -> dict of all keys. Validation is the caller's."""
    if isinstance(difficulty, Mapping):
        out = {k: 1.0 for k in NUISANCE_KEYS}
        out.update({k: float(v) for k, v in difficulty.items()})
        return out
    d = float(difficulty)
    out = {k: d for k in NUISANCE_KEYS}
    out['age'] = 1.0  # age is the signal, not a nuisance: set it explicitly
    return out


def _rng(seed: int, uid: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), int(uid), int(stream)]))


def _lerp(lo, hi, t):
    return lo + (hi - lo) * t


def _choice(u: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Categorical draw per row: ``u`` (n,) uniforms, ``probs`` (n, k)."""
    cdf = np.cumsum(probs / probs.sum(1, keepdims=True), axis=1)
    return np.minimum((u[:, None] > cdf).sum(1), probs.shape[1] - 1)


def sample_identities(seed: int, uids: Sequence[int]) -> Dict[str, np.ndarray]:
    """Fixed facial parameters of each identity (arrays of length n).

    Shape, colouring, feature geometry, marks, and the identity-specific
    ageing traits (``age_rate``, ``grey_onset``, ``bald``, ``wrinkle``,
    ``spots``, ``beard``) that :func:`resolve` applies.
    """
    uids = np.asarray(uids, dtype=np.int64)
    n = len(uids)
    U = np.empty((n, _N_ID_U))
    for i, uid in enumerate(uids):
        U[i] = _rng(seed, uid, _STREAM_IDENTITY).random(_N_ID_U)
    col = iter(range(_N_ID_U))

    def u():
        return U[:, next(col)]

    p = {'uid': uids}
    male = u() < 0.5
    p['male'] = male.astype(np.float64)
    # face shape
    p['face_w'] = _lerp(0.47, 0.60, u())
    p['face_ht'] = _lerp(0.74, 0.84, u())          # crown above centre
    p['face_hb'] = _lerp(0.70, 0.84, u())          # chin below centre
    p['jaw'] = _lerp(0.05, 0.40, u()) + 0.06 * male
    p['cheek'] = _lerp(-0.04, 0.06, u())           # width bulge at cheeks
    # skin: position on the tone curve plus small hue jitter
    tone = u() ** 1.15
    seg = tone * (len(_SKIN) - 1)
    i0 = np.minimum(seg.astype(int), len(_SKIN) - 2)
    f = (seg - i0)[:, None]
    skin = _SKIN[i0] * (1 - f) + _SKIN[i0 + 1] * f
    skin = skin * (1 + 0.05 * (np.stack([u(), u(), u()], 1) - 0.5))
    p['skin_tone'] = tone
    p['skin'] = np.clip(skin, 0, 1)
    p['blush'] = _lerp(0.0, 0.25, u())
    # eyes
    p['eye_sep'] = _lerp(0.185, 0.25, u())
    p['eye_v'] = _lerp(-0.07, 0.02, u())
    p['eye_w'] = _lerp(0.075, 0.105, u())
    p['eye_ratio'] = _lerp(0.42, 0.70, u())
    p['eye_tilt'] = _lerp(-0.12, 0.18, u())
    p['iris_r'] = _lerp(0.50, 0.66, u())
    iris_p = _IRIS_P_LIGHT[None] * (1 - tone[:, None]) + \
        _IRIS_P_DARK[None] * tone[:, None]
    iris = _IRIS[_choice(u(), iris_p)]
    p['iris'] = np.clip(iris * _lerp(0.85, 1.15, u())[:, None], 0, 1)
    # brows
    p['brow_thick'] = _lerp(0.016, 0.040, u()) + 0.007 * male
    p['brow_angle'] = _lerp(-0.10, 0.30, u())
    p['brow_arch'] = _lerp(0.00, 0.045, u())
    p['brow_gap'] = _lerp(0.085, 0.135, u())       # above the eye centre
    p['brow_len'] = _lerp(0.085, 0.125, u())
    # nose and mouth
    p['nose_len'] = _lerp(0.17, 0.30, u())
    p['nose_w'] = _lerp(0.055, 0.10, u())
    p['mouth_v'] = _lerp(0.40, 0.50, u())
    p['mouth_w'] = _lerp(0.13, 0.21, u())
    p['lip_t'] = _lerp(0.018, 0.045, u()) * np.where(male, 0.85, 1.0)
    p['lip_col'] = np.clip(p['skin'] * np.array([1.0, 0.62, 0.62]) *
                           _lerp(0.75, 0.95, u())[:, None] +
                           np.array([0.08, 0.0, 0.02]), 0, 1)
    p['ear'] = _lerp(0.85, 1.2, u())
    # hair
    dk = np.sqrt(tone)[:, None]
    hair_p = _HAIR_P_LIGHT[None] * (1 - dk) + _HAIR_P_DARK[None] * dk
    hair = _HAIR[_choice(u(), hair_p)]
    p['hair'] = np.clip(hair * _lerp(0.85, 1.15, u())[:, None], 0, 1)
    p['child_light'] = _lerp(0.0, 0.45, u()) * (p['hair'].mean(1) > 0.12)
    style = _choice(u(), np.where(male[:, None], _STYLE_P_M[None],
                                  _STYLE_P_F[None]))
    p['hair_style'] = style.astype(np.float64)
    st = _STYLE_TABLE[style]
    p['hair_vol'] = _lerp(st[:, 0], st[:, 1], u())
    p['hair_len'] = _lerp(st[:, 2], st[:, 3], u())
    p['fringe'] = _lerp(st[:, 4], st[:, 5], u())
    p['hair_cover'] = st[:, 6]
    p['curl'] = st[:, 7]
    p['hairline'] = _lerp(-0.50, -0.38, u())
    p['part'] = _lerp(-0.35, 0.35, u())
    p['fringe_slope'] = np.where(u() < 0.5, -1.0, 1.0) * _lerp(0.8, 3.0, u())
    # identity marks: up to 3 moles (position in face units, radius)
    nm = np.floor(u() * 3.6).astype(int)          # 0..3
    for k in range(3):
        on = nm > k
        p[f'mole{k}_u'] = _lerp(-0.40, 0.40, u())
        p[f'mole{k}_v'] = _lerp(-0.35, 0.60, u())
        p[f'mole{k}_r'] = np.where(on, _lerp(0.010, 0.022, u()), 0.0)
    p['freckles'] = np.where(u() < 0.15, _lerp(0.3, 0.8, u()), 0.0) * \
        (1 - tone)
    p['texture_key'] = np.floor(u() * 2**24)  # exact in float32
    # ageing traits
    p['age_rate'] = _lerp(0.70, 1.40, u())
    p['grey_onset'] = _lerp(32.0, 66.0, u())
    p['grey_span'] = _lerp(20.0, 40.0, u())
    p['bald'] = np.where(male, u() ** 1.5, 0.12 * u())
    p['wrinkle'] = _lerp(0.6, 1.3, u())
    p['spots'] = _lerp(0.0, 1.0, u())
    beard = _choice(u(), np.array([[0.35, 0.15, 0.12, 0.1, 0.18, 0.1]]
                                  * n))
    p['beard_style'] = np.where(male, beard, 0).astype(np.float64)
    p['beard_dens'] = _lerp(0.55, 1.0, u())
    p['age_spot_u'] = _lerp(-0.35, 0.35, u())
    p['age_spot_v'] = _lerp(-0.45, 0.1, u())
    p['grey_max'] = _lerp(0.45, 0.95, u())
    return p


def sample_ages(seed: int, uids: Sequence[int], n_images: int,
                age_range=(5, 80)) -> np.ndarray:
    """(n, n_images) int ages, stratified over ``age_range`` and sorted: image
    j of an identity falls in the j-th of ``n_images`` equal age bands."""
    lo, hi = float(age_range[0]), float(age_range[1])
    out = np.empty((len(uids), n_images))
    for i, uid in enumerate(uids):
        out[i] = _rng(seed, uid, _STREAM_AGES).random(n_images)
    j = np.arange(n_images)[None]
    ages = lo + (j + out) / n_images * (hi - lo)
    return np.clip(np.round(ages), lo, hi).astype(np.int64)


def sample_nuisance(seed: int, uids: Sequence[int], n_images: int
                    ) -> Dict[str, np.ndarray]:
    """Raw per-image nuisance draws, (n, n_images) arrays ``U`` (uniform) and
    ``N`` (normal); image j of an identity keeps its draws whatever
    ``n_images`` is. :func:`resolve` scales them by ``difficulty``."""
    U = np.empty((len(uids), n_images, _N_IMG_U))
    N = np.empty((len(uids), n_images, _N_IMG_N))
    for i, uid in enumerate(uids):
        U[i] = _rng(seed, uid, _STREAM_IMAGES).random((n_images, _N_IMG_U))
        N[i] = np.clip(_rng(seed, uid, _STREAM_NORMAL).standard_normal(
            (n_images, _N_IMG_N)), -3, 3)
    return dict(U=U, N=N)


def _ramp(x, lo, hi):
    """0 below ``lo``, 1 above ``hi``, smoothstep between."""
    t = np.clip((np.asarray(x, np.float64) - lo) / (hi - lo), 0, 1)
    return t * t * (3 - 2 * t)


def resolve(ident: Dict[str, np.ndarray], id_index: np.ndarray,
            ages: np.ndarray, U: np.ndarray, N: np.ndarray,
            difficulty) -> Dict[str, np.ndarray]:
    """Per-image drawing parameters (dict of float32 (n,) / (n, 3) arrays).

    Args:
        ident: :func:`sample_identities` output.
        id_index: (n,) row of ``ident`` for each image.
        ages: (n,) ages in years.
        U, N: (n, k) per-image uniform / normal draws.
        difficulty: float or dict (see :func:`normalize_difficulty`).
    """
    d = normalize_difficulty(difficulty)
    I = {k: v[id_index] for k, v in ident.items()}  # noqa: E741
    age = np.asarray(ages, np.float64)
    n = len(age)
    ucol, ncol = iter(range(U.shape[1])), iter(range(N.shape[1]))

    def u():
        return U[:, next(ucol)]

    def nrm():
        return N[:, next(ncol)]

    A = d['age']
    # --- age model -------------------------------------------------------
    # growth g: 0 = age 4 (child proportions), 1 = adult (20+)
    g = np.maximum(1 - A * (1 - _ramp(age, 4, 20)), -0.5)
    # biological age: identity-specific ageing rate after 30
    bio = 30 + np.maximum(age - 30, 0) * I['age_rate'] * A
    old = _ramp(bio, 30, 85)
    r = {}
    r['face_w'] = I['face_w'] * (1 + 0.05 * (1 - g)) * (1 + 0.03 * old)
    r['face_ht'] = I['face_ht'] * (1 + 0.04 * (1 - g))
    r['face_hb'] = I['face_hb'] * (0.76 + 0.24 * g) * (1 + 0.04 * old)
    r['jaw'] = I['jaw'] * (0.15 + 0.85 * g) - 0.10 * (1 - g)
    r['jowl'] = 0.22 * old * I['wrinkle']
    r['cheek'] = I['cheek'] + 0.05 * (1 - g)
    lower = r['face_hb'] / I['face_hb']            # lower-face scale
    r['eye_w'] = I['eye_w'] * (1 + 0.40 * (1 - g)) * (1 - 0.06 * old)
    r['eye_h'] = r['eye_w'] * I['eye_ratio'] * (1 + 0.12 * (1 - g)) * \
        (1 - 0.30 * old)
    r['eye_sep'] = I['eye_sep'] * (0.93 + 0.07 * g)
    r['eye_v'] = I['eye_v'] + 0.10 * (1 - g)
    r['eye_tilt'] = I['eye_tilt'] - 0.10 * old
    r['iris'] = I['iris']
    r['iris_r'] = np.minimum(I['iris_r'] * (1 + 0.15 * (1 - g)), 0.8)
    r['brow_thick'] = I['brow_thick'] * (0.6 + 0.4 * g) * (1 + 0.25 * old)
    r['brow_gap'] = I['brow_gap'] * (0.9 + 0.1 * g) - 0.015 * old
    r['brow_len'] = I['brow_len'] * (0.85 + 0.15 * g)
    r['brow_angle'] = I['brow_angle'] - 0.12 * old
    r['brow_arch'] = I['brow_arch']
    r['nose_len'] = I['nose_len'] * (0.62 + 0.38 * g) * (1 + 0.15 * old)
    r['nose_w'] = I['nose_w'] * (0.78 + 0.22 * g) * (1 + 0.15 * old)
    r['mouth_v'] = I['mouth_v'] * lower + 0.04 * old
    r['mouth_w'] = I['mouth_w'] * (0.78 + 0.22 * g)
    r['lip_t'] = I['lip_t'] * (1.05 - 0.05 * g) * (1 - 0.55 * old)
    r['ear'] = I['ear'] * (0.9 + 0.1 * g) * (1 + 0.25 * old)
    # skin: children pinker, elderly sallower and blotchier
    skin = I['skin'] * (1 + 0.04 * (1 - g))[:, None]
    sallow = np.array([0.95, 0.93, 0.85])
    skin = skin * (1 - 0.25 * old[:, None]) + skin * sallow * \
        0.25 * old[:, None]
    r['skin'] = np.clip(skin, 0, 1)
    r['blush'] = np.clip(I['blush'] + 0.35 * (1 - g), 0, 0.6)
    r['lip_col'] = I['lip_col'] * (1 - 0.3 * old[:, None]) + \
        skin * 0.3 * old[:, None]
    # wrinkles and age marks (0..1 strengths)
    w = I['wrinkle'] * A
    r['wr_forehead'] = np.clip(w * _ramp(bio, 30, 70), 0, 1)
    r['wr_crow'] = np.clip(w * _ramp(bio, 38, 72), 0, 1)
    r['wr_naso'] = np.clip(w * _ramp(bio, 28, 70), 0, 1)
    r['wr_bags'] = np.clip(w * _ramp(bio, 42, 80), 0, 1)
    r['age_spots'] = I['spots'] * _ramp(bio, 52, 80) * min(A, 1.5)
    r['freckles'] = I['freckles'] * (1 - 0.5 * old)
    # hair: lighter in childhood for some, greying from an identity onset
    grey = _ramp(age, I['grey_onset'],
                 I['grey_onset'] + I['grey_span'] / max(A, 1e-3))
    grey = np.where(A > 0, grey, 0.0)
    hair = I['hair'] * (1 - I['child_light'] * (1 - g))[:, None] + \
        np.array([0.9, 0.78, 0.5]) * (I['child_light'] * (1 - g))[:, None]
    grey_col = _GREY * (1 - grey[:, None]) + _WHITE_HAIR * grey[:, None]
    gg = (grey * I['grey_max'])[:, None]           # salt and pepper
    r['hair'] = np.clip(hair * (1 - gg) + grey_col * gg, 0, 1)
    bg = np.clip(grey - 0.15, 0, 1)[:, None]        # brows grey later
    r['brow_col'] = np.clip(hair * 0.75 * (1 - bg) + grey_col * 0.85 * bg,
                            0, 1)
    recede = I['bald'] * _ramp(age, 20, 65) * A
    r['hairline'] = I['hairline'] - 0.30 * recede
    r['temple'] = 0.20 * recede
    r['crown'] = np.clip(I['bald'] - 0.35, 0, 1) * 1.5 * _ramp(age, 30, 70) \
        * A
    r['hair_vol'] = I['hair_vol'] * (1 - 0.5 * r['crown'])
    r['hair_len'] = I['hair_len']
    r['fringe'] = I['fringe']
    r['hair_cover'] = I['hair_cover']
    r['curl'] = I['curl']
    r['part'] = I['part']
    r['fringe_slope'] = I['fringe_slope']
    beard_on = _ramp(age, 13, 21) * I['beard_dens'] * (A > 0)
    style = I['beard_style']
    r['stubble'] = beard_on * np.where(style == 1, 1.0, 0.0)
    r['moustache'] = beard_on * np.isin(style, (2, 5))
    r['goatee'] = beard_on * np.isin(style, (3, 5))
    r['beard'] = beard_on * (style == 4)
    for k in range(3):
        for s in ('u', 'v', 'r'):
            r[f'mole{k}_{s}'] = I[f'mole{k}_{s}']
    r['age_spot_u'] = I['age_spot_u']
    r['age_spot_v'] = I['age_spot_v']
    r['texture_key'] = I['texture_key']
    # --- nuisance --------------------------------------------------------
    dp, dl, de = d['pose'], d['lighting'], d['expression']
    dn, db, do, dg = d['noise'], d['blur'], d['occlusion'], d['background']
    r['roll'] = np.deg2rad(7.0) * dp * nrm()
    r['yaw'] = np.clip(0.30 * dp * nrm(), -0.8, 0.8)
    r['scale'] = np.exp(0.05 * dp * nrm())
    r['tx'] = 0.035 * dp * nrm()
    r['ty'] = 0.035 * dp * nrm()
    theta = 2 * np.pi * u()
    strength = 0.45 * dl * u()
    r['light_x'] = strength * np.cos(theta)
    r['light_y'] = strength * np.sin(theta)
    r['bright'] = 0.07 * dl * nrm()
    r['contrast'] = np.exp(0.12 * dl * nrm())
    r['cast'] = 0.035 * dl * np.stack([nrm(), nrm(), nrm()], 1)
    bgc = np.stack([u(), u(), u()], 1)
    grey_bg = bgc.mean(1, keepdims=True)
    base_bg = np.array([0.40, 0.55, 0.74])
    sat = np.clip(0.6 * dg, 0, 1)
    r['bg'] = np.clip(base_bg * (1 - min(dg, 1)) + min(dg, 1) *
                      (grey_bg + sat * (bgc - grey_bg)), 0, 1)
    r['bg_grad'] = 0.25 * dg * (u() - 0.5)
    shirt = np.stack([u(), u(), u()], 1)
    r['shirt'] = 0.15 + 0.7 * shirt * _lerp(0.3, 1.0, u())[:, None]
    r['smile'] = np.clip(0.35 + 0.45 * de * nrm(), -0.6, 1.0) * \
        (de > 0) + 0.35 * (de <= 0)
    r['mouth_open'] = np.where(u() < min(1, 0.25 * de), 0.4 + 0.6 * u(),
                               0.0)
    r['brow_raise'] = np.clip(0.5 * de * nrm(), 0, 1) * \
        (u() < min(1, 0.5 * de))
    r['squint'] = np.clip(0.5 * de * nrm(), 0, 0.7) * \
        (u() < min(1, 0.4 * de))
    r['noise'] = 0.035 * dn * u()
    r['blur'] = np.where(u() < min(1, 0.5 * db), np.clip(db, 0, 2) * u(),
                         0.0)
    occ = u() < min(1, 0.15 * do)
    kind = 1 + np.floor(u() * 3)
    r['occ'] = np.where(occ, kind, 0.0)              # 1 glasses 2 mask 3 box
    r['occ_x'] = 1.4 * (u() - 0.5)
    r['occ_y'] = 1.4 * (u() - 0.5)
    r['occ_w'] = 0.2 + 0.25 * u()
    r['occ_h'] = 0.2 + 0.25 * u()
    r['occ_col'] = np.stack([u(), u(), u()], 1)
    r['noise_key'] = np.floor(u() * 2**24)
    out = {}
    for k, v in r.items():
        v = np.asarray(v, np.float64)
        out[k] = np.broadcast_to(v, (n, ) + v.shape[1:]).astype(np.float32)
    return out
