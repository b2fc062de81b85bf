"""Shared test set-up: deterministic seeds, repo root importable, quiet threads."""

import os
import random
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    """Decoded-.bin cache in a throwaway folder: tests never touch ~/.cache."""
    import tempfile

    config._facetrain_cache = tempfile.mkdtemp(prefix="facetrain-cache-")
    os.environ["FACETRAIN_CACHE"] = config._facetrain_cache


def pytest_sessionfinish(session, exitstatus):
    """Fail, rather than hang, when a test left worker processes behind.

    Loader workers ignore SIGTERM, so the interpreter's exit hook (terminate, then join every
    child) would wait for them forever: kill them and fail the run with their names instead.
    """
    import multiprocessing

    left = [p for p in multiprocessing.active_children() if p.is_alive()]
    for p in left:
        p.kill()
        p.join(timeout=10)
    if left:
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in left)
        session.config.get_terminal_writer().line(f"\ntests left child processes running: {names}", red=True)
        session.exitstatus = 1


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(getattr(config, "_facetrain_cache", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass
    yield


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory):
    """A small synthetic insightface pack: 6 identities x 6 images + seven 20-pair .bin files."""
    from prepare.synth import generate_dataset

    out = tmp_path_factory.mktemp("tiny_pack")
    generate_dataset(str(out), identities=6, images_per_id=6, pairs=0.001, seed=1, progress=False)
    return str(out)


@pytest.fixture
def damaged_pack(tiny_pack, tmp_path):
    """A copy of ``tiny_pack`` whose record 10 has lost its magic word (zeroed in the .rec)."""
    import shutil

    pack = tmp_path / "damaged_pack"
    shutil.copytree(tiny_pack, pack)
    idx = dict(line.split("\t") for line in (pack / "train.idx").read_text().splitlines())
    data = bytearray((pack / "train.rec").read_bytes())
    off = int(idx["10"])
    data[off:off + 4] = b"\0\0\0\0"
    (pack / "train.rec").write_bytes(bytes(data))
    return str(pack)


#: The quickly trained model shared by the end-to-end tests (facebank, IJB): seed 1, difficulty 0
#: (the most distinct identities), mobilefacenet 64-d on 24 identities x 5 images for 8 epochs.
QUICK_SEED, QUICK_DIFFICULTY, QUICK_IDS, QUICK_PER_ID = 1, 0.0, 24, 5


@pytest.fixture(scope="session")
def quick_trained(tmp_path_factory):
    """{"root", "pack", "run", "info"}: a model trained once per session (about 40 s of CPU).

    Training runs on one torch thread (restored afterwards): the trained weights, hence the
    counts the end-to-end tests assert, do not depend on the machine's core count.
    """
    import torch

    import train
    from prepare.synth import generate_dataset

    root = str(tmp_path_factory.mktemp("quick_trained"))
    pack, run = os.path.join(root, "pack"), os.path.join(root, "run")
    info = generate_dataset(pack, identities=QUICK_IDS, images_per_id=QUICK_PER_ID, pairs=0.005, seed=QUICK_SEED,
                            difficulty=QUICK_DIFFICULTY, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(["--data", pack, "--output", run, "--backbone", "mobilefacenet", "--embedding-size", "64",
                           "--batch-size", "16", "--epochs", "8", "--lr", "0.1", "--num-workers", "0",
                           "--no-progress", "--eval-every", "-1", "--log-every", "100"]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "pack": pack, "run": run, "info": info}
