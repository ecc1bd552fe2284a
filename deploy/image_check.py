"""The check the Docker build runs after it slims the venv: does everything the image runs still work?

The Dockerfile deletes what the runtime should never read (pip, torch's C++ headers, test suites, onnx's
backend test data). A deletion that was wrong shows up only when a code path needs it, so this imports every
module of the two packages (module-level imports), the dependencies that are imported only inside functions
(``onnxruntime`` and ``openvino`` in service/backends.py; ``onnx``, which ``torch.onnx.export`` writes
through), and runs the ONNX route end to end on a small network: the TorchScript exporter, then every runtime
of ``service.backends.RUNTIMES``, compared with torch.
tests/test_deploy_image_check.py runs the same script in the project's venv, so it is known to pass there.

    python deploy/image_check.py        exit 0 and one summary line, or a traceback naming what broke
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import numpy as np

LAZY_IMPORTS = (
    "onnx",
    "onnxruntime",
    "openvino",
    "psycopg",
    "psycopg_pool",
)  # imported inside functions, not at module level


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


def onnx_round_trip() -> dict[str, float]:
    """Per runtime, the largest difference from torch of the normalised output of a small conv net put
    through the service's own exporter and backends (``service.backends``)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from service.backends import AUTO_RUNTIMES, RUNTIMES, onnx_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 8)).eval()
    onnx_model = onnx_bytes(model, torch.zeros(2, 1, 16, 16))
    probe = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        expected = F.normalize(model(probe), dim=1).numpy()
    return {
        name: float(np.max(np.abs(backend(onnx_model, 1)(probe.numpy()) - expected)))
        for name, backend in RUNTIMES.items()
        if name in AUTO_RUNTIMES  # openvino-bf16 is the same runtime, and not exact by design
    }


def main() -> int:
    modules = import_every_module()
    differences = onnx_round_trip()
    worst = max(differences.values())
    if not worst < 1e-4:
        print(f"image check: a runtime differs from torch: {differences}", file=sys.stderr)
        return 1
    names = ", ".join(differences)
    print(f"image check: {len(modules)} modules imported, ONNX export + {names} agree (max |diff| {worst:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
