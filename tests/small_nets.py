"""A tiny stand-in backbone for tests of the loop and the heads (not of a model)."""

import torch.nn as nn


class SmallNet(nn.Module):
    """~60k parameters at 112x112; keeps the spatial layout (flatten, like the real face heads)."""

    def __init__(self, emb: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=4, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(32 * 7 * 7, emb)
        self.bn = nn.BatchNorm1d(emb)

    def forward(self, x):
        return self.bn(self.fc(self.features(x)))


class NoBNNet(nn.Module):
    """No batch statistics: its gradient over a batch is the sum of per-sample parts, so one process
    with batch 2B and two processes with B each (or 2 accumulated micro-batches) must agree."""

    def __init__(self, emb: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 8, stride=8), nn.PReLU(8),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.PReLU(16), nn.Flatten())
        self.fc = nn.Linear(16 * 7 * 7, emb)

    def forward(self, x):
        return self.fc(self.features(x))
