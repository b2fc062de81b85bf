"""--amp precision per device: bf16 where native (no loss scaling), fp16 + GradScaler elsewhere."""

import pytest
import torch

import train
from tests.cli_helpers import script_error
from utils.precision import amp_dtype, needs_grad_scaler

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_cpu_takes_bf16_and_refuses_fp16():
    assert amp_dtype("auto", CPU) == torch.bfloat16 == amp_dtype("bf16", CPU)
    with pytest.raises(ValueError, match="fp16 is for CUDA.*use bf16 or auto"):
        amp_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="one of auto, bf16, fp16"):
        amp_dtype("fp32", CPU)
    assert not needs_grad_scaler(torch.bfloat16, CPU)


@pytest.mark.parametrize("bf16_native", [True, False])
def test_cuda_auto_follows_the_hardware(monkeypatch, bf16_native):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-32GB")
    want = torch.bfloat16 if bf16_native else torch.float16
    assert amp_dtype("auto", CUDA) == want
    assert amp_dtype("fp16", CUDA) == torch.float16 and needs_grad_scaler(torch.float16, CUDA)
    assert not needs_grad_scaler(torch.bfloat16, CUDA)
    if bf16_native:
        assert amp_dtype("bf16", CUDA) == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="V100.*does not compute bf16 natively"):
            amp_dtype("bf16", CUDA)


def test_train_fp16_on_cpu_is_a_one_line_error(capsys, tiny_pack, tmp_path):
    script_error(capsys, train.main, ["--data", tiny_pack, "--output", str(tmp_path / "r"), "--amp",
                                         "--amp-dtype", "fp16", "--device", "cpu", "--max-steps", "1"],
                    "train.py: error:", "fp16 is for CUDA")


def test_train_amp_on_cpu_logs_bf16(capsys, tiny_pack, tmp_path):
    assert train.main(["--data", tiny_pack, "--output", str(tmp_path / "r"), "--amp", "--device", "cpu",
                       "--batch-size", "12", "--max-steps", "1", "--num-workers", "0", "--no-progress",
                       "--eval-every", "-1"]) == 0
    assert "amp bf16" in capsys.readouterr().out
