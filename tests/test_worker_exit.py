"""Loader workers never outlive the run: a process that trained must be able to exit.

The workers ignore SIGTERM (the training process owns the clean stop), so a loader left
to the garbage collector would make the interpreter's exit hook wait for them forever.
"""

import multiprocessing
import os
import subprocess
import sys
import textwrap

from torch.utils.data import DataLoader

from data.dataset import stop_workers, worker_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stop_workers_ends_persistent_workers_now():
    before = set(multiprocessing.active_children())
    loader = DataLoader(list(range(8)), batch_size=4, num_workers=1, persistent_workers=True,
                        worker_init_fn=worker_init, multiprocessing_context="forkserver")
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert set(multiprocessing.active_children()) - before  # persistent: alive after the epoch
    stop_workers(loader)
    assert not set(multiprocessing.active_children()) - before
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a later epoch starts new ones
    stop_workers(loader)
    assert not set(multiprocessing.active_children()) - before
    stop_workers(DataLoader([1]))  # never iterated: nothing to stop


def test_process_exits_after_a_training_error_with_workers(damaged_pack, tmp_path):
    """A record error raised through the workers' loader, then a normal interpreter exit."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import train
        try:
            train.main(["--data", {damaged_pack!r}, "--output", {str(tmp_path / "run")!r}, "--batch-size", "36",
                        "--num-workers", "1", "--no-progress", "--max-steps", "1"])
        except SystemExit as exc:
            kept = exc  # holds the error's traceback (and so the loader) until after the exit hooks, as pytest would
            print("main exited with", exc.code, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert "main exited with 2" in proc.stdout, proc.stdout + proc.stderr
