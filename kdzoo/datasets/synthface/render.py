"""Vectorised cartoon-face renderer: per-image parameter table -> uint8 RGB.

Every shape is a signed distance field (face units) evaluated on whole
float32 arrays of a chunk of images and turned into anti-aliased coverage
with a 1-pixel box filter: ``clip(0.5 - d * pixels_per_unit, 0, 1)`` for
fills, the exact box overlap for thin lines. Layers are alpha-composited back
to front. There are no per-pixel Python loops: Python loops run over layers
and chunks only. Pixel noise and freckles come from an integer hash of
(pixel, key), so no random state is involved.

Small features (eyes, brows, nose, mouth, beard, ears, skin marks) are drawn
in per-image windows: each image gets a window placed around its own feature
(clamped to the canvas), of one size for the chunk, and the window's pixels
are gathered, drawn and scattered back. A pixel's value is computed by the
same arithmetic whether it lies in a window or in the full frame, and every
feature has zero coverage outside its window, so the output is
byte-identical however images are chunked or threaded (tested).

Bump :data:`RENDER_VERSION` whenever the pictures change: it is part of the
dataset cache key.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

import numpy as np

__all__ = ['RENDER_VERSION', 'render']

RENDER_VERSION = 1

_F = np.float32
ONE, ZERO, HALF = _F(1), _F(0), _F(0.5)
FACE_SCALE = 1.05     # face units -> image units ([-1, 1]) at scale 1
FACE_DY = -0.08       # face centre above the image centre
_USE_WINDOWS = True   # False draws everything in the full frame (tests)


def _hash32(x: np.ndarray) -> np.ndarray:
    """lowbias32 integer hash (uint32 -> uint32, elementwise)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7feb352d)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846ca68b)
    return x ^ (x >> np.uint32(16))


def _ellipse(x, y, a, b):
    """Approximate signed distance to an axis-aligned ellipse (a, b)."""
    k = np.sqrt((x / a)**2 + (y / b)**2)
    return (k - ONE) * np.minimum(a, b)


def _tri(t):
    """Triangle wave in [0, 0.5]: distance of ``t`` to the nearest integer."""
    return np.abs(t - np.floor(t + HALF))


def _sat(x):
    """clip(x, 0, 1)."""
    return np.clip(x, ZERO, ONE)


class _Canvas:
    """A chunk of images: parameters, derived per-image scalars, pixels."""

    def __init__(self, P: Dict[str, np.ndarray], size: int):
        self.P = P
        self.b = b = len(P['scale'])
        self.size = size
        self.lin = ((np.arange(size, dtype=_F) + HALF) / _F(size) * _F(2) -
                    ONE)
        sc = self.s('scale') * _F(FACE_SCALE)
        self.sc = sc
        self.pf = sc * _F(size / 2)          # pixels per face unit
        self.cx, self.cy = self.s('tx'), self.s('ty') + _F(FACE_DY)
        roll = self.s('roll')
        self.cos, self.sin = np.cos(roll), np.sin(roll)
        self.cs, self.sn = self.cos / sc, self.sin / sc
        self.g = _scalars(self)
        x = self.lin.reshape(1, 1, size)
        y = self.lin.reshape(1, size, 1)
        bg, grad = self.c3('bg'), self.s('bg_grad')
        shade = np.broadcast_to(ONE + grad * y + _F(0.3) * grad * x,
                                (b, size, size))
        self.img = [bg[k] * shade for k in range(3)]

    def s(self, key):
        """Parameter ``key`` as (b, 1, 1)."""
        return self.P[key].reshape(-1, 1, 1)

    def c3(self, key, scale=1.0):
        """Colour parameter ``key`` (b, 3) as three (b, 1, 1), scaled."""
        v = self.P[key] * _F(scale)
        return [v[:, k].reshape(-1, 1, 1) for k in range(3)]

    def any(self, key) -> bool:
        return bool(np.any(self.P[key] != 0))

    def full(self) -> '_Region':
        return _Region(self, self.lin.reshape(1, 1, -1),
                       self.lin.reshape(1, -1, 1))

    def window(self, u0, u1, v0, v1, sel=None) -> Optional['_Region']:
        """Per-image windows covering the face-frame boxes [u0, u1]×[v0, v1]
        ((b, 1, 1) arrays) with 2 pixels of margin, one size for the chunk.
        ``sel``: only these images (a boolean (b,) mask); None if empty."""
        if sel is not None:
            sel = np.flatnonzero(sel)
            if sel.size == 0:
                return None
            if sel.size == self.b:
                sel = None
        pick = (lambda a: a) if sel is None else (lambda a: a[sel])
        us = np.concatenate([u0, u1, u0, u1], axis=1)
        vs = np.concatenate([v0, v0, v1, v1], axis=1)
        cos, sin, sc = pick(self.cos), pick(self.sin), pick(self.sc)
        x = pick(self.cx) + sc * (cos * pick(us) - sin * pick(vs))
        y = pick(self.cy) + sc * (sin * pick(us) + cos * pick(vs))
        S, b = self.size, len(x)

        def span(t):
            pix = (t.reshape(b, -1) + ONE) * _F(S / 2) - HALF
            lo = np.floor(pix.min(1)).astype(np.int64) - 2
            hi = np.ceil(pix.max(1)).astype(np.int64) + 2
            n = int(min(S, max(1, (hi - lo + 1).max())))
            return np.clip(lo, 0, S - n), n

        ox, w = span(x)
        oy, h = span(y)
        if not _USE_WINDOWS or h * w >= 0.7 * S * S:
            if sel is None:
                return self.full()
            ox, oy, w, h = np.zeros(b, np.int64), np.zeros(b, np.int64), S, S
        ah, aw = np.arange(h), np.arange(w)
        rows, cols = oy[:, None] + ah, ox[:, None] + aw
        img_i = np.arange(self.b) if sel is None else sel
        idx = (img_i[:, None, None] * (S * S) +
               rows[:, :, None] * S + cols[:, None, :]).reshape(-1)
        return _Region(self, self.lin[cols].reshape(b, 1, w),
                       self.lin[rows].reshape(b, h, 1), idx, (h, w), sel)


