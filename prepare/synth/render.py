"""Drawing one face image from traits: pose, features, occlusion, lighting, blur, noise, JPEG."""

from __future__ import annotations

import functools
import math
from typing import Any, Tuple

import cv2
import numpy as np

from prepare.synth.traits import _jitter, _mix, _scale, render_identity_traits

SIZE = 112
_SS = 2  # supersampling factor of the drawing canvas
_CENTRE = (56.0, 60.0)  # head-ellipsoid centre in the 112x112 frame


# --------------------------------------------------------------------------- geometry

class _Pose:
    """Projects face-plane points (x right, y down, relative to the head centre) onto the canvas.

    Points on the face lie on an ellipsoid with semi-axes (a, b, 0.9a) and may stand
    out of it by ``dz`` (the nose); yaw/pitch rotate them in 3D (orthographic view),
    roll, scale and shift act in the image plane.
    """

    def __init__(self, a, b, yaw, pitch, roll, scale, tx, ty):
        self.a, self.b, self.c = a, b, 0.9 * a
        y, p, r = (math.radians(v) for v in (yaw, pitch, roll))
        ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
        self.rot = (rx @ ry)[:2]
        cr, sr = math.cos(math.radians(roll)), math.sin(math.radians(roll))
        self.m2 = np.array([[cr, -sr], [sr, cr]]) * scale * _SS
        self.off = np.array([(_CENTRE[0] + tx) * _SS, (_CENTRE[1] + ty) * _SS])
        k = (self.c / self.a) ** 2
        self.sil_w = math.sqrt(math.cos(y) ** 2 + k * math.sin(y) ** 2)
        self.sil_h = math.sqrt(math.cos(p) ** 2 + k * math.sin(p) ** 2)
        self.yaw_s = math.sin(y)

    def surf(self, pts, dz=0.0) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        r2 = (pts[:, 0] / self.a) ** 2 + (pts[:, 1] / self.b) ** 2
        z = self.c * np.sqrt(np.maximum(1 - r2, 0.03)) + dz
        p = pts @ self.rot[:, :2].T + z[:, None] * self.rot[:, 2]
        return p @ self.m2.T + self.off

    def sil(self, pts) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2) * (self.sil_w, self.sil_h)
        return pts @ self.m2.T + self.off

    def px(self, v: float) -> int:
        """A length in 112-frame pixels as a canvas line thickness."""
        return max(1, int(round(v * abs(self.m2[0, 0] + 1j * self.m2[0, 1]))))


def _fill(img, polys, colour) -> None:
    cv2.fillPoly(img, [np.round(p * 16).astype(np.int32) for p in polys], colour, cv2.LINE_AA, 4)


def _line(img, pts, colour, thick, closed=False) -> None:
    cv2.polylines(img, [np.round(pts * 16).astype(np.int32)], closed, colour, thick, cv2.LINE_AA, 4)


def _ell(cx, cy, rx, ry, n=20, t0=0.0, t1=2 * math.pi, angle=0.0) -> np.ndarray:
    t = np.linspace(t0, t1, n, endpoint=abs(t1 - t0 - 2 * math.pi) > 1e-9)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return np.column_stack([cx + ca * x - sa * y, cy + sa * x + ca * y])


