"""The benchmark harness (bench/_common.py, bench/run.py): Markdown tables that keep every cell whole,
targets on medians of interleaved rounds, quick results kept apart, and the summary.md that lists
every target. No model is run."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402


@pytest.fixture
def bench_run(tmp_path, monkeypatch):
    """bench/run.py as a module, with its results directory (and _common's) in tmp_path."""
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def parse_markdown_table(text: str) -> list[list[str]]:
    """Cells of every line of a GitHub pipe table (separator line included), unescaped."""
    rows = []
    for line in text.strip().splitlines():
        assert line.startswith("|") and line.endswith("|"), line
        cells = re.split(r"(?<!\\)\|", line[1:-1])
        rows.append([cell.strip().replace("\\|", "|") for cell in cells])
    return rows


def test_markdown_table_keeps_long_cells_whole():
    note = "out of memory: DefaultCPUAllocator: can't allocate memory: you tried to allocate " + "x" * 300
    rows = [
        {"run": "naive | full matrix", "seconds": 1.234567, "note": note + "\nsecond line"},
        {"run": "blocked", "peak RSS MB": 12.0, "ok": True},
    ]
    table = _common.markdown_table(rows)
    parsed = parse_markdown_table(table)
    header, separator, *body = parsed
    assert header == ["run", "seconds", "note", "peak RSS MB", "ok"]
    assert all(set(cell) <= {"-", ":"} for cell in separator)
    # every cell whole: the pipe kept (escaped), the line break a space, floats to 4 significant digits
    assert body[0] == ["naive | full matrix", "1.235", note + " second line", "", ""]
    assert body[1] == ["blocked", "", "", "12", "yes"]
    assert len({len(r) for r in parsed}) == 1


def test_ratio_target_compares_medians_and_reports_the_per_round_spread():
    # medians 4 and 2 -> 2.0; per-round ratios 2/1, 4/2, 100/2 -> 2, 2, 50
    t = _common.ratio_target("a / b", [2.0, 4.0, 100.0], [1.0, 2.0, 2.0], ">= 1.9", lambda r: r >= 1.9)
    assert t["measured"] == pytest.approx(2.0)
    assert t["spread"] == [pytest.approx(2.0), pytest.approx(50.0)]
    assert t["rounds"] == 3 and t["ok"] is True
    # a scale multiplies the measure and the spread: 0.5 x 2 = 1 < 1.9
    t = _common.ratio_target(
        "a / b", [2.0, 4.0, 100.0], [1.0, 2.0, 2.0], ">= 1.9", lambda r: r >= 1.9, scale=0.5
    )
    assert t["measured"] == pytest.approx(1.0) and t["ok"] is False
    with pytest.raises(ValueError):
        _common.ratio_target("a / b", [1.0], [1.0, 2.0], ">= 1", lambda r: r >= 1)


def test_rate_range_matches_the_median_time_the_targets_use():
    # 8 items in 2.0 s (median of 1, 2, 4 s): 4/s; slowest 8/4 = 2/s, fastest 8/1 = 8/s
    assert _common.rate_range([4.0, 1.0, 2.0], 8) == "4 (2-8)"
    # an even number of rounds: the median time is the mean of the middle two (1.5 s + 2.5 s) / 2
    assert _common.rate_range([1.0, 1.5, 2.5, 4.0], 8) == "4 (2-8)"


def test_interleaved_rounds_runs_the_functions_in_turn():
    calls = []
    times = _common.interleaved_rounds(
        {"ours": lambda: calls.append("ours"), "ref": lambda: calls.append("ref")}, 3, warmup=1
    )
    assert calls == ["ours", "ref"] * 4  # one untimed warm-up round, then 3 timed ones
    assert {k: len(v) for k, v in times.items()} == {"ours": 3, "ref": 3}


def test_report_prints_full_tables_and_keeps_quick_results_apart(bench_run, tmp_path, capsys):
    long_name = "blip DiT sampling, 50 Euler steps, classifier-free guidance 3.0, " * 3
    targets = [_common.target("speed-up", 1.3, ">= 1.1", True)]
    notes = {"budget_mb": 1024, "sizes": {"tokens": 16}}
    _common.report(
        "demo", [{"model": long_name, "samples_per_s": 2.5}], quick=True, targets=targets, notes=notes
    )
    out = capsys.readouterr().out
    assert _common.QUICK_NOTE in out
    assert '- budget_mb: 1024\n- sizes: `{"tokens": 16}`' in out
    assert long_name.strip() in out  # not cut to the terminal width
    quick = json.loads((tmp_path / "demo.quick.json").read_text())
    assert quick["quick"] is True and quick["targets"] == targets
    assert quick["machine"]["cpus"] >= 1 and "torch" in quick["machine"]
    assert not (tmp_path / "demo.json").exists()

    _common.report("demo", [{"model": "full"}], quick=False, targets=targets)
    assert json.loads((tmp_path / "demo.json").read_text())["quick"] is False
    assert [r["name"] for r in bench_run.load_results(quick=False)] == ["demo"]
    assert [r["rows"][0]["model"] for r in bench_run.load_results(quick=True)] == [long_name]


def test_summary_lists_every_target_with_its_verdict(bench_run, tmp_path, capsys):
    started = time.time() - 1
    _common.report(
        "caption",
        [{"run": "blip caption", "images/s": 0.97}],
        quick=False,
        targets=[
            _common.ratio_target("speed-up over the pipeline", [2.0], [1.0], ">= 1.1", lambda r: r >= 1.1),
            _common.target("captions identical", 0.0, "1", False),
        ],
        notes={"matmul GFLOP/s": 188.0},
    )
    _common.report(
        "startup", [], quick=False, targets=[_common.target("blip --help (s)", 0.2, "< 0.5", True)]
    )
    capsys.readouterr()
    results = bench_run.load_results(quick=False)
    runs = [{"script": "bench_caption", "exit code": 0, "seconds": 3.0}]
    text = bench_run.summary(
        results, runs, quick=False, machine_info=_common.machine(), started=started, start_time="now"
    )
    targets = parse_markdown_table(text.split("## Targets")[1].split("\n\n", 2)[2].split("\n\n")[0])
    header, _, *body = targets
    assert header == ["benchmark", "target", "measured", "per-round min-max", "rounds", "required", "pass"]
    assert body == [
        ["caption", "speed-up over the pipeline", "2", "2-2", "1", ">= 1.1", "yes"],
        ["caption", "captions identical", "0", "", "", "1", "**NO**"],
        ["startup", "blip --help (s)", "0.2", "", "", "< 0.5", "yes"],
    ]
    assert "| cpus " in text and "- matmul GFLOP/s: 188" in text and "QUICK" not in text
    quick_text = bench_run.summary([], runs, quick=True, machine_info={}, started=started, start_time="now")
    assert _common.QUICK_NOTE in quick_text
