"""`evaluate.py --ijb` against arcface_torch's eval_ijbc.py done longhand, step by step, on a hand-written release.

Nothing of ours is used for the reference but the network's weights: each 5pts line is split on ' '
and read with cv2.imread; its points (float32) are fitted to the ArcFace template by a float64
Umeyama written here, warped (border 0), BGR -> RGB; the image and its mirror go through the torch
module as one (2, 3, 112, 112) blob normalised (x/255 - 0.5)/0.5; the image feature is the two
halves summed, times the faceness score (float32); per template, per media, the mean, summed over
media, L2-normalised; score = dot product; sklearn roc_curve, arrays flipped, the first nearest FPR
(so the highest TPR at a tied FPR). Scores agree to 2e-4 (crops may differ by one grey level
where the warp rounds differently), their order exactly, and TAR@FAR exactly. The release mixes
media shared by several faces (video frames), non-contiguous template ids, a grey JPEG, a PNG named
.jpg, CRLF meta files and a gallery CSV with its columns in another order; --ijb is given the
folder above it (IJB_release/, holding this one release).
"""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

import backbones
import evaluate
from backbones.weights import save_backbone

SRC = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                [70.7299, 92.2041]], np.float32)  # eval_ijbc.py's template (x + 8 of the 96-wide one)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# template id -> subject; faces per template as lists of media ids (a repeated id: frames of one video)
TEMPLATES = {11: ("A", [1, 1, 2]), 12: ("A", [3]), 27: ("B", [4, 5]), 28: ("B", [6, 6]), 35: ("C", [7]),
             36: ("C", [8, 9, 9]), 40: ("D", [10]), 41: ("D", [11, 12])}


