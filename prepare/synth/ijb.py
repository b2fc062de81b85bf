"""A small synthetic IJB-B / IJB-C set, written in exactly the layout of insightface's evaluation package.

Why: the real IJB sets cannot be downloaded where this project is built and tested, yet the IJB
evaluation (alignment from loose crops, faceness weighting, media/template pooling, 1:1 pairs,
1:N galleries) must be exercised end to end. This module draws held-out synthetic identities
(numbered from ``IDENTITY_OFFSET``, far from the training identities 0..identities-1 and from the
.bin sets' pools that follow them), renders each face as a 112x112 aligned crop with the ordinary
generator, and places it in a larger "loose crop" by a random similarity, so the 5 points written
for it (the ArcFace template pushed through that similarity) align it back onto the original crop.

Layout under ``<out>/<TARGET>`` (prefix ``ijbc``/``ijbb``; galleries G1/G2 or S1/S2)::

    loose_crop/<k>.jpg                    k = 1..N, line k of both face files
    meta/<p>_face_tid_mid.txt             "<k>.jpg tid mid"
    meta/<p>_name_5pts_score.txt          "<k>.jpg x1 y1 ... x5 y5 faceness"   (loose-crop pixels)
    meta/<p>_template_pair_label.txt      "gallery_tid probe_tid label"        (1 genuine, 0 impostor)
    meta/<p>_1N_gallery_<G>.csv, meta/<p>_1N_probe_mixed.csv
                                          header TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,...
                                          one row per face (SIGHTING_ID = k)

Protocol shape: subjects are split into two disjoint gallery halves; each subject has one gallery
template (2-4 media) in its half and two probe templates (1-3 media) in probe_mixed; a media is a
still (1 frame) or a video (2-4 frames sharing pose, placement and background, with small jitter).
Pairs: every probe template against every gallery template, in a fixed shuffled order (IJB-C's
1:1 pairs are gallery-vs-probe templates too). Face lines are shuffled (a template's faces are
not contiguous) and template and media ids are distinct, gapped positive ints, so a reader that
assumes sorted or 0..T-1 ids fails here rather than on the real data.

Everything is a pure function of the arguments (same arguments, same bytes). Units: pixels
(x right, y down, pixel centres at integers, OpenCV's convention); angles in degrees.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np

from detection.align import template
from prepare.synth.dataset import encoded, render_job
from prepare.synth.render import SIZE
from utils.atomic import write_bytes, write_text
from utils.errors import UserError

#: Identity numbers of the IJB subjects start here: never a training identity nor a .bin pool's.
IDENTITY_OFFSET = 10 ** 6
#: ``render_job`` set code of IJB faces: an RNG stream apart from train (0) and the .bin sets (1..7).
SET_CODE = 100
#: Target folder -> (file prefix, the two gallery names), as the release names them.
TARGETS: Dict[str, Tuple[str, Tuple[str, str]]] = {"IJBC": ("ijbc", ("G1", "G2")), "IJBB": ("ijbb", ("S1", "S2"))}
CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"
PROBE = "probe"  # role of a probe template (the others are named by their gallery)

# Placement of the aligned crop in its loose crop: scale and rotation of the base similarity,
# jitter of the frames of one video, side of the loose crop before it grows to fit the face.
SCALE_RANGE = (0.8, 1.6)
ROTATION_DEG = 25.0
FRAME_JITTER = {"rotation": 2.0, "scale": 0.03, "shift": 3.0}
SIDE_RANGE = (150, 220)
LOW_SCORE_SHARE = 0.05  # faces with a poor faceness score (0.05-0.5); the rest score 0.5-1


class IjbSynthError(UserError, ValueError):
    """Bad arguments for the synthetic IJB set (one line naming the argument)."""


@dataclasses.dataclass(frozen=True)
class IjbFace:
    """One face line: which crop it is, where it was placed, and its meta data.

    ``matrix`` (2x3, row-major) maps crop pixels to loose-crop pixels; ``job`` is the
    ``render_job`` job that draws the 112x112 crop; ``background`` seeds the loose crop's
    background (shared by the frames of one media).
    """

    image: int
    tid: int
    mid: int
    subject: int
    job: Tuple[int, int, int, int, float | None, float]
    size: Tuple[int, int]  # loose crop (width, height)
    matrix: Tuple[float, ...]
    background: Tuple[int, ...]
    score: float
    filename: str  # as the 1:N CSV names the source ("img/<mid>.jpg" or "frames/<mid>_<j>.png")

    def landmarks(self) -> np.ndarray:
        """The (5, 2) float64 ArcFace 112x112 template points in loose-crop pixels, rounded as written."""
        m = np.asarray(self.matrix, np.float64).reshape(2, 3)
        return np.round(template((SIZE, SIZE)) @ m[:, :2].T + m[:, 2], 3)


@dataclasses.dataclass(frozen=True)
class IjbTemplate:
    tid: int
    subject: int
    role: str  # a gallery name (G1/G2, S1/S2) or PROBE


def _gapped_ids(rng: np.random.Generator, n: int) -> List[int]:
    """``n`` distinct positive ints with random gaps, in a random order."""
    ids = 1 + np.cumsum(rng.integers(1, 9, size=n))
    return [int(v) for v in rng.permutation(ids)]


def _placements(rng: np.random.Generator, frames: int) -> Tuple[Tuple[int, int], List[np.ndarray]]:
    """Loose-crop size and one crop->loose matrix per frame of a media: one base similarity plus
    small per-frame jitter; the loose crop grows so that every frame's whole crop lies inside."""
    angle0, scale0 = rng.uniform(-ROTATION_DEG, ROTATION_DEG), rng.uniform(*SCALE_RANGE)
    j = FRAME_JITTER
    poses = [(angle0 + rng.uniform(-1, 1) * j["rotation"], scale0 * (1 + rng.uniform(-1, 1) * j["scale"]),
              rng.uniform(-1, 1, 2) * j["shift"]) for _ in range(frames)]
    extent = [SIZE * s * (abs(math.cos(math.radians(a))) + abs(math.sin(math.radians(a)))) for a, s, _ in poses]
    need = int(math.ceil(max(extent))) + 2 + 2 * int(math.ceil(j["shift"]))
    w, h = (max(int(rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1)), need) for _ in range(2))
    slack = np.array([w, h], np.float64) - need
    centre = np.array([w, h], np.float64) / 2 - 0.5 + rng.uniform(-0.5, 0.5, 2) * slack
    mats = []
    for angle, scale, shift in poses:
        a = math.radians(angle)
        lin = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        c = (SIZE - 1) / 2
        mats.append(np.hstack([lin, (centre + shift - lin @ np.array([c, c]))[:, None]]))
    return (w, h), mats


