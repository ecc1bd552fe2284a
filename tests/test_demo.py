"""The first-run bootstrap (``python -m service.demo``) on a tiny scale: 10 ORL identities, 4 held out of
training (3 enrolled, 1 stranger), a 3-epoch narrow ResNet. One bootstrap per session, shared by the tests."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import training.train
from service import demo
from service.app import create_app
from service.demo_folders import MARKER, PARTIAL, claim, mark_complete, read_marker
from service.gallery import Gallery
from service.settings import Settings
from training.bundle import load_bundle
from training.data import scan_image_folder, split_identities

TINY = ["--identities", "10", "--holdout", "4", "--unknown", "1", "--enroll-images", "3", "--samples-per-identity", "2"]
TRAINING = ["--arch", "resnet18", "--width", "8", "--image-size", "28", "24", "--feat-dim", "16", "--epochs", "3"]
TRAINING += ["--batch-size", "8", "--target-far", "0.1"]
SAMPLE_NAME = re.compile(r"^(?P<who>s\d\d|unknown)_(?P<n>\d+)\.png$")


def demo_args(root: Path, gallery: str = "gallery", samples: str = "samples") -> list[str]:
    paths = ["--data", str(root / "data" / "orl"), "--bundle", str(root / "bundles" / "demo")]
    paths += ["--gallery", str(root / gallery), "--samples", str(root / samples)]
    return [*paths, "--no-serve", *TINY, "--", *TRAINING]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert demo.main(demo_args(root)) == 0
    return root


@pytest.fixture(scope="session")
def heldout(demo_root: Path) -> list[str]:
    """Who the training job held out, recomputed from the data module (the split the job is documented to use)."""
    folder = scan_image_folder(demo_root / "data" / "orl-first10")
    assert len(folder.class_names) == 10
    return sorted(split_identities(folder, holdout_identities=4, test_fraction=0.2, seed=0).holdout_classes)


def sample_files(folder: Path) -> dict[str, re.Match[str]]:
    files = {p.name: SAMPLE_NAME.match(p.name) for p in folder.iterdir() if not p.name.startswith(".")}
    assert all(files.values()), f"badly named samples: {[n for n, m in files.items() if not m]}"
    return files  # type: ignore[return-value]


def test_bundle_trained_without_the_heldout_identities(demo_root: Path, heldout: list[str]) -> None:
    bundle = load_bundle(demo_root / "bundles" / "demo")
    assert not set(heldout) & set(bundle.class_names)
    assert len(bundle.class_names) == 6
    config = bundle.metadata["training"]["config"]
    assert (config["width"], config["epochs"], config["feat_dim"]) == (8, 3, 16)  # flags after -- won
    assert bundle.threshold is not None


def test_gallery_holds_the_enrolled_identities_only(demo_root: Path, heldout: list[str]) -> None:
    bundle = load_bundle(demo_root / "bundles" / "demo")
    with Gallery.open(demo_root / "gallery", bundle.feat_dim, bundle.fingerprint) as gallery:
        labels = dict(gallery.labels().labels)
        assert labels == {name: 3 for name in heldout[:3]}  # the last held-out identity is the stranger
        for name in heldout[:3]:
            files = [entry.metadata["file"] for entry in gallery.entries(name)]
            assert files == [f"{name}/{n:02d}.pgm" for n in (1, 2, 3)]


def test_samples_are_unenrolled_images_named_after_their_identity(demo_root: Path, heldout: list[str]) -> None:
    data = demo_root / "data" / "orl-first10"
    pixels = {
        f"{name}/{path.name}": np.asarray(Image.open(path))
        for name in heldout
        for path in sorted((data / name).iterdir())
    }
    files = sample_files(demo_root / "samples")
    who = [match["who"] for match in files.values()]
    assert set(who) - {"unknown"} <= set(heldout[:3]) and "unknown" in who and len(set(who)) > 1
    assert max(int(match["n"]) for match in files.values()) <= 2 and who.count("unknown") <= 1
    for name, match in files.items():
        sample = np.asarray(Image.open(demo_root / "samples" / name))
        sources = [source for source, image in pixels.items() if np.array_equal(image, sample)]
        assert len(sources) == 1, f"{name} is not exactly one image of a held-out identity"
        identity, file = sources[0].split("/")
        assert identity == (heldout[3] if match["who"] == "unknown" else match["who"])
        assert match["who"] == "unknown" or file not in {"01.pgm", "02.pgm", "03.pgm"}  # never an enrolled image


def test_the_service_answers_the_samples_as_named(demo_root: Path) -> None:
    settings = Settings(bundle=demo_root / "bundles" / "demo", data_dir=demo_root / "gallery")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.1)
        for name, match in sample_files(demo_root / "samples").items():
            files = {"image": (name, (demo_root / "samples" / name).read_bytes(), "image/png")}
            answer = client.post("/identify", files=files).json()
            assert answer["identity"] == (None if match["who"] == "unknown" else match["who"]), (name, answer)


def test_second_run_reuses_everything(
    demo_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    watched = [demo_root / "bundles/demo/bundle.json", demo_root / "bundles/demo/model.safetensors"]
    watched += [demo_root / "gallery" / MARKER, demo_root / "samples" / MARKER]
    before = [path.stat().st_mtime_ns for path in watched]
    monkeypatch.setattr(training.train, "main", lambda argv: pytest.fail(f"retrained: {argv}"))
    capsys.readouterr()
    assert demo.main(demo_args(demo_root)) == 0
    assert [path.stat().st_mtime_ns for path in watched] == before
    out = capsys.readouterr().out
    assert "reusing the bundle" in out and "reusing the gallery" in out
    uploads = re.findall(r"=@(\S+)", out)
    assert uploads and all(Path(path).is_file() for path in uploads)
    for route in ("/identify", "/verify", "/embed"):
        assert re.search(rf"^  curl -s .* http://127\.0\.0\.1:8000{route}", out, re.M), route


def test_interrupted_enrollment_is_redone(demo_root: Path, heldout: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_add = Gallery.add

    def add_then_crash(self: Gallery, *args: object, **kwargs: object) -> object:
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(Gallery, "add", add_then_crash)
    with pytest.raises(RuntimeError, match="power cut"):
        demo.main(demo_args(demo_root, gallery="gallery2", samples="samples2"))
    assert (demo_root / "gallery2" / PARTIAL).exists() and not (demo_root / "gallery2" / MARKER).exists()
    monkeypatch.setattr(Gallery, "add", real_add)

    assert demo.main(demo_args(demo_root, gallery="gallery2", samples="samples2")) == 0
    assert not (demo_root / "gallery2" / PARTIAL).exists()
    bundle = load_bundle(demo_root / "bundles" / "demo")
    with Gallery.open(demo_root / "gallery2", bundle.feat_dim, bundle.fingerprint) as gallery:
        assert dict(gallery.labels().labels) == {name: 3 for name in heldout[:3]}  # no leftovers of the first try


def test_a_folder_the_demo_did_not_make_is_left_alone(demo_root: Path, capsys: pytest.CaptureFixture) -> None:
    foreign = demo_root / "someone-elses-gallery"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    assert demo.main(demo_args(demo_root, gallery=foreign.name, samples="samples3")) == 2
    assert (foreign / "precious.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    assert "not made by the demo" in capsys.readouterr().err


def test_a_marker_beside_the_partial_flag_is_not_trusted(tmp_path: Path) -> None:
    claim(tmp_path)
    (tmp_path / MARKER).write_text('{"done": true}')  # e.g. a crash between marker and flag removal
    assert read_marker(tmp_path) is None
    mark_complete(tmp_path, {"done": True})
    assert read_marker(tmp_path) == {"done": True} and not (tmp_path / PARTIAL).exists()
    claim(tmp_path)  # a rebuild starts by un-completing the folder
    assert read_marker(tmp_path) is None and not (tmp_path / MARKER).exists()