class _Region:
    """Pixels being drawn: the full frame, or one window per image of all
    images or of a subset ``sel`` of them."""

    def __init__(self, C: _Canvas, x, y, idx=None, hw=None, sel=None):
        self.C, self.idx, self.sel = C, idx, sel
        if sel is None:
            self.g, self.pf = C.g, C.pf
            cx, cy, cs, sn = C.cx, C.cy, C.cs, C.sn
        else:
            self.g = {k: v[sel] for k, v in C.g.items()}
            self.pf = C.pf[sel]
            cx, cy, cs, sn = C.cx[sel], C.cy[sel], C.cs[sel], C.sn[sel]
        dx, dy = x - cx, y - cy
        self.x, self.y = x, y
        self.u = cs * dx + sn * dy     # face frame, v pointing down
        self.v = cs * dy - sn * dx
        if idx is None:
            self.img = C.img
        else:
            shape = (len(x), ) + hw
            self.img = [C.img[k].reshape(-1)[idx].reshape(shape)
                        for k in range(3)]
        self._cache = {}

    def s(self, key):
        v = self.C.s(key)
        return v if self.sel is None else v[self.sel]

    def c3(self, key, scale=1.0):
        v = self.C.c3(key, scale)
        return v if self.sel is None else [c[self.sel] for c in v]

    def any(self, key) -> bool:
        return bool(np.any(self.s(key) != 0))

    def commit(self):
        if self.idx is not None:
            for k in range(3):
                self.C.img[k].reshape(-1)[self.idx] = self.img[k].reshape(-1)

    def fill(self, d):
        return _sat(HALF - d * self.pf)

    def line(self, d, width):
        """Coverage of a line of ``width`` (face units) at distance ``d``."""
        w = width * self.pf
        return np.clip(HALF + HALF * w - np.abs(d) * self.pf, ZERO,
                       np.minimum(w, ONE))

    def comp(self, a, col):
        """Composite colour ``col`` (3 values broadcastable to the region)
        with coverage ``a``."""
        for k in range(3):
            t = col[k] - self.img[k]
            t *= a
            self.img[k] += t

    # cached per-pixel geometry -------------------------------------------
    def head(self):
        """Head egg: (signed distance, half-width w(v), half-height, k, u)."""
        if 'head' not in self._cache:
            g, u, v = self.g, self.u, self.v
            uh = u + _F(0.03) * g['yaw']
            t = _sat(v / g['fhb'])
            t2 = t * t
            w_v = g['fw'] * (ONE + g['cheek'] * (ONE - np.abs(_F(2) * t -
                                                              _F(0.6)))
                             - g['jaw'] * t2 + g['jowl'] * _F(3) * t2 *
                             (ONE - t))
            h_v = np.where(v < 0, g['fht'], g['fhb'])
            k = np.sqrt((uh / w_v)**2 + (v / h_v)**2)
            d = (k - ONE) * np.minimum(w_v, h_v)
            self._cache['head'] = (d, w_v, h_v, k, uh)
        return self._cache['head']

    def inner(self):
        """Inner-feature frame: yaw shifts the features and squashes the far
        side. Returns (ui, |ui|)."""
        if 'inner' not in self._cache:
            yaw = self.g['yaw']
            ui = self.u - _F(0.11) * yaw
            ui = ui * np.where(ui * yaw > 0, ONE + _F(0.35) * np.abs(yaw),
                               ONE - _F(0.12) * np.abs(yaw))
            self._cache['inner'] = (ui, np.abs(ui))
        return self._cache['inner']

    def mouth(self):
        """Mouth geometry: (mx, my, my_u, tu, taper, opening, d_lips)."""
        if 'mouth' not in self._cache:
            g = self.g
            ui, _ = self.inner()
            mx = ui - _F(0.03) * g['yaw']
            mw = g['mw']
            my = self.v - g['mouth_v'] + g['smile'] * _F(0.05) * (mx / mw)**2
            taper = _sat(ONE - (mx / mw)**2)
            opening = g['open'] * taper
            my_u, my_l = my + HALF * opening, my - HALF * opening
            tu, tl = g['lip_t'] * _F(0.85) * taper, \
                g['lip_t'] * _F(1.15) * taper
            d_lips = np.minimum(np.maximum(-my_u - tu, my_u),
                                np.maximum(my_l - tl, -my_l))
            d_lips = np.maximum(d_lips, np.abs(mx) - mw)
            self._cache['mouth'] = (mx, my, my_u, tu, taper, opening, d_lips)
        return self._cache['mouth']