def _head_outline(h: dict, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    s = np.sin(t)
    lower = np.clip(s, 0, 1)
    x = h["a"] * np.cos(t) * (1 - h["jaw"] * lower ** 2.5) * (1 + h["cheek"] * np.exp(-((s - 0.15) / 0.3) ** 2))
    y = h["b"] * s * (1 - h["chin"] * 0.12 * lower ** 6)
    return np.column_stack([x, y])


# --------------------------------------------------------------------------- rendering

def _background(img, rng, d: float) -> None:
    S = SIZE * _SS
    cv2.rectangle(img, (0, 0), (S, S), tuple(rng.uniform(40, 220, 3).tolist()), -1)
    n = int(rng.integers(0, 1 + round(7 * d)))
    for _ in range(n):
        c = tuple(float(v) for v in rng.uniform(0, 255, 3))
        kind = rng.integers(3)
        x, y = rng.uniform(0, S, 2)
        if kind == 0:
            w, hh = rng.uniform(10, 90, 2)
            _fill(img, [np.array([[x, y], [x + w, y], [x + w, y + hh], [x, y + hh]])], c)
        elif kind == 1:
            _fill(img, [_ell(x, y, *rng.uniform(6, 40, 2), n=16)], c)
        else:
            _line(img, np.array([[x, y], rng.uniform(0, S, 2)]), c, int(rng.integers(2, 9)))


def _hair_cap(P: _Pose, tr: dict, hair: dict, vol: float) -> np.ndarray:
    h = tr["head"]
    a, b = h["a"] + vol, h["b"] + vol
    line_y = -hair["line"] * h["b"]
    temple = hair["temple"] + (14 if hair["style"] in (3, 4) else 0)  # long hair frames the face
    t_l = math.pi - math.asin(np.clip(temple / b, -0.95, 0.95))
    t_r = 2 * math.pi + math.asin(np.clip(temple / b, -0.95, 0.95))
    t = np.linspace(t_l, t_r, 20)
    outer = P.sil(np.column_stack([a * np.cos(t), b * np.sin(t)]))
    xs = np.linspace(h["a"] * 0.93, -h["a"] * 0.93, 15)
    u = xs / h["a"]
    part = hair["part"] * (hair["style"] == 5)
    ys = line_y + (temple - line_y) * np.abs(u) ** 3 - hair["peak"] * np.exp(-(u / 0.2) ** 2) + 9 * part * u
    if hair["style"] == 3:  # fringe
        ys = ys + 10 * np.exp(-((u - part * 0.3) / 0.7) ** 2)
    ys = np.minimum(ys, tr["eyes"]["dy"] - tr["brows"]["gap"] - 3 + 40 * np.abs(u) ** 4)
    inner = P.surf(np.column_stack([xs, ys]))
    return np.vstack([outer, inner])


def _draw_eye(img, P, tr, side, open_, gaze, skin) -> None:
    e = tr["eyes"]
    cx, cy = side * e["dx"], e["dy"]
    w, hgt = e["w"], e["w"] * e["h"] * open_
    ang = math.radians(-side * e["tilt"])
    ca, sa = math.cos(ang), math.sin(ang)
    t = np.linspace(0, 2 * math.pi, 18, endpoint=False)
    s = np.sin(t)
    up, lo = hgt * (1 + e["almond"]), hgt * (1 - e["almond"]) * 0.85
    lx, ly = w * np.cos(t), np.where(s < 0, up, lo) * s
    rot = lambda x, y: np.column_stack([cx + ca * x - sa * y, cy + sa * x + ca * y])
    _fill(img, [P.surf(rot(lx, ly))], (235, 232, 225) if open_ > 0.2 else _scale(skin, 0.8))
    if open_ > 0.2:
        r = w * e["iris_r"]
        ix, iy = r * np.cos(t) + gaze[0], r * np.sin(t) + gaze[1]
        lim = np.sqrt(np.clip(1 - (ix / w) ** 2, 0, 1))
        iy = np.clip(iy, -up * lim, lo * lim)
        _fill(img, [P.surf(rot(ix, iy))], e["iris"])
        _fill(img, [P.surf(rot(0.45 * (ix - gaze[0]) + gaze[0], np.clip(0.45 * (iy - gaze[1]) + gaze[1],
                                                                      -up * lim, lo * lim)))], (15, 12, 12))
    tu = np.linspace(math.pi, 2 * math.pi, 10)
    _line(img, P.surf(rot(w * 1.05 * np.cos(tu), up * np.sin(tu))), (30, 22, 20), P.px(0.5 * e["lash"] + 0.3))


def _draw_features(img, P, tr, ex, skin) -> None:
    """The inner face, in painting order: what is drawn later covers what is drawn earlier."""
    _draw_wrinkles(img, P, tr, skin)
    _draw_beard(img, P, tr, skin)  # before the mouth so lips stay visible
    _draw_brows(img, P, tr, ex, skin)
    for side in (-1, 1):
        _draw_eye(img, P, tr, side, ex["open"], ex["gaze"], skin)
    _draw_nose(img, P, tr, ex, skin)
    _draw_mouth(img, P, tr, ex, skin)
    _draw_marks(img, P, tr, skin)
    if tr["extras"]["glasses"]:
        _draw_glasses(img, P, tr)


def _draw_wrinkles(img, P, tr, skin) -> None:
    """Age: forehead lines, crow's feet, nasolabial folds (none below wrinkles 0.15)."""
    e, br, no, mo = tr["eyes"], tr["brows"], tr["nose"], tr["mouth"]
    wr = tr["skin"]["wrinkles"]
    if wr <= 0.15:
        return
    wc = _scale(skin, 1 - 0.25 * wr)
    for k in range(1 + int(wr * 3)):
        y0 = e["dy"] - br["gap"] - 7 - 4 * k
        _line(img, P.surf(np.column_stack([np.linspace(-14, 14, 8), y0 - 1.5 * np.cos(np.linspace(-1, 1, 8))])),
              wc, P.px(0.5))
    for side in (-1, 1):
        ox = side * (e["dx"] + e["w"] + 1.5)
        for k in (-1, 0, 1):
            _line(img, P.surf(np.array([[ox, e["dy"] + 1.5 * k], [ox + side * 3.5, e["dy"] + 2.8 * k]])), wc,
                  P.px(0.45))
        _line(img, P.surf(np.array([[side * (no["w"] + 1), no["y"] - 1], [side * (mo["w"] + 2), mo["y"] - 3],
                                    [side * (mo["w"] + 3), mo["y"] + 2]])), wc, P.px(0.6))


def _draw_beard(img, P, tr, skin) -> None:
    """Beard kinds: 1 full, 2 goatee + moustache, 3 moustache, 4 stubble (a full beard, faint)."""
    no, mo, x = tr["nose"], tr["mouth"], tr["extras"]
    kind = x["beard"]
    if not kind:
        return
    bc = _mix(skin, tr["hair"]["colour"], x["beard_d"] * (0.45 if kind == 4 else 1.0))
    if kind in (1, 4):  # full beard / stubble
        outline = _head_outline(tr["head"])
        low = outline[(outline[:, 1] > no["y"] - 2)]
        low = low[np.argsort(np.arctan2(low[:, 1], low[:, 0]))][::-1]
        a8, w = tr["head"]["a"] * 0.8, mo["w"]
        inner = np.array([[-a8, no["y"] - 2], [-w - 4, mo["y"] - 2], [-w * 0.5, no["y"] + 4], [0, no["y"] + 3.5],
                          [w * 0.5, no["y"] + 4], [w + 4, mo["y"] - 2], [a8, no["y"] - 2]])
        _fill(img, [np.vstack([P.surf(low * 0.97), P.surf(inner[::-1])])], bc)
    if kind == 2:  # goatee
        _fill(img, [P.surf(_ell(0, mo["y"] + 9, mo["w"] * 0.55, 7, n=14))], bc)
    if kind in (2, 3):  # moustache
        _fill(img, [P.surf(np.array([[-mo["w"] - 1, mo["y"] + 1], [-mo["w"] * 0.8, mo["y"] - mo["up"] - 3.5],
                                     [0, no["y"] + 2.5], [mo["w"] * 0.8, mo["y"] - mo["up"] - 3.5],
                                     [mo["w"] + 1, mo["y"] + 1], [0, mo["y"] - mo["up"] - 0.5]]))], bc)


def _draw_brows(img, P, tr, ex, skin) -> None:
    e, br = tr["eyes"], tr["brows"]
    bcol = _mix(skin, _scale(tr["hair"]["colour"], 0.7), br["dark"])
    for side in (-1, 1):
        xs = np.linspace(br["inner"] + 5, br["inner"] + 5 + br["len"], 9)
        base = e["dy"] - br["gap"] - ex["brow"]
        tt = np.linspace(0, 1, 9)
        yc = base - br["arch"] * np.sin(tt * math.pi * 0.9) + br["slant"] * (tt - 0.5)
        th = br["thick"] * (1.1 - 0.6 * tt)
        pts = np.vstack([np.column_stack([side * xs, yc - th / 2]), np.column_stack([side * xs, yc + th / 2])[::-1]])
        _fill(img, [P.surf(pts)], bcol)


def _draw_nose(img, P, tr, ex, skin) -> None:
    """Bridge shadow (on the side ``ex["shadow_side"]``), wings, tip, nostrils."""
    e, no = tr["eyes"], tr["nose"]
    dark = _scale(skin, tr["skin"]["shade"])
    s = ex["shadow_side"]
    ny, nw, pr = no["y"], no["w"], no["prot"]
    k = np.linspace(0, 1, 8)
    bridge = np.column_stack([s * (no["bridge"] + 0.5 * nw * k ** 3), e["dy"] + 2 + (ny - e["dy"] - 3) * k])
    _line(img, P.surf(bridge, pr * k[:, None].ravel() ** 1.5), dark, P.px(1.0))
    for side in (-1, 1):
        _fill(img, [P.surf(_ell(side * nw * 0.8, ny, nw * 0.38, 2.6, n=12), pr * 0.35)], dark)
    _fill(img, [P.surf(_ell(0, ny - 1.5, nw * 0.45, 3.0, n=12), pr)], _scale(skin, 1.04))
    for side in (-1, 1):
        _fill(img, [P.surf(_ell(side * nw * 0.42, ny + 1.0, 1.1 * no["nostril"], 0.7 * no["nostril"], n=10),
                           pr * 0.5)], (70, 40, 38))


def _draw_mouth(img, P, tr, ex, skin) -> None:
    """Lips on a smile-bent line; an open mouth shows its inside (and teeth past 0.3)."""
    mo = tr["mouth"]
    w = mo["w"]
    xs = np.linspace(-w, w, 15)
    q = 1 - (xs / w) ** 2
    line = mo["y"] + (mo["curve"] + 2.5 * ex["smile"]) * q - 2.5 * ex["smile"]
    up_edge = line - mo["up"] * np.sqrt(q) * (1 - 0.35 * np.exp(-(xs / 2.5) ** 2))
    gap = ex["mouth_open"] * 6 * np.sqrt(q)
    low_top = line + gap
    low_edge = low_top + mo["low"] * np.sqrt(q)
    lip = _mix(skin, (175, 55, 70), mo["red"])
    if ex["mouth_open"] > 0.05:
        _fill(img, [P.surf(np.vstack([np.column_stack([xs, line]), np.column_stack([xs, low_top])[::-1]]))],
              (55, 20, 25))
        if ex["mouth_open"] > 0.3:
            _fill(img, [P.surf(np.vstack([np.column_stack([xs * 0.8, line]),
                                          np.column_stack([xs * 0.8, line + 1.6 * np.sqrt(q)])[::-1]]))],
                  (225, 220, 205))
    _fill(img, [P.surf(np.vstack([np.column_stack([xs, up_edge]), np.column_stack([xs, line])[::-1]]))],
          _scale(lip, 0.9))
    _fill(img, [P.surf(np.vstack([np.column_stack([xs, low_top]), np.column_stack([xs, low_edge])[::-1]]))], lip)
    _line(img, P.surf(np.column_stack([xs, line])), _scale(lip, 0.55), P.px(0.6))


def _draw_marks(img, P, tr, skin) -> None:
    """Moles, a scar, freckles (their own seeded generator: the same spots in every photo)."""
    x = tr["extras"]
    for mx, my, mr in x["moles"]:
        _fill(img, [P.surf(_ell(mx, my, mr, mr, n=8))], (60, 38, 30))
    if x["scar"] is not None:
        sx, sy, dx, dy = x["scar"]
        _line(img, P.surf(np.array([[sx, sy], [sx + dx, sy + dy], [sx + 1.6 * dx, sy + 1.3 * dy]])),
              _mix(skin, (200, 120, 120), 0.5), P.px(0.8))
    if x["freckles"]:
        fr = np.random.default_rng(x["freckle_seed"])
        pts = fr.uniform((-24, -4), (24, 14), (24, 2))
        pts[:, 0] += np.sign(pts[:, 0]) * 4
        _fill(img, [P.surf(_ell(px_, py_, 0.7, 0.7, n=6)) for px_, py_ in pts], _mix(skin, (120, 70, 40), 0.45))


def _draw_glasses(img, P, tr) -> None:
    """Frames: kind 1 oval lenses, else rounded rectangles; temples run to the head's edge."""
    e, x = tr["eyes"], tr["extras"]
    fc, th = x["frame"], P.px(x["frame_t"])
    lenses = []
    for side in (-1, 1):
        cx, cy = side * e["dx"], e["dy"] + 0.5
        rx, ry = e["w"] + x["lens"], e["w"] * 0.7 + x["lens"] * 0.8
        if x["glasses"] == 1:
            ring = _ell(cx, cy, rx, ry, n=20)
        else:  # rounded rectangle (superellipse)
            t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
            c, sn = np.cos(t), np.sin(t)
            ring = np.column_stack([cx + rx * np.sign(c) * np.abs(c) ** 0.4,
                                    cy + ry * np.sign(sn) * np.abs(sn) ** 0.4])
        lenses.append(P.surf(ring, 2.5))
        _line(img, P.surf(np.array([[side * (e["dx"] + rx), cy], [side * tr["head"]["a"] * 0.99, cy - 1]]), 1.0),
              fc, th)
    for ring in lenses:
        _line(img, ring, fc, th, closed=True)
    _line(img, P.surf(np.array([[-e["dx"] + e["w"] + x["lens"], e["dy"]], [0, e["dy"] - 1.5],
                                [e["dx"] - e["w"] - x["lens"], e["dy"]]]), 3.0), fc, th)


def _occlude(img, P, tr, rng, skin) -> None:
    kind = int(rng.integers(5))
    S = SIZE * _SS
    e = tr["eyes"]
    if kind == 0:  # random patch
        x, y = rng.uniform(0, S, 2)
        w, h = rng.uniform(25, 75, 2)
        _fill(img, [np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])], tuple(rng.uniform(0, 255, 3).tolist()))
    elif kind == 1:  # hand: palm and fingers
        hc = _jitter(rng, skin if rng.random() < 0.7 else render_identity_traits(rng)["skin"]["colour"], 10)
        cx, cy = rng.uniform(-30, 30), rng.uniform(10, 45)
        _fill(img, [P.sil(_ell(cx, cy + 14, 15, 12, n=16))], hc)
        ang = rng.uniform(-0.6, 0.6)
        for f in range(4):
            fx = cx - 10 + f * 6.5
            tip = np.array([[fx, cy + 10], [fx + 20 * math.sin(ang), cy + 10 - 24 * math.cos(ang)]])
            _line(img, P.sil(tip), _scale(hc, 0.97), P.px(5.0))
    elif kind == 2:  # mask band over nose and mouth
        col = [(170, 205, 230), (235, 235, 235), (30, 30, 35), (120, 120, 125)][int(rng.integers(4))]
        outline = _head_outline(tr["head"])
        top_y = tr["nose"]["y"] - rng.uniform(3, 10)
        low = outline[outline[:, 1] > top_y]
        low = low[np.argsort(np.arctan2(low[:, 1], low[:, 0]))]
        a = tr["head"]["a"] * 0.95
        pts = np.vstack([low * 0.98, [[-a, top_y], [0, top_y - 2], [a, top_y]]])
        _fill(img, [P.surf(pts)], col)
    elif kind == 3:  # sunglasses
        for side in (-1, 1):
            _fill(img, [P.surf(_ell(side * e["dx"], e["dy"], e["w"] + 4, e["w"] * 0.7 + 3.5, n=16), 2.5)], (25, 25, 30))
        _line(img, P.surf(np.array([[-e["dx"] + e["w"], e["dy"]], [e["dx"] - e["w"], e["dy"]]]), 3.0), (25, 25, 30),
              P.px(1.2))
    else:  # hat covering the hair and forehead
        col = tuple(rng.uniform(0, 255, 3).tolist())
        h = tr["head"]
        brim = e["dy"] - tr["brows"]["gap"] - rng.uniform(5, 14)
        t = np.linspace(math.pi, 2 * math.pi, 16)
        dome = np.column_stack([(h["a"] + 4) * np.cos(t), brim + (h["b"] + 12 + brim) * np.sin(t)])
        _fill(img, [P.sil(dome)], col)
        _line(img, P.sil(np.array([[-h["a"] - 6, brim], [h["a"] + 6, brim]])), _scale(col, 0.7), P.px(3.0))


