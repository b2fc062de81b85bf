"""MTCNN (Zhang et al. 2016): three small cascaded networks finding faces and their 5 landmarks.

The networks and the cascade follow facenet-pytorch 2.6.0's port (the one the InsightFace_Pytorch
seed uses), written here so that nothing of that package's code is imported (its import needs
`requests` and PIL, its metadata pins torch<2.3 / numpy<2). Only its weight files are used:
``facenet_pytorch/data/{pnet,rnet,onet}.pt`` (2 MB, plain state_dicts), found in the installed
package without importing it and read with utils.torchfile.load_file (weights_only). Install them
with ``pip install --no-deps facenet-pytorch==2.6.0``; nothing is downloaded at run time.

Units: images are (H, W, 3) uint8 RGB; boxes (x1, y1, x2, y2) and landmarks in pixels of that image,
pixel centres at integers; scores are ONet's face probability (0-1).
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import nms  # stages 1-2 (IoU without the +1), as the port

from utils.errors import UserError
from utils.torchfile import load_file

WEIGHTS_PACKAGE = "facenet-pytorch==2.6.0"
INSTALL_HINT = f"pip install --no-deps {WEIGHTS_PACKAGE}"
THRESHOLDS = (0.6, 0.7, 0.7)  # per stage: PNet, RNet, ONet face probability (facenet-pytorch's defaults)
PYRAMID_FACTOR = 0.709  # scale step of the image pyramid (~1/sqrt(2) in area)


class DetectorWeightsError(UserError, FileNotFoundError):
    """The MTCNN weight files are not installed (one line saying how to install them)."""


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 windows at stride 2; (box offsets, face probability)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refine net on 24x24 crops: (box offsets, face probability)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(len(x), -1)))  # Caffe's (W, H, C) flatten
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net on 48x48 crops: (box offsets, 5 landmarks as fractions of the box, face probability)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(len(x), -1)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


def weights_dir() -> str:
    """The folder holding pnet.pt, rnet.pt, onet.pt inside the installed facenet-pytorch (not imported)."""
    try:
        spec = importlib.util.find_spec("facenet_pytorch")  # a top-level find: its __init__ does not run
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DetectorWeightsError(f"the face detector's weights (MTCNN) are not installed: {INSTALL_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    missing = [n for n in ("pnet.pt", "rnet.pt", "onet.pt") if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DetectorWeightsError(f"{folder}: no {', '.join(missing)} (reinstall: {INSTALL_HINT})")
    return folder


def load_nets(folder: str | None = None) -> Tuple[PNet, RNet, ONet]:
    """The three networks in eval mode, with the weights from `folder` (default: :func:`weights_dir`)."""
    folder = folder or weights_dir()
    nets = (PNet(), RNet(), ONet())
    for name, net in zip(("pnet", "rnet", "onet"), nets):
        net.load_state_dict(load_file(os.path.join(folder, f"{name}.pt")))
        net.eval().requires_grad_(False)
    return nets


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression of stage 3: +1 pixel areas, overlap over the smaller box."""
    order = torch.argsort(scores, descending=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    keep: List[int] = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        order = rest[inter / torch.minimum(area[i], area[rest]) <= threshold]
    return torch.tensor(keep, dtype=torch.long)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes grown to squares of their longer side about the same centre."""
    boxes = boxes.clone()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2], boxes[:, 3] = boxes[:, 0] + side, boxes[:, 1] + side
    return boxes


def _regress(boxes: torch.Tensor, reg: torch.Tensor, plus_one: bool = True) -> torch.Tensor:
    """Boxes moved by the nets' offsets, in units of the box side (+1 pixel after stage 1, as the port)."""
    boxes = boxes.clone()
    w, h = boxes[:, 2] - boxes[:, 0] + plus_one, boxes[:, 3] - boxes[:, 1] + plus_one
    boxes[:, :4] += reg * torch.stack([w, h, w, h], dim=1)
    return boxes


def _crops(img: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, size, size) crops of boxes clipped to the image (1-based Matlab convention, as the port)."""
    _, h, w = img.shape
    b = boxes[:, :4].trunc().int().tolist()
    out = []
    for x1, y1, x2, y2 in b:
        x1, y1, x2, y2 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
        crop = img[:, y1 - 1:y2, x1 - 1:x2] if (y2 > y1 - 1 and x2 > x1 - 1) else img[:, :1, :1]
        out.append(F.interpolate(crop[None], size=(size, size), mode="area"))
    return (torch.cat(out) - 127.5) * 0.0078125


@torch.no_grad()
def detect_faces(nets: Sequence[nn.Module], image_rgb: np.ndarray, min_size: float = 20.0,
                 thresholds: Sequence[float] = THRESHOLDS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (N, 4), landmarks (N, 5, 2), scores (N,)) float64 for one (H, W, 3) uint8 RGB image.

    `min_size`: the smallest face side, pixels, the image pyramid looks for (smaller is slower).
    """
    pnet, rnet, onet = nets
    img = torch.as_tensor(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float()
    _, h, w = img.shape
    empty = (np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros(0))
    scale, side, scales = 12.0 / min_size, min(h, w) * 12.0 / min_size, []
    while side >= 12:
        scales.append(scale)
        scale, side = scale * PYRAMID_FACTOR, side * PYRAMID_FACTOR
    found = []
    for s in scales:  # stage 1: proposals at every scale
        im = F.interpolate(img[None], size=(int(h * s + 1), int(w * s + 1)), mode="area")
        reg, prob = pnet((im - 127.5) * 0.0078125)
        ys, xs = torch.nonzero(prob[0, 1] >= thresholds[0], as_tuple=True)
        if not len(ys):
            continue
        q1 = ((2 * torch.stack([xs, ys], 1).float() + 1) / s).floor()
        q2 = ((2 * torch.stack([xs, ys], 1).float() + 12) / s).floor()
        cand = torch.cat([q1, q2, prob[0, 1, ys, xs, None], reg[0, :, ys, xs].T], dim=1)
        found.append(cand[nms(cand[:, :4], cand[:, 4], 0.5)])
    if not found:
        return empty
    cand = torch.cat(found)
    cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
    boxes = _square(torch.cat([_regress(cand[:, :4], cand[:, 5:9], plus_one=False), cand[:, 4:5]], 1))
    reg, prob = rnet(_crops(img, boxes, 24))  # stage 2
    keep = prob[:, 1] > thresholds[1]
    boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], 1)
    reg = reg[keep]
    if not len(boxes):
        return empty
    pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
    boxes = _square(_regress(boxes[pick], reg[pick]))
    reg, pts, prob = onet(_crops(img, boxes, 48))  # stage 3
    keep = prob[:, 1] > thresholds[2]
    boxes, reg, pts = torch.cat([boxes[keep, :4], prob[keep, 1:2]], 1), reg[keep], pts[keep]
    if not len(boxes):
        return empty
    bw, bh = boxes[:, 2:3] - boxes[:, 0:1] + 1, boxes[:, 3:4] - boxes[:, 1:2] + 1
    marks = torch.stack([bw * pts[:, :5] + boxes[:, 0:1] - 1, bh * pts[:, 5:] + boxes[:, 1:2] - 1], dim=2)
    boxes = _regress(boxes, reg)
    pick = _nms_min(boxes[:, :4], boxes[:, 4], 0.7)
    boxes, marks = boxes[pick].double().numpy(), marks[pick].double().numpy()
    return boxes[:, :4], marks, boxes[:, 4]