def _scalars(C: _Canvas) -> Dict[str, np.ndarray]:
    """Per-image derived geometry, (b, 1, 1) each."""
    s = C.s
    g = {}
    g['yaw'] = yaw = s('yaw')
    g['ayaw'] = np.abs(yaw)
    g['fw'] = s('face_w') * (ONE - _F(0.07) * g['ayaw'])
    g['fht'], g['fhb'] = s('face_ht'), s('face_hb')
    g['cheek'], g['jaw'], g['jowl'] = s('cheek'), s('jaw'), s('jowl')
    g['eye_v'], g['eye_sep'] = s('eye_v'), s('eye_sep')
    g['ew'] = s('eye_w')
    g['eh'] = s('eye_h') * (ONE - s('squint'))
    g['tip_v'] = g['eye_v'] + s('nose_len') + _F(0.03)
    g['mouth_v'] = s('mouth_v')
    g['smile'] = s('smile')
    g['mw'] = s('mouth_w') * (ONE + _F(0.12) * g['smile'])
    g['lip_t'] = s('lip_t')
    g['open'] = s('mouth_open') * _F(0.07)
    g['brow_v'] = g['eye_v'] - s('brow_gap') - _F(0.05) * s('brow_raise')
    g['ear_v'] = g['eye_v'] + _F(0.07)
    # |ui| <= h (inner frame, see _Region.inner) implies
    # |u| <= h * to_u + 0.11 |yaw|: used to size windows (_u_box)
    g['to_u'] = ONE / (ONE - _F(0.12) * g['ayaw'])
    return g


def _u_box(g, half):
    """u-range of |ui| <= half (inner frame) -> (-X, X) in the face frame."""
    X = half * g['to_u'] + _F(0.11) * g['ayaw'] + _F(0.01)
    return -X, X


# ---- layers -------------------------------------------------------------

def _back_hair(R: _Region):
    """Hair mass behind the head (ellipse plus hanging length, minus crown
    baldness); its distance is reused by the front hair."""
    g, s, v = R.g, R.s, R.v
    _, _, _, _, uh = R.head()
    vol, hlen = s('hair_vol'), s('hair_len')
    d_ell = _ellipse(uh, v + _F(0.02), g['fw'] + vol, g['fht'] + vol)
    d_box = np.maximum(np.abs(uh) - (g['fw'] + vol) * (ONE - _F(0.12) * v),
                       -v - _F(0.1))
    d_hair = np.maximum(np.minimum(d_ell, d_box), v - hlen)
    sel = np.flatnonzero(R.C.P['crown'] > 0)
    if sel.size:  # balding crown, only on the images that have one
        cr, fw, fht = s('crown')[sel], g['fw'][sel], g['fht'][sel]
        d_crown = _ellipse(uh[sel], v[sel] + fht * _F(0.55),
                           fw * _F(0.95) * cr, fht * _F(0.75) * cr)
        d_hair[sel] = np.maximum(d_hair[sel], -d_crown)
    R.comp(R.fill(d_hair), R.c3('hair', 0.72))
    return d_hair


def _body(R: _Region):
    g, v = R.g, R.v
    _, _, _, _, uh = R.head()
    d_neck = np.maximum(np.abs(uh) - g['fw'] * _F(0.55), _F(0.2) - v)
    R.comp(R.fill(d_neck), R.c3('skin', 0.80))
    d_shirt = _ellipse(uh, v - g['fhb'] - _F(0.75), _F(1.25), _F(0.55))
    R.comp(R.fill(d_shirt), R.c3('shirt'))


def _ears(C: _Canvas):
    g, s = C.g, C.s
    esz = s('ear')
    X = s('face_w') * _F(0.97) + _F(0.07) * esz + _F(0.08)
    R = C.window(-X, X, g['ear_v'] - _F(0.13) * esz - _F(0.02),
                 g['ear_v'] + _F(0.13) * esz + _F(0.02))
    u, v = R.u, R.v
    ue = np.abs(u + _F(0.05) * g['yaw']) - s('face_w') * _F(0.97) + \
        _F(0.02) * u * g['yaw']
    d_ear = _ellipse(ue, v - g['ear_v'], _F(0.07) * esz, _F(0.12) * esz)
    R.comp(R.fill(d_ear), R.c3('skin', 0.90))
    R.comp(R.line(d_ear + _F(0.025) * esz, _F(0.012)) * _F(0.6),
           R.c3('skin', 0.65))
    R.commit()


