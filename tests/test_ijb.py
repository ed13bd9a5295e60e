"""IJB-B/C 1:1 template verification (kdzoo.evaluation.ijb).

The fixture is a miniature IJB-C written by the tests: 4 subjects x 3
templates, each template 1-3 media of 1-3 loose crops (PNG, random sizes)
whose 5 landmarks are a known similarity transform of the ArcFace template.
Results are checked against hand-computed values and against a plain-loop
re-implementation of insightface's eval_ijbc.py steps.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import kdzoo  # noqa: F401
from kdzoo.cli import main
from kdzoo.evaluation import (align_face, estimate_similarity, evaluate_ijb,
                              ijb_roc, ijb_tar_table, image_features,
                              pair_scores, read_ijb_meta, template_features)
from kdzoo.evaluation.ijb import ARCFACE_TEMPLATE
from kdzoo.registry import BACKBONES
from kdzoo.utils import ConfigError, DataError


# ------------------------------------------------------------------ helpers
def similarity(scale, degrees, tx, ty):
    """2x3 matrix of x -> scale * R(degrees) x + t."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def apply(M, pts):
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ M[:, :2].T + M[:, 2]


def invert(M):
    return np.linalg.inv(np.vstack([M, [0, 0, 1]]))[:2]


def warp_loop(img, M, size=112):
    """cv2.warpAffine(img, M, (size, size), borderValue=0) semantics, one
    pixel at a time: bilinear, zero outside, round to nearest."""
    img = img.astype(np.float64)
    h, w, c = img.shape
    inv = invert(M)
    out = np.zeros((size, size, c), np.uint8)

    def px(y, x):
        return img[y, x] if 0 <= y < h and 0 <= x < w else np.zeros(c)

    for oy in range(size):
        for ox in range(size):
            sx, sy = apply(inv, [[ox, oy]])[0]
            x0, y0 = math.floor(sx), math.floor(sy)
            ax, ay = sx - x0, sy - y0
            v = ((1 - ay) * ((1 - ax) * px(y0, x0) + ax * px(y0, x0 + 1)) +
                 ay * ((1 - ax) * px(y0 + 1, x0) + ax * px(y0 + 1, x0 + 1)))
            out[oy, ox] = np.clip(np.floor(v + 0.5), 0, 255)
    return out


def write_ijb(root, target='ijbc', subjects=4, templates_per_subject=3,
              seed=0):
    """A miniature IJB layout; returns what was written, per image."""
    rng = np.random.default_rng(seed)
    meta_dir, crops = root / 'meta', root / 'loose_crop'
    meta_dir.mkdir(parents=True)
    crops.mkdir()
    # one smooth face pattern per subject (survives the crop's resampling)
    bases = [np.asarray(Image.fromarray(rng.integers(
        0, 256, (7, 7, 3), dtype=np.uint8)).resize((112, 112),
                                                   Image.BILINEAR))
             for _ in range(subjects)]
    rows, pairs = [], []
    template_subject = {}
    media_id = 500
    for subj in range(subjects):
        for k in range(templates_per_subject):
            tid = 10 * subj + 3 * k + 1  # sparse, non-contiguous ids
            template_subject[tid] = subj
            for _ in range(rng.integers(1, 4)):  # media
                media_id += 1
                for _ in range(rng.integers(1, 3)):  # frames
                    name = f'{len(rows) + 1}.png'
                    h, w = rng.integers(60, 90, 2)
                    M = similarity(rng.uniform(0.45, 0.6),
                                   rng.uniform(-15, 15), rng.uniform(2, 10),
                                   rng.uniform(2, 10))
                    face = bases[subj] * 0.7 + rng.integers(
                        0, 256, (112, 112, 3)) * 0.3
                    # the subject's face, placed in the crop by M (so its
                    # landmarks are M(template)) on a noise background
                    canvas = rng.integers(0, 256, (h, w, 3)).astype(
                        np.float64)
                    inv = invert(M)
                    ys, xs = np.mgrid[0:h, 0:w]
                    src = apply(inv, np.stack([xs.ravel(), ys.ravel()], 1))
                    sx = np.rint(src[:, 0]).astype(int)
                    sy = np.rint(src[:, 1]).astype(int)
                    ok = (sx >= 0) & (sx < 112) & (sy >= 0) & (sy < 112)
                    flat = canvas.reshape(-1, 3)
                    flat[ok] = face[sy[ok], sx[ok]]
                    Image.fromarray(canvas.astype(np.uint8)).save(crops / name)
                    rows.append(dict(name=name, tid=tid, mid=media_id,
                                     lmk=apply(M, ARCFACE_TEMPLATE),
                                     score=float(rng.uniform(0.3, 2.0))))
    order = rng.permutation(len(rows))  # images of a template not adjacent
    rows = [rows[i] for i in order]
    with open(meta_dir / f'{target}_face_tid_mid.txt', 'w') as f:
        for r in rows:
            f.write(f'{r["name"]} {r["tid"]} {r["mid"]}\n')
    with open(meta_dir / f'{target}_name_5pts_score.txt', 'w') as f:
        for r in rows:
            coords = ' '.join(f'{v:.6f}' for v in r['lmk'].ravel())
            f.write(f'{r["name"]} {coords} {r["score"]:.6f}\n')
    tids = sorted(template_subject)
    with open(meta_dir / f'{target}_template_pair_label.txt', 'w') as f:
        for i, a in enumerate(tids):
            for b in tids[i + 1:]:
                label = int(template_subject[a] == template_subject[b])
                f.write(f'{a} {b} {label}\n')
                pairs.append((a, b, label))
    return rows, np.array(pairs)


