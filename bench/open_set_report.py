"""The markdown table ``bench.open_set`` writes beside its JSON: rates with their intervals and counts.

Kept apart so that the measurement does not carry its presentation.
"""

from __future__ import annotations

import json
from typing import Any


def pct(entry: dict[str, Any]) -> str:
    """``1.23 % [0.80, 1.90] (17/1380)``: the rate, its 95 % Wilson interval and the counts."""
    if entry["rate"] is None:
        return "– (0 trials)"
    low, high = entry["ci95"]
    return f"{100 * entry['rate']:.2f} % [{100 * low:.2f}, {100 * high:.2f}] ({entry['k']}/{entry['n']})"


def thresholds(row: dict[str, Any]) -> str:
    low, high = row["threshold_min"], row["threshold_max"]
    if low is None:
        return "–"
    return f"{low:.4f}" if low == high else f"{low:.4f}–{high:.4f}"


def markdown(result: dict[str, Any]) -> str:
    verify, info = result["verify"], result["info"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['nproc']} cores, {result['machine']['cpu']}, torch {result['machine']['torch']};"
        f" {result['date']} (UTC); wall {result['wall_s']:.0f} s. Bundle `{result['bundle']}` "
        f"(`/info` threshold: {json.dumps(info.get('threshold'))}).",
        "",
        "| /verify | threshold | FAR, unseen identities | TAR, unseen identities |",
        "|---|---|---|---|",
        f"| {verify['far']['n']} + {verify['tar']['n']} pairs | {thresholds(verify)} | {pct(verify['far'])} "
        f"| {pct(verify['tar'])} |",
        "",
        f"| gallery identities | strangers (searches) | /identify threshold | FPIR | FNIR | rank-1 "
        f"| oracle threshold @ FPIR {result['config']['target_fpir']:g} | oracle FNIR | oracle FNIR @ measured FPIR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["galleries"]:
        lines.append(
            f"| {row['gallery_identities']} | {row['stranger_identities']} ({row['fpir']['n']}) | {thresholds(row)} "
            f"| {pct(row['fpir'])} | {pct(row['fnir'])} | {pct(row['rank1'])} | {row['oracle']['threshold']:.4f} "
            f"| {pct(row['oracle']['fnir'])} | {pct(row['oracle_at_measured_fpir']['fnir'])} |"
        )
    bases = [b for row in [verify, *result["galleries"]] for b in row["threshold_basis"]]
    lines += ["", f"Rates: {result['interval']}; (k/n) are the counts behind each."]
    lines += ["", f"threshold_basis in the answers: {json.dumps(bases[:4]) if bases else 'none (field absent)'}."]
    return "\n".join(lines) + "\n"
