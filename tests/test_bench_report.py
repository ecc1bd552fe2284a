"""The benchmark report's aggregation and rendering: numbers must come from results JSON, unchanged."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `bench` is a top-level folder, not an installed package
    sys.path.insert(0, str(_ROOT))

from bench.common import dig, mean_std, write_results  # noqa: E402
from bench.report import (  # noqa: E402
    ReportError,
    build_report,
    demote_headings,
    format_number,
    load_results,
    markdown_table,
    render_table,
)

MACHINE = {"nproc": 2, "cpu": "Test CPU 9000", "torch": "2.13.0", "device": "cpu"}


def payload(title: str, measured: object, **extra: object) -> dict:
    return {
        "title": title,
        "command": f"python -m bench.{title.lower()} --quick",
        "machine": MACHINE,
        "date": "2031-02-03",
        "wall_s": 61.4,
        "summary": [
            {"figure": f"{title} accuracy", "goal": "≥ 99.0 %", "measured": measured, "fmt": "pct", "met": False}
        ],
        **extra,
    }


@pytest.mark.parametrize("values", [[0.91, 0.95, 0.97], [1.0, 2.0], [3.5, 3.5, 3.5, 3.5]])
def test_mean_std_matches_statistics_module(values: list[float]) -> None:
    result = mean_std(values)
    assert result["n"] == len(values)
    assert result["mean"] == pytest.approx(statistics.fmean(values))
    assert result["std"] == pytest.approx(statistics.stdev(values))


def test_mean_std_of_one_value_has_zero_spread_and_empty_is_refused() -> None:
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_dig_walks_dotted_paths_and_names_the_missing_key() -> None:
    data = {"verification": {"tar_at_far": {"0.01": {"tar": 0.8}}}}
    assert dig(data, "verification.tar_at_far") == {"0.01": {"tar": 0.8}}
    with pytest.raises(KeyError, match="open_set"):
        dig(data, "open_set.rank1")


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        (0.99123, "pct", "99.12 %"),
        (0.5, "g", "0.5"),
        (0.001, "g", "0.001"),
        (41.6, "s", "42 s"),
        (None, "pct", "—"),
        ("resnet18", "str", "resnet18"),
        ({"mean": 0.9, "std": 0.012, "n": 3}, "pct", "90.00 ± 1.20 % (n=3)"),
        ({"mean": 0.91234, "std": 0.0042, "n": 2}, "f3", "0.912 ± 0.004 (n=2)"),
        ({"mean": 0.5, "std": 0.0, "n": 1}, "pct", "50.00 % (n=1)"),
    ],
)
def test_format_number(value: object, fmt: str, expected: str) -> None:
    assert format_number(value, fmt) == expected


def test_format_number_rejects_unknown_format() -> None:
    with pytest.raises(ReportError, match="unknown number format"):
        format_number(1.0, "percent")


def test_markdown_table_escapes_pipes_and_checks_width() -> None:
    table = markdown_table(["a", "b"], [["x|y", "2"]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| x\\|y | 2 |"]
    with pytest.raises(ReportError, match="2 columns"):
        markdown_table(["a", "b"], [["only one"]])


def test_render_table_formats_each_column_by_its_own_format() -> None:
    table = {
        "title": "Sweep",
        "columns": [{"name": "λ", "fmt": "g"}, {"name": "acc", "fmt": "pct"}],
        "rows": [[0.01, 0.987], [0, {"mean": 0.5, "std": 0.1, "n": 3}]],
    }
    lines = render_table(table).splitlines()
    assert lines[0] == "**Sweep**"
    assert lines[-2] == "| 0.01 | 98.70 % |"
    assert lines[-1] == "| 0 | 50.00 ± 10.00 % (n=3) |"


def test_demote_headings_skips_fenced_code() -> None:
    text = "# Title\nbody\n```bash\n# a shell comment\n```\n### Deep\n###### Max"
    assert demote_headings(text, 2).splitlines() == [
        "### Title",
        "body",
        "```bash",
        "# a shell comment",
        "```",
        "##### Deep",
        "###### Max",
    ]


def test_report_takes_every_number_from_results_and_merges_sections(tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    write_results("faces_orl", payload("Faces", {"mean": 0.8312, "std": 0.021, "n": 3}), results_dir)
    write_results(
        "paper_mnist",
        payload(
            "Mnist",
            0.98765,
            tables=[
                {"title": "Per λ", "columns": [{"name": "λ"}, {"name": "acc", "fmt": "pct"}], "rows": [[0.1, 0.4321]]}
            ],
            plots=[{"path": "docs/img/mnist_lambda_0.1.png", "caption": "features at λ=0.1"}],
            runs=[{"name": "train λ=0.1", "command": "python -m training --center-weight 0.1", "wall_s": 12.0}],
            not_run=["the full 60k-image schedule (needs a GPU)"],
        ),
        results_dir,
    )
    section = tmp_path / "benchmarks_service.md"
    section.write_text("# Serving\n\n| p50 | 3.1 ms |\n")
    latest = tmp_path / "service_latest.md"
    latest.write_text("# Raw\n\n| p50 | 2.7 ms |\n")
    raw_json = tmp_path / "serve_load.json"
    raw_json.write_text('{"rps": 123.4}\n')
    provenance = {
        "command": "python -m bench.serve_load --json x",
        "machine": "2× Test",
        "date": "2031-02-04",
        "wall_s": 42,
    }
    (tmp_path / "provenance.json").write_text(json.dumps({str(raw_json): provenance}))
    results = load_results(results_dir)
    assert list(results) == ["paper_mnist", "faces_orl"]  # report order, not file-name order

    report = build_report(
        results,
        [
            ("Serving and gallery", section, [latest, raw_json]),
            ("Center-loss op", tmp_path / "missing.md", [tmp_path / "none.md"]),
        ],
    )
    summary = report.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "98.77 %" in summary and "83.12 ± 2.10 % (n=3)" in summary
    assert summary.index("Mnist accuracy") < summary.index("Faces accuracy")
    assert "2× Test CPU 9000, torch 2.13.0" in summary and "2031-02-03" in summary
    assert "`python -m bench.mnist --quick`" in summary
    assert "| 0.1 | 43.21 % |" in report
    assert "![features at λ=0.1](img/mnist_lambda_0.1.png)" in report
    assert "`python -m training --center-weight 0.1`" in report
    assert "#### Serving" not in report and "### Serving" in report and "| p50 | 3.1 ms |" in report
    assert "#### Raw" in report and "| p50 | 2.7 ms |" in report  # the latest raw table, nested one deeper
    assert report.index("| p50 | 3.1 ms |") < report.index("| p50 | 2.7 ms |")
    assert '```json\n{"rps": 123.4}\n```' in report
    assert (
        "Command: `python -m bench.serve_load --json x`" in report
        and "run on 2031-02-04 (UTC), wall time 42 s" in report
    )
    assert "`" + str(tmp_path / "missing.md") + "` was not written yet" in report
    assert "## What was not run" in report and "Mnist: the full 60k-image schedule (needs a GPU)" in report


def test_report_changes_when_a_result_changes(tmp_path: Path) -> None:
    """No number is baked into the renderer: editing the JSON value changes the report."""
    results_dir = tmp_path / "results"
    path = write_results("sensitivity", payload("Sens", 0.25), results_dir)
    before = build_report(load_results(results_dir), [])
    data = json.loads(path.read_text())
    data["summary"][0]["measured"] = 0.75
    path.write_text(json.dumps(data))
    after = build_report(load_results(results_dir), [])
    assert "25.00 %" in before and "25.00 %" not in after and "75.00 %" in after


def test_reused_training_runs_are_named_with_their_own_cost() -> None:
    """An invocation that only re-evaluated reused runs must not pass its short wall time off as the cost."""
    from bench.report import render_bench

    runs = [{"name": "train a (reused run)", "command": "x", "wall_s": 900.0},
            {"name": "train b", "command": "y", "wall_s": 100.0}]  # fmt: skip
    text = render_bench({**payload("Mnist", 0.99), "wall_s": 90.0, "runs": runs})
    assert "wall time 90 s (1 of 2 training runs reused from an earlier invocation; all runs: 1000 s)" in text
    assert "reused" not in render_bench({**payload("Mnist", 0.99), "wall_s": 90.0, "runs": runs[1:]}).split("\n")[3]


def test_judged_section_figures_are_those_their_curated_docs_record() -> None:
    """The summary rows transcribed from the op and serving docs: every evidence string is in its source doc,
    and the displayed figure is part of the evidence (a number can't be changed in one place only)."""
    from bench.common import RESULTS_DIR, ROOT

    payload = json.loads((RESULTS_DIR / "judged_sections.json").read_text())
    assert payload["summary_only"] is True and len(payload["summary"]) >= 9
    for row in payload["summary"]:
        doc = (ROOT / row["source"]).read_text()
        for evidence in row["evidence"]:
            assert evidence in doc, f"{row['figure']}: {evidence!r} not in {row['source']}"
        for figure in row["measured"].split(", "):
            assert any(figure in evidence for evidence in row["evidence"]), (row["figure"], figure)
        assert row["command"] in doc, f"{row['figure']}: command not in {row['source']}"


def test_summary_only_results_reach_the_summary_table_but_get_no_section(tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    data = {**payload("Judged", 0.5), "summary_only": True}
    data["summary"][0].update(measured="1.9×", fmt="str", command="python -m bench.serve_load", date="2031-01-02")
    write_results("judged_sections", data, results_dir)
    report = build_report(load_results(results_dir), [])
    assert "| 1.9× |" in report and "`python -m bench.serve_load`" in report and "| 2031-01-02 |" in report
    assert "## Judged" not in report


def test_load_results_names_the_file_missing_a_field(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text(json.dumps({"title": "x", "command": "y", "machine": MACHINE}))
    with pytest.raises(ReportError, match=r"broken\.json has no 'date'"):
        load_results(tmp_path)


def test_cli_flags_spells_options_like_the_training_cli() -> None:
    from bench.common import cli_flags

    argv = cli_flags(feat_dim=2, image_size=(28, 28), no_hflip=True, amp=False, lr=None, center_weight=0.0)
    assert argv == ["--feat-dim", "2", "--image-size", "28", "28", "--no-hflip", "--center-weight", "0.0"]


def test_faces_aggregate_is_mean_std_per_metric_and_skips_missing_values() -> None:
    from bench.faces_orl import METRICS, aggregate

    keys = [key for key, _, _ in METRICS]
    runs = [{"metrics": dict.fromkeys(keys, value)} for value in (0.8, 0.9, 1.0)]
    runs[0]["metrics"]["tar_1e-3"] = None  # e.g. too few negatives in one run
    result = aggregate(runs)
    assert result["ten_fold"]["mean"] == pytest.approx(0.9)
    assert result["ten_fold"]["std"] == pytest.approx(statistics.stdev([0.8, 0.9, 1.0]))
    assert result["tar_1e-3"] == {
        "mean": pytest.approx(0.95),
        "std": pytest.approx(statistics.stdev([0.9, 1.0])),
        "n": 2,
    }


def test_sensitivity_sweeps_share_the_paper_point() -> None:
    from bench.sensitivity import FIXED_ALPHA, FIXED_LAMBDA, sweep_points

    points = sweep_points([0.01, 0.0, FIXED_LAMBDA], [1.0, FIXED_ALPHA])
    assert [p for p in points if p[0] == "lambda"] == [
        ("lambda", 0.0, FIXED_ALPHA),
        ("lambda", FIXED_LAMBDA, FIXED_ALPHA),
        ("lambda", 0.01, FIXED_ALPHA),
    ]
    assert ("alpha", FIXED_LAMBDA, FIXED_ALPHA) in points  # trained once, used by both sweeps
    assert len({(lam, alpha) for _, lam, alpha in points}) == 4


def test_mnist_summary_judges_goals_against_the_lambda_zero_baseline() -> None:
    import argparse

    from bench.common import IMG_DIR
    from bench.paper_mnist import summarise

    def row(lam: float, closed: float, tar: float, rank1: float) -> dict:
        return {
            "lambda": lam,
            "closed_wall_s": 10.0,
            "closed_bundle": {"classifier_accuracy": closed, "train_accuracy": 0.95},
            "open_bundle": {"classifier_accuracy": 0.9, "train_accuracy": 0.95},
            "closed": {"images": 100, "nearest_center_accuracy": 0.5,
                       "euclidean_center_accuracy": 0.5, "plot": IMG_DIR / f"x{lam}.png"},
            "open": {"tar_at_far_1e-2": tar, "rank1": rank1, "ten_fold_accuracy": 0.9, "auc": 0.95,
                     "dir_at_far_1e-2": 0.5, "pairs": "1+/2-"},
        }  # fmt: skip

    args = argparse.Namespace(train_per_class=200, test_per_class=None, epochs=5, seed=0)
    payload = summarise([row(0.0, 0.97, 0.40, 0.80), row(0.01, 0.992, 0.55, 0.79)], args, "python -m bench.paper_mnist")
    met = {r["figure"]: r["met"] for r in payload["summary"]}
    assert met["MNIST closed-set test accuracy (softmax head), 2-D features, λ = 0"] is None
    assert met["MNIST closed-set test accuracy (softmax head), 2-D features, λ = 0.01"] is True
    assert met["MNIST open set (train 0–5, test 6–9) TAR@FAR=1e-2, λ = 0.01"] is True
    assert met["MNIST open set (train 0–5, test 6–9) rank-1, λ = 0.01"] is False
    assert payload["tables"][0]["rows"][1][2] == 0.992


def test_faces_paired_deltas_subtract_the_same_seeds_baseline() -> None:
    from bench.faces_orl import deltas

    def run(seed: int, value: float) -> dict:
        return {"seed": seed, "metrics": {"ten_fold": value, "tar_1e-2": value, "rank1": None}}

    cells = {
        ("demo", 0.0): {"runs": [run(0, 0.90), run(1, 0.80), run(2, 0.70)]},
        ("demo", 0.01): {"runs": [run(0, 0.92), run(1, 0.81)]},  # seed 2 not run at this λ
    }
    result = deltas(cells)
    assert list(result) == [("demo", 0.01)]
    assert result["demo", 0.01]["ten_fold"]["mean"] == pytest.approx(0.015)
    assert result["demo", 0.01]["ten_fold"]["std"] == pytest.approx(statistics.stdev([0.02, 0.01]))
    assert result["demo", 0.01]["rank1"] is None


def test_faces_goal_needs_a_gain_larger_than_its_seed_spread() -> None:
    import argparse

    from bench.faces_orl import METRICS, aggregate, summarise

    def cell(values: list[float]) -> dict:
        runs = [{"seed": s, "metrics": dict.fromkeys([k for k, _, _ in METRICS], v)} for s, v in enumerate(values)]
        return {"runs": runs, "aggregate": aggregate(runs)}

    cells = {
        ("demo", 0.0): cell([0.80, 0.90, 0.70]),
        ("demo", 0.01): cell([0.82, 0.92, 0.72]),  # +2 points on every seed: consistent
        ("demo", 0.1): cell([0.90, 0.85, 0.70]),  # +3.3 points on average, but −5..+10 per seed
    }
    rows = summarise(cells, argparse.Namespace(configs=["demo"], lambdas=[0.0, 0.01, 0.1]))
    met = {
        (r["figure"].split("λ = ")[1].split(" ")[0], r["figure"].split("Δ ")[1].split(" of")[0]): r["met"] for r in rows
    }
    assert met["0.01", "10-fold acc."] is True
    assert met["0.1", "10-fold acc."] is False
    consistent = next(r for r in rows if "λ = 0.01" in r["figure"] and "rank-1" in r["figure"])
    assert consistent["measured"]["mean"] == pytest.approx(0.02)


def test_run_all_records_the_command_beside_each_raw_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.run_all as run_all

    monkeypatch.setattr(run_all, "RAW_DIR", tmp_path)
    run_all.record_raw_provenance(["python", "-m", "bench.gallery_scale", "--json", "bench/results/raw/g.json"], 12.34)
    run_all.record_raw_provenance(["python", "-m", "bench.paper_mnist", "--quick"], 99.0)  # no raw output: no entry
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert list(provenance) == ["bench/results/raw/g.json"]
    assert (
        provenance["bench/results/raw/g.json"]["command"]
        == "python -m bench.gallery_scale --json bench/results/raw/g.json"
    )
    assert provenance["bench/results/raw/g.json"]["wall_s"] == 12.3