class LinearEmbed(nn.Module):
    """A fixed random linear map of the whole 3x112x112 input."""
    input_size = (112, 112)

    def __init__(self, dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(
            torch.randn(dim, 3 * 112 * 112, generator=g) / 100)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def reference_ijb(root, net, target='ijbc', flip=True, faceness=True,
                  mean=127.5, std=128.0):
    """insightface's eval_ijbc.py steps as plain loops: per-image features,
    media means, template sums, cosine per pair, TAR at FAR."""
    meta = root / 'meta'
    rows = [ln.split() for ln in open(meta / f'{target}_face_tid_mid.txt')]
    lmks = [ln.split() for ln in open(meta / f'{target}_name_5pts_score.txt')]
    crops = []
    for (name, _, _), lm in zip(rows, lmks):
        img = np.asarray(Image.open(root / 'loose_crop' / name).convert('RGB'))
        crops.append(align_face(img, np.array(lm[1:11], float).reshape(5, 2)))
    x = (torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() -
         mean) / std
    with torch.no_grad():  # one batch: single-image CPU convs are slow
        emb = net(x).double().numpy()
        mirrored = net(torch.flip(x, dims=[3])).double().numpy()
    feats = []
    for i, lm in enumerate(lmks):
        f = emb[i] + mirrored[i] if flip else emb[i]
        feats.append(f * (float(lm[11]) if faceness else 1.0))
    by_template = {}
    for (_, tid, mid), f in zip(rows, feats):
        by_template.setdefault(int(tid), {}).setdefault(int(mid), []).append(f)
    template = {}
    for tid, medias in by_template.items():
        total = sum(np.mean(fs, axis=0) for fs in medias.values())
        template[tid] = total / np.linalg.norm(total)
    pairs = [ln.split() for ln in open(meta /
                                       f'{target}_template_pair_label.txt')]
    scores = np.array([float(template[int(a)] @ template[int(b)])
                       for a, b, _ in pairs])
    labels = np.array([int(lab) for _, _, lab in pairs])
    return scores, labels


def reference_tar(scores, labels, far, min_false_accepts=10):
    """Accept score > the (k+1)-th largest impostor score,
    k = floor(far * impostors); None when k < min_false_accepts (kdzoo
    reports a TAR only where 10 impostors lie above its threshold)."""
    neg = sorted((s for s, lab in zip(scores, labels) if lab == 0),
                 reverse=True)
    pos = [s for s, lab in zip(scores, labels) if lab == 1]
    k = math.floor(far * len(neg) + 1e-9)
    if k < max(1, min_false_accepts):
        return None
    thr = neg[k] if k < len(neg) else -math.inf
    return sum(s > thr for s in pos) / len(pos)


@pytest.fixture
def ijb(tmp_path):
    root = tmp_path / 'IJB_release' / 'IJBC'
    rows, pairs = write_ijb(root)
    return root, rows, pairs


# ---------------------------------------------------------------- alignment
def test_estimate_similarity_inverts_a_known_transform():
    S = similarity(0.55, 17.0, 12.5, -3.25)
    landmarks = apply(S, ARCFACE_TEMPLATE)
    M = estimate_similarity(landmarks, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(M, invert(S), atol=1e-9)
    np.testing.assert_allclose(apply(M, landmarks), ARCFACE_TEMPLATE,
                               atol=1e-9)
    with pytest.raises(ValueError, match='coincide'):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE)


def test_estimate_similarity_is_the_least_squares_fit_umeyama_gives():
    rng = np.random.default_rng(1)
    src = apply(similarity(2.0, -30, 40, 20), ARCFACE_TEMPLATE) + \
        rng.normal(0, 3, (5, 2))
    dst = ARCFACE_TEMPLATE
    # Umeyama (1991): SVD of the cross-covariance, reflection excluded
    mu_s, mu_d = src.mean(0), dst.mean(0)
    cov = (dst - mu_d).T @ (src - mu_s) / len(src)
    U, D, Vt = np.linalg.svd(cov)
    d = np.diag([1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt))])
    R = U @ d @ Vt
    scale = np.trace(np.diag(D) @ d) / np.mean(np.sum((src - mu_s)**2, 1))
    ref = np.c_[scale * R, mu_d - scale * R @ mu_s]
    M = estimate_similarity(src, dst)
    np.testing.assert_allclose(M, ref, atol=1e-9)
    # and it is a minimum: perturbing the parameters raises the error
    err = np.sum((apply(M, src) - dst)**2)
    for delta in np.eye(4) * 1e-3:
        a, b = M[0, 0] + delta[0], M[1, 0] + delta[1]
        P = np.array([[a, -b, M[0, 2] + delta[2]], [b, a, M[1, 2] + delta[3]]])
        assert np.sum((apply(P, src) - dst)**2) > err


