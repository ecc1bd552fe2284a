"""The end of a run (rank 0): evaluate on held-out data, calibrate the threshold, plot, write the bundle."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import plots
from training.bundle import Strangers, Threshold, save_bundle
from training.calibration import Embedded, calibrate_pair_threshold, stranger_set
from training.config import TrainConfig
from training.data import Split
from training.evaluate import embed_samples, evaluate_embeddings, format_results, roc_curve
from training.loop import Trainer
from training.preprocess import Preprocessor

log = logging.getLogger("training")


def finish(
    config: TrainConfig,
    trainer: Trainer,
    split: Split,
    preprocess: Preprocessor,
    skipped: int,
    history: list[dict[str, Any]],
) -> Path:
    """Evaluate on the held-out data, calibrate the threshold, plot, and write the bundle."""
    output, device = Path(config.output), trainer.runtime.device
    embed, centers = trainer.embed, trainer.center_loss.centers.detach().float().cpu()

    def embed_split(samples: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray] | None:
        if not samples:
            return None
        return embed_samples(embed, samples, preprocess, 256, device, config.flip_tta, config.workers)

    closed, heldout = embed_split(split.test), embed_split(split.holdout)
    unseen = heldout
    logits = None
    if closed is not None:
        with torch.no_grad():
            logits = trainer.head(torch.from_numpy(closed[0]).to(device)).float().cpu().numpy()  # no margin
    calibrated_on = "held-out identities"
    if heldout is None:  # no unseen identities: pairs of the test images of training identities (optimistic)
        heldout, calibrated_on = closed, "test images of training identities (no held-out identities)"
    results, (positive, negative) = evaluate_embeddings(
        heldout, closed, centers.numpy(), logits, config.target_far, config.seed
    )
    results.update(flip_tta=config.flip_tta, pairs_from=calibrated_on)
    write_plots(output, history, positive, negative, closed, centers, split.train_classes, config)
    threshold, strangers = calibrate(config, split, unseen, closed)
    results["threshold"] = threshold.to_dict() if threshold else None  # replaces the in-sample one
    results["calibration"] = (threshold.calibration if threshold else None) or {
        "warnings": ["no negative pair anywhere: the bundle has no pair threshold"]
    }
    results["calibration"]["calibrated"] = bool(threshold and threshold.calibrated)
    training = {
        "config": config.to_dict(),
        "split": split.summary(),
        "skipped_images": skipped,
        "world_size": trainer.runtime.world,
        "threads": trainer.runtime.threads,
        "final_epoch": history[-1] if history else None,
    }
    embed.eval()
    save_bundle(
        output,
        embed,
        preprocess.spec,
        centers,
        split.train_classes,
        threshold,
        training,
        results,
        config.hflip,
        strangers=strangers,
    )
    print(format_results(results))
    for warning in results["calibration"]["warnings"]:
        log.warning("WARNING: the bundle is marked UNCALIBRATED: %s", warning)
    log.info("%s", summary_line(output, results, split.summary()["holdout_identities"]))
    return output


def calibrate(
    config: TrainConfig,
    split: Split,
    heldout: tuple[np.ndarray, np.ndarray] | None,
    closed: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[Threshold | None, Strangers | None]:
    """The pair threshold chosen and reported on disjoint held-out identities, and the strangers to ship
    (the choosing half, by name): see :mod:`training.calibration`."""
    held = Embedded(*heldout) if heldout is not None and len(heldout[1]) else None
    fallback = Embedded(*closed) if closed is not None and len(closed[1]) else None
    record = calibrate_pair_threshold(held, fallback, config.target_far, config.seed)
    chosen = stranger_set(held, config.seed)
    strangers = None
    if chosen is not None:
        labels, index = np.unique(chosen.labels, return_inverse=True)
        names = [split.holdout_classes[int(label)] for label in labels]
        source = "held-out identities that chose the pair threshold (never trained on, never reported its rates)"
        strangers = Strangers(chosen.embeddings, index.astype(np.int64), names, source)
    if record is not None:  # labels → names, of held-out identities or (fallback) of training identities
        names = split.holdout_classes if held is not None and held.identities >= 2 else split.train_classes
        for part in ("chosen_on", "reported_on"):
            entry = record["calibration"][part]
            entry["names"] = [names[label] for label in entry.pop("labels")]
    return (Threshold(**record) if record else None), strangers


def summary_line(output: Path, results: dict[str, Any], unseen_identities: int) -> str:
    """The run in one line: where the bundle is, its figures on unseen identities, where its threshold came from."""
    ver = results.get("verification") or {}
    tar = (ver.get("tar_at_far") or {}).get("0.001", {}).get("tar")
    rank1 = (results.get("open_set") or {}).get("rank1")
    on = f"{unseen_identities} unseen identities" if unseen_identities else "training identities' test images"
    figures = f"TAR@FAR=1e-3 {_number(tar)}, open-set rank-1 {_number(rank1)} on {on}"
    threshold = results.get("threshold")
    basis = results.get("threshold_basis") or results.get("pairs_from") or "unknown"
    if isinstance(basis, dict):
        basis = ", ".join(f"{k} {v}" for k, v in basis.items())
    if threshold:
        calibrated = f"threshold {_number(threshold['value'])} at FAR {threshold['target_far']:g} from {basis}"
        if threshold.get("calibrated") is False:
            calibrated += " (UNCALIBRATED: see the warnings above)"
    else:
        calibrated = "no threshold (uncalibrated: too few pairs)"
    return f"done: bundle {output}: {figures}; {calibrated}"


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_plots(
    output: Path,
    history: list[dict[str, Any]],
    positive: np.ndarray,
    negative: np.ndarray,
    closed: tuple[np.ndarray, np.ndarray] | None,
    centers: torch.Tensor,
    class_names: list[str],
    config: TrainConfig,
) -> None:
    folder = output / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    plots.plot_training_curves(history, folder / "training_curves.png")
    if len(positive) and len(negative):
        far, tar, _ = roc_curve(positive, negative)
        plots.plot_roc(
            {f"λ={config.center_weight:g}": (far, tar)}, folder / "roc.png", "Verification ROC (held-out pairs)"
        )
    if config.feat_dim == 2 and closed is not None:
        plots.plot_features_2d(
            closed[0],
            closed[1],
            centers.numpy(),
            folder / "features_2d.png",
            f"Test features and centers (λ={config.center_weight:g}, α={config.center_alpha:g})",
            class_names,
        )
