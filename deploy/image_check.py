"""The check the Docker build runs after it slims the venv: does everything the image runs still work?

The Dockerfile deletes what the runtime should never read (pip, torch's C++ headers, test suites, onnx's
backend test data). A deletion that was wrong shows up only when a code path needs it, so this imports every
module of the two packages (module-level imports), the dependencies that are imported only inside functions
(``onnxruntime`` in service/backends.py; ``onnx``, which ``torch.onnx.export`` writes through), and runs the
ONNX route end to end on a small network: the TorchScript exporter, then ONNX Runtime, compared with torch.
tests/test_deploy_image_check.py runs the same script in the project's venv, so it is known to pass there.

    python deploy/image_check.py        exit 0 and one summary line, or a traceback naming what broke
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import numpy as np

LAZY_IMPORTS = ("onnx", "onnxruntime", "psycopg", "psycopg_pool")  # imported inside functions, not at module level


def import_every_module() -> list[str]:
    """Every module of service/ and training/ except the ``__main__`` entry points (they would start a job)."""
    names = []
    for package_name in ("service", "training"):
        package = importlib.import_module(package_name)
        names.append(package_name)
        for module in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if module.name.rsplit(".", 1)[-1] != "__main__":
                importlib.import_module(module.name)
                names.append(module.name)
    for name in LAZY_IMPORTS:
        importlib.import_module(name)
    return names


def onnx_round_trip() -> float:
    """The largest difference between torch and ONNX Runtime on a small conv net put through the service's own
    exporter (``service.backends.onnx_bytes``)."""
    import onnxruntime
    import torch
    from torch import nn

    from service.backends import onnx_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 8)).eval()
    onnx_model = onnx_bytes(model, torch.zeros(2, 1, 16, 16))
    probe = torch.rand(3, 1, 16, 16)
    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": probe.numpy()})
    with torch.no_grad():
        expected = model(probe).numpy()
    return float(np.max(np.abs(got - expected)))


def main() -> int:
    modules = import_every_module()
    difference = onnx_round_trip()
    if not difference < 1e-4:
        print(f"image check: ONNX Runtime and torch differ by {difference:g}", file=sys.stderr)
        return 1
    print(f"image check: {len(modules)} modules imported, ONNX export + runtime agree (max |diff| {difference:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
