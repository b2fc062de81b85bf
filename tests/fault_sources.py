"""Training sources that misbehave on purpose, for tests/test_faults.py.

Importable by module path, so DataLoader workers (started from a forkserver, which
unpickles the dataset) find the same classes.
"""

from __future__ import annotations

import os
import time

import numpy as np


class SlowGarbageSource:
    """``n`` records of two classes whose bytes never decode, each read taking ``delay`` seconds."""

    num_classes = 2

    def __init__(self, n: int, delay: float) -> None:
        self.path, self.n, self.delay = "slow-garbage", n, delay
        self.labels = np.arange(n, dtype=np.int64) % 2

    def __len__(self) -> int:
        return self.n

    def read(self, index: int) -> bytes:
        time.sleep(self.delay)
        return b"\xff\xd8\xff" + b"\0" * 64  # a JPEG's magic, then nothing decodable

    def describe(self, index: int) -> str:
        return f"slow-garbage record {index}"


class FifoSource:
    """Records read from a FIFO nobody writes to: the read blocks forever (in a worker).

    Before blocking, the reading process writes its pid to ``pid_file``.
    """

    num_classes = 2

    def __init__(self, fifo: str, pid_file: str, n: int = 24) -> None:
        self.path, self.fifo, self.pid_file, self.n = fifo, fifo, pid_file, n
        self.labels = np.arange(n, dtype=np.int64) % 2

    def __len__(self) -> int:
        return self.n

    def read(self, index: int) -> bytes:
        with open(self.pid_file + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(self.pid_file + ".tmp", self.pid_file)
        with open(self.fifo, "rb") as fh:  # blocks until a writer opens the FIFO: never
            return fh.read()

    def describe(self, index: int) -> str:
        return f"{self.fifo} record {index}"
