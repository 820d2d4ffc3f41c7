"""`make bench`: run every bench/bench_*.py in its own process (so peak-memory numbers are per
benchmark), then print every target and write bench/results/summary.md: the machine, every target
with its measured value, spread and pass/fail, and each benchmark's table and notes, in Markdown to
paste into the README.

    python bench/run.py [--quick] [NAME ...]

NAME runs only the scripts whose name contains it. --quick runs every script on small sizes (a few
minutes in all) to check the scripts work; its results go to results/*.quick.json and
results/summary.quick.md, marked as not comparable, and leave the full run's files alone."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import QUICK_NOTE, RESULTS, machine, machine_line, markdown_table, note_lines, target_rows

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: check the scripts work")
    parser.add_argument("names", nargs="*", help="run only the scripts whose name contains one of these")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.names:
        scripts = [s for s in scripts if any(name in s.stem for name in args.names)]
    started, start_time = time.time(), time.strftime("%Y-%m-%d %H:%M")
    before = machine()
    print("# make bench" + (f" ({QUICK_NOTE})" if args.quick else ""), flush=True)
    runs = []
    for script in scripts:
        print(f"\n# {script.stem}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *(["--quick"] if args.quick else [])])
        runs.append({"script": script.stem, "exit code": code, "seconds": time.perf_counter() - start})
    results = load_results(args.quick)
    after = machine()
    text = summary(
        results,
        runs,
        quick=args.quick,
        machine_info={**before, "load average at the end": after["load average (1, 5, 15 min)"]},
        started=started,
        start_time=start_time,
    )
    path = RESULTS / ("summary.quick.md" if args.quick else "summary.md")
    RESULTS.mkdir(exist_ok=True)
    path.with_suffix(".tmp").write_text(text)
    path.with_suffix(".tmp").replace(path)

    print("\n# summary\n")
    print(markdown_table(runs) + "\n")
    rows = [r for result in results for r in target_rows(result["targets"], result["name"])]
    if rows:
        print(markdown_table(rows) + "\n")
    print(f"written: {os.path.relpath(path)}")
    failed = [r["script"] for r in runs if r["exit code"] != 0]
    if failed:
        print(f"benchmark scripts that failed: {', '.join(failed)}")
    return 1 if failed else 0


def load_results(quick: bool) -> list[dict]:
    """The latest result of every benchmark of this kind (quick or full) in results/, with the
    modification time of its file."""
    results = []
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.endswith(".quick.json") != quick:
            continue
        result = json.loads(path.read_text())
        if "targets" not in result:  # not a benchmark's result (bench/dit_recipes.py's table)
            continue
        result["mtime"] = path.stat().st_mtime
        results.append(result)
    return results


def summary(
    results: list[dict],
    runs: list[dict],
    *,
    quick: bool,
    machine_info: dict,
    started: float,
    start_time: str,
) -> str:
    """summary.md: the run, the machine, every target, then each benchmark's rows and notes."""
    minutes = (time.time() - started) / 60
    command = "python bench/run.py" + (" --quick" if quick else "")
    lines = ["# Benchmark results", ""]
    if quick:
        lines += [f"**{QUICK_NOTE}.**", ""]
    lines += [f"`{command}` (`make bench`), started {start_time}, {minutes:.1f} min.", ""]
    lines += ["## Machine", "", markdown_table([{"": k, "value": v} for k, v in machine_info.items()]), ""]
    lines += ["## Scripts run", "", markdown_table(runs), ""]
    targets = [r for result in results for r in target_rows(result["targets"], result["name"])]
    lines += ["## Targets", ""]
    lines += [
        "Measured = median over the timed rounds of the measure and of its reference (interleaved); "
        "per-round min-max = the spread of the ratio over those rounds (empty for a single measurement).",
        "",
    ]
    lines += [markdown_table(targets) if targets else "(no results)", ""]
    for result in results:
        title = result["name"] + (" (QUICK)" if result.get("quick") else "")
        lines += [f"## {title}", ""]
        info = result.get("machine", {})
        earlier = " (from an earlier run: not re-run this time)" if result["mtime"] < started else ""
        lines += [
            f"Measured {result.get('time', '?')}{earlier}, {result.get('wall_seconds', '?')} s, on "
            f"{machine_line(info)}.",
            "",
        ]
        if result.get("rows"):
            lines += [markdown_table(result["rows"]), ""]
        if result.get("notes"):
            lines += [*note_lines(result["notes"]), ""]
        for table_title, table in (result.get("tables") or {}).items():
            lines += [f"### {table_title}", "", markdown_table(table), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
