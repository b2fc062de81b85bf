"""IJB scoring speed: evaluation/ijb_protocol.py against a transcription of the reference loops.

    python benchmarks/bench_ijb.py [--faces 50000] [--templates 3000] [--subjects 500]
                                   [--pairs 1000000] [--dim 512] [--json PATH]

Random float32 "embeddings" of IJB-like shape (faces in templates, templates made of media of
1-5 frames, subjects with one gallery template each split over G1/G2, every other template a
probe, random template pairs labelled by subject). Three stages, each timed both ways in one run:

- aggregation: arcface_torch eval_ijbc.py ``image2template_feature`` (per-template ``np.where``,
  per-media loop) against ``template_features``;
- pair scoring: eval_ijbc.py ``verification`` (template2id table, 100000-pair batches) against
  ``pair_scores``; then TAR@FAR (the reference's flip + min(zip(...)) pick against ``tar_at_far``);
- 1:N: ijb_1n.py ``gen_mask`` + ``evaluation`` (full argsort per probe, top-k loops, heapq
  over the non-mate scores) against ``identification`` (which also computes the NIST open set).

Both sides get the same float64 face features (the reference keeps them in float32, which moves
scores by ~1e-7; here the point is the same arithmetic), and the run stops unless template
features and scores agree to 1e-12 and TAR@FAR and rank-1/5/10 are identical.
"""

import argparse
import heapq
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import sklearn.preprocessing  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from evaluation.ijb_protocol import (  # noqa: E402
    FARS,
    face_features,
    identification,
    pair_scores,
    tar_at_far,
    template_features,
)
from utils.atomic import write_json  # noqa: E402

# ---- the reference, transcribed (arcface_torch eval_ijbc.py, recognition/_evaluation_/ijb/ijb_1n.py)

def ref_image2template_feature(img_feats, templates, medias):
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        media_norm_feats = np.array(media_norm_feats)
        template_feats[count_template] = np.sum(media_norm_feats, axis=0)
    template_norm_feats = sklearn.preprocessing.normalize(template_feats)
    return template_norm_feats, unique_templates


def ref_verification(template_norm_feats, unique_templates, p1, p2):
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.zeros((len(p1),))
    total_pairs = np.array(range(len(p1)))
    batchsize = 100000
    sublists = [total_pairs[i:i + batchsize] for i in range(0, len(p1), batchsize)]
    for s in sublists:
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()
    return score


