"""deploy/image_check.py, the Docker build's check after it slims the venv, passes on a complete install and
fails when something the service needs is gone (what the build would then stop on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_check(prelude: str = "") -> subprocess.CompletedProcess[str]:
    """The script as the Dockerfile runs it, after ``prelude`` (which can make a module unimportable)."""
    code = f"{prelude}\nimport runpy\nrunpy.run_path('deploy/image_check.py', run_name='__main__')"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_image_check_passes_on_the_project_venv() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr
    assert "ONNX export + onnxruntime, openvino agree" in result.stdout
    imported = int(result.stdout.split("image check: ")[1].split()[0])
    expected = [p for p in (ROOT / "service").rglob("*.py")] + [p for p in (ROOT / "training").rglob("*.py")]
    assert imported == len([p for p in expected if p.name != "__main__.py"])  # every module, none skipped


def test_the_image_check_fails_when_onnx_is_removed() -> None:
    """onnx is imported by nothing in service/ at module level, only by torch.onnx.export: the check must
    still notice its absence, as the ONNX backend (CENTERID_BACKEND=auto) would at start."""
    result = run_check("import sys; sys.modules['onnx'] = None")
    assert result.returncode != 0 and "onnx" in result.stderr


def test_the_image_check_fails_when_a_runtime_plugin_is_gone() -> None:
    """The build deletes parts of OpenVINO; losing what the CPU route needs must stop it."""
    result = run_check("import sys; sys.modules['openvino'] = None")
    assert result.returncode != 0 and "openvino" in result.stderr
