"""IJB-B / IJB-C 1:1 template verification (the insightface protocol).

Follows insightface's ``recognition/arcface_torch/eval_ijbc.py`` on its
released layout (``<root>`` below; ``<t>`` is ``ijbb`` or ``ijbc``)::

    <root>/meta/<t>_face_tid_mid.txt        image  template_id  media_id
    <root>/meta/<t>_name_5pts_score.txt     image  x1 y1 ... x5 y5  faceness
    <root>/meta/<t>_template_pair_label.txt template_a  template_b  label
    <root>/loose_crop/<image>

The two per-image files list the same images in the same order. Pipeline:

1. align each image to 112x112 with its 5 landmarks: least-squares
   similarity transform onto the ArcFace 5-point template, bilinear warp
   with black outside the image (as ``cv2.warpAffine``), RGB;
2. embed the image and, by default, its mirror, and sum the two;
3. keep the feature norm (insightface's ``use_norm_score``) and multiply by
   the detector's faceness score (``use_detector_score``), both defaults;
4. media pooling: mean of a template's features within each media id (the
   frames of one video, or one still image); template pooling: sum of its
   media features, then L2 normalisation (sum and mean give the same
   direction);
5. cosine similarity of each template pair; TAR at FAR 1e-6 ... 1e-1 with
   kdzoo's threshold rule (:func:`kdzoo.evaluation.verification.tar_at_far`:
   accept scores strictly above the (k+1)-th largest negative score,
   k = floor(FAR * negatives), so the achieved FAR never exceeds the target)
   instead of insightface's nearest ROC point, reported where k >= 10 (as
   every TAR@FAR kdzoo reports); ROC AUC and a TAR-vs-FAR curve for plots.

Pure functions (meta parsing, alignment, pooling, scoring) are separate from
:func:`evaluate_ijb`, which reads images, runs the model and writes results.
"""
import math
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, \
    Tuple, Union

import numpy as np
import torch

from kdzoo.utils import (ConfigError, DataError, atomic_write_bytes,
                         atomic_write_json, did_you_mean)

from .all_pairs import MIN_FALSE_ACCEPTS
from .verification import far_key, l2_normalize, roc_auc, tar_at_far

__all__ = [
    'IJB_TARGETS', 'IJB_FARS', 'ARCFACE_TEMPLATE', 'IJBMeta', 'ijb_meta_paths',
    'read_ijb_meta', 'estimate_similarity', 'align_face', 'image_features',
    'template_features', 'pair_scores', 'ijb_tar_table', 'ijb_roc',
    'embed_ijb_images', 'evaluate_ijb'
]

IJB_TARGETS = ('ijbb', 'ijbc')
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
ALIGNED_SIZE = 112
# ArcFace's 5-point template for 112x112 crops (eyes, nose tip, mouth
# corners; x shifted by 8 from the 96x112 original), pixel-index coordinates.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014],
                             [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]])
_PAIR_CHUNK = 1 << 14  # template pairs scored per step (bounded memory)


class IJBMeta(NamedTuple):
    """The protocol of one IJB target; per-image arrays share one order."""
    names: List[str]  # (N,) image file names under loose_crop/
    landmarks: np.ndarray  # (N, 5, 2) float64, pixel coordinates
    faceness: np.ndarray  # (N,) float64 detector scores
    templates: np.ndarray  # (N,) int64 template id of each image
    medias: np.ndarray  # (N,) int64 media id of each image
    pairs: np.ndarray  # (P, 2) int64 template ids
    labels: np.ndarray  # (P,) bool, True for same-subject pairs
    image_list: str = ''  # the file listing the images (for error messages)
    image_lines: Optional[np.ndarray] = None  # (N,) line of each image there


# ------------------------------------------------------------------ meta I/O
def _check_target(target: str) -> str:
    t = str(target).lower()
    if t not in IJB_TARGETS:
        raise ConfigError(f'IJB target must be one of {list(IJB_TARGETS)}, '
                          f'got {target!r}.' + did_you_mean(t, IJB_TARGETS))
    return t