@functools.lru_cache(maxsize=1)
def _light_grid() -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return (xx - 55.5) / 56, (yy - 55.5) / 56


@functools.lru_cache(maxsize=1)
def _noise_field() -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((2 * SIZE, 2 * SIZE, 3), dtype=np.float32)


def render_face(traits: dict, rng: np.random.Generator, difficulty: float = 1.0, **overrides: Any) -> np.ndarray:
    """Draw one image of the identity ``traits``; returns a (112, 112, 3) uint8 RGB array.

    ``difficulty`` scales every nuisance (pose, scale/shift jitter, lighting, expression,
    blur, noise, JPEG damage, occlusion, background clutter); 0 gives a clean frontal
    image. ``overrides`` pin per-image parameters: yaw, pitch, roll (degrees), scale,
    tx, ty (pixels), occlude (bool), smile, mouth_open, open (eyes), brow.
    """
    d = float(difficulty)
    cap = min(d, 1.25)  # above 1 the spread keeps growing, the extremes (e.g. yaw 60) do not
    g = lambda sd, lim: min(lim * cap, max(-lim * cap, sd * d * float(rng.standard_normal())))
    v = {"yaw": g(16, 48), "pitch": g(7, 18), "roll": g(5, 14), "scale": 1 + g(0.05, 0.1),
         "tx": g(1.8, 4), "ty": g(1.8, 4), "occlude": rng.random() < 0.12 * d,
         "smile": g(0.5, 1), "mouth_open": max(0.0, g(0.5, 1)) if rng.random() < 0.3 else 0.0,
         "open": 1 - (0.85 if rng.random() < 0.05 * d else abs(g(0.15, 0.4))), "brow": g(1.2, 3)}
    v.update(overrides)
    img = np.empty((SIZE * _SS, SIZE * _SS, 3), np.uint8)
    _background(img, rng, d)
    tr = traits
    h, hair = tr["head"], tr["hair"]
    # mild per-photo changes of the stable traits (haircut, make-up, glasses on/off)
    vol = max(0.0, hair["vol"] + rng.normal(0, 1.0 * d))
    if tr["extras"]["glasses"] and rng.random() < 0.12 * d:
        tr = {**tr, "extras": {**tr["extras"], "glasses": 0}}
    skin = tr["skin"]["colour"]
    P = _Pose(h["a"], h["b"], v["yaw"], v["pitch"], v["roll"], v["scale"], v["tx"], v["ty"])
    _draw_head(img, P, tr, vol, skin, cloth=tuple(rng.uniform(0, 255, 3).tolist()))
    ex = {"open": float(np.clip(v["open"], 0.05, 1.2)), "gaze": (g(0.7, 1.4), g(0.4, 0.8)),
          "smile": float(np.clip(v["smile"], -1, 1)), "mouth_open": float(np.clip(v["mouth_open"], 0, 1)),
          "brow": v["brow"], "shadow_side": 1 if rng.random() < 0.5 else -1}
    _draw_features(img, P, tr, ex, skin)
    if hair["style"] == 1:
        _fill(img, [_hair_cap(P, tr, hair, 0.5)], _mix(skin, hair["colour"], 0.55))
    elif hair["style"] != 0:
        _fill(img, [_hair_cap(P, tr, hair, vol)], hair["colour"])
    if v["occlude"]:
        _occlude(img, P, tr, rng, skin)
    return _photograph(img, rng, d, g)


