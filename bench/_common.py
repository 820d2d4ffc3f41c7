"""Shared helpers for the benchmarks. Each bench_*.py is runnable alone
(`python bench/bench_x.py [--quick]`), prints a table and writes bench/results/<name>.json.

Targets are ratios against a reference measured in the same process (these machines are noisy),
never absolute times."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smaller sizes: checks the script works, numbers are not meaningful.",
    )
    if extra:
        extra(parser)
    return parser.parse_args()


def matmul_rate(size: int = 1024, seconds: float = 2.0) -> float:
    """This machine's float32 matmul rate in FLOP/s (square matmuls on all threads), the ceiling
    achieved FLOP/s are compared with."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    elapsed = time.perf_counter() - start
    return 2 * size**3 * count / elapsed


def timed(fn: Callable[[], object], *, repeat: int = 1, warmup: int = 0) -> float:
    """Best wall time of `repeat` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux ru_maxrss is in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def report(
    name: str, rows: list[dict], *, targets: list[dict] | None = None, notes: dict | None = None
) -> dict:
    """Print rows (and pass/fail targets) as a table and write bench/results/<name>.json."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if rows:
        table = Table(title=name)
        keys = list(dict.fromkeys(k for row in rows for k in row))
        for key in keys:
            table.add_column(key)
        for row in rows:
            table.add_row(*[_fmt(row.get(k, "")) for k in keys])
        console.print(table)
    if targets:
        table = Table(title=f"{name}: targets")
        for key in ("target", "measured", "required", "ok"):
            table.add_column(key)
        for t in targets:
            table.add_row(t["target"], _fmt(t["measured"]), str(t["required"]), "yes" if t["ok"] else "NO")
        console.print(table)
    result = {
        "name": name,
        "machine": machine(),
        "rows": rows,
        "targets": targets or [],
        "notes": notes or {},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def target(description: str, measured: float, required: str, ok: bool) -> dict:
    return {"target": description, "measured": measured, "required": required, "ok": bool(ok)}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