def _skin_marks(C: _Canvas):
    """Blush, freckles, moles and age spots, each in its own windows over
    the images that have it."""
    g = C.g
    # blush on both cheeks (strong in children)
    half = g['eye_sep'] + _F(0.16)
    R = C.window(*_u_box(g, half), g['eye_v'] + _F(0.07),
                 g['eye_v'] + _F(0.33), sel=C.P['blush'] > 0)
    if R is not None:
        ui, ua = R.inner()
        r2 = (ua - R.g['eye_sep'] - _F(0.03))**2 + \
            (R.v - R.g['eye_v'] - _F(0.2))**2
        blush = _sat(ONE - r2 / _F(0.012))
        R.comp(blush * blush * R.s('blush') * _F(0.45),
               [_F(0.95), _F(0.45), _F(0.45)])
        R.commit()
    # freckles: hashed dots, one per cell, over nose and cheeks
    R = C.window(*_u_box(g, _F(0.42)), g['eye_v'] + _F(0.02),
                 g['eye_v'] + _F(0.30), sel=C.P['freckles'] > 0)
    if R is not None:
        ui, _ = R.inner()
        v, eye_v = R.v, R.g['eye_v']
        cell = _F(0.045)
        qx, qy = ui / cell, (v - eye_v) / cell
        ix, iy = np.floor(qx), np.floor(qy)
        key = R.s('texture_key').astype(np.uint32)
        h = _hash32((ix.astype(np.int32).view(np.uint32) *
                     np.uint32(73856093)) ^
                    (iy.astype(np.int32).view(np.uint32) *
                     np.uint32(19349663)) ^ key)
        ox = (h & np.uint32(255)).astype(_F) * _F(1 / 255)
        oy = ((h >> np.uint32(8)) & np.uint32(255)).astype(_F) * _F(1 / 255)
        keep = ((h >> np.uint32(16)) & np.uint32(255)).astype(_F) * \
            _F(1 / 255)
        dd = np.sqrt((qx - ix - _F(0.2) - _F(0.6) * ox)**2 +
                     (qy - iy - _F(0.2) - _F(0.6) * oy)**2) * cell
        region = _sat(ONE - ((ui / _F(0.36))**2 +
                             ((v - eye_v - _F(0.16)) / _F(0.12))**2))
        a = R.fill(dd - _F(0.008)) * (keep < R.s('freckles')) * region
        R.comp(a * _F(0.55), R.c3('skin', 0.62))
        R.commit()
    # moles (identity marks) and age spots: small discs clipped to the head
    su, sv = C.s('age_spot_u'), C.s('age_spot_v')
    discs = [(C.s(f'mole{k}_u'), C.s(f'mole{k}_v'), C.s(f'mole{k}_r'),
              C.P[f'mole{k}_r'] > 0, None) for k in range(3)]
    spots = C.P['age_spots'] > 0
    r_spot = np.broadcast_to(_F(0.035), su.shape)
    discs.append((su, sv, r_spot, spots, 'age_spots'))
    discs.append((-su * _F(0.7) - _F(0.1), sv * _F(0.5) + _F(0.35),
                  r_spot * _F(0.8), spots, 'age_spots'))
    for cu, cv, r, sel, strength in discs:
        m = r + _F(0.01)
        R = C.window(cu - m, cu + m, cv - m, cv + m, sel=sel)
        if R is None:
            continue
        pick = np.flatnonzero(sel) if R.sel is not None else slice(None)
        cu, cv, r = cu[pick], cv[pick], r[pick]
        a = R.fill(np.sqrt((R.u - cu)**2 + (R.v - cv)**2) - r) * \
            R.fill(R.head()[0])
        if strength is None:
            R.comp(a * _F(0.9), [_F(0.30), _F(0.18), _F(0.13)])
        else:
            R.comp(a * R.s(strength) * _F(0.5), R.c3('skin', 0.72))
        R.commit()


def _forehead(C: _Canvas):
    """Forehead lines, on the images that have them."""
    g = C.g
    u0, u1 = _u_box(g, _F(0.42))
    R = C.window(u0, u1, g['brow_v'] - _F(0.30), g['brow_v'] + _F(0.02),
                 sel=C.P['wr_forehead'] > 0)
    if R is None:
        return
    ui, ua = R.inner()
    sp = _F(0.055)
    q = (R.g['brow_v'] - _F(0.05) - R.v - _F(0.35) * ui * ui) / sp
    lines = R.line(_tri(q) * sp, _F(0.012))
    mask = (_sat(q + _F(0.3)) * _sat(_F(3.3) - q) *
            _sat((_F(0.3) - ua) / _F(0.1)))
    R.comp(lines * mask * R.s('wr_forehead') * _F(0.75),
           R.c3('skin', 0.60))
    R.commit()