def _draw_head(img, P, tr, vol, skin, cloth) -> None:
    """Shoulders (``cloth`` RGB), neck, long hair behind the head, ears, the face outline, blush."""
    h, hair = tr["head"], tr["hair"]
    _fill(img, [P.sil(np.array([[-70, h["b"] + 4], [70, h["b"] + 4], [90, 90], [-90, 90]]))], cloth)
    _fill(img, [P.sil(np.array([[-h["a"] * 0.55, 0], [h["a"] * 0.55, 0], [h["a"] * 0.6, 70], [-h["a"] * 0.6, 70]]))],
          _scale(skin, 0.8))
    if hair["style"] in (4, 6):  # long hair / curls behind the head
        ln = hair["length"] if hair["style"] == 4 else 8
        back = _ell(0, 0, h["a"] + vol + (8 if hair["style"] == 6 else 3), h["b"] * 0.8 + vol + 6, n=16,
                    t0=math.pi, t1=2 * math.pi)
        back = np.vstack([back, [[h["a"] + vol + 3, h["b"] * 0.3 + ln], [-h["a"] - vol - 3,
                                                                                          h["b"] * 0.3 + ln]]])
        _fill(img, [P.sil(back)], _scale(hair["colour"], 0.85))
    for side in (-1, 1):
        ew = h["ear_w"] * float(np.clip(1 + 1.5 * side * -P.yaw_s, 0.2, 1.8))
        _fill(img, [P.sil(_ell(side * (h["a"] - 1), h["ear_y"], ew + 1, h["ear_h"], n=14))], _scale(skin, 0.9))
    outline = _head_outline(h)
    _fill(img, [P.sil(outline)], skin)
    _line(img, P.sil(outline), _scale(skin, tr["skin"]["shade"]), P.px(2.5), closed=True)
    if tr["skin"]["blush"] > 0.12:
        for side in (-1, 1):
            _fill(img, [P.surf(_ell(side * 20, 10, 6, 4, n=12))], _mix(skin, (220, 90, 90), tr["skin"]["blush"] * 0.5))


def _photograph(img: np.ndarray, rng: np.random.Generator, d: float, g) -> np.ndarray:
    """The camera: downsample the supersampled drawing to 112x112, then lighting (gain, directional
    gradient, colour cast), blur, sensor noise and JPEG damage, each scaled by difficulty ``d``
    (``g(sd, lim)`` draws the clipped normal jitter of ``render_face``)."""
    out = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    gx, gy = _light_grid()
    grad = 1 + abs(g(0.25, 0.5)) * (math.cos(ang) * gx + math.sin(ang) * gy)
    cast = 1 + np.array([g(0.07, 0.15) for _ in range(3)], np.float32)
    out *= (math.exp(g(0.2, 0.45)) * grad)[..., None] * cast
    sigma = abs(g(0.6, 1.3))
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    noise = abs(g(4.0, 10.0))
    if noise > 0.5:  # a random window of a fixed noise field: much cheaper than fresh normals
        oy, ox = (int(v) for v in rng.integers(0, SIZE, 2))
        out += _noise_field()[oy:oy + SIZE, ox:ox + SIZE] * noise
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.25 * d:
        q = int(rng.integers(15, 60))
        out = cv2.imdecode(cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_COLOR)
    return out
