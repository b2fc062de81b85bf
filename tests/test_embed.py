"""embed(): the TTA modes against direct computation, input layouts, eval mode restored."""

import numpy as np
import pytest
import torch

from evaluation.embed import embed
from tests.small_nets import SmallNet


@pytest.fixture()
def net_and_images():
    torch.manual_seed(0)
    net = SmallNet(16)
    net.train()
    with torch.no_grad():  # give BN sensible running statistics
        for _ in range(3):
            net(torch.rand(8, 3, 112, 112) * 2 - 1)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    return net, images


def _direct(net, images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1.0
    net = net.double().eval()
    with torch.no_grad():
        a, b = net(x), net(x.flip(3))
    net.float().train()
    return a.numpy(), b.numpy()


def _l2n(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("tta", ["sum", "concat", "none"])
def test_tta_modes_match_direct_formulas(net_and_images, tta):
    net, images = net_and_images
    a, b = _direct(net, images)
    expected = {"sum": _l2n(a + b), "concat": _l2n(np.concatenate([a, b], 1)), "none": _l2n(a)}[tta]
    got = embed(net, images, batch_size=2, tta=tta)
    assert got.shape == expected.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert net.training  # the caller's mode is restored


def test_nchw_input_and_unknown_mode(net_and_images):
    net, images = net_and_images
    nhwc = embed(net, images, tta="sum")
    nchw = embed(net, np.ascontiguousarray(images.transpose(0, 3, 1, 2)), tta="sum")
    np.testing.assert_allclose(nhwc, nchw, atol=1e-6)
    with pytest.raises(KeyError, match="did you mean 'sum'"):
        embed(net, images, tta="summ")


def test_return_norms_are_raw_unflipped_norms(net_and_images):
    """XNorm's per-image value: the L2 norm of e(x) before any flip or normalisation."""
    net, images = net_and_images
    a, _ = _direct(net, images)
    _, norms = embed(net, images, batch_size=2, tta="sum", return_norms=True)
    np.testing.assert_allclose(norms, np.linalg.norm(a, axis=1), rtol=1e-5)


def test_amp_runs_the_backbone_in_the_training_precision(net_and_images):
    """--amp means utils.precision's rule (bf16 on a CPU), the dtype training's autocast uses."""
    net, images = net_and_images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = net(x).double().numpy()
    net.train()
    expected = _l2n(a)
    got = embed(net, images, batch_size=5, tta="none", amp=True)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.abs(got - embed(net, images, batch_size=5, tta="none")).max() > 1e-4  # bf16 did change them
    np.testing.assert_array_equal(embed(net, images, batch_size=5, tta="none", amp=True, amp_dtype="bf16"), got)
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        embed(net, images, tta="none", amp=True, amp_dtype="fp16")
