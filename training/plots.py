"""Figures of a training run, reusable by the benches: curves, the paper's Fig. 3 view, ROC curves.

matplotlib runs headless (Agg); every function writes one PNG and closes its figure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Training") -> Path:
    """Losses, training accuracy, and feature/center norms (a collapse shows as norms falling to 0)."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc, ax_norm) = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("loss", "total"), ("softmax_loss", "softmax"), ("center_loss", "center (L_C)")):
        ax_loss.plot(epochs, [r[key] for r in history], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: losses")
    if any(r["loss"] > 0 for r in history):
        ax_loss.set_yscale("log")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], marker=".", label="train accuracy")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy", ylim=(0, 1.02))
    ax_norm.plot(epochs, [r["feature_norm"] for r in history], marker=".", label="mean ‖feature‖")
    ax_norm.plot(epochs, [r["center_norm"] for r in history], marker=".", label="mean ‖center‖")
    ax_norm.set(xlabel="epoch", ylabel="L2 norm", title=f"{title}: feature and center norms")
    for ax in (ax_loss, ax_acc, ax_norm):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_features_2d(
    features: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray,
    path: str | Path,
    title: str,
    class_names: Sequence[str] | None = None,
    max_points: int = 20_000,
) -> Path:
    """Wen et al. Fig. 3: 2-D deep features coloured by class, each class center as a black-edged star."""
    features, labels, centers = np.asarray(features), np.asarray(labels), np.asarray(centers)
    if features.shape[1] != 2 or centers.shape[1] != 2:
        raise ValueError(f"plot_features_2d needs 2-D features, got {features.shape[1]}-D")
    if len(labels) > max_points:  # keep the scatter readable and the file small
        keep = np.random.default_rng(0).choice(len(labels), max_points, replace=False)
        features, labels = features[keep], labels[keep]
    cmap = plt.get_cmap("tab10" if len(centers) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7, 7))
    handles = []
    for c in range(len(centers)):
        colour = cmap(c % cmap.N)
        mask = labels == c
        ax.scatter(features[mask, 0], features[mask, 1], s=4, alpha=0.5, color=colour)
        ax.scatter(*centers[c], marker="*", s=250, color=colour, edgecolors="black", linewidths=1.2, zorder=3)
        name = class_names[c] if class_names else str(c)
        handles.append(Line2D([], [], marker="o", linestyle="", color=colour, label=name))
    handles.append(
        Line2D(
            [],
            [],
            marker="*",
            markersize=12,
            linestyle="",
            color="white",
            markeredgecolor="black",
            label="class centers",
        )
    )
    ax.set(xlabel="feature 1", ylabel="feature 2", title=title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize="small", ncol=1 + len(centers) // 20, loc="best")
    return _save(fig, path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    """TAR against FAR on a log axis, one line per ``label -> (far, tar)``."""
    fig, ax = plt.subplots(figsize=(6, 5))
    floor = 1.0
    for label, (far, tar) in curves.items():
        far, tar = np.asarray(far), np.asarray(tar)
        positive = far > 0
        if positive.any():
            floor = min(floor, far[positive].min())
        ax.step(far[positive], tar[positive], where="post", label=label)
    ax.set_xscale("log")
    ax.set(xlabel="false accept rate (FAR)", ylabel="true accept rate (TAR)", title=title, ylim=(0, 1.02))
    ax.set_xlim(max(floor, 1e-6), 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    return _save(fig, path)
