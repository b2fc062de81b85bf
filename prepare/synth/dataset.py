"""The synthetic data set: which images of whom, the verification pairs, and writing it all."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

import cv2
import numpy as np

from prepare.synth.render import SIZE, render_face
from prepare.synth.traits import age_traits, lookalike_traits, render_identity_traits

#: Real pair counts of the verification sets, scaled by ``pairs`` in generate_dataset.
VERIFICATION_PAIRS = {"lfw": 6000, "cfp_ff": 7000, "cfp_fp": 7000, "agedb_30": 6000,
                      "calfw": 6000, "cplfw": 6000, "vgg2_fp": 5000}


# --------------------------------------------------------------------------- data set

#: Character of each verification set: pose of the pair's images, age drift of the
#: second image, and whether negatives are look-alikes (see ``generate_dataset``).
SET_CHARACTER = {
    "lfw": {"pose": "free", "age": 0.0, "lookalike": False},
    "cfp_ff": {"pose": "frontal", "age": 0.0, "lookalike": False},
    "cfp_fp": {"pose": "frontal_profile", "age": 0.0, "lookalike": False},
    "agedb_30": {"pose": "free", "age": 1.0, "lookalike": False},
    "calfw": {"pose": "free", "age": 0.7, "lookalike": True},
    "cplfw": {"pose": "cross", "age": 0.0, "lookalike": True},
    "vgg2_fp": {"pose": "frontal_profile", "age": 0.0, "lookalike": False},
}

TRAIN_TURNED = 0.25  # share of training images drawn at a large yaw (see render_job)

# A job is (set_code, identity, parent, index, yaw, age): set_code 0 = train, k = k-th set;
# parent >= 0 makes the identity a look-alike of identity ``parent``; yaw None = random.
_Job = Tuple[int, int, int, int, Any, float]


def pair_count(name: str, pairs: float) -> int:
    """Pairs of set ``name``: its real count times ``pairs``, a multiple of 20 (10 balanced folds), >= 20."""
    return max(20, int(VERIFICATION_PAIRS[name] * pairs / 20 + 0.5) * 20)


def lookalike_keep(difficulty: float) -> float:
    """Share of trait groups a look-alike negative keeps: 0.55 at difficulty 1, 0.1 at 0."""
    return 0.1 + 0.45 * min(max(difficulty, 0.0), 1.0)


@functools.lru_cache(maxsize=4096)
def identity_traits(seed: int, identity: int, parent: int = -1, keep: float = 0.55) -> dict:
    """The traits of global identity ``identity`` of data set ``seed``; if ``parent`` >= 0, a
    look-alike of identity ``parent`` keeping each trait group with probability ``keep``."""
    if parent >= 0:
        return lookalike_traits(identity_traits(seed, parent), np.random.default_rng([seed, 4, identity]), keep)
    return render_identity_traits(np.random.default_rng([seed, 0, identity]))


def render_job(seed: int, difficulty: float, job: _Job) -> np.ndarray:
    """Render one image of a job list (see ``dataset_jobs``); a pure function of its arguments."""
    set_code, ident, parent, index, yaw, age = job
    traits = identity_traits(seed, ident, parent, lookalike_keep(difficulty))
    rng = np.random.default_rng([seed, 1, set_code, ident, index])
    if set_code == 0 and rng.random() < 0.3:  # some training photos show the person older
        age = float(rng.uniform(0.1, 0.8))
    if age > 0:
        traits = age_traits(traits, np.random.default_rng([seed, 5, set_code, ident, index]), age)
    if set_code == 0 and yaw is None:
        # A quarter of the training photos are turned as far as the pose sets probe
        # (cfp_fp, cplfw, vgg2_fp), whatever the difficulty: real training sets hold
        # profile-ish faces too, and a model never shown one cannot match them.
        prng = np.random.default_rng([seed, 6, ident, index])
        if prng.random() < TRAIN_TURNED:
            yaw = float(prng.choice([-1, 1]) * prng.uniform(15, 52))
    return render_face(traits, rng, difficulty, **({} if yaw is None else {"yaw": yaw}))


def _pair_yaws(pose: str, rng: np.random.Generator) -> Tuple[Any, Any]:
    if pose == "frontal":
        return float(rng.normal(0, 4)), float(rng.normal(0, 4))
    if pose == "frontal_profile":
        return float(rng.normal(0, 4)), float(rng.choice([-1, 1]) * rng.uniform(36, 52))
    if pose == "cross":
        return float(rng.normal(0, 8)), float(rng.choice([-1, 1]) * rng.uniform(22, 48))
    return None, None


def dataset_jobs(identities: int, images_per_id: int, pairs: float, seed: int, difficulty: float = 1.0
                 ) -> Tuple[List[_Job], Dict[str, Dict[str, Any]]]:
    """Every image of a data set in write order, and per verification set its pairs and identities.

    Train identities are 0..identities-1; each verification set draws its own pool of
    held-out identities numbered from ``identities`` up, so no set shares an identity
    with train or with another set. Each set has 10 contiguous folds, each half
    same-identity pairs then half different-identity pairs; pair i = images 2i, 2i+1.
    Age drift grows with ``difficulty`` (x0.4 at 0, x1 from 1 up).
    """
    age_scale = 0.4 + 0.6 * min(max(difficulty, 0.0), 1.0)
    jobs: List[_Job] = [(0, i, -1, j, None, 0.0) for i in range(identities) for j in range(images_per_id)]
    sets: Dict[str, Dict[str, Any]] = {}
    next_id = identities
    for code, name in enumerate(VERIFICATION_PAIRS, start=1):
        char = SET_CHARACTER[name]
        n = pair_count(name, pairs)
        rng = np.random.default_rng([seed, 2, code])
        pool = np.arange(next_id, next_id + max(8, n // 4))
        next_id = int(pool[-1]) + 1
        # look-alike sets: every odd identity of the pool is a look-alike of the one before it
        parent = {int(g): (int(g) - 1 if char["lookalike"] and (g - pool[0]) % 2 else -1) for g in pool}
        issame: List[bool] = []
        start = len(jobs)
        for _ in range(10):
            for same in (True, False):
                for _ in range(n // 20):
                    if same:
                        a = b = int(rng.choice(pool))
                    elif char["lookalike"]:
                        base = int(pool[0]) + 2 * int(rng.integers(len(pool) // 2))
                        a, b = (base, base + 1) if rng.random() < 0.5 else (base + 1, base)
                    else:
                        a, b = (int(v) for v in rng.choice(pool, 2, replace=False))
                    ya, yb = _pair_yaws(char["pose"], rng)
                    age = float(rng.uniform(0.4, 1.0) * char["age"] * age_scale)
                    k = len(jobs) - start
                    jobs.append((code, a, parent[a], k, ya, 0.0))
                    jobs.append((code, b, parent[b], k + 1, yb, age))
                    issame.append(same)
        used = sorted({j[1] for j in jobs[start:]})
        sets[name] = {"pairs": n, "images": 2 * n, "issame": issame, "identities": used,
                      "lookalike_of": {g: parent[g] for g in used if parent[g] >= 0}}
    return jobs, sets


def _encode(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed to write a JPEG")
    return buf.tobytes()


def _work(args: Tuple[int, float, int, _Job]) -> bytes:
    seed, difficulty, quality, job = args
    return _encode(render_job(seed, difficulty, job), quality)


@contextlib.contextmanager
def encoded(work: Callable[[Any], bytes], jobs: Iterable[Any], workers: int, total: int, desc: str,
            progress: bool, chunksize: int = 32) -> Iterator[Iterator[bytes]]:
    """The payloads ``work(job)`` in job order, rendered by a fork pool of ``workers`` when > 1, counted
    on a tqdm bar (``progress``); the pool is terminated and the bar closed on leaving, however left."""
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers)
        results: Iterator[bytes] = pool.imap(work, jobs, chunksize=chunksize)
    else:
        results = map(work, jobs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="img")

    def counted() -> Iterator[bytes]:
        for payload in results:
            if bar is not None:
                bar.update(1)
            yield payload

    try:
        yield counted()
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()


def generate_dataset(out_dir: str, identities: int = 300, images_per_id: int = 20, pairs: float = 0.05,
                     seed: int = 0, difficulty: float = 1.0, jpeg_quality: int = 90, progress: bool = True,
                     workers: int = 1) -> Dict[str, Any]:
    """Write a synthetic insightface pack into ``out_dir``: train.rec/.idx/property of
    ``identities`` classes x ``images_per_id`` JPEGs, and the seven verification .bin
    files from held-out identities, with ``pairs`` times the real pair counts.

    Output bytes depend only on the arguments (not on ``workers``). Returns counts,
    the held-out identities of each set, and the seconds taken.
    """
    from data.bins import write_bin
    from data.facerec import write_pack

    if identities < 1 or images_per_id < 1:
        raise ValueError(f"generate_dataset: identities={identities} and images_per_id={images_per_id} must be >= 1")
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    jobs, sets = dataset_jobs(identities, images_per_id, pairs, seed, difficulty)
    args = ((seed, float(difficulty), jpeg_quality, j) for j in jobs)
    n_train = identities * images_per_id
    with encoded(_work, args, workers, len(jobs), "synth", progress) as results:
        labels = (j[1] for j in jobs[:n_train])
        pack = write_pack(out_dir, zip(labels, itertools.islice(results, n_train)), num_classes=identities,
                          image_size=(SIZE, SIZE))
        for name, info in sets.items():
            write_bin(os.path.join(out_dir, f"{name}.bin"), list(itertools.islice(results, info["images"])),
                      info["issame"])
    seconds = time.perf_counter() - t0
    return {"out_dir": out_dir, "seed": seed, "difficulty": difficulty, "train_classes": identities,
            "train_images": n_train, "pack": pack, "images": len(jobs), "seconds": round(seconds, 2),
            "images_per_second": round(len(jobs) / seconds, 1),
            "sets": {k: {kk: vv for kk, vv in v.items() if kk != "issame"} for k, v in sets.items()}}
