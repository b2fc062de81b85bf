"""The fast CPU loader path gives today's pixels and floats exactly.

References are written out here, independently of data.transforms / data.dataset: the published
normalisation (x/255 - 0.5)/0.5 in float32, a flip as reversed width indices per image, and
OpenCV's own decode + BGR->RGB conversion.
"""

import cv2
import numpy as np
import pytest
import torch

from data.dataset import FaceDataset, bgr_to_chw_rgb, collate
from data.transforms import apply_flips, flip_normalize, normalize


def _reference(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flip image i along the width (reversed column indices) where mask[i], then (x/255 - 0.5)/0.5, float32."""
    out = images.clone()
    cols = torch.arange(images.shape[3] - 1, -1, -1)
    for i in range(len(images)):
        if mask[i]:
            out[i] = images[i][:, :, cols]
    return (out.to(torch.float32) / 255 - 0.5) / 0.5


@pytest.mark.parametrize("shape", [(7, 3, 112, 112), (5, 3, 9, 13), (1, 3, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_flip_normalize_is_exactly_the_published_formula(shape, channels_last):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[3])
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    images[0, 0, 0, :] = torch.arange(shape[3]) % 256  # every image size sees 0 and the row order
    for mask in (torch.rand(shape[0], generator=g) < 0.5, torch.ones(shape[0], dtype=torch.bool),
                 torch.zeros(shape[0], dtype=torch.bool)):
        got = flip_normalize(images, mask, channels_last=channels_last)
        assert got.dtype == torch.float32 and got.shape == shape
        assert torch.equal(got, _reference(images, mask))
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(got, normalize(apply_flips(images, mask), channels_last=channels_last))  # today's path


def test_flip_normalize_covers_all_256_values_and_leaves_input_alone():
    images = torch.arange(256, dtype=torch.uint8).repeat(6).view(2, 3, 16, 16)
    before = images.clone()
    got = flip_normalize(images, torch.tensor([False, True]))
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # float64: within one float32 rounding
    assert torch.allclose(got[0].reshape(3, -1)[0].double(), values, rtol=0, atol=2 ** -23)
    assert torch.equal(got[1, :, :, 0], got[0, :, :, 15])  # the flipped image's first column is the last one
    assert torch.equal(images, before)


def test_flip_normalize_strided_input_and_other_paths():
    g = torch.Generator().manual_seed(3)
    nhwc = torch.randint(0, 256, (4, 8, 10, 3), dtype=torch.uint8, generator=g)
    images = nhwc.permute(0, 3, 1, 2)  # (B,3,H,W) view with channels-last strides
    mask = torch.tensor([True, False, True, True])
    assert torch.equal(flip_normalize(images, mask), _reference(images.contiguous(), mask))
    assert flip_normalize(images[:0], mask[:0]).shape == (0, 3, 8, 10)
    with pytest.raises(ValueError, match="flip mask"):
        flip_normalize(images, mask[:3])


_RNG = np.random.default_rng(0)
_PAYLOADS = [cv2.imencode(".jpg", _RNG.integers(0, 256, (112, 112, 3), dtype=np.uint8))[1].tobytes()
             for _ in range(3)] + [b"not a jpeg"]


class _Jpegs:
    """Four random 112x112 JPEGs, one class each; record 3 does not decode."""

    path, num_classes, payloads = "jpegs", 4, _PAYLOADS
    labels = np.arange(4, dtype=np.int64)

    def __len__(self):
        return 4

    def read(self, i):
        return self.payloads[i]

    def describe(self, i):
        return f"jpeg {i}"


def _opencv_rgb(i: int) -> torch.Tensor:
    """Record i decoded by OpenCV and converted to RGB there, as (3,H,W)."""
    bgr = cv2.imdecode(np.frombuffer(_Jpegs.payloads[i], np.uint8), cv2.IMREAD_COLOR)
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def test_items_are_cv2s_rgb_planes():
    bgr = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    chw = bgr_to_chw_rgb(bgr)
    assert chw.is_contiguous() and torch.equal(chw, torch.from_numpy(bgr[:, :, ::-1].transpose(2, 0, 1).copy()))
    ds = FaceDataset([_Jpegs()])
    images, labels, bad = collate([ds[1], ds[0]])
    assert torch.equal(images, torch.stack([_opencv_rgb(1), _opencv_rgb(0)]))
    assert labels.tolist() == [1, 0] and bad == []


def test_batch_decoded_in_place_matches_items():
    ds = FaceDataset([_Jpegs()])
    images, labels, bad = collate(ds.__getitems__([2, 0, 1]))  # what the DataLoader calls with a batch sampler
    assert torch.equal(images, torch.stack([_opencv_rgb(2), _opencv_rgb(0), _opencv_rgb(1)]))
    assert labels.tolist() == [2, 0, 1] and bad == []
    images, labels, bad = collate(ds.__getitems__([1, 3, 0]))  # a bad record: the good rows, in order
    assert torch.equal(images, torch.stack([_opencv_rgb(1), _opencv_rgb(0)]))
    assert labels.tolist() == [1, 0] and bad == [3]
