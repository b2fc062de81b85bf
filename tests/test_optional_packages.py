"""The scripts start without the optional packages a GPU image may lack (TorchCodec, efficientnet-pytorch,
facenet-pytorch): each is imported where it is used, never at module level on the training path."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a meta-path finder that makes the three packages absent, then the imports and builds under test
PROBE = r"""
import importlib.abc, sys
BLOCKED = {"torchcodec", "efficientnet_pytorch", "facenet_pytorch"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
sys.path[:0] = [ROOT, ROOT + "/benchmarks"]
import train, evaluate, prepare_data, bench_train, pfc_step, gpu_check  # noqa
import backbones, torch
from data import device_decode
assert backbones.build("mobilefacenet")(torch.zeros(2, 3, 112, 112)).shape == (2, 512)
try:
    backbones.build("efficientnet_b0")
except ImportError as exc:
    assert "efficientnet_pytorch" in str(exc), exc
else:
    raise AssertionError("efficientnet_b0 built without its package")
assert device_decode.codec().name == "torchvision"  # TorchCodec absent: the fallback
print("ok")
"""


def test_training_path_imports_without_optional_packages():
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