def _upper(C: _Canvas):
    """Eye bags, crow's feet, eyes and brows."""
    g, s = C.g, C.s
    eye_v, eye_sep, ew, eh = g['eye_v'], g['eye_sep'], g['ew'], g['eh']
    blen = s('brow_len')
    tilt = np.abs(s('eye_tilt'))
    half = np.maximum(eye_sep + ew * _F(1.1) + _F(0.09),
                      eye_sep + blen + _F(0.02))
    u0, u1 = _u_box(g, half)
    brow_top = g['brow_v'] - np.abs(s('brow_angle')) * blen - \
        s('brow_arch') - s('brow_thick')
    top = np.minimum(brow_top, eye_v - _F(1.6) * eh - tilt * half) - \
        _F(0.03)
    bottom = eye_v + np.maximum(_F(1.45) * eh + _F(0.25) * ew + _F(0.02),
                                _F(0.11)) + tilt * half + _F(0.02)
    R = C.window(u0, u1, top, bottom)
    v = R.v
    ui, ua = R.inner()
    wrk = R.c3('skin', 0.60)
    brow_v = g['brow_v']
    ex = ua - eye_sep
    ey = (v - eye_v) + s('eye_tilt') * ex
    if C.any('wr_bags'):
        bag = R.line(ey - eh * _F(1.35) - _F(0.25) * ex * ex / ew, _F(0.014))
        bag = bag * _sat(ONE - (ex / (ew * _F(0.9)))**2)
        R.comp(bag * s('wr_bags') * _F(0.7), wrk)
    if C.any('wr_crow'):
        cx = ex - ew * _F(1.08)
        tq = ey / np.maximum(cx + _F(0.015), _F(0.005)) * _F(2.2)
        dcrow = _tri(tq) * cx / _F(2.2)
        mask = _sat(cx / _F(0.01)) * _sat((_F(0.075) - cx) / _F(0.015)) * \
            _sat(_F(1.6) - np.abs(tq))
        R.comp(R.line(dcrow, _F(0.010)) * mask * s('wr_crow') * _F(0.75),
               wrk)
    kx, ky = ex / ew, ey / eh
    ke = np.sqrt(kx * kx + ky * ky)
    d_eye = (ke - ONE) * eh
    R.comp(R.fill(d_eye), [_F(0.96), _F(0.95), _F(0.93)])
    gaze = _F(-0.18) * g['yaw'] * ew
    ir = s('iris_r') * ew * _F(0.55)
    d_iris = np.sqrt((ex - gaze * np.where(ui >= 0, ONE, -ONE))**2 + ey * ey)
    R.comp(R.fill(np.maximum(d_iris - ir, d_eye)), R.c3('iris'))
    R.comp(R.fill(np.maximum(d_iris - ir * _F(0.45), d_eye)),
           [_F(0.04), _F(0.03), _F(0.03)])
    d_hl = np.sqrt((ex + ir * _F(0.35))**2 + (ey + ir * _F(0.35))**2) \
        - ir * _F(0.28)
    R.comp(R.fill(np.maximum(d_hl, d_eye)) * _F(0.8), [ONE, ONE, ONE])
    lid = R.line(d_eye, _F(0.016)) * _sat(_F(0.4) - ky)
    R.comp(lid, [_F(0.10), _F(0.07), _F(0.06)])
    crease = R.line((ke - _F(1.5)) * eh, _F(0.008)) * _sat(-ky - _F(0.3))
    R.comp(crease * _F(0.5), R.c3('skin', 0.65))
    # brows: tapered arc
    bx = ua - eye_sep - _F(0.012)
    by = v - brow_v + s('brow_angle') * bx + \
        s('brow_arch') * (ONE - (bx / blen)**2)
    bt = s('brow_thick') * (ONE - _F(0.3) * (bx / blen))
    d_brow = np.maximum(np.abs(by) - HALF * bt, np.abs(bx) - blen)
    R.comp(R.fill(d_brow) * _F(0.95), R.c3('brow_col'))
    R.commit()


def _sunglasses(C: _Canvas):
    g = C.g
    half = g['eye_sep'] + g['ew'] * _F(1.45) + _F(0.05)
    R = C.window(*_u_box(g, half), g['eye_v'] - _F(0.1),
                 g['eye_v'] + _F(0.12), sel=C.P['occ'] == 1)
    if R is None:
        return
    _, ua = R.inner()
    v, eye_v, eye_sep = R.v, R.g['eye_v'], R.g['eye_sep']
    lens = _ellipse(ua - eye_sep, v - eye_v - _F(0.01),
                    R.g['ew'] * _F(1.45) + _F(0.03), _F(0.085))
    bridge = np.maximum(np.abs(v - eye_v + _F(0.03)) - _F(0.012),
                        ua - eye_sep)
    R.comp(R.fill(np.minimum(lens, bridge)) * _F(0.97),
           [_F(0.05), _F(0.05), _F(0.07)])
    R.commit()


