"""Render ``docs/benchmarks.md`` from ``bench/results/*.json`` and the other engineers' markdown sections.

``python -m bench.report [--results DIR] [--out FILE]``. The report is generated, never edited: every
number in it comes from a results file (see ``bench/common.py`` for the schema), and the sections
written by others (center-loss op, serving) are included verbatim with their headings demoted.

The judged figures of those sections reach the summary table through ``judged_sections.json``, a
``summary_only`` results file whose rows name their ``source`` doc and the ``evidence`` strings that doc
holds (``tests/test_bench_report.py`` checks that they are there, so the two cannot drift apart).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT

BENCH_ORDER = ("paper_mnist", "faces_orl", "sensitivity", "judged_sections")
# (title, curated doc of its owner, raw table of the latest `bench.run_all` run): both included verbatim
SECTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Center-loss op", "docs/benchmarks_center_loss.md", ("bench/results/raw/center_loss_op.md",)),
    ("Serving and gallery", "docs/benchmarks_service.md",
     ("bench/results/raw/serve_load.json", "bench/results/raw/gallery_scale.json")),
    ("Hardening", "docs/benchmarks_hardening.md", ("bench/results/raw/slow_clients.json",)),
    ("Face detection and alignment", "docs/benchmarks_detection.md",
     ("bench/results/raw/detect_cost.json", "bench/results/raw/align_identify.json",
      "bench/results/raw/faces_service.json")),
    ("Training job", "docs/benchmarks_training.md", ()),
    ("Center loss and heads on unseen identities", "docs/benchmarks_heads.md", ("bench/results/raw/center_grid.md",)),
    ("Open-set error rates (glyphs)", "docs/benchmarks_open_set.md", ()),  # its tables are in the doc itself
    ("Scale-out", "docs/benchmarks_scale.md", ("bench/results/raw/scale_out.json",)),
    ("Docker deployment", "docs/benchmarks_deploy.md", ()),  # docker-local runs; commands in the doc
    ("int8 inference (not offered)", "docs/benchmarks_int8.md", ()),  # its tables are in the doc itself
)  # fmt: skip
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"


class ReportError(ValueError):
    """A results file is unreadable or misses a field the report needs; the message names the file."""


# -----------------------------------------------------------------------------
# formatting


def format_number(value: Any, fmt: str = "g") -> str:
    """One cell. Fractions with ``pct`` become percentages; ``{"mean", "std", "n"}`` becomes mean ± std."""
    if value is None:
        return "—"
    if isinstance(value, dict) and "mean" in value:
        mean, std = format_number(value["mean"], fmt), format_number(value["std"], fmt)
        suffix = " %" if fmt == "pct" else ""
        if value.get("n") == 1:  # one run: a spread of 0 would read as a measured one
            return f"{mean} (n=1)"
        return f"{mean.removesuffix(suffix)} ± {std.removesuffix(suffix)}{suffix} (n={value.get('n', '?')})"
    if isinstance(value, bool) or fmt == "str" or not isinstance(value, int | float):
        return str(value)
    formats = {
        "pct": lambda v: f"{100 * v:.2f} %",
        "f2": lambda v: f"{v:.2f}",
        "f3": lambda v: f"{v:.3f}",
        "f4": lambda v: f"{v:.4f}",
        "int": lambda v: f"{round(v):d}",
        "s": lambda v: f"{v:.0f} s",
        "g": lambda v: f"{v:g}",
    }
    if fmt not in formats:
        raise ReportError(f"unknown number format {fmt!r}; known: {sorted(formats)}")
    return formats[fmt](value)


def format_met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "—"}[met]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; ``|`` inside cells is escaped so a cell never splits a row."""
    for row in rows:
        if len(row) != len(headers):
            raise ReportError(f"table row has {len(row)} cells for {len(headers)} columns: {list(row)}")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def machine_text(info: dict[str, Any]) -> str:
    text = f"{info.get('nproc', '?')}× {info.get('cpu', '?')}, torch {info.get('torch', '?')}"
    if info.get("device", "cpu") != "cpu":
        text += f", {info.get('gpu', info['device'])}"
    return text


