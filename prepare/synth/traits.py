"""An identity's stable traits: sampling, look-alikes, ageing (no drawing here)."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

_HAIR = [(25, 20, 18), (55, 38, 28), (100, 68, 44), (135, 70, 38), (175, 135, 85),
         (215, 185, 130), (120, 120, 118), (205, 205, 200)]
_IRIS = [(60, 35, 20), (100, 60, 30), (120, 100, 50), (70, 110, 70), (70, 110, 170), (120, 130, 140)]
_FRAME = [(20, 20, 20), (90, 55, 30), (150, 150, 155), (190, 160, 80), (150, 30, 40), (30, 40, 110)]


def _mix(a, b, t: float) -> Tuple[float, float, float]:
    """Colour a*(1-t) + b*t, as floats (cv2 accepts them)."""
    return tuple(float(x) * (1.0 - t) + float(y) * t for x, y in zip(a, b))


def _scale(c, k: float) -> Tuple[float, float, float]:
    return tuple(min(255.0, float(x) * k) for x in c)


def _jitter(rng: np.random.Generator, c, amount: float) -> Tuple[float, float, float]:
    return tuple(min(255.0, max(0.0, float(x) + amount * float(z))) for x, z in zip(c, rng.standard_normal(3)))


# --------------------------------------------------------------------------- traits

_GROUPS = ("head", "skin", "hair", "eyes", "brows", "nose", "mouth", "extras")


def render_identity_traits(rng: np.random.Generator) -> Dict[str, Dict[str, Any]]:
    """Sample one identity's stable traits, grouped (see ``lookalike_traits``).

    Lengths are pixels of the 112 frame relative to the head centre (56, 60);
    colours are RGB 0-255 floats.
    """
    u = lambda lo, hi: float(rng.uniform(lo, hi))
    tone = u(0, 1)
    skin = _mix((92, 58, 40), (240, 206, 182), tone)
    skin = (skin[0] + u(-8, 12), skin[1] + u(-8, 6), skin[2] + u(-14, 6))
    hair_col = _jitter(rng, _HAIR[int(rng.integers(len(_HAIR)))], 12)
    style = int(rng.choice(7, p=[0.08, 0.12, 0.25, 0.15, 0.2, 0.1, 0.1]))
    beard = int(rng.choice(5, p=[0.6, 0.1, 0.1, 0.1, 0.1])) if style not in (4,) else 0
    return {
        "head": {"a": u(33, 41), "b": u(44, 52), "jaw": u(0.0, 0.4), "chin": u(0.0, 0.5),
                 "cheek": u(-0.05, 0.12), "ear_w": u(3.5, 6.0), "ear_h": u(8, 12), "ear_y": u(-4, 6)},
        "skin": {"colour": skin, "blush": u(0, 0.25), "shade": u(0.78, 0.92), "wrinkles": u(0, 0.35)},
        "hair": {"colour": hair_col, "style": style, "line": u(0.36, 0.62), "vol": u(1, 7),
                 "temple": u(-14, 0), "peak": u(-3, 4), "part": u(-1, 1), "length": u(10, 40)},
        "eyes": {"dx": u(15.5, 19.5), "dy": u(-10.5, -6.5), "w": u(4.6, 7.0), "h": u(0.32, 0.55),
                 "almond": u(-0.15, 0.35), "tilt": u(-9, 11), "iris": _jitter(rng, _IRIS[int(rng.integers(6))], 10),
                 "iris_r": u(0.42, 0.6), "lash": u(0.5, 1.6)},
        "brows": {"gap": u(3.5, 8), "thick": u(0.9, 3.2), "arch": u(-0.5, 3.5), "len": u(9, 15),
                  "inner": u(-2, 3), "slant": u(-3, 3), "dark": u(0.5, 1.0)},
        "nose": {"y": u(8.5, 15), "w": u(4.5, 8.5), "prot": u(6, 13), "nostril": u(0.6, 1.6),
                 "bridge": u(1.5, 4)},
        "mouth": {"y": u(29, 35), "w": u(10.5, 17), "up": u(1.3, 4), "low": u(1.8, 5.2),
                  "red": u(0.15, 0.6), "curve": u(-1.8, 1.8)},
        "extras": {"glasses": int(rng.choice(3, p=[0.72, 0.14, 0.14])), "frame": _FRAME[int(rng.integers(6))],
                   "frame_t": u(0.6, 1.8), "lens": u(1.5, 4.5), "beard": beard, "beard_d": u(0.35, 0.9),
                   "moles": [(u(-26, 26), u(-20, 38), u(0.6, 1.5)) for _ in range(int(rng.integers(0, 4)))],
                   "scar": [u(-28, 28), u(-22, 30), u(-8, 8), u(-8, 8)] if rng.random() < 0.15 else None,
                   "freckles": rng.random() < 0.15, "freckle_seed": int(rng.integers(1 << 30))},
    }


def lookalike_traits(traits: dict, rng: np.random.Generator, keep: float = 0.55) -> dict:
    """A different identity that shares each trait group of ``traits`` with probability ``keep``.

    Used for the hard negatives of cplfw and calfw; at least two groups always differ.
    """
    fresh = render_identity_traits(rng)
    keep_mask = rng.random(len(_GROUPS)) < keep
    differ = rng.choice(len(_GROUPS), 2, replace=False)
    keep_mask[differ] = False
    return {g: (dict(traits[g]) if k else fresh[g]) for g, k in zip(_GROUPS, keep_mask)}


def age_traits(traits: dict, rng: np.random.Generator, amount: float = 1.0) -> dict:
    """The same identity some years later: greyer hair, more wrinkles, higher hairline,
    slightly changed face shape. ``amount`` 0 (no change) to 1 (decades)."""
    t = {g: dict(v) for g, v in traits.items()}
    a = float(np.clip(amount, 0, 1.5))
    grey = rng.uniform(0.2, 0.8) * a
    t["hair"]["colour"] = _mix(t["hair"]["colour"], (185, 185, 182), grey)
    t["brows"]["dark"] = t["brows"]["dark"] * (1 - 0.3 * grey)
    t["hair"]["line"] = t["hair"]["line"] + rng.uniform(0, 0.15) * a
    t["skin"]["wrinkles"] = min(1.0, t["skin"]["wrinkles"] + rng.uniform(0.3, 0.7) * a)
    t["head"]["a"] *= 1 + rng.uniform(-0.02, 0.05) * a
    t["head"]["jaw"] = float(np.clip(t["head"]["jaw"] + rng.uniform(-0.1, 0.1) * a, 0, 0.5))
    t["mouth"]["up"] *= 1 - 0.3 * a * rng.random()
    t["skin"]["colour"] = _jitter(rng, t["skin"]["colour"], 6 * a)
    return t