def _lower(C: _Canvas):
    """Nasolabial folds, nose, mouth."""
    g, s = C.g, C.s
    nw, mw, tip_v, mouth_v = s('nose_w'), g['mw'], g['tip_v'], g['mouth_v']
    half = np.maximum(nw * _F(1.2), mw * _F(1.05)) + _F(0.07)
    u0, u1 = _u_box(g, half)
    top = g['eye_v'] + _F(0.03)
    bottom = mouth_v + np.maximum(g['lip_t'] * _F(1.2) + g['open'],
                                  _F(0.09)) + _F(0.06)
    R = C.window(u0, u1, top, bottom)
    v = R.v
    ui, ua = R.inner()
    wrk = R.c3('skin', 0.60)
    naso = np.maximum(s('wr_naso'),
                      _F(0.3) * np.maximum(g['smile'] - HALF, ZERO))
    if np.any(naso > 0):
        v0, v1 = tip_v - _F(0.03), mouth_v + _F(0.07)
        tt = _sat((v - v0) / (v1 - v0))
        u_line = nw * _F(1.15) + (mw + _F(0.02) - nw * _F(1.15)) * tt \
            + _F(0.03) * tt * (ONE - tt)
        mask = _sat((v - v0) / _F(0.02)) * _sat((v1 - v) / _F(0.03))
        R.comp(R.line(ua - u_line, _F(0.014)) * mask * naso * _F(0.7), wrk)
    # nose: wing arc, nostrils, one ridge line
    nx = ui - _F(0.05) * g['yaw']
    dark = R.c3('skin', 0.55)
    d_wing = _ellipse(nx, v - tip_v + nw * _F(0.35), nw, nw * _F(0.6))
    wing = R.line(d_wing, _F(0.013)) * _sat((v - tip_v + nw * _F(0.2)) /
                                            _F(0.02))
    R.comp(wing * _F(0.8), dark)
    d_nost = _ellipse(np.abs(nx) - nw * _F(0.45), v - tip_v + _F(0.005),
                      _F(0.022), _F(0.011))
    R.comp(R.fill(d_nost) * _F(0.85), R.c3('skin', 0.35))
    side = np.where(g['yaw'] >= 0, ONE, -ONE)
    ridge = R.line(nx - side * nw * HALF, _F(0.012)) * \
        _sat((v - g['eye_v'] - _F(0.06)) / _F(0.05)) * \
        _sat((tip_v - nw * HALF - v) / _F(0.03))
    R.comp(ridge * _F(0.45), dark)
    # mouth: lips, open mouth with teeth, mouth line
    mx, my, my_u, tu, taper, opening, d_lips = R.mouth()
    R.comp(R.fill(d_lips), R.c3('lip_col'))
    if C.any('mouth_open'):
        is_open = g['open'] > 0
        d_in = np.maximum(np.abs(my) - HALF * opening,
                          np.abs(mx) - mw * _F(0.92))
        R.comp(R.fill(d_in) * is_open, [_F(0.25), _F(0.06), _F(0.07)])
        d_teeth = np.maximum(np.maximum(-my_u, my_u - opening * _F(0.4)),
                             np.abs(mx) - mw * _F(0.7))
        R.comp(R.fill(d_teeth) * is_open, [_F(0.95), _F(0.93), _F(0.88)])
    R.comp(R.line(my, _F(0.013)) * taper * _F(0.8), R.c3('lip_col', 0.45))
    R.commit()


def _facial_hair(C: _Canvas):
    """Moustache, goatee, full beard and stubble (textured, greying)."""
    keys = ('moustache', 'goatee', 'beard', 'stubble')
    sel = np.any([C.P[k] > 0 for k in keys], axis=0)
    g = C.g
    X = C.s('face_w') * _F(1.25) + _F(0.05)
    top = np.minimum(g['tip_v'], g['eye_v'] + _F(0.05)) - _F(0.02)
    R = C.window(-X, X, top, g['fhb'] * _F(1.05) + _F(0.04), sel=sel)
    if R is None:
        return
    g, s, v = R.g, R.s, R.v
    mouth_v, tip_v, fhb = g['mouth_v'], g['tip_v'], g['fhb']
    ui, ua = R.inner()
    d_head = R.head()[0]
    mx, my, my_u, tu, taper, opening, d_lips = R.mouth()
    mw = g['mw']
    lip_top = my_u + tu                  # 0 on the upper lip's edge
    d_mo = np.maximum(np.maximum(np.abs(mx) - mw * _F(1.1),
                                 lip_top - _F(0.006)),
                      np.maximum(-lip_top - _F(0.055) *
                                 (ONE - _F(0.45) * (mx / mw)**2),
                                 tip_v + _F(0.02) - v))
    chin_c = mouth_v + (fhb - mouth_v) * _F(0.55)
    d_go = np.maximum(_ellipse(mx, v - chin_c, mw * _F(0.75),
                               (fhb - mouth_v) * _F(0.55)), d_head)
    top_line = (mouth_v - _F(0.03)) - (ua / s('face_w'))**2 * \
        (mouth_v - g['eye_v'] - _F(0.22))
    d_bd = np.maximum(d_head + _F(0.005), top_line - v)
    d_bd = np.minimum(d_bd, d_mo)
    # soft edges (hair thins out) and a per-pixel speckle texture
    soft = _F(0.03)

    def cover(d):
        return _sat(HALF - d / soft)

    a = np.maximum(np.maximum(cover(d_mo) * s('moustache'),
                              cover(d_go) * s('goatee')),
                   np.maximum(cover(d_bd) * s('beard'),
                              cover(d_bd) * s('stubble') * _F(0.5)))
    a = a * R.fill(d_head - _F(0.01)) * R.fill(-(d_lips - _F(0.006))) * \
        _sat((v - g['eye_v'] - _F(0.1)) * R.pf)   # hard top: the window
    cell = np.maximum(_F(0.012), _F(1.2) / R.pf)
    qx, qy = np.floor(mx / cell), np.floor(v / cell)
    h = _hash32((qx.astype(np.int32).view(np.uint32) * np.uint32(73856093))
                ^ (qy.astype(np.int32).view(np.uint32) *
                   np.uint32(19349663)))
    speck = (h & np.uint32(255)).astype(_F) * _F(1 / 255)
    a = a * (_F(0.7) + _F(0.3) * speck)
    R.comp(a, R.c3('hair', 0.75))
    R.commit()


