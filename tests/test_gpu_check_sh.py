"""benchmarks/gpu_check.sh (make gpu-check): carried wheels are installed offline (one for another
Python is skipped), a package the scripts need but cannot import is one line naming it (exit 3)
before any work, and without CUDA it ends in gpu_check.py's one line (exit 0)."""

import base64
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash script")


def _wheel(folder, name, tag="py3-none-any", body="VALUE = 42\n"):
    """A minimal wheel built by hand (PEP 427: METADATA, WHEEL, RECORD with sha256 digests)."""
    files = {f"{name}/__init__.py": body.encode(),
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                           f"Tag: {tag}\n".encode()}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    files[f"{name}-1.0.dist-info/RECORD"] = record.encode()
    path = folder / f"{name}-1.0-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
    return path


def _python_blocking(tmp_path, module):
    """A `python` that cannot import ``module`` unless a carried wheel (earlier on PYTHONPATH) provides it."""
    block = tmp_path / "block" / module
    block.mkdir(parents=True)
    (block / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    py = tmp_path / "python"
    py.write_text(f'#!/bin/bash\nexport PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{tmp_path / "block"}"\n'
                  f'exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return py


def _run(env):
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", **env),
                          capture_output=True, text=True, timeout=300)


def test_missing_package_is_one_line_before_any_work(tmp_path):
    py = _python_blocking(tmp_path, "cv2")  # needed at import (efficientnet-pytorch, TorchCodec are optional there)
    proc = _run({"PY": str(py), "WHEELS": str(tmp_path / "none")})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "No module named 'cv2'" in lines[0] and "device-wheels" in lines[0]
    assert "plan" not in proc.stdout  # gpu_check.py never started


def test_carried_wheels_installed_offline_and_others_skipped(tmp_path):
    """A carried wheel supplies the blocked module; a wheel for another Python is skipped with a note."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "carried_probe")
    _wheel(wheels, "other_python", tag="cp27-cp27mu-manylinux1_x86_64")
    py = _python_blocking(tmp_path, "carried_probe")
    probe = subprocess.run([str(py), "-c", "import carried_probe"], capture_output=True, text=True)
    assert probe.returncode != 0  # blocked without the wheel
    proc = _run({"PY": str(py), "WHEELS": str(wheels)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" in proc.stdout and "other_python" in proc.stdout
    assert (wheels / "site" / "carried_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    assert not (wheels / "site" / "other_python").exists()
    out = subprocess.run([str(py), "-c", "import carried_probe; print(carried_probe.VALUE)"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(wheels / "site")))
    assert out.stdout.strip() == "42"
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: no CUDA device on this machine")