def test_align_face_identity_and_integer_shift():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align_face(img, ARCFACE_TEMPLATE), img)
    # landmarks 5 px right and 7 px down: out[y, x] = img[y + 7, x + 5],
    # black where that leaves the image
    out = align_face(img, ARCFACE_TEMPLATE + [5, 7])
    np.testing.assert_array_equal(out[:105, :107], img[7:, 5:])
    assert not out[105:].any() and not out[:, 107:].any()


def test_align_face_matches_a_per_pixel_bilinear_warp():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    S = similarity(0.4, 25.0, 20.0, 3.0)  # face partly outside the crop
    out = align_face(img, apply(S, ARCFACE_TEMPLATE))
    ref = warp_loop(img, invert(S))
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert (ref == 0).all(-1).mean() > 0.05  # the border case is exercised
    np.testing.assert_array_equal(out, ref)
    # grey images come out with one channel
    assert align_face(img[..., 0], apply(S, ARCFACE_TEMPLATE)).shape == \
        (112, 112, 1)


def test_align_face_puts_a_drawn_dot_where_the_transform_sends_it():
    img = np.zeros((80, 90, 3), np.uint8)
    dot = np.array([40.0, 30.0])  # (x, y) in the crop
    img[29:32, 39:42] = 255  # 3x3 square centred on the dot
    S = similarity(0.5, -20.0, 10.0, 5.0)  # template -> crop
    out = align_face(img, apply(S, ARCFACE_TEMPLATE))[..., 0].astype(float)
    expected = apply(invert(S), [dot])[0]  # crop -> template frame
    ys, xs = np.mgrid[0:112, 0:112]
    centroid = np.array([(xs * out).sum(), (ys * out).sum()]) / out.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.25)
    assert out[int(round(expected[1])), int(round(expected[0]))] == 255
    assert out.sum() > 0 and (out > 0).sum() < 80  # a blob, not a smear