def _front_hair(R: _Region, d_hair):
    """Hair over the forehead (hairline with temple recession and fringe)
    and, for covering styles, over the ears; strand/curl texture."""
    g, s, v = R.g, R.s, R.v
    ui, ua = R.inner()
    _, _, _, _, uh = R.head()
    rec = s('temple') * _sat(ONE - ((ua - _F(0.26)) / _F(0.16))**2)
    fr = s('fringe') * _sat(HALF + (ui - s('part')) * s('fringe_slope'))
    hl = s('hairline') + _F(0.45) * ui * ui - rec + fr
    side_u = g['fw'] * (_F(0.86) + _F(0.08) * v)
    d_side = np.where(s('hair_cover') > 0, side_u - np.abs(uh), ONE) + \
        np.maximum(v - s('hair_len'), ZERO)
    d_front = np.maximum(d_hair, np.minimum(v - hl, d_side))
    front = R.fill(d_front)
    hair = R.c3('hair')
    # strand / curl texture where strands are >= ~4 px apart (else it
    # aliases); exactly 1 (skipped) when the amplitude is 0
    amp = _sat((R.pf - _F(36)) / _F(20)) * _F(0.10)
    if np.any(amp > 0):
        curl = s('curl')
        tex = _tri(ui * _F(16) + v * _F(5) * np.where(ui >= s('part'), ONE,
                                                      -ONE)) * (ONE - curl)
        if np.any(curl > 0):
            row = np.floor(v * _F(13))      # staggered rows of curls
            tex = tex + curl * _F(1.6) * _tri(ui * _F(13) + HALF * row) * \
                _tri(v * _F(13) + _F(0.25) * _tri(ui * _F(6.5)))
        tex = ONE + amp * (_F(4) * tex - ONE)
        hair = [hair[k] * tex for k in range(3)]
    R.comp(front, hair)


def _mask(C: _Canvas):
    """Surgical mask over nose, mouth and chin (occlusion type 2)."""
    g = C.g
    X = C.s('face_w') * _F(1.3) + _F(0.05)
    R = C.window(-X, X, g['tip_v'] - _F(0.12), g['fhb'] + _F(0.06),
                 sel=C.P['occ'] == 2)
    if R is None:
        return
    g = R.g
    ui, _ = R.inner()
    d_head, w_v, _, _, uh = R.head()
    v = R.v
    top = g['tip_v'] - _F(0.10) + _F(0.15) * ui * ui
    d_mask = np.maximum(np.maximum(np.abs(uh) - w_v * _F(1.04), top - v),
                        v - g['fhb'] - _F(0.03))
    a = R.fill(d_mask)
    pleat = ONE - _F(0.08) * R.line(_tri((v - top) / _F(0.08)) * _F(0.08),
                                    _F(0.01))
    R.comp(a, [_F(0.72) * pleat, _F(0.84) * pleat, _F(0.93) * pleat])
    R.commit()


def _lighting(R: _Region):
    """Image-wide light gradient, directional face shading, brightness,
    contrast and colour cast; also maps [0, 1] to [0.5, 255.5] so that
    truncation in :func:`_finish` rounds."""
    s = R.s
    d_head, w_v, h_v, k_head, uh = R.head()
    ha = R.fill(d_head)
    lx, ly = s('light_x'), s('light_y')
    S = ONE + HALF * (lx * R.x + ly * R.y) + \
        _F(0.55) * ha * (lx * uh / w_v + ly * R.v / h_v) * _sat(k_head)
    con, br = s('contrast'), s('bright')
    cast = R.c3('cast')
    for k in range(3):
        gain = con * (ONE + cast[k]) * _F(255)
        off = (HALF - HALF * con + br) * (ONE + cast[k]) * _F(255) + HALF
        R.img[k] *= S * gain
        R.img[k] += off