def ref_tar_at_far(label, score, x_labels=FARS):
    fpr, tpr, _ = roc_curve(label, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    row = []
    for far in x_labels:
        _, min_index = min(list(zip(abs(fpr - far), range(len(fpr)))))
        row.append(tpr[min_index])
    return row


def ref_gen_mask(query_ids, reg_ids):
    mask = []
    for query_id in query_ids:
        pos = [i for i, x in enumerate(reg_ids) if query_id == x]
        if len(pos) != 1:
            raise RuntimeError(f"RegIdsError with id = {query_id}, duplicate = {len(pos)}")
        mask.append(pos[0])
    return mask


def ref_1n_evaluation(query_feats, gallery_feats, mask, fars=(0.01, 0.1)):
    query_num = query_feats.shape[0]
    similarity = np.dot(query_feats, gallery_feats.T)
    top_inds = np.argsort(-similarity)
    tops = {}
    for k in (1, 5, 10):
        correct_num = 0
        for i in range(query_num):
            if mask[i] in top_inds[i, 0:k]:
                correct_num += 1
        tops[k] = correct_num / query_num
    required_topk = [math.ceil(query_num * x) for x in fars]
    top_sims = similarity
    pos_sims = []
    for i in range(query_num):
        gt = mask[i]
        pos_sims.append(top_sims[i, gt])
        top_sims[i, gt] = -2.0
    pos_sims = np.array(pos_sims)
    neg_sims = top_sims[np.where(top_sims > -2.0)]
    neg_sims_sorted = heapq.nlargest(max(required_topk), neg_sims)
    recalls = [np.sum(pos_sims > neg_sims_sorted[pos - 1]) / query_num for pos in required_topk]
    return tops, recalls


# ---- data and timing

def make_ijb_like(args):
    """Raw float32 features, faceness, per-face template/media ids, pairs, 1:N lists."""
    rng = np.random.default_rng(args.seed)
    n_t, n_s = args.templates, args.subjects
    tids = rng.choice(np.arange(1, 20 * n_t), n_t, replace=False)  # gapped, shuffled ids
    subject = np.r_[np.arange(n_s), rng.integers(0, n_s, n_t - n_s)]  # first n_s: gallery
    face_t = np.r_[np.arange(n_t), rng.integers(0, n_t, args.faces - n_t)]  # every template has a face
    face_m = face_t * 8 + np.minimum(rng.geometric(0.45, args.faces) - 1, 7)  # media of ~1-5 frames
    centres = rng.standard_normal((n_s, args.dim)).astype(np.float32)
    raw = centres[subject[face_t]] + rng.standard_normal((args.faces, args.dim)).astype(np.float32) * 1.5
    raw *= rng.uniform(5, 30, (args.faces, 1)).astype(np.float32)
    faceness = rng.uniform(0.3, 1.0, args.faces)
    p1, p2 = rng.integers(0, n_t, args.pairs), rng.integers(0, n_t, args.pairs)
    genuine = rng.integers(0, n_t, args.pairs // 100)  # ~1% genuine pairs: a random other template
    for _ in range(4):  # of the same subject, found by a few redraws (no loop over pairs)
        cand = rng.integers(0, n_t, genuine.size)
        ok = subject[cand] == subject[p1[: genuine.size]]
        p2[: genuine.size] = np.where(ok, cand, p2[: genuine.size])
    labels = (subject[p1] == subject[p2]).astype(int)
    gal = np.arange(n_s)
    perm = rng.permutation(n_s)
    g1, g2 = gal[perm[: n_s // 2]], gal[perm[n_s // 2:]]
    probes = np.arange(n_s, n_t)
    return {
        "raw": raw, "faceness": faceness, "templates": tids[face_t], "medias": face_m,
        "p1": tids[p1], "p2": tids[p2], "labels": labels,
        "G1": (tids[g1], subject[g1]), "G2": (tids[g2], subject[g2]), "probe": (tids[probes], subject[probes]),
    }


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args) -> dict:
    d = make_ijb_like(args)
    feats = face_features(d["raw"], d["faceness"])
    (ref_tf, ref_ids), t_ref_agg = timed(lambda: ref_image2template_feature(feats, d["templates"], d["medias"]))
    (ids, tf), t_agg = timed(lambda: template_features(feats, d["templates"], d["medias"]))
    assert np.array_equal(ids, ref_ids)
    agg_diff = float(np.max(np.abs(tf - ref_tf)))

    ref_scores, t_ref_pairs = timed(lambda: ref_verification(ref_tf, ref_ids, d["p1"], d["p2"]))
    scores, t_pairs = timed(lambda: pair_scores(ids, tf, d["p1"], d["p2"]))
    score_diff = float(np.max(np.abs(scores - ref_scores)))
    ref_tar, t_ref_tar = timed(lambda: ref_tar_at_far(d["labels"], ref_scores))
    tar, t_tar = timed(lambda: tar_at_far(d["labels"], scores))
    tar_same = [float(x) for x in ref_tar] == [tar["tar_at_far"][f] for f in FARS]

    g_t = np.concatenate([d["G1"][0], d["G2"][0]])
    g_s = np.concatenate([d["G1"][1], d["G2"][1]])
    row = {t: i for i, t in enumerate(ids)}

    def ref_1n():
        mask = ref_gen_mask(d["probe"][1], g_s)
        q = tf[[row[t] for t in d["probe"][0]]]
        return ref_1n_evaluation(q, tf[[row[t] for t in g_t]], mask)

    (ref_top, _), t_ref_1n = timed(ref_1n)
    ident, t_1n = timed(lambda: identification(ids, tf, *d["probe"], {"G1": d["G1"], "G2": d["G2"]}))
    rank_same = all(ref_top[k] == ident["rank"][k] for k in (1, 5, 10))

    if not (agg_diff <= 1e-12 and score_diff <= 1e-12 and tar_same and rank_same):
        raise AssertionError(f"results differ: templates {agg_diff:.3g}, scores {score_diff:.3g}, "
                             f"TAR same {tar_same} ({ref_tar} vs {tar['tar_at_far']}), rank same {rank_same}")
    stages = {
        "aggregation": (t_ref_agg, t_agg),
        "pair_scoring": (t_ref_pairs, t_pairs),
        "tar_at_far": (t_ref_tar, t_tar),
        "one_to_n": (t_ref_1n, t_1n),
        "total": (t_ref_agg + t_ref_pairs + t_ref_tar + t_ref_1n, t_agg + t_pairs + t_tar + t_1n),
    }
    return {
        "faces": args.faces, "templates": args.templates, "subjects": args.subjects, "pairs": args.pairs,
        "genuine_pairs": int(d["labels"].sum()), "probes": int(d["probe"][0].size), "dim": args.dim,
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "max_abs_diff_template": agg_diff, "max_abs_diff_score": score_diff,
        "tar_at_far_identical": tar_same, "rank_identical": rank_same,
        "tar_at_far": {str(f): v for f, v in tar["tar_at_far"].items()},
        "rank": {str(k): v for k, v in ident["rank"].items()},
        "tpir_at_fpir": {g: {str(f): v for f, v in r.items()} for g, r in ident["tpir_at_fpir"].items()},
        "stages": {name: {"reference_s": r, "ours_s": o, "speedup": r / o} for name, (r, o) in stages.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=50000, help="faces (IJB-C: 469,375)")
    parser.add_argument("--templates", type=int, default=3000, help="templates (IJB-C: 23,124)")
    parser.add_argument("--subjects", type=int, default=500, help="subjects = gallery templates (IJB-C: 3,531)")
    parser.add_argument("--pairs", type=int, default=1_000_000, help="template pairs (IJB-C: 15,658,489)")
    parser.add_argument("--dim", type=int, default=512, help="feature size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.subjects < args.templates <= args.faces:
        parser.error("need 0 < --subjects < --templates <= --faces")
    res = run(args)
    print(f"{res['faces']} faces, {res['templates']} templates, {res['pairs']} pairs "
          f"({res['genuine_pairs']} genuine), {res['probes']} probes x {res['subjects']} gallery, {res['dim']}-d")
    print(f"agree: templates {res['max_abs_diff_template']:.1e}, scores {res['max_abs_diff_score']:.1e}, "
          f"TAR@FAR identical {res['tar_at_far_identical']}, rank-1/5/10 identical {res['rank_identical']}")
    print(f"{'stage':<14}{'reference s':>12}{'ours s':>10}{'speedup':>9}")
    for name, s in res["stages"].items():
        print(f"{name:<14}{s['reference_s']:>12.3f}{s['ours_s']:>10.3f}{s['speedup']:>8.1f}x")
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