def ijb_plan(subjects: int, seed: int = 0, difficulty: float = 0.3, target: str = "IJBC"
             ) -> Tuple[List[IjbFace], List[IjbTemplate]]:
    """Every face (in line order, image k = line k) and every template of the synthetic set."""
    if target not in TARGETS:
        raise IjbSynthError(f"IJB target {target!r} is not one of {', '.join(TARGETS)}")
    if subjects < 2:
        raise IjbSynthError(f"IJB subjects={subjects}: need at least 2 (one per gallery)")
    galleries = TARGETS[target][1]
    d = float(difficulty)
    rng = np.random.default_rng([seed, 20, subjects])
    order = rng.permutation(subjects)
    gallery_of = {int(s): galleries[0] if i < subjects // 2 else galleries[1] for i, s in enumerate(order)}
    # (subject, role, media count) per template: gallery template first, then the two probes
    shapes = [(s, gallery_of[s], int(rng.integers(2, 5))) for s in range(subjects)]
    shapes += [(s, PROBE, int(rng.integers(1, 4))) for s in range(subjects) for _ in range(2)]
    tids = _gapped_ids(rng, len(shapes))
    frames = [[1 if rng.random() < 0.5 else int(rng.integers(2, 5)) for _ in range(m)] for _, _, m in shapes]
    mids = iter(_gapped_ids(rng, sum(len(f) for f in frames)))
    templates, faces = [], []
    renders = [0] * subjects  # per-subject render index: each face its own RNG stream
    for t, ((s, role, _), tid) in enumerate(zip(shapes, tids)):
        templates.append(IjbTemplate(tid, IDENTITY_OFFSET + s, role))
        for n in frames[t]:
            mid = next(mids)
            mrng = np.random.default_rng([seed, 21, mid])
            size, mats = _placements(mrng, n)
            background = tuple(int(v) for v in mrng.integers(0, 2 ** 31, 2))
            # a video keeps its head pose (yaw, with small drift); a still draws it freely
            yaw0 = min(48 * min(d, 1.25), max(-48 * min(d, 1.25), 16 * d * float(mrng.standard_normal())))
            for f, m in enumerate(mats):
                yaw = None if n == 1 else yaw0 + 3 * d * float(mrng.standard_normal())
                low = mrng.random() < LOW_SCORE_SHARE
                score = round(float(mrng.uniform(0.05, 0.5) if low else mrng.uniform(0.5, 1.0)), 5)
                name = f"img/{mid}.jpg" if n == 1 else f"frames/{mid}_{f}.png"
                job = (SET_CODE, IDENTITY_OFFSET + s, -1, renders[s], yaw, 0.0)
                renders[s] += 1
                faces.append(IjbFace(0, tid, mid, IDENTITY_OFFSET + s, job, size,
                                     tuple(float(v) for v in m.ravel()), background, score, name))
    line_order = rng.permutation(len(faces))
    faces = [dataclasses.replace(faces[i], image=k + 1) for k, i in enumerate(line_order)]
    return faces, templates


def ijb_pairs(templates: List[IjbTemplate], seed: int = 0) -> List[Tuple[int, int, int]]:
    """(gallery tid, probe tid, label) for every probe x gallery template, in a fixed shuffled order."""
    gallery = [t for t in templates if t.role != PROBE]
    probes = [t for t in templates if t.role == PROBE]
    pairs = [(g.tid, p.tid, int(g.subject == p.subject)) for p in probes for g in gallery]
    order = np.random.default_rng([seed, 22, len(templates)]).permutation(len(pairs))
    return [pairs[i] for i in order]


def render_crop(seed: int, difficulty: float, face: IjbFace) -> np.ndarray:
    """The face's 112x112 aligned crop (RGB uint8), before placement: what alignment must recover."""
    return render_job(seed, difficulty, face.job)


def _background(face: IjbFace) -> np.ndarray:
    """A smooth colour gradient with mild fixed noise (float32 RGB), the same for one media's frames."""
    w, h = face.size
    rng = np.random.default_rng(list(face.background))
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (math.cos(a) * xx + math.sin(a) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + t[..., None] * (c1 - c0)
    return (img + rng.normal(0, 6, (h, w, 3))).astype(np.float32)


def render_loose(seed: int, difficulty: float, face: IjbFace) -> np.ndarray:
    """The loose crop (RGB uint8, height x width): the aligned crop warped by ``face.matrix``
    (bilinear) over the media's background, blended by the warped coverage at the crop's edge."""
    w, h = face.size
    m = np.asarray(face.matrix, np.float64).reshape(2, 3)
    crop = render_crop(seed, difficulty, face).astype(np.float32)
    warp = dict(flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    face_px = cv2.warpAffine(crop, m, (w, h), **warp)
    cover = cv2.warpAffine(np.ones((SIZE, SIZE), np.float32), m, (w, h), **warp)[..., None]
    out = face_px + _background(face) * (1 - cover)  # border 0 makes face_px premultiplied by cover
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _encode(img_rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img_rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed to write a JPEG")
    return buf.tobytes()


def _work(args: Tuple[int, float, int, IjbFace]) -> bytes:
    seed, difficulty, quality, face = args
    return _encode(render_loose(seed, difficulty, face), quality)


def _face_box(face: IjbFace) -> Tuple[int, int, int, int]:
    """The crop's bounding box in the loose crop (x, y, width, height), whole pixels."""
    m = np.asarray(face.matrix, np.float64).reshape(2, 3)
    corners = np.array([[-0.5, -0.5], [SIZE - 0.5, -0.5], [-0.5, SIZE - 0.5], [SIZE - 0.5, SIZE - 0.5]])
    pts = corners @ m[:, :2].T + m[:, 2]
    x0, y0 = np.floor(pts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def meta_texts(faces: List[IjbFace], templates: List[IjbTemplate], pairs: List[Tuple[int, int, int]],
               target: str) -> Dict[str, str]:
    """File name (under meta/) -> text of every meta file."""
    prefix, galleries = TARGETS[target]
    texts = {f"{prefix}_face_tid_mid.txt": "".join(f"{f.image}.jpg {f.tid} {f.mid}\n" for f in faces),
             f"{prefix}_name_5pts_score.txt": "".join(
                 f"{f.image}.jpg " + " ".join(f"{v:.3f}" for v in f.landmarks().ravel()) + f" {f.score:.5f}\n"
                 for f in faces),
             f"{prefix}_template_pair_label.txt": "".join(f"{a} {b} {label}\n" for a, b, label in pairs)}
    faces_of: Dict[int, List[IjbFace]] = {}
    for f in faces:
        faces_of.setdefault(f.tid, []).append(f)
    files = [(g, f"{prefix}_1N_gallery_{g}.csv") for g in galleries] + [(PROBE, f"{prefix}_1N_probe_mixed.csv")]
    for role, name in files:
        rows = [CSV_HEADER]
        for t in sorted((t for t in templates if t.role == role), key=lambda t: t.tid):
            rows += [f"{t.tid},{t.subject},{f.filename},{f.image}," + ",".join(map(str, _face_box(f)))
                     for f in faces_of[t.tid]]
        texts[name] = "\n".join(rows) + "\n"
    return texts


def _remove_stale(folder: str, count: int) -> None:
    """Delete numbered images beyond ``count`` left by an earlier, larger run (only names we write)."""
    for name in os.listdir(folder):
        match = re.fullmatch(r"(\d+)\.jpg", name)
        if match and int(match.group(1)) > count:
            os.remove(os.path.join(folder, name))


def generate_ijb(out_dir: str, subjects: int = 200, seed: int = 0, difficulty: float = 0.3, jpeg_quality: int = 90,
                 target: str = "IJBC", workers: int = 1, progress: bool = False) -> Dict[str, Any]:
    """Write the synthetic ``target`` set under ``out_dir/target`` (layout in the module docstring).

    Images first, meta files last (a run cut short leaves no meta, so no reader takes it for a
    whole set). Output bytes depend only on the arguments (not on ``workers``). Returns counts.
    """
    t0 = time.perf_counter()
    faces, templates = ijb_plan(subjects, seed, difficulty, target)
    pairs = ijb_pairs(templates, seed)
    root = os.path.join(out_dir, target)
    crops = os.path.join(root, "loose_crop")
    os.makedirs(crops, exist_ok=True)
    _remove_stale(crops, len(faces))
    jobs = ((seed, float(difficulty), jpeg_quality, f) for f in faces)
    with encoded(_work, jobs, workers, len(faces), f"synth {target}", progress, chunksize=16) as results:
        for face, payload in zip(faces, results):
            write_bytes(os.path.join(crops, f"{face.image}.jpg"), payload)
    for name, text in meta_texts(faces, templates, pairs, target).items():
        write_text(os.path.join(root, "meta", name), text)
    seconds = time.perf_counter() - t0
    galleries = TARGETS[target][1]
    return {"root": root, "target": target, "faces": len(faces), "media": len({f.mid for f in faces}),
            "templates": len(templates), "pairs": len(pairs), "genuine": sum(p[2] for p in pairs),
            "subjects": subjects, "gallery_subjects": {g: sum(t.role == g for t in templates) for g in galleries},
            "probe_templates": sum(t.role == PROBE for t in templates), "seconds": round(seconds, 2)}