def _block(C: _Canvas):
    """A random rectangle (image coordinates) over the images that have
    one; drawn after lighting, so colours are in [0.5, 255.5]."""
    sel = np.flatnonzero(C.P['occ'] == 3)
    if not sel.size:
        return
    x, y = C.lin.reshape(1, 1, -1), C.lin.reshape(1, -1, 1)
    occ_x, occ_y = C.s('occ_x')[sel], C.s('occ_y')[sel]
    w, h = C.s('occ_w')[sel], C.s('occ_h')[sel]
    d_box = np.maximum(np.abs(x - occ_x) - HALF * w,
                       np.abs(y - occ_y) - HALF * h)
    a = _sat(HALF - d_box * _F(C.size / 2))
    col = C.c3('occ_col', 255)
    for k in range(3):
        img = C.img[k][sel]
        C.img[k][sel] = img + a * (col[k][sel] + HALF - img)


def _draw(C: _Canvas) -> None:
    R0 = C.full()
    d_hair = _back_hair(R0)
    _body(R0)
    _ears(C)
    R0.comp(R0.fill(R0.head()[0]), R0.c3('skin'))
    _skin_marks(C)
    _forehead(C)
    _upper(C)
    _sunglasses(C)
    _lower(C)
    _facial_hair(C)
    _front_hair(R0, d_hair)
    _mask(C)
    _lighting(R0)
    _block(C)


def _blur121(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur of (b, H, W), edges replicated."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode='edge')
    y = p[:, :-2] + _F(2) * p[:, 1:-1] + p[:, 2:]
    return (y[:, :, :-2] + _F(2) * y[:, :, 1:-1] + y[:, :, 2:]) * _F(1 / 16)


def _finish(C: _Canvas) -> np.ndarray:
    """Blur, sensor noise, quantisation -> (b, H, W, 3) uint8."""
    sel = np.flatnonzero(C.P['blur'] > 0)
    if sel.size:
        bl = C.s('blur')[sel]
        a1, a2 = np.minimum(bl, ONE), _sat(bl - ONE)
        for k in range(3):
            x = C.img[k][sel]
            b1 = _blur121(x)
            b2 = _blur121(b1)
            C.img[k][sel] = x + a1 * (b1 - x) + a2 * (b2 - b1)
    out = np.empty((C.b, C.size, C.size, 3), np.uint8)
    noisy = C.any('noise')
    if noisy:  # uniform noise, std = noise: 3 hashed bytes per pixel
        idx = np.arange(C.size * C.size, dtype=np.uint32).reshape(
            1, C.size, C.size)
        key = C.P['noise_key'].astype(np.uint32).reshape(-1, 1, 1)
        h = _hash32(idx * np.uint32(2654435761) + key)
        q = h.view(np.uint8).reshape(C.b, C.size, C.size, 4)
        amp = C.s('noise') * _F(255 * 3.4641 / 255)
    for k in range(3):
        x = C.img[k]
        if noisy:
            x = x + (q[..., k] * amp - _F(127.5) * amp)
        out[..., k] = np.clip(x, ZERO, _F(255.99)).astype(np.uint8)
    return out


def _render_chunk(P: Dict[str, np.ndarray], size: int) -> np.ndarray:
    C = _Canvas(P, size)
    # NaN/inf would silently turn into arbitrary pixels: fail loudly
    with np.errstate(over='raise', invalid='raise', divide='raise',
                     under='ignore'):
        _draw(C)
        return _finish(C)


def render(params: Dict[str, np.ndarray], image_size: int,
           chunk: Optional[int] = None, num_threads: Optional[int] = None,
           out: Optional[np.ndarray] = None) -> np.ndarray:
    """Draw every row of ``params`` (``identities.resolve``) as an
    ``image_size``² RGB uint8 image -> (n, H, W, 3).

    ``chunk`` images are drawn at once (default: about 100k pixels per
    chunk, which keeps the working set in cache); chunks run on
    ``num_threads`` threads (default 1; extra threads help little, most
    numpy calls being short). The result does not depend on ``chunk`` or
    threads. ``out``, if given, is filled in place (e.g. a memory-mapped
    array).
    """
    n = len(params['scale'])
    size = int(image_size)
    if chunk is None:
        chunk = max(8, 100_000 // (size * size))
    chunk = max(1, int(chunk))
    if out is None:
        out = np.empty((n, size, size, 3), np.uint8)
    P = {k: np.ascontiguousarray(v, dtype=_F) for k, v in params.items()}

    def job(a):
        b = min(n, a + chunk)
        out[a:b] = _render_chunk({k: v[a:b] for k, v in P.items()}, size)

    starts = range(0, n, chunk)
    threads = max(1, int(num_threads or 1))
    if threads == 1 or n <= chunk:
        for a in starts:
            job(a)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(job, starts))
    return out
