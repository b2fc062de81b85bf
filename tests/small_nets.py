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