# ------------------------------------------------------------------ pooling
def test_template_features_media_then_template_pooling():
    f = np.array([[1.0, 0.0, 0.0],   # template 7, media 5 (A)
                  [0.0, 2.0, 0.0],   # template 3, media 5
                  [3.0, 0.0, 4.0],   # template 7, media 5 (A)
                  [0.0, 0.0, 1.0],   # template 7, media 9 (B)
                  [0.0, 4.0, 3.0],   # template 3, media 5
                  [0.0, 0.0, 0.0]])  # template 3, media 5
    templates = [7, 3, 7, 7, 3, 3]
    medias = [5, 5, 5, 9, 5, 5]  # media id 5 in both templates: not merged
    ids, feats = template_features(f, templates, medias)
    np.testing.assert_array_equal(ids, [3, 7])

    def normalise(v):
        return v / np.linalg.norm(v)

    # template 7: normalise(mean(A) + B) = normalise([2, 0, 2] + [0, 0, 1])
    np.testing.assert_allclose(feats[1], normalise(np.array([2.0, 0, 3.0])))
    # template 3: one media of three frames -> its normalised mean
    np.testing.assert_allclose(feats[0], normalise(np.array([0, 6.0, 3.0])))
    # not a plain mean over images, which would weight A twice
    assert not np.allclose(feats[1], normalise(f[[0, 2, 3]].mean(0)))
    # an all-zero template stays zero (no NaN)
    _, z = template_features(np.zeros((2, 3)), [1, 1], [1, 2])
    assert np.array_equal(z, np.zeros((1, 3)))
    with pytest.raises(ValueError, match='features'):
        template_features(f, templates[:-1], medias)