def ijb_meta_paths(root: str, target: str) -> Dict[str, str]:
    """Paths of the three meta files of ``target`` under ``root/meta``."""
    t = _check_target(target)
    meta = os.path.join(root, 'meta')
    return dict(tid_mid=os.path.join(meta, f'{t}_face_tid_mid.txt'),
                landmarks=os.path.join(meta, f'{t}_name_5pts_score.txt'),
                pairs=os.path.join(meta, f'{t}_template_pair_label.txt'))


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise DataError(f'{path}: IJB meta file not found (expected '
                        '<root>/meta/<target>_face_tid_mid.txt, '
                        '<target>_name_5pts_score.txt and '
                        '<target>_template_pair_label.txt)')
    with open(path, 'rb') as f:
        return f.read()


def _lines(path: str, data: bytes):
    """(line number, tokens) of the non-blank lines."""
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text ({e})') from None
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if tokens:
            yield number, tokens


def _bad_line(path, number, tokens, expected) -> DataError:
    return DataError(f'{path}, line {number}: expected "{expected}", got '
                     f'{" ".join(tokens)!r}')


def _read_tid_mid(path: str):
    names, templates, medias, numbers = [], [], [], []
    for number, tokens in _lines(path, _read_bytes(path)):
        try:
            name, tid, mid = tokens
            templates.append(int(tid))
            medias.append(int(mid))
        except ValueError:
            raise _bad_line(path, number, tokens,
                            '<image> <template id> <media id>') from None
        names.append(name)
        numbers.append(number)
    return names, np.array(templates, np.int64), np.array(medias,
                                                          np.int64), numbers


def _read_5pts(path: str):
    names, values, numbers = [], [], []
    expected = '<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <faceness score>'
    for number, tokens in _lines(path, _read_bytes(path)):
        try:
            if len(tokens) != 12:
                raise ValueError
            row = [float(v) for v in tokens[1:]]
            if not all(math.isfinite(v) for v in row):
                raise ValueError
        except ValueError:
            raise _bad_line(path, number, tokens, expected) from None
        names.append(tokens[0])
        values.append(row)
        numbers.append(number)
    values = np.array(values, np.float64).reshape(-1, 11)
    return names, values[:, :10].reshape(-1, 5, 2), values[:, 10], numbers


