"""End-to-end tests of ``python -m training`` and ``python -m training.evaluate`` on a small real slice:
scikit-learn's 8×8 digits (36 per class + one corrupt file per class), LeNets++ with 2-D features."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_support import run_cli

from training import evaluate, train
from training.bundle import load_bundle
from training.datasets import export_digits

PER_CLASS = 36
EPOCHS = 3
TRAIN_ARGS = ["--arch", "lenetpp", "--feat-dim", "2", "--image-size", "16", "16", "--hflip",
              "--epochs", str(EPOCHS), "--batch-size", "32", "--lr", "0.05", "--warmup-epochs", "1",
              "--center-weight", "0.01", "--holdout-identities", "3", "--seed", "0", "--device", "cpu",
              "--target-far", "0.01"]  # fmt: skip
EVAL_KEYS = {"closed_set", "verification", "open_set", "threshold"}
VERIFICATION_KEYS = {"positive_pairs", "negative_pairs", "auc", "tar_at_far", "ten_fold_accuracy"}


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 identities × 36 real digit images, plus one undecodable file in every identity folder."""
    full = export_digits(tmp_path_factory.mktemp("digits_full") / "digits")
    root = tmp_path_factory.mktemp("digits") / "data"
    for folder in sorted(p for p in full.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:PER_CLASS]:
            shutil.copy(image, root / folder.name / image.name)
        (root / folder.name / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="session")