def demote_headings(markdown: str, levels: int = 1) -> str:
    """Push every ATX heading down ``levels`` (max ######) so an included file nests under our heading.
    Fenced code blocks are left alone (a ``# comment`` in a shell block is not a heading)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        match = None if fenced else re.match(r"^(#{1,6})(\s.*)$", line)
        out.append(f"{'#' * min(6, len(match.group(1)) + levels)}{match.group(2)}" if match else line)
    return "\n".join(out)


# -----------------------------------------------------------------------------
# loading


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """All results files, in report order (known benches first, the rest by name)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ReportError(f"unreadable results file {path}: {error}") from None
        for key in ("title", "command", "machine", "date"):
            if key not in payload:
                raise ReportError(f"results file {path} has no {key!r}")
        found[payload.get("bench", path.stem)] = payload
    rank = {name: i for i, name in enumerate(BENCH_ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


# -----------------------------------------------------------------------------
# rendering


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    headers = ["Figure", "Goal", "Measured", "Met", "Command", "Machine", "Date (UTC)"]
    rows = []
    for payload in results.values():
        for row in payload.get("summary", []):
            rows.append(
                [
                    row["figure"],
                    row.get("goal", "—"),
                    format_number(row["measured"], row.get("fmt", "g")),
                    format_met(row.get("met")),
                    f"`{row.get('command', payload['command'])}`",
                    machine_text(payload["machine"]),
                    row.get("date", payload["date"]),
                ]
            )
    return markdown_table(headers, rows) if rows else "_No results files yet._"


def render_table(table: dict[str, Any]) -> str:
    columns = table["columns"]
    rows = [
        [format_number(cell, col.get("fmt", "g")) for cell, col in zip(row, columns, strict=True)]
        for row in table["rows"]
    ]
    title = f"**{table['title']}**\n\n" if table.get("title") else ""
    return title + markdown_table([c["name"] for c in columns], rows)


def render_bench(payload: dict[str, Any]) -> str:
    parts = [f"## {payload['title']}", ""]
    parts.append(f"Command: `{payload['command']}`  ")
    wall = f", wall time {format_number(payload['wall_s'], 's')}" if "wall_s" in payload else ""
    reused = [r for r in payload.get("runs", []) if "(reused run)" in r["name"]]
    if reused:  # this invocation only evaluated: say what the training it reused cost
        total = format_number(sum(r["wall_s"] for r in payload["runs"]), "s")
        runs = len(payload["runs"])
        wall += f" ({len(reused)} of {runs} training runs reused from an earlier invocation; all runs: {total})"
    parts.append(f"Machine: {machine_text(payload['machine'])}; run on {payload['date']} (UTC){wall}.")
    parts.append("")
    for note in payload.get("notes", []):
        parts += [f"- {note}"]
    if payload.get("notes"):
        parts.append("")
    for table in payload.get("tables", []):
        parts += [render_table(table), ""]
    for plot in payload.get("plots", []):
        rel = Path(plot["path"]).relative_to("docs") if plot["path"].startswith("docs/") else Path(plot["path"])
        parts += [f"![{plot.get('caption', '')}]({rel.as_posix()})", "", f"_{plot.get('caption', '')}_", ""]
    runs = payload.get("runs", [])
    if runs:
        parts += [
            "<details><summary>Every step (command, wall time; a reused run was trained by an earlier "
            "invocation with the identical command, and its wall time is that run's)</summary>",
            "",
        ]
        parts += [
            markdown_table(
                ["Step", "Wall", "Command"],
                [[r["name"], format_number(r["wall_s"], "s"), f"`{r['command']}`"] for r in runs],
            )
        ]
        parts += ["", "</details>", ""]
    if payload.get("not_run"):
        parts += ["**Not run:**", ""] + [f"- {item}" for item in payload["not_run"]] + [""]
    return "\n".join(parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def render_latest(path: Path) -> list[str]:
    """A raw output of the latest run_all run: markdown nested under ours, JSON folded in a code block,
    preceded by the command, machine and date run_all noted for it (``provenance.json`` beside it)."""
    parts = [f"### Latest `bench.run_all` output (`{_rel(path)}`, verbatim)", ""]
    provenance_file = path.parent / "provenance.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    entry = provenance.get(_rel(path))
    if entry:
        parts += [f"Command: `{entry['command']}`  ", f"Machine: {entry['machine']}; run on {entry['date']} (UTC), "
                  f"wall time {format_number(entry['wall_s'], 's')}.", ""]  # fmt: skip
    if path.suffix == ".json":
        return [*parts, "<details><summary>raw JSON</summary>", "", "```json", path.read_text().strip(), "```",
                "", "</details>", ""]  # fmt: skip
    return [*parts, demote_headings(path.read_text().strip(), 3), ""]


def render_section(title: str, path: Path, latest: Sequence[Path] = ()) -> str:
    """Another engineer's curated markdown, verbatim, then the raw outputs of the latest run_all run."""
    parts = [f"## {title}", ""]
    if path.is_file():
        parts += [f"_Included verbatim from `{_rel(path)}`._", "", demote_headings(path.read_text().strip(), 2), ""]
    else:
        parts += [f"_`{_rel(path)}` was not written yet._", ""]
    for raw in latest:
        if raw.is_file():
            parts += render_latest(raw)
    return "\n".join(parts)


def build_report(results: dict[str, dict[str, Any]], sections: Sequence[tuple[str, Path, Sequence[Path]]]) -> str:
    """The whole markdown document: summary table, one section per bench, the included sections, and
    everything that was not run, gathered at the end."""
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` from `bench/results/*.json` (the provenance of every number "
        "below) and the included sections; regenerate it, don't edit it. Quick versions: "
        "`python -m bench.run_all --quick`.",
        "",
        "## Summary",
        "",
        "The center-loss op and serving rows come from `bench/results/judged_sections.json`, transcribed from "
        "those sections below (the tests check that each figure is there).",
        "",
        summary_table(results),
        "",
    ]
    parts += [render_bench(payload) for payload in results.values() if not payload.get("summary_only")]
    parts += [render_section(title, path, latest) for title, path, latest in sections]
    not_run = [f"{payload['title']}: {item}" for payload in results.values() for item in payload.get("not_run", [])]
    if not_run:
        parts += ["## What was not run", ""] + [f"- {item}" for item in not_run] + [""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of results JSON files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    args = parser.parse_args(argv)
    sections = [(title, ROOT / doc, [ROOT / raw for raw in latest]) for title, doc, latest in SECTIONS]
    report = build_report(load_results(args.results), sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out} ({len(report.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