def _read_pairs(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(P, 3)`` int64 rows. IJB-C has 15.7M pairs, so numpy parses the
    whole file at once; the line-by-line parser runs only to explain (or
    tolerate, e.g. blank lines) what the fast path could not read."""
    data = _read_bytes(path)
    n_lines = data.count(b'\n') + (0 if data.endswith(b'\n') else 1)
    try:
        rows = np.fromstring(data, dtype=np.int64, sep=' ')
        ok = rows.size == 3 * n_lines
    except ValueError:  # a token that is not an integer
        ok = False
    if ok:
        rows = rows.reshape(-1, 3)
        ok = np.isin(rows[:, 2], (0, 1)).all()
    if ok:
        return rows, np.arange(1, len(rows) + 1)
    rows, numbers = [], []
    for number, tokens in _lines(path, data):
        try:
            a, b, label = (int(v) for v in tokens)
            if label not in (0, 1):
                raise ValueError
        except ValueError:
            raise _bad_line(path, number, tokens,
                            '<template a> <template b> <label 0 or 1>') \
                from None
        rows.append((a, b, label))
        numbers.append(number)
    return np.array(rows, np.int64).reshape(-1, 3), np.array(numbers)


def read_ijb_meta(root: str, target: str = 'ijbc') -> IJBMeta:
    """Parse and cross-check the three meta files of an IJB target.

    Raises :class:`DataError` naming the file and line for a missing file,
    a malformed line, image lists that disagree, a pair whose template
    has no image, or a pair list without both genuine and impostor pairs.
    """
    paths = ijb_meta_paths(root, target)
    names, templates, medias, tid_lines = _read_tid_mid(paths['tid_mid'])
    names5, landmarks, faceness, lmk_lines = _read_5pts(paths['landmarks'])
    if not names:
        raise DataError(f'{paths["tid_mid"]}: no images listed')
    if len(names) != len(names5):
        raise DataError(
            f'{paths["landmarks"]} lists {len(names5)} images but '
            f'{paths["tid_mid"]} lists {len(names)}; both must list the same '
            'images in the same order')
    for i, (a, b) in enumerate(zip(names, names5)):
        if a != b:
            raise DataError(
                f'{paths["landmarks"]}, line {lmk_lines[i]}: image {b!r} but '
                f'{paths["tid_mid"]}, line {tid_lines[i]} has {a!r}; both '
                'files must list the same images in the same order')
    rows, pair_lines = _read_pairs(paths['pairs'])
    if not len(rows):
        raise DataError(f'{paths["pairs"]}: no template pairs listed')
    known = np.unique(templates)
    missing = ~np.isin(rows[:, :2], known)
    if missing.any():
        i, j = np.argwhere(missing)[0]
        raise DataError(
            f'{paths["pairs"]}, line {pair_lines[i]}: template {rows[i, j]} '
            f'has no image in {paths["tid_mid"]} ({int(missing.any(1).sum())}'
            ' pairs affected)')
    n_pos = int(rows[:, 2].sum())
    if n_pos in (0, len(rows)):  # checked before hours of embedding
        raise DataError(f'{paths["pairs"]}: needs both genuine (1) and '
                        f'impostor (0) pairs, got {n_pos} genuine of '
                        f'{len(rows)}')
    return IJBMeta(names, landmarks, faceness, templates, medias,
                   rows[:, :2].copy(), rows[:, 2].astype(bool),
                   paths['landmarks'], np.array(lmk_lines))


# ----------------------------------------------------------------- alignment
def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale,
    translation; no reflection) mapping ``src`` points onto ``dst``.

    Solves ``[x', y'] = [a x - b y + tx, b x + a y + ty]`` for
    ``(a, b, tx, ty)`` by linear least squares, which has the same minimiser
    as Umeyama's (1991) closed form. Returns the 2x3 matrix ``[[a, -b, tx],
    [b, a, ty]]``.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if len(src) != len(dst) or len(src) < 2:
        raise ValueError(f'need >= 2 matching points, got {len(src)} and '
                         f'{len(dst)}')
    if np.ptp(src, axis=0).max() <= 1e-9:
        raise ValueError('source points coincide; no similarity fits them')
    x, y = src[:, 0], src[:, 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    A = np.concatenate([np.stack([x, -y, one, zero], 1),
                        np.stack([y, x, zero, one], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(A, np.r_[dst[:, 0], dst[:, 1]],
                                         rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def _warp_affine(img: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """Bilinear warp of an HxWxC uint8 image by ``M`` (input pixel ->
    output pixel, integer coordinates at pixel centres), zeros outside the
    input: the semantics of ``cv2.warpAffine(..., borderValue=0)``."""
    h, w = img.shape[:2]
    inv = np.linalg.inv(np.vstack([M, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    # one ring of zeros (padded index = pixel index + 1); a neighbour
    # outside the image is clipped onto it
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)))
    px, py = x0.astype(np.int64) + 1, y0.astype(np.int64) + 1
    xi, xj = np.clip(px, 0, w + 1), np.clip(px + 1, 0, w + 1)
    yi, yj = np.clip(py, 0, h + 1), np.clip(py + 1, 0, h + 1)

    def at(yy, xx):
        return padded[yy, xx].astype(np.float64)

    out = ((1 - fy) * ((1 - fx) * at(yi, xi) + fx * at(yi, xj)) +
           fy * ((1 - fx) * at(yj, xi) + fx * at(yj, xj)))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(img, landmarks, size: int = ALIGNED_SIZE) -> np.ndarray:
    """Warp ``img`` (HxW or HxWx3 uint8 array, or PIL image) so that its 5
    ``landmarks`` (left eye, right eye, nose, left and right mouth corner,
    pixel coordinates) land on :data:`ARCFACE_TEMPLATE` (scaled to
    ``size``). Returns a ``size x size x C`` uint8 array."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ValueError(f'align_face expects an HxW(xC) uint8 image, got '
                         f'{img.dtype} {img.shape}')
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != (5, 2):
        raise ValueError(f'align_face expects 5 (x, y) landmarks, got '
                         f'{landmarks.shape[0]}')
    M = estimate_similarity(landmarks,
                            ARCFACE_TEMPLATE * (size / ALIGNED_SIZE))
    return _warp_affine(img, M, size)