def test_image_features_faceness_and_norm_modes():
    f = np.array([[3.0, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(image_features(f, [2.0, 0.5]),
                               [[6.0, 8.0], [0.5, 0.0]])
    np.testing.assert_allclose(
        image_features(f, [2.0, 0.5], use_norm_score=False),
        [[1.2, 1.6], [0.5, 0.0]])
    np.testing.assert_allclose(image_features(f), f)
    # in a two-media template the weights tilt the template feature
    g = np.array([[1.0, 0.0], [0.0, 1.0]])
    _, t = template_features(image_features(g, [3.0, 1.0]), [1, 1], [1, 2])
    np.testing.assert_allclose(t[0], np.array([3.0, 1.0]) / math.sqrt(10))
    with pytest.raises(ValueError, match='faceness'):
        image_features(f, [1.0])


def test_pair_scores_are_template_cosines():
    ids = np.array([2, 5, 9])
    feats = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    scores = pair_scores(ids, feats, [[2, 5], [5, 9], [9, 2], [5, 5]])
    np.testing.assert_allclose(scores, [0.6, -0.8, 0.0, 1.0])
    with pytest.raises(ValueError, match='template 4'):
        pair_scores(ids, feats, [[2, 4]])
    with pytest.raises(ValueError, match='sorted'):
        pair_scores(ids[::-1], feats, [[2, 5]])


# ------------------------------------------------------------------ metrics
def test_tar_table_and_roc_on_hand_made_scores():
    pos = [0.9, 0.8, 0.7, 0.3]
    neg = [0.85, 0.6, 0.5, 0.4, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3]
    scores = np.array(pos + neg)
    labels = np.array([1] * 4 + [0] * 10)
    table = ijb_tar_table(scores, labels, (1e-2, 1e-1, 2e-1, 1.0),
                          min_false_accepts=1)
    # FAR 0.1: k = 1 impostor accepted, threshold 0.6 -> 0.9, 0.8, 0.7
    # FAR 0.2: threshold 0.5 -> same three; FAR 1: everything accepted
    assert table == {'1e-2': None, '1e-1': 0.75, '2e-1': 0.75, '1e0': 1.0}
    # kdzoo's default asks for 10 false accepts: of 10 impostors, FAR 1 only
    assert ijb_tar_table(scores, labels, (1e-1, 2e-1, 1.0)) == {
        '1e-1': None, '2e-1': None, '1e0': 1.0}
    roc = ijb_roc(scores, labels, min_false_accepts=1)
    # 10 impostors measure FAR >= 0.1 only: the grid's last decade
    np.testing.assert_allclose(roc['far'], np.logspace(-1, 0, 11))
    assert roc['tar'] == [reference_tar(scores, labels, f, 1)
                          for f in roc['far']]
    assert roc['tar'][0] == 0.75 and roc['tar'][-1] == 1.0
    assert ijb_roc(scores, labels) == dict(far=[1.0], tar=[1.0])


# --------------------------------------------------------------- meta files
def test_read_ijb_meta_parses_the_fixture(ijb):
    root, rows, pairs = ijb
    meta = read_ijb_meta(str(root), 'IJBC')  # target case-insensitive
    assert meta.names == [r['name'] for r in rows]
    np.testing.assert_array_equal(meta.templates, [r['tid'] for r in rows])
    np.testing.assert_array_equal(meta.medias, [r['mid'] for r in rows])
    np.testing.assert_allclose(meta.landmarks,
                               np.stack([r['lmk'] for r in rows]), atol=1e-6)
    np.testing.assert_allclose(meta.faceness, [r['score'] for r in rows],
                               atol=1e-6)
    np.testing.assert_array_equal(meta.pairs, pairs[:, :2])
    np.testing.assert_array_equal(meta.labels, pairs[:, 2].astype(bool))
    assert meta.image_list.endswith('ijbc_name_5pts_score.txt')


def _edit(path, line, text):
    lines = open(path).read().splitlines()
    lines[line - 1] = text
    open(path, 'w').write('\n'.join(lines) + '\n')


def test_read_ijb_meta_errors_name_file_and_line(ijb):
    root = ijb[0]
    meta = root / 'meta'
    tid = meta / 'ijbc_face_tid_mid.txt'
    pts = meta / 'ijbc_name_5pts_score.txt'
    pairs = meta / 'ijbc_template_pair_label.txt'
    originals = {p: p.read_text() for p in (tid, pts, pairs)}

    def check(path, line, text, *match):
        _edit(path, line, text)
        with pytest.raises(DataError) as e:
            read_ijb_meta(str(root), 'ijbc')
        for m in match:
            assert m in str(e.value), (m, str(e.value))
        path.write_text(originals[path])

    check(tid, 3, '3.png 4', str(tid), 'line 3', '<media id>')
    check(tid, 2, 'x.png one 2', str(tid), 'line 2')
    name = originals[pts].splitlines()[4].split()[0]
    check(pts, 5, f'{name} 1 2 3 4 5 6 7 8 9 0.5', str(pts), 'line 5',
          'faceness')
    check(pts, 5, f'{name} 1 2 3 4 5 6 7 8 9 10 nan', 'line 5')
    check(pts, 2, 'other.png 1 2 3 4 5 6 7 8 9 10 0.9', str(pts), 'line 2',
          "'other.png'", 'same order')
    check(pairs, 4, '1 4 2', str(pairs), 'line 4', '<label 0 or 1>')
    check(pairs, 6, '1 4.5 0', str(pairs), 'line 6')
    check(pairs, 2, '1 999 0', str(pairs), 'line 2', 'template 999')

    # only genuine pairs: refused here, before any image is embedded
    only = [' '.join(line.split()[:2]) + ' 1'
            for line in originals[pairs].splitlines() if line.strip()]
    pairs.write_text('\n'.join(only) + '\n')
    with pytest.raises(DataError, match=r'needs both genuine \(1\) and '
                       rf'impostor \(0\) pairs, got {len(only)} genuine'):
        read_ijb_meta(str(root), 'ijbc')
    pairs.write_text(originals[pairs])

    # a shorter landmark file
    pts.write_text(''.join(originals[pts].splitlines(True)[:-1]))
    with pytest.raises(DataError, match='lists .* images but'):
        read_ijb_meta(str(root), 'ijbc')
    pts.write_text(originals[pts])

    # blank lines are tolerated (slow path) and change nothing
    ref = read_ijb_meta(str(root), 'ijbc')
    pairs.write_text('\n' + originals[pairs].replace('\n', '\n\n', 3))
    again = read_ijb_meta(str(root), 'ijbc')
    np.testing.assert_array_equal(again.pairs, ref.pairs)
    np.testing.assert_array_equal(again.labels, ref.labels)

    pairs.unlink()
    with pytest.raises(DataError, match='ijbc_template_pair_label.txt: IJB '
                       'meta file not found'):
        read_ijb_meta(str(root), 'ijbc')
    with pytest.raises(DataError, match='ijbb_face_tid_mid.txt: IJB meta'):
        read_ijb_meta(str(root), 'ijbb')
    with pytest.raises(ConfigError, match="'ijbd'.*Did you mean"):
        read_ijb_meta(str(root), 'ijbd')


# --------------------------------------------------------------- end to end
@pytest.mark.parametrize('flip,faceness', [(True, True), (False, False)])
def test_evaluate_ijb_matches_the_plain_loop_protocol(ijb, tmp_path, flip,
                                                      faceness):
    root = ijb[0]
    net = LinearEmbed()
    out = tmp_path / 'res' / 'ijbc.json'
    entry = evaluate_ijb(net, str(root), 'ijbc', flip=flip,
                         use_detector_score=faceness, batch_size=5,
                         out=str(out))
    scores, labels = reference_ijb(root, net, flip=flip, faceness=faceness)
    saved = np.load(tmp_path / 'res' / 'ijbc.ijbc.npz')
    np.testing.assert_allclose(saved['scores'], scores, atol=1e-5)
    np.testing.assert_array_equal(saved['labels'], labels)
    assert sorted(os.listdir(tmp_path / 'res')) == ['ijbc.ijbc.npz',
                                                    'ijbc.json']
    written = json.loads(out.read_text())
    assert list(written) == ['ijbc']
    assert written['ijbc'] == json.loads(json.dumps(entry))
    n_pos = int(labels.sum())
    assert (entry['images'], entry['templates'], entry['pairs']) == \
        (len(ijb[1]), 12, 66)
    assert (entry['positive_pairs'], entry['negative_pairs']) == \
        (n_pos, 66 - n_pos)
    assert list(entry['tar_at_far']) == ['1e-6', '1e-5', '1e-4', '1e-3',
                                         '1e-2', '1e-1']
    # 54 impostor pairs: FAR 1e-1 would rest on 5 false accepts, fewer
    # than the 10 kdzoo asks for; the ROC keeps FAR >= 10/54
    for key, tar in entry['tar_at_far'].items():
        assert tar == reference_tar(scores, labels, float(key))
    assert entry['tar_at_far']['1e-1'] is None
    assert entry['settings']['min_false_accepts'] == 10
    assert min(entry['roc']['far']) >= 10 / 54 and entry['roc']['far']
    pos, neg = scores[labels == 1], scores[labels == 0]
    auc = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert entry['roc_auc'] == pytest.approx(auc, abs=1e-12)
    assert entry['roc']['tar'] == [reference_tar(scores, labels, f)
                                   for f in entry['roc']['far']]
    assert entry['settings']['flip'] is flip
    # the subjects' shared faces make genuine pairs score higher
    # (TAR at the lowest FAR the 54 impostors support, 10 of them above)
    assert auc > 0.8 and 0 < entry['roc']['tar'][0] < 1


def test_evaluate_ijb_settings_change_the_scores(ijb):
    root = ijb[0]
    net = LinearEmbed(seed=4)
    weighted, _ = reference_ijb(root, net, faceness=True)
    plain, labels = reference_ijb(root, net, faceness=False)
    assert np.abs(weighted - plain).max() > 1e-3  # the option matters
    # a plain function works as the embedding too (CPU tensors)
    entry = evaluate_ijb(lambda x: net(x).detach().numpy(), str(root),
                         use_detector_score=False, batch_size=64)
    assert entry['roc_auc'] == pytest.approx(
        np.mean([(p > n) for p in plain[labels == 1]
                 for n in plain[labels == 0]]), abs=1e-12)


def test_evaluate_ijb_input_errors(ijb):
    root = ijb[0]
    small = BACKBONES.build(dict(type='IResNet', width_mult=0.25,
                                 layers=(1, 1, 1, 1), embedding_size=8,
                                 input_size=(32, 32)))
    with pytest.raises(ConfigError, match=r'\(32, 32\) inputs.*112x112'):
        evaluate_ijb(small, str(root))
    name = read_ijb_meta(str(root)).names[3]
    os.remove(root / 'loose_crop' / name)
    with pytest.raises(DataError, match=rf'{name}: image not found .*'
                       r'ijbc_name_5pts_score.txt, line 4'):
        evaluate_ijb(LinearEmbed(), str(root))
    (root / 'loose_crop' / name).write_bytes(b'not an image')
    with pytest.raises(DataError, match=f'{name}: cannot decode image'):
        evaluate_ijb(LinearEmbed(), str(root))
    (root / 'loose_crop').rename(root / 'crops')
    with pytest.raises(DataError, match='loose_crop: IJB image folder not'):
        evaluate_ijb(LinearEmbed(), str(root))


# ---------------------------------------------------------------------- CLI
def test_cli_evaluate_ijb(ijb, tmp_path, capsys):
    root = ijb[0]
    backbone = dict(type='IResNet', width_mult=0.25, layers=(1, 1, 1, 1),
                    embedding_size=16, input_size=(112, 112))
    torch.manual_seed(5)
    net = BACKBONES.build(backbone).eval()
    model = str(tmp_path / 'model.pth')
    torch.save(net.state_dict(), model)
    out = str(tmp_path / 'ijb.json')
    assert main(['evaluate', '--model', model, '--backbone',
                 json.dumps(backbone), '--ijb', str(root), '--ijb-target',
                 'IJBC', '--out', out, '--batch-size', '7']) == 0
    assert 'TAR@FAR=1e-1' in capsys.readouterr().out
    entry = json.loads(open(out).read())['ijbc']
    scores, labels = reference_ijb(root, net)
    assert entry['tar_at_far']['1e-1'] == reference_tar(scores, labels, 0.1)
    pos, neg = scores[labels == 1], scores[labels == 0]
    assert entry['roc_auc'] == pytest.approx(
        np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]),
        abs=1e-9)
    assert entry['settings']['use_detector_score'] is True
    assert os.path.isfile(tmp_path / 'ijb.ijbc.npz')

    # --bin and --ijb together: one JSON holding both
    import io
    import pickle
    rng = np.random.default_rng(6)
    blobs = []
    for _ in range(40):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
                        ).save(buf, format='PNG')
        blobs.append(buf.getvalue())
    bin_path = tmp_path / 'rand.bin'
    bin_path.write_bytes(pickle.dumps((blobs, [i % 2 == 0
                                               for i in range(20)])))
    both = str(tmp_path / 'both.json')
    assert main(['evaluate', '--model', model, '--backbone',
                 json.dumps(backbone), '--bin', str(bin_path), '--ijb',
                 str(root), '--out', both]) == 0
    combined = json.loads(open(both).read())
    assert sorted(combined) == ['ijbc', 'rand']
    assert combined['ijbc'] == dict(entry, scores_file='both.ijbc.npz')
    assert 'accuracy' in combined['rand']

    # neither --bin nor --ijb: one clear line, exit 2
    assert main(['evaluate', '--model', model]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--bin' in err and '--ijb' in err
    # a data error is one line naming the file and line
    (root / 'meta' / 'ijbc_template_pair_label.txt').write_text('1 4 7\n')
    assert main(['evaluate', '--model', model, '--backbone',
                 json.dumps(backbone), '--ijb', str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    # with --bin too, the .bin results are written before IJB fails
    kept = tmp_path / 'kept.json'
    assert main(['evaluate', '--model', model, '--backbone',
                 json.dumps(backbone), '--bin', str(bin_path), '--ijb',
                 str(root), '--out', str(kept)]) == 2
    assert 'template_pair_label.txt, line 1' in capsys.readouterr().err
    assert json.loads(kept.read_text()) == dict(rand=combined['rand'])
    assert 'ijbc_template_pair_label.txt, line 1' in err