def trained(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One 3-epoch run shared by the tests, keeping every epoch's checkpoint."""
    bundle = tmp_path_factory.mktemp("run") / "bundle"
    result = run_cli("--data", str(digits), "--output", str(bundle), "--keep-checkpoints", *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    return bundle, result


def sample_images(digits: Path, n: int = 12) -> list[tuple[Path, int]]:
    return [(p, 0) for p in sorted(digits.glob("*/*.png")) if p.name != "zz_corrupt.png"][:n]


@pytest.mark.slow
def test_bundle_embeds_like_the_checkpoint_model(trained, digits: Path) -> None:
    bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    checkpoint = torch.load(bundle_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    config = train.TrainConfig(**{**checkpoint["config"], "image_size": tuple(checkpoint["config"]["image_size"])})
    model = train.build_embed(config)
    model.load_state_dict(checkpoint["model"])
    samples = sample_images(digits)
    from_bundle, _ = evaluate.embed_samples(bundle.model, samples, bundle.preprocess)
    from_checkpoint, _ = evaluate.embed_samples(model, samples, bundle.preprocess)
    np.testing.assert_array_equal(from_bundle, from_checkpoint)
    torch.testing.assert_close(bundle.centers, checkpoint["center_loss"]["centers"], rtol=0, atol=0)
    assert checkpoint["epoch"] == EPOCHS and bundle.feat_dim == 2
    assert len(bundle.class_names) == 7 and bundle.threshold is not None and bundle.threshold.target_far == 0.01
    training = bundle.metadata["training"]
    assert training["config"]["center_weight"] == 0.01 and training["split"]["holdout_identities"] == 3


@pytest.mark.slow
def test_metrics_log_and_plots(trained) -> None:
    bundle_dir, result = trained
    records = [json.loads(line) for line in (bundle_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for record in records:
        assert {"lr", "loss", "softmax_loss", "center_loss", "train_accuracy", "images_per_s",
                "feature_norm", "center_norm"} <= set(record)  # fmt: skip
        assert record["loss"] == pytest.approx(record["softmax_loss"] + 0.01 * record["center_loss"], rel=1e-6)
    assert records[-1]["loss"] < records[0]["loss"]
    for name in ("training_curves.png", "roc.png", "features_2d.png"):
        assert (bundle_dir / "plots" / name).stat().st_size > 10_000
    assert "TAR @ FAR=0.01" in result.stdout and "open-set rank-1" in result.stdout


def check_evaluation(results: dict, classifier: bool) -> None:
    assert set(results) >= EVAL_KEYS
    closed = results["closed_set"]
    assert 0 <= closed["nearest_center_accuracy"] <= 1
    assert (closed["classifier_accuracy"] is not None) == classifier
    ver = results["verification"]
    assert set(ver) >= VERIFICATION_KEYS and ver["positive_pairs"] > 0 and ver["negative_pairs"] > 0
    assert set(ver["tar_at_far"]) == {"0.1", "0.01", "0.001"}
    assert 0 <= ver["auc"] <= 1 and 0 <= ver["ten_fold_accuracy"]["mean"] <= 1
    open_set = results["open_set"]
    assert 0 <= open_set["rank1"] <= 1 and 0 <= open_set["dir"]["dir"] <= 1
    assert {"value", "far", "tar", "positive_pairs", "negative_pairs"} <= set(results["threshold"])


@pytest.mark.slow
def test_training_evaluation_and_standalone_evaluate(trained, digits: Path, tmp_path: Path, capsys) -> None:
    bundle_dir, _ = trained
    stored = load_bundle(bundle_dir).metadata["evaluation"]
    check_evaluation(stored, classifier=True)
    # held-out identities: 3 × 36 readable images
    assert stored["verification"]["positive_pairs"] == 3 * (36 * 35 // 2)
    assert stored["verification"]["negative_pairs"] == 3 * 36 * 36  # 3 identity pairs × 36²
    assert stored["verification"]["tar_at_far"]["0.001"]["tar"] is not None  # 3888 negatives ≥ 1000
    out = tmp_path / "eval.json"
    assert evaluate.main(["--bundle", str(bundle_dir), "--data", str(digits), "--json", str(out)]) == 0
    standalone = json.loads(out.read_text())
    check_evaluation(standalone, classifier=False)
    assert "softmax classifier not available" in standalone["closed_set"]["note"]
    assert standalone["closed_set"]["images"] == 7 * 36 and standalone["verification"]["identities"] == 10
    assert standalone["skipped_images"] == 10 and "bundle_threshold" in standalone
    assert "ROC AUC" in capsys.readouterr().out


@pytest.mark.slow
def test_corrupt_files_are_skipped_and_counted(trained) -> None:
    bundle_dir, result = trained
    skipped = load_bundle(bundle_dir).metadata["training"]["skipped_images"]
    assert skipped >= 1
    assert f"skipped {skipped} unreadable training image(s)" in result.stderr


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(trained, digits: Path, tmp_path: Path) -> None:
    bundle_dir, _ = trained
    resumed = tmp_path / "resumed"
    checkpoint = bundle_dir / "checkpoints" / "epoch_001.pt"
    result = run_cli("--data", str(digits), "--output", str(resumed), "--resume", str(checkpoint), *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    for name in ("model.safetensors", "centers.safetensors"):
        expected, actual = load_file(bundle_dir / name), load_file(resumed / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{name}:{key}")
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in (bundle_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[0] == original[0]
    assert [r["loss"] for r in records] == [r["loss"] for r in original]


@pytest.mark.slow
def test_resume_refuses_different_options(trained, digits: Path, tmp_path: Path, capsys) -> None:
    bundle_dir, _ = trained
    args = ["--data", str(digits), "--output", str(tmp_path / "x"),
            "--resume", str(bundle_dir / "checkpoints" / "last.pt"), *TRAIN_ARGS, "--lr", "0.5"]  # fmt: skip
    assert train.main(args) == 2
    assert "--lr 0.05 (now 0.5)" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_gloo(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = ["--standalone", "--nproc_per_node=2", "-m", "training", "--data", str(digits), "--output", str(out),
            *TRAIN_ARGS, "--epochs", "2"]  # fmt: skip
    result = run_cli(*args, module="torch.distributed.run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    bundle = load_bundle(out)
    assert bundle.metadata["training"]["world_size"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # both ranks' images are counted: 2 ranks × ⌊(⌊N/2⌋)/32⌋ batches × 32
    n_train = bundle.metadata["training"]["split"]["train_images"] - bundle.metadata["training"]["skipped_images"]
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["images"] == 2 * 32 * ((n_train // 2) // 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # one bundle, no staging leftovers
    assert result.stdout.count("open-set rank-1") == 1  # only rank 0 evaluates


@pytest.mark.slow
def test_torchrun_streaming_with_undecodable_files_does_not_desync(digits: Path, tmp_path: Path) -> None:
    """Streamed batches shrink when files fail to decode; the ranks must skip such steps together, or one
    rank's next all-reduce pairs with another's current one (a hang, or mixed-up gradients)."""
    data = tmp_path / "half_corrupt"
    for name in ("0", "1", "2", "3"):
        (data / name).mkdir(parents=True)
        for i, image in enumerate(sorted((digits / name).glob("[0-9]*.png"))[:24]):
            shutil.copy(image, data / name / image.name)
            (data / name / f"zz_bad_{i}.png").write_bytes(b"not an image")
    out = tmp_path / "ddp"
    args = ["--standalone", "--nproc_per_node=2", "-m", "training", "--data", str(data), "--output", str(out),
            *TRAIN_ARGS, "--holdout-identities", "0", "--epochs", "1", "--batch-size", "2",
            "--cache", "off"]  # fmt: skip
    result = run_cli(*args, module="torch.distributed.run", timeout=120)  # ~10 s; without the agreement: a hang
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text())
    # only steps where both ranks had 2 readable images count: 2 ranks × 2 images each
    assert 0 < record["images"] < 4 * 24 and record["images"] % 4 == 0


def copy_test_folder(digits: Path, dest: Path, classes: list[str], per_class: int = 4) -> Path:
    for name in classes:
        (dest / name).mkdir(parents=True)
        for image in sorted((digits / name).glob("[0-9]*.png"))[-per_class:]:
            shutil.copy(image, dest / name / image.name)
    return dest


def closed_set_predictions(features: np.ndarray, head: str, state: dict[str, torch.Tensor]) -> np.ndarray:
    """The head's margin-free argmax, written out: W x + b for softmax, the cosine to each class otherwise."""
    weight = state["weight"].double().numpy()
    if head == "softmax":
        return np.argmax(features @ weight.T + state["bias"].double().numpy(), axis=1)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return np.argmax(unit @ (weight / np.linalg.norm(weight, axis=1, keepdims=True)).T, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["softmax", "cosface", "arcface"])
def test_each_head_trains_and_scores_the_test_data(head: str, digits: Path, tmp_path: Path) -> None:
    """A short run per head (with λ·center loss): the loss falls, the bundle holds the embedding network but
    not the head, and --test-data's closed-set accuracy is the head's argmax, recomputed from the checkpoint."""
    classes = sorted(p.name for p in digits.iterdir())
    test_dir = copy_test_folder(digits, tmp_path / "test", classes[3:])  # a subset: its labels must be remapped
    out = tmp_path / "bundle"
    args = ["--data", str(digits), "--output", str(out), *TRAIN_ARGS, "--epochs", "2", "--holdout-identities", "0",
            "--test-fraction", "0", "--test-data", str(test_dir), "--head", head, "--feat-dim", "16"]  # fmt: skip
    assert train.main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records) and records[1]["loss"] < records[0]["loss"]
    bundle = load_bundle(out)
    closed = bundle.metadata["evaluation"]["closed_set"]
    assert closed["images"] == 4 * 7 and bundle.metadata["training"]["split"]["test_images"] == 28
    config = bundle.metadata["training"]["config"]
    assert config["head"] == head and config["center_weight"] == 0.01
    if head != "softmax":  # the papers' defaults, recorded
        assert (config["head_scale"], config["head_margin"]) == (64.0, {"cosface": 0.35, "arcface": 0.5}[head])
    checkpoint = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert set(load_file(out / "model.safetensors")) == set(checkpoint["model"])  # the head is not shipped
    samples = [(p, bundle.class_names.index(p.parent.name)) for p in sorted(test_dir.glob("*/*.png"))]
    features, labels = evaluate.embed_samples(bundle.model, samples, bundle.preprocess)
    expected = float(np.mean(closed_set_predictions(features.astype(np.float64), head, checkpoint["head"]) == labels))
    assert closed["classifier_accuracy"] == pytest.approx(expected)


def test_test_data_with_an_unknown_identity_exits_2(digits: Path, tmp_path: Path, capsys) -> None:
    test_dir = copy_test_folder(digits, tmp_path / "test", ["0", "stranger"], per_class=0)
    shutil.copy(next(digits.glob("0/[0-9]*.png")), test_dir / "stranger" / "a.png")
    shutil.copy(next(digits.glob("0/[0-9]*.png")), test_dir / "0" / "a.png")
    args = ["--data", str(digits), "--output", str(tmp_path / "out"), *TRAIN_ARGS, "--test-data", str(test_dir)]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "stranger" in err and "training identities" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "bundle.json").exists()


BAD_ARGS = [
    (["--center-weight", "-1"], "--center-weight"),
    (["--center-alpha", "0"], "--center-alpha"),
    (["--center-alpha", "1.5"], "--center-alpha"),
    (["--holdout-identities", "9"], "holding out 9 of 10 identities"),
    (["--holdout-identities", "abc"], "--holdout-identities"),
    (["--epochs", "0"], "--epochs"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--device", "tpu"], "--device"),
    (["--arch", "vgg"], "--arch"),
    (["--batch-size", "1000"], "exceeds the"),
    (["--resume", "/nonexistent/last.pt"], "not found"),
    (["--target-far", "2"], "--target-far"),
    (["--head", "sphereface"], "--head"),
    (["--head-margin", "0.3"], "--head-margin applies only to --head cosface or arcface"),
    (["--head", "arcface", "--head-margin", "2"], "--head-margin must be in [0, π/2)"),
    (["--head", "cosface", "--head-scale", "0"], "--head-scale must be finite and > 0"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--progress-every-s", "-1"], "--progress-every-s must be >= 0"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_cli_input_exits_2_with_one_line(extra: list[str], message: str, digits: Path, tmp_path: Path,
                                             capsys) -> None:  # fmt: skip
    args = ["--data", str(digits), "--output", str(tmp_path / "out"), *TRAIN_ARGS, *extra]
    try:
        code = train.main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "bundle.json").exists()


def test_bad_cli_input_subprocess_has_no_traceback(tmp_path: Path) -> None:
    result = run_cli("--data", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_threads_progress_lines_and_summary_in_a_non_tty_log(digits: Path, tmp_path: Path) -> None:
    """Captured output is not a terminal: a plain progress line per step (--progress-every-s 0), the thread
    count in force (--threads 1 against OMP_NUM_THREADS=2) and a last line that sums the run up."""
    out = tmp_path / "run"
    result = run_cli("--data", str(digits), "--output", str(out), *TRAIN_ARGS, "--epochs", "2", "--threads", "1",
                     "--progress-every-s", "0", env_extra={"OMP_NUM_THREADS": "2"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(out)
    assert bundle.metadata["training"]["threads"] == 1 and "1 thread(s) each" in result.stderr
    steps = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["images"] // 32
    progress = [line for line in result.stderr.splitlines() if re.match(r"epoch \d/2  step ", line)]
    assert [line.split()[:4] for line in progress] == [
        ["epoch", f"{e}/2", "step", f"{k}/{steps}"] for e in (1, 2) for k in range(1, steps + 1)
    ]
    assert all(re.search(r"  \d+ img/s  ETA epoch \d+:\d\d  run \d+:\d\d  loss ", line) for line in progress)
    assert "\r" not in result.stderr  # no tqdm bar
    evaluation = bundle.metadata["evaluation"]
    last = result.stderr.strip().splitlines()[-1]
    tar = evaluation["verification"]["tar_at_far"]["0.001"]["tar"]
    assert last.startswith(f"done: bundle {out}: TAR@FAR=1e-3 {tar:.4f}, "), last
    assert f"open-set rank-1 {evaluation['open_set']['rank1']:.4f} on 3 unseen identities" in last
    assert f"threshold {bundle.threshold.value:.4f} at FAR 0.01 from held-out identities" in last


def diverging_args(digits: Path, out: Path) -> list[str]:
    return ["--data", str(digits), "--output", str(out), *TRAIN_ARGS, "--lr", "1e30"]


def test_a_diverging_run_stops_with_a_hint_and_writes_no_bundle(digits: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "diverged"
    assert train.main(diverging_args(digits, out)) == 1
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after the job's own log lines, one line says what happened
    assert last.startswith("error: training diverged: the loss is nan at epoch 1/3, step 2/"), err
    assert all(hint in last for hint in ("--lr", "--warmup-epochs", "--grad-clip")) and "earlier run" not in last
    assert err.count("training diverged") == 1 and "Traceback" not in err
    assert not (out / "bundle.json").exists() and not list(out.glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged"]  # no half-written staging folder
    assert (out / "metrics.jsonl").read_text() == "" and not list((out / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_diverging_run_leaves_an_earlier_bundle_as_it_was(trained, digits: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "earlier"
    shutil.copytree(trained[0], out)
    before = (out / "bundle.json").read_bytes()
    assert train.main(diverging_args(digits, out)) == 1
    assert "is an earlier run's, left as it was" in capsys.readouterr().err
    assert (out / "bundle.json").read_bytes() == before


@pytest.mark.slow
def test_torchrun_diverging_run_exits_non_zero_without_a_bundle(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = ["--standalone", "--nproc_per_node=2", "-m", "training", *diverging_args(digits, out), "--epochs", "2"]
    result = run_cli(*args, module="torch.distributed.run", timeout=120)  # a rank left waiting would hang here
    assert result.returncode != 0
    assert result.stderr.count("error: training diverged") == 1, result.stderr[-3000:]
    assert not (out / "bundle.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


def test_a_folder_aligned_by_training_align_makes_an_aligning_bundle(digits: Path, tmp_path: Path, capsys) -> None:
    """alignment.json beside the crops (as training.align writes it) reaches the bundle's input spec, so the
    service detects and aligns uploads; a size that disagrees with the crops is refused with one line."""
    data = tmp_path / "aligned"
    shutil.copytree(digits, data)
    template = [[5.0, 6.0], [11.0, 6.0], [8.0, 9.0], [6.0, 12.0], [10.0, 12.0]]
    record = {"input": {"channels": 1, "height": 16, "width": 16, "align": "similarity5", "template": template}}
    (data / "alignment.json").write_text(json.dumps(record))
    out = tmp_path / "bundle"
    args = ["--data", str(data), "--output", str(out), *TRAIN_ARGS, "--epochs", "1", "--warmup-epochs", "0"]
    assert train.main(args) == 0
    spec = load_bundle(out).preprocess.spec
    assert spec.align == "similarity5" and [list(point) for point in spec.template] == template
    capsys.readouterr()
    wrong = [*args[:2], "--output", str(tmp_path / "other"), *TRAIN_ARGS, "--image-size", "20", "20"]
    assert train.main(wrong) == 2
    err = capsys.readouterr().err
    assert "--image-size 20 20 differs from the 16x16 crops" in err and "Traceback" not in err
    assert not (tmp_path / "other" / "bundle.json").exists()