# ------------------------------------------------------------------- pooling
def image_features(features, faceness=None,
                   use_norm_score: bool = True) -> np.ndarray:
    """Per-image features entering the pooling (insightface's test modes).

    ``use_norm_score=True`` keeps each feature's norm as an implicit
    quality weight (N1); False L2-normalises first. ``faceness`` (N,)
    multiplies each feature (D1); None skips it.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f'features must be (N, D), got {f.shape}')
    if not use_norm_score:
        f = l2_normalize(f)
    if faceness is not None:
        s = np.asarray(faceness, dtype=np.float64).reshape(-1)
        if len(s) != len(f):
            raise ValueError(f'{len(s)} faceness scores for {len(f)} images')
        f = f * s[:, None]
    return f


def template_features(img_feats, templates, medias
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Media-then-template pooling.

    Within each template, images sharing a media id are averaged; the media
    features are summed and the sum L2-normalised (an all-zero template
    stays zero). Returns ``(template_ids, features)``: sorted unique ids
    (T,) and (T, D) float64 rows in that order.
    """
    f = np.asarray(img_feats)
    templates = np.asarray(templates, dtype=np.int64).reshape(-1)
    medias = np.asarray(medias, dtype=np.int64).reshape(-1)
    if f.ndim != 2 or not len(f) == len(templates) == len(medias) or \
            not len(f):
        raise ValueError(f'need (N, D) features with N > 0 template and media'
                         f' ids, got {f.shape}, {templates.shape} and '
                         f'{medias.shape}')
    order = np.lexsort((medias, templates))
    t, m = templates[order], medias[order]
    new_media = np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])]
    starts = np.flatnonzero(new_media)
    counts = np.diff(np.r_[starts, len(t)])
    media = np.add.reduceat(f[order], starts, axis=0,
                            dtype=np.float64) / counts[:, None]
    media_template = t[starts]
    first = np.flatnonzero(np.r_[True, media_template[1:] !=
                                 media_template[:-1]])
    pooled = np.add.reduceat(media, first, axis=0)
    return media_template[first], l2_normalize(pooled)


