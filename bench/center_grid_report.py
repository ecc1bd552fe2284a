"""Tables, paired tests and the Fig. 5-style λ plot of :mod:`bench.center_grid`'s runs.

Every configuration is compared with softmax-only (λ = 0) trained with the same seed: the differences
d_s = metric(config, s) − metric(softmax, s) give the mean paired difference, its sample sd, and a paired
t-test (two-sided, n − 1 degrees of freedom; with 3 seeds only large, consistent differences reach p < 0.05).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from bench.common import RESULTS_DIR, ROOT, machine, utc_date, write_results

Config = tuple[str, float, float]  # head, λ, α (α = 0.5 when λ = 0: unused)
METRICS = (  # key, label, path in unseen.json, higher is better
    ("tar", "TAR@FAR=1e-3", ("cosine", "verification", "tar"), True),
    ("rank1", "rank-1 @ 1000", ("cosine", "identification", "rank1"), True),
    ("fnir", "FNIR@FPIR=1e-2 @ 1000", ("cosine", "identification", "fnir"), False),
)
EUCLIDEAN = (
    ("tar", "TAR@FAR=1e-3", ("euclidean", "verification", "tar"), True),
    ("rank1", "rank-1 @ 1000", ("euclidean", "identification", "rank1"), True),
)
BASELINE: Config = ("softmax", 0.0, 0.5)


def load_runs(out: Path) -> dict[Config, dict[int, dict[str, Any]]]:
    """{(head, λ, α): {seed: unseen.json}} for every scored run under ``out/runs``."""
    runs: dict[Config, dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in sorted((out / "runs").glob("*/unseen.json")):
        report = json.loads(path.read_text())
        if "seed" not in report:
            continue  # scored but not yet labelled by run_point
        alpha = report["center_alpha"] if report["center_weight"] > 0 else 0.5
        runs[(report["head"], report["center_weight"], alpha)][report["seed"]] = report
    return dict(runs)


def value(report: dict[str, Any], path: tuple[str, ...]) -> float:
    node: Any = report
    for key in path:
        node = node[key]
    return float(node)


def paired(config_runs: dict[int, dict], base_runs: dict[int, dict], path: tuple[str, ...]) -> dict[str, Any]:
    """Mean ± sd of the config, and of its per-seed difference from the baseline, with the paired t-test."""
    seeds = sorted(config_runs)
    values = np.array([value(config_runs[s], path) for s in seeds])
    summary: dict[str, Any] = {"mean": float(values.mean()), "sd": _sd(values), "n": len(values), "seeds": seeds}
    common = [s for s in seeds if s in base_runs]
    if len(common) >= 2:
        diffs = np.array([value(config_runs[s], path) - value(base_runs[s], path) for s in common])
        ours, theirs = ([value(runs[s], path) for s in common] for runs in (config_runs, base_runs))
        p = float(stats.ttest_rel(ours, theirs).pvalue) if diffs.std() > 0 else None
        summary["diff"] = {"mean": float(diffs.mean()), "sd": _sd(diffs), "n": len(diffs), "p": p}
    return summary


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(runs: dict[Config, dict[int, dict]]) -> list[dict[str, Any]]:
    base = runs.get(BASELINE, {})
    rows = []
    for config in sorted(runs, key=lambda c: (c[0] != "softmax", c[0], c[1], c[2])):
        head, lam, alpha = config
        row: dict[str, Any] = {"head": head, "center_weight": lam, "center_alpha": alpha if lam > 0 else None}
        for key, _, path, _ in METRICS:
            row[key] = paired(runs[config], base, path)
        for key, _, path, _ in EUCLIDEAN:
            row[f"euclidean_{key}"] = paired(runs[config], base, path)
        norms = [r["feature_norm"] for r in runs[config].values()]
        row["feature_norm"] = float(np.mean(norms))
        row["train_wall_s"] = float(np.mean([r.get("train_wall_s", math.nan) for r in runs[config].values()]))
        rows.append(row)
    return rows


def _pct(summary: dict[str, Any]) -> str:
    return f"{100 * summary['mean']:.2f} ± {100 * summary['sd']:.2f}"


def _diff(summary: dict[str, Any], higher_better: bool) -> str:
    diff = summary.get("diff")
    if diff is None:
        return "—"
    p = "—" if diff["p"] is None else f"{diff['p']:.3f}"
    clear = (diff["mean"] > 2 * diff["sd"]) if higher_better else (-diff["mean"] > 2 * diff["sd"])
    mark = " ✓" if clear and diff["mean"] != 0 else ""
    return f"{100 * diff['mean']:+.2f} ± {100 * diff['sd']:.2f} (p {p}){mark}"


def _name(row: dict[str, Any]) -> str:
    if row["center_weight"] == 0:
        return f"{row['head']}"
    return f"{row['head']} + center (λ {row['center_weight']:g}, α {row['center_alpha']:g})"


def table(rows: list[dict[str, Any]], metrics: tuple = METRICS, prefix: str = "") -> list[str]:
    header = ["configuration", "seeds"]
    for _, label, _, _ in metrics:
        header += [f"{label} %", "Δ vs softmax (pts, paired)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_name(row), str(row[f"{prefix}{metrics[0][0]}"]["n"])]
        for key, _, _, higher in metrics:
            cells += [_pct(row[prefix + key]), _diff(row[prefix + key], higher)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """λ against each metric, one line per α, softmax head (the paper's Fig. 5 shape), sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    softmax = [r for r in rows if r["head"] == "softmax"]
    base = next((r for r in softmax if r["center_weight"] == 0), None)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for axis, (key, label, _, _) in zip(axes, METRICS, strict=True):
        for alpha in sorted({r["center_alpha"] for r in softmax if r["center_alpha"] is not None}):
            points = ([base] if base else []) + sorted(
                (r for r in softmax if r["center_alpha"] == alpha), key=lambda r: r["center_weight"]
            )
            x = [r["center_weight"] for r in points]
            y = [100 * r[key]["mean"] for r in points]
            err = [100 * r[key]["sd"] for r in points]
            axis.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"α = {alpha:g}")
        axis.set_xscale("symlog", linthresh=1e-3)
        axis.set_xlabel("λ (center-loss weight; 0 = softmax only)")
        axis.set_title(f"{label} %")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Glyph set, 1 000 unseen identities: mean ± sd over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def contrasts(runs: dict[Config, dict[int, dict]]) -> list[str]:
    """Paired differences that choose a recipe: α 0.5 − α 0.1 at each λ, each λ − the paper's λ = 0.003 (α 0.5)
    and cosine − Euclidean scoring, each over the seeds both sides have."""
    pairs: list[tuple[str, Config, Config]] = []
    lambdas = sorted({c[1] for c in runs if c[0] == "softmax" and c[1] > 0})
    pairs += [(f"α 0.5 − α 0.1 at λ {lam:g}", ("softmax", lam, 0.5), ("softmax", lam, 0.1)) for lam in lambdas]
    paper = ("softmax", 0.003, 0.5)
    pairs += [(f"λ {lam:g} − λ 0.003 (α 0.5)", ("softmax", lam, 0.5), paper) for lam in lambdas if lam != 0.003]
    lines = ["| contrast (softmax head) | seeds | Δ TAR@FAR=1e-3 (pts) | Δ rank-1 (pts) | Δ FNIR@FPIR=1e-2 (pts) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for label, left, right in pairs:
        if left not in runs or right not in runs:
            continue
        cells = [paired(runs[left], runs[right], path).get("diff") for _, _, path, _ in METRICS]
        if cells[0] is None:
            continue
        lines.append(f"| {label} | {cells[0]['n']} | " + " | ".join(_delta(cell) for cell in cells) + " |")
    return lines


def _delta(diff: dict[str, Any]) -> str:
    p = "—" if diff["p"] is None else f"{diff['p']:.3f}"
    return f"{100 * diff['mean']:+.2f} ± {100 * diff['sd']:.2f} (p {p})"


def write_report(out: Path, markdown: Path | None, plot_path: Path) -> dict[str, Any]:
    runs = load_runs(out)
    rows = summarise(runs)
    softmax_rows = [r for r in rows if r["head"] == "softmax"]
    head_rows = [r for r in rows if r["head"] != "softmax" or r["center_weight"] == 0]
    lines = ["### λ × α, softmax head (cosine scoring)", "", *table(softmax_rows), ""]
    if any(r["head"] != "softmax" for r in rows):
        lines += ["### Heads, each alone and with center loss (cosine scoring)", "", *table(head_rows), ""]
    lines += ["### Paired contrasts behind the default recipe (cosine scoring)", "", *contrasts(runs), ""]
    lines += ["### The same runs scored by Euclidean distance on the raw features", "",
              *table(rows, EUCLIDEAN, "euclidean_"), ""]  # fmt: skip
    lines += ["Mean feature norm on the unseen images, per configuration: "
              + "; ".join(f"{_name(r)} {r['feature_norm']:.1f}" for r in rows), ""]  # fmt: skip
    image = plot(rows, plot_path).resolve()
    docs = ROOT / "docs"
    link = image.relative_to(docs) if image.is_relative_to(docs) else image  # read from docs/benchmarks.md
    lines += [f"![λ vs the unseen-identity figures]({link})", ""]
    text = "\n".join(lines)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(text)
    print(text)
    payload = {"date": utc_date(), "machine": machine(), "rows": rows}
    write_results("center_grid", payload, RESULTS_DIR / "raw")  # raw: bench.report reads the tables from the .md
    return payload
