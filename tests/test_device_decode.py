"""Decoding on the training device: the same pixels as the workers' OpenCV decode, bad ones reported."""

import importlib.util

import cv2
import numpy as np
import pytest
import torch

from data import device_decode
from data.device_decode import decode_batch
from tests.test_trainer import _trainer

# every codec this machine has (torchcodec is in requirements.txt; torchvision is the fallback)
CODECS = [n for n, module in (("torchcodec", "torchcodec"), ("torchvision", "torchvision"))
          if importlib.util.find_spec(module) is not None]


def _encoded(ext, img):
    return torch.from_numpy(cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].copy())


@pytest.mark.parametrize("codec_name", CODECS)
def test_jpeg_png_and_a_damaged_payload(codec_name):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2))
    jpeg, png = _encoded(".jpg", a), _encoded(".png", b)
    images, bad = decode_batch([jpeg, torch.tensor([255, 216, 1, 2], dtype=torch.uint8), png], torch.device("cpu"),
                               codec_name=codec_name)
    assert bad == [1] and images.shape == (2, 3, 112, 112) and images.dtype == torch.uint8
    ref_jpeg = cv2.cvtColor(cv2.imdecode(jpeg.numpy(), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(images[0].permute(1, 2, 0).numpy().astype(int) - ref_jpeg).max() <= 1
    np.testing.assert_array_equal(images[1].permute(1, 2, 0).numpy(), b)  # PNG is lossless


@pytest.mark.parametrize("codec_name", CODECS)
def test_a_batch_of_jpegs_gives_cv2s_pixels(codec_name):
    """Same bytes in, same pixels out: a whole-JPEG batch against cv2's decode (libjpeg-turbo both)."""
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(4)]
    payloads = [_encoded(".jpg", im) for im in imgs]
    images, bad = decode_batch(payloads, torch.device("cpu"), codec_name=codec_name)
    assert not bad
    for got, p in zip(images, payloads):
        ref = cv2.cvtColor(cv2.imdecode(p.numpy(), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(got.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1


def test_torchvision_is_the_fallback_when_torchcodec_is_missing(monkeypatch):
    def missing():
        raise ImportError("No module named 'torchcodec'")

    monkeypatch.setattr(device_decode, "CODECS", {"torchcodec": missing, **{
        k: v for k, v in device_decode.CODECS.items() if k != "torchcodec"}})
    monkeypatch.setattr(device_decode, "_CHOSEN", {})
    assert device_decode.codec().name == "torchvision"


def test_other_sizes_are_resized():
    img = np.full((56, 64, 3), 200, np.uint8)
    images, bad = decode_batch([_encoded(".png", img)], torch.device("cpu"), (112, 112))
    assert not bad and images.shape == (1, 3, 112, 112) and int(images.float().mean().round()) == 200


def test_training_with_device_decode_matches_worker_decode(tiny_pack, tmp_path):
    a, _ = _trainer(tiny_pack, tmp_path / "a", max_steps=3)
    a.fit()
    b, _ = _trainer(tiny_pack, tmp_path / "b", max_steps=3)
    b.dataset.decode = False
    b.fit()
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def _codecs_with(monkeypatch, first):
    """CODECS with ``first`` ahead of torchvision (the real fallback), nothing cached."""
    monkeypatch.setattr(device_decode, "CODECS", {"first": first, "torchvision": device_decode.CODECS["torchvision"]})
    monkeypatch.setattr(device_decode, "_CHOSEN", {})


def test_a_codec_whose_library_fails_to_load_falls_back(monkeypatch):
    # TorchCodec built for another torch raises RuntimeError ("Could not load libtorchcodec"), not ImportError
    def broken():
        raise RuntimeError("Could not load libtorchcodec. Likely causes: ...")

    _codecs_with(monkeypatch, broken)
    assert device_decode.codec().name == "torchvision"


def test_a_codec_that_cannot_reach_the_device_falls_back_and_images_decode(monkeypatch):
    """A codec that imports but fails every decode on the device (a CPU-only TorchCodec asked for CUDA)
    must not turn every image into "undecodable": the next codec decodes them, with cv2's pixels."""
    def no_device(payloads, device):
        raise RuntimeError(f"decode_jpegs_cuda: not compiled with support for {device}")

    _codecs_with(monkeypatch, lambda: device_decode.Codec("first", no_device, no_device))
    img = np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    payload = _encoded(".jpg", img)
    images, bad = decode_batch([payload, payload], torch.device("cpu"))
    assert not bad and images.shape == (2, 3, 112, 112)
    ref = cv2.cvtColor(cv2.imdecode(payload.numpy(), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(images[0].permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1


def test_no_codec_for_the_device_is_one_line_naming_each(monkeypatch):
    def no_device(payloads, device):
        raise RuntimeError("CUDA error: no CUDA-capable device is detected\nframe #0: ...")

    monkeypatch.setattr(device_decode, "CODECS", {"first": lambda: device_decode.Codec("first", no_device, no_device)})
    monkeypatch.setattr(device_decode, "_CHOSEN", {})
    with pytest.raises(device_decode.CodecError) as err:
        decode_batch([_encoded(".jpg", np.zeros((8, 8, 3), np.uint8))], torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and "first: RuntimeError: CUDA error: no CUDA-capable device is detected" in msg
    assert isinstance(err.value, ImportError)  # callers that skip a missing codec skip this one too


def test_encoded_batches_travel_as_one_block_and_keep_their_bytes(tiny_pack, monkeypatch):
    """A worker hands the main process one flat tensor per batch (not a tensor per image), through
    pinning too (CUDA runs pin the batch; Tensor.pin_memory stands in by a copy on this CPU machine)."""
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.pin_memory import pin_memory

    from data.dataset import EncodedBatch, build_dataset, collate

    ds = build_dataset(tiny_pack, decode=False)
    order = [5, 0, 3]
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: t.clone())
    batch, labels, bad = pin_memory(collate(ds.__getitems__(order)))
    assert isinstance(batch, EncodedBatch) and batch.indices == order and not bad
    assert batch.data.dim() == 1 and batch.data.dtype == torch.uint8
    for i, p in zip(order, batch.payloads()):  # reference: the record's bytes read from the source itself
        assert bytes(p.tolist()) == bytes(ds.sources[0].read(i))
    assert labels.tolist() == [int(ds.labels[i]) for i in order]
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate)  # through a worker process
    first = next(iter(loader))[0]
    assert isinstance(first, EncodedBatch) and [bytes(p.tolist()) for p in first.payloads()] == [
        bytes(ds.sources[0].read(i)) for i in range(4)]