def pair_scores(template_ids, template_feats, pairs) -> np.ndarray:
    """Cosine similarity of each ``(template a, template b)`` row of
    ``pairs``, given L2-normalised ``template_feats`` whose rows follow the
    sorted ``template_ids``. Returns (P,) float64."""
    ids = np.asarray(template_ids, dtype=np.int64)
    feats = np.asarray(template_feats, dtype=np.float64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if np.any(ids[1:] <= ids[:-1]) or len(ids) != len(feats):
        raise ValueError('template_ids must be sorted, unique and match '
                         'template_feats (as template_features returns)')
    rows = np.clip(np.searchsorted(ids, pairs), 0, len(ids) - 1)
    unknown = ids[rows] != pairs
    if unknown.any():
        i, j = np.argwhere(unknown)[0]
        raise ValueError(f'pair {i} references template {pairs[i, j]}, '
                         'which has no features')
    scores = np.empty(len(pairs))
    for s in range(0, len(pairs), _PAIR_CHUNK):
        a, b = rows[s:s + _PAIR_CHUNK].T
        scores[s:s + _PAIR_CHUNK] = np.einsum('ij,ij->i', feats[a], feats[b])
    return scores


# ------------------------------------------------------------------- metrics
def ijb_tar_table(scores, labels, fars: Sequence[float] = IJB_FARS,
                  min_false_accepts: int = MIN_FALSE_ACCEPTS
                  ) -> Dict[str, Optional[float]]:
    """``{far_key(far): TAR}`` by :func:`verification.tar_at_far`; None
    where ``far * negatives < min_false_accepts`` (kdzoo's rule for every
    TAR@FAR it reports: at least 10 impostor pairs above the threshold, so
    no TAR rests on a handful of scores; IJB-C's 15.6M negatives support
    1e-6, IJB-B's 8.0M stop at 1e-5)."""
    tars = tar_at_far(scores, labels, fars, min_false_accepts)
    return {far_key(f): tars.get(float(f)) for f in fars}


def ijb_roc(scores, labels, points_per_decade: int = 10,
            min_far: float = 1e-6,
            min_false_accepts: int = MIN_FALSE_ACCEPTS
            ) -> Dict[str, List[float]]:
    """TAR on a log-spaced FAR grid from ``min_far`` to 1 (the points the
    negative count supports), same rule as :func:`ijb_tar_table`: a compact
    ROC for plots (IJB-C has 15.7M pairs; the full curve is not stored)."""
    decades = round(-math.log10(min_far))
    grid = np.logspace(-decades, 0, decades * points_per_decade + 1)
    tars = tar_at_far(scores, labels, grid, min_false_accepts)
    return dict(far=list(tars), tar=list(tars.values()))


# ---------------------------------------------------------------- embedding
class _AlignedFaces(torch.utils.data.Dataset):
    """Loose crops of the meta's images, aligned; item = HxWx3 uint8."""

    def __init__(self, image_dir: str, meta: IJBMeta):
        self.image_dir, self.meta = image_dir, meta

    def _where(self, i: int) -> str:
        m = self.meta
        if m.image_lines is None:
            return f'image {i + 1} of the meta files'
        return f'{m.image_list}, line {m.image_lines[i]}'

    def __len__(self):
        return len(self.meta.names)

    def __getitem__(self, i):
        from PIL import Image
        path = os.path.join(self.image_dir, self.meta.names[i])
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert('RGB'))
        except FileNotFoundError:
            raise DataError(f'{path}: image not found (listed in '
                            f'{self._where(i)})') from None
        except OSError as e:
            raise DataError(f'{path}: cannot decode image ({e}; listed in '
                            f'{self._where(i)})') from None
        return torch.from_numpy(align_face(img, self.meta.landmarks[i]))


@torch.no_grad()
def embed_ijb_images(embed, root: str, meta: IJBMeta, flip: bool = True,
                     batch_size: int = 128, mean: float = 127.5,
                     std: float = 128.0, device=None, num_workers: int = 0,
                     progress: Optional[str] = None) -> np.ndarray:
    """(N, D) float32 features of the meta's images, in its order.

    ``embed`` maps a float (B, 3, 112, 112) RGB batch normalised as
    ``(pixel - mean) / std`` to (B, D). A ``torch.nn.Module`` is put in eval
    mode on ``device`` (default CUDA if available); any other callable gets
    CPU tensors unless ``device`` is given. ``flip`` adds the embedding of
    the mirrored image.
    """
    from kdzoo.utils.console import ProgressBar
    if isinstance(embed, torch.nn.Module):
        device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        embed = embed.to(device).eval()
    device = device or 'cpu'
    image_dir = os.path.join(root, 'loose_crop')
    if not os.path.isdir(image_dir):
        raise DataError(f'{image_dir}: IJB image folder not found (expected '
                        '<root>/loose_crop/ beside <root>/meta/)')
    loader = torch.utils.data.DataLoader(
        _AlignedFaces(image_dir, meta), batch_size=batch_size,
        shuffle=False, num_workers=num_workers)
    bar = ProgressBar(progress, len(loader))
    feats = []
    for batch in loader:
        x = (batch.to(device).permute(0, 3, 1, 2).float() - mean) / std
        emb = _as_tensor(embed(x))
        if flip:
            emb = emb + _as_tensor(embed(torch.flip(x, dims=[3])))
        feats.append(emb.float().cpu().numpy())
        bar.advance()
    bar.stop()
    return np.concatenate(feats)


def _as_tensor(y) -> torch.Tensor:
    y = torch.as_tensor(y)
    return y.reshape(len(y), -1)