def umeyama(src, dst):
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    u, d, vt = np.linalg.svd(d0.T @ s0 / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    r = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / (s0 ** 2).sum(1).mean()
    return np.hstack([scale * r, (md - scale * r @ ms)[:, None]])


def subject_face(subject, rng):
    """A smooth 112x112 BGR image per subject, with a little per-image noise."""
    y, x = np.mgrid[0:112, 0:112] / 111.0
    srng = np.random.default_rng(ord(subject))
    chans = [127 + 100 * np.sin(2 * np.pi * (srng.uniform(0.5, 2) * x + srng.uniform(0.5, 2) * y + srng.random()))
             for _ in range(3)]
    img = np.stack(chans, -1) + rng.normal(0, 70, (112, 112, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJB_release") / "IJBC"
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    rng = np.random.default_rng(5)
    pts_lines, mid_lines, k = [], [], 0
    for tid, (subject, medias) in TEMPLATES.items():
        for mid in medias:
            k += 1
            name = f"{k}.jpg"
            deg, scale = rng.uniform(-25, 25), rng.uniform(1.2, 2.0)
            a = np.deg2rad(deg)
            m = np.array([[scale * np.cos(a), -scale * np.sin(a), rng.uniform(20, 60)],
                          [scale * np.sin(a), scale * np.cos(a), rng.uniform(20, 60)]])
            look = "Z" if tid == 12 else subject  # a genuine pair that looks like an impostor: TAR < 1
            big = cv2.warpAffine(subject_face(look, rng), m, (300, 280), flags=cv2.INTER_LINEAR)
            path = str(root / "loose_crop" / name)
            if k == 3:
                assert cv2.imwrite(path, cv2.cvtColor(big, cv2.COLOR_BGR2GRAY))  # grey JPEG
            elif k == 5:
                ok, buf = cv2.imencode(".png", big)  # a PNG under a .jpg name
                open(path, "wb").write(buf.tobytes())
            else:
                assert cv2.imwrite(path, big, [cv2.IMWRITE_JPEG_QUALITY, 92])
            pts = SRC @ m[:, :2].T + m[:, 2] + rng.normal(0, 0.7, (5, 2))
            faceness = rng.uniform(0.3, 1.0)
            pts_lines.append(f"{name} " + " ".join(f"{v:.3f}" for v in pts.ravel()) + f" {faceness:.4f}")
            mid_lines.append(f"{name} {tid} {mid}")
    tids = list(TEMPLATES)
    pairs = [(a, b, int(TEMPLATES[a][0] == TEMPLATES[b][0])) for i, a in enumerate(tids) for b in tids[i + 1:]]
    (root / "meta" / "ijbc_name_5pts_score.txt").write_bytes(("\r\n".join(pts_lines) + "\r\n").encode())
    (root / "meta" / "ijbc_face_tid_mid.txt").write_bytes(("\r\n".join(mid_lines) + "\r\n").encode())
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {lab}\n" for a, b, lab in pairs))
    gal = {"G1": [11, 27], "G2": [35, 40]}
    for g, ts in gal.items():
        (root / "meta" / f"ijbc_1N_gallery_{g}.csv").write_text(
            "FILENAME,SUBJECT_ID,TEMPLATE_ID\n" + "".join(f"x.jpg,{ord(TEMPLATES[t][0])},{t}\n" for t in ts))
    probes = [12, 28, 36, 41]
    (root / "meta" / "ijbc_1N_probe_mixed.csv").write_text(
        "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(f"{t},{ord(TEMPLATES[t][0])},y.jpg\n" for t in probes))
    return str(root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(3)
    model = backbones.build("mobilefacenet", embedding_size=64).eval()
    path = str(tmp_path_factory.mktemp("w") / "m.pt")
    save_backbone(path, model.state_dict(), "mobilefacenet", 64, "rgb")
    return path, model


def longhand(root, model):
    """(labels, scores) as eval_ijbc.py computes them, written out."""
    feats, faceness = [], []
    for line in open(os.path.join(root, "meta", "ijbc_name_5pts_score.txt")).readlines():
        parts = line.strip().split(" ")
        img = cv2.imread(os.path.join(root, "loose_crop", parts[0]))
        lmk = np.array([float(x) for x in parts[1:-1]], dtype=np.float32).reshape((5, 2))
        crop = cv2.warpAffine(img, umeyama(lmk, SRC), (112, 112), borderValue=0.0)
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
        blob = np.stack([crop.transpose(2, 0, 1), np.fliplr(crop).transpose(2, 0, 1)]).astype(np.float32)
        with torch.no_grad():
            out = model(torch.from_numpy((blob / 255.0 - 0.5) / 0.5)).numpy()
        feats.append(out.reshape(-1).astype(np.float32))  # [e(x), e(flip x)], as forward_db's reshape
        faceness.append(parts[-1])
    feats = np.array(feats, np.float32)
    faceness = np.array(faceness).astype(np.float32)
    d = feats.shape[1] // 2
    img_input = (feats[:, :d] + feats[:, d:]) * faceness[:, np.newaxis]
    meta = [line.split() for line in open(os.path.join(root, "meta", "ijbc_face_tid_mid.txt"))]
    templates = np.array([int(m[1]) for m in meta])
    medias = np.array([int(m[2]) for m in meta])
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), d))
    for c, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_feats, face_medias = img_input[ind_t], medias[ind_t]
        media_feats = []
        for u, ct in zip(*np.unique(face_medias, return_counts=True)):
            (ind_m,) = np.where(face_medias == u)
            media_feats.append(face_feats[ind_m] if ct == 1 else np.mean(face_feats[ind_m], axis=0, keepdims=True))
        template_feats[c] = np.sum(np.array(media_feats), axis=0)
    template_feats /= np.sqrt(np.sum(template_feats ** 2, -1, keepdims=True))
    row = {t: i for i, t in enumerate(unique_templates)}
    pairs = np.loadtxt(os.path.join(root, "meta", "ijbc_template_pair_label.txt"), dtype=int)
    scores = np.array([template_feats[row[a]] @ template_feats[row[b]] for a, b, _ in pairs])
    return pairs[:, 2], scores


def tar_at_far_longhand(labels, scores):
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for x in FARS:
        _, i = min(zip(abs(fpr - x), range(len(fpr))))
        out[x] = tpr[i]
    return out


def test_evaluate_ijb_equals_the_longhand_reference(release, weights, tmp_path):
    path, model = weights
    report, emb = str(tmp_path / "r"), str(tmp_path / "e")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the release's parent folder: it holds one release, which is used
        rc = evaluate.main([path, "--ijb", os.path.dirname(release), "--report", report, "--save-embeddings", emb,
                            "--no-progress", "--workers", "0", "--no-cache"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    labels, expect = longhand(release, model)
    scores = np.load(os.path.join(emb, "IJBC_scores.npy"))
    # the crops may differ by 1 grey level at a few pixels (the warp matrix rounds differently): ~5e-5 here
    np.testing.assert_allclose(scores, expect, rtol=0, atol=2e-4)
    assert (np.argsort(scores) == np.argsort(expect)).all()  # so the ROC is the same
    summary = json.load(open(os.path.join(report, "eval.json")))["checkpoints"][0]["ijb"]["IJBC"]
    got = summary["verification"]["tar_at_far"]
    want = tar_at_far_longhand(labels, expect)
    assert 0 < min(want.values()) < 1  # the rule is exercised, not a saturated 100%
    for far, tar in want.items():
        assert got[str(far)] == pytest.approx(tar, abs=1e-12), far
    assert summary["faces"] == sum(len(m) for _, m in TEMPLATES.values()) and summary["unreadable_faces"] == 0
    assert summary["verification"]["pairs"] == len(labels) and summary["identification"]