# -------------------------------------------------------------------- driver
def evaluate_ijb(model_or_embed_fn: Union[torch.nn.Module, Callable],
                 root: str, target: str = 'ijbc', flip: bool = True,
                 use_detector_score: bool = True, use_norm_score: bool = True,
                 batch_size: int = 128, out: Optional[str] = None,
                 mean: float = 127.5, std: float = 128.0, device=None,
                 num_workers: int = 0,
                 fars: Sequence[float] = IJB_FARS) -> dict:
    """Run the IJB-B/C 1:1 protocol; print a table; optionally write files.

    Returns (and writes to ``out`` as ``{target: entry}``, atomically) the
    entry ``{"tar_at_far": {"1e-6": TAR or null, ...}, "roc_auc",
    "roc": {"far": [...], "tar": [...]}, "images", "templates", "pairs",
    "positive_pairs", "negative_pairs", "settings": {...}}``. With ``out``,
    the per-pair scores and labels also go to ``<out stem>.<target>.npz``
    (``scores`` float32, ``labels`` uint8, ``pairs`` int64) for custom plots.
    """
    target = _check_target(target)
    if batch_size < 1:
        raise ConfigError(f'batch_size must be >= 1, got {batch_size}')
    meta = read_ijb_meta(root, target)
    size = getattr(model_or_embed_fn, 'input_size', None)
    if size is not None:
        size = tuple(int(s) for s in np.broadcast_to(size, 2))
        if size != (ALIGNED_SIZE, ALIGNED_SIZE):
            raise ConfigError(f'the model takes {size} inputs, but IJB faces '
                              f'are aligned to {ALIGNED_SIZE}x{ALIGNED_SIZE};'
                              ' use a 112x112 model')
    raw = embed_ijb_images(model_or_embed_fn, root, meta, flip, batch_size,
                           mean, std, device, num_workers,
                           progress=f'embed {target}')
    if not np.isfinite(raw).all():
        raise DataError(f'{root}: the model returned NaN/inf features for '
                        f'{int((~np.isfinite(raw).all(1)).sum())} images')
    feats = image_features(raw, meta.faceness if use_detector_score else None,
                           use_norm_score)
    ids, tfeats = template_features(feats, meta.templates, meta.medias)
    scores = pair_scores(ids, tfeats, meta.pairs)
    n_pos = int(meta.labels.sum())
    entry = dict(
        tar_at_far=ijb_tar_table(scores, meta.labels, fars),
        roc_auc=roc_auc(scores, meta.labels),
        images=len(meta.names), templates=len(ids), pairs=len(scores),
        positive_pairs=n_pos, negative_pairs=len(scores) - n_pos,
        settings=dict(flip=flip, use_detector_score=use_detector_score,
                      use_norm_score=use_norm_score, mean=mean, std=std,
                      aligned_size=ALIGNED_SIZE,
                      min_false_accepts=MIN_FALSE_ACCEPTS),
        roc=ijb_roc(scores, meta.labels))
    _print(target, entry)
    if out:
        scores_file = f'{os.path.splitext(out)[0]}.{target}.npz'
        entry['scores_file'] = os.path.basename(scores_file)
        _save_npz(scores_file, scores=scores.astype(np.float32),
                  labels=meta.labels.astype(np.uint8), pairs=meta.pairs)
        atomic_write_json(out, {target: entry})
        print(f'results: {out} (pair scores: {scores_file})')
    return entry


def _save_npz(path: str, **arrays) -> None:
    import io
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _print(target: str, entry: dict) -> None:
    from rich.table import Table
    from kdzoo.utils.console import console
    s = entry['settings']
    mode = ', '.join([('flip-sum' if s['flip'] else 'no flip'),
                      ('faceness-weighted' if s['use_detector_score'] else
                       'no faceness'),
                      ('norm kept' if s['use_norm_score'] else
                       'normalised images')])
    table = Table(title=f'{target.upper()} 1:1 verification ({mode}; '
                  f'{entry["templates"]} templates, {entry["pairs"]} pairs)')
    for h in ['set'] + [f'TAR@FAR={f}' for f in entry['tar_at_far']] + \
            ['ROC AUC']:
        table.add_column(h, justify='right')
    table.add_row(target, *[('–' if v is None else f'{100 * v:.2f}')
                            for v in entry['tar_at_far'].values()],
                  f'{entry["roc_auc"]:.4f}')
    console().print(table)
    print('TAR in percent; – = too few impostor pairs for that FAR')
