"""CLI start-up: `blip --help` (and `blip caption --help`) against `python -c pass` (the interpreter's
own start-up: the floor) and `python -c "import torch, transformers"` (what a CLI that imports its
libraries eagerly would pay), each command a fresh process. After one untimed run of each, 7 rounds
(quick: 2, no untimed run), each running the commands in turn; medians over the rounds, with the
per-round spread.

Where the time goes is printed too: `python -X importtime` of `blip --help`, the modules costing the
most (cumulative microseconds)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

from _common import interleaved_rounds, median_range, parse_args, ratio_target, report, target

HELP_TARGET = 0.3  # seconds


def run(command: list[str]):
    return lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def import_profile(blip: str, top: int = 12) -> list[dict]:
    """The `top` slowest imports of `blip --help` (cumulative), from python -X importtime."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", blip, "--help"], capture_output=True, text=True, check=True
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        if not name.startswith("  "):  # top-level imports only (nested ones are indented)
            rows.append(
                {"module": name.strip(), "cumulative ms": int(cumulative) / 1000, "own ms": int(own) / 1000}
            )
    return sorted(rows, key=lambda r: -r["cumulative ms"])[:top]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rounds, warmup = (2, 0) if args.quick else (7, 1)
    blip = os.path.join(os.path.dirname(sys.executable), "blip")
    commands = {
        "blip --help": [blip, "--help"],
        "blip caption --help": [blip, "caption", "--help"],
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch, transformers'": [sys.executable, "-c", "import torch, transformers"],
    }
    times = interleaved_rounds(
        {name: run(command) for name, command in commands.items()}, rounds, warmup=warmup
    )
    floor = statistics.median(times["python -c pass"])
    rows = [
        {
            "command": name,
            "seconds": statistics.median(t),
            "seconds median (min-max)": median_range(t),
            "over python -c pass (s)": statistics.median(t) - floor,
        }
        for name, t in times.items()
    ]
    help_times = times["blip --help"]
    help_time = statistics.median(help_times)
    caption_time = statistics.median(times["blip caption --help"])
    report(
        "startup",
        rows,
        quick=args.quick,
        targets=[
            target(
                "blip --help (s)",
                help_time,
                f"< {HELP_TARGET}",
                help_time < HELP_TARGET,
                spread=(min(help_times), max(help_times)),
                rounds=rounds,
            ),
            ratio_target(
                "blip --help / import torch, transformers",
                help_times,
                times["python -c 'import torch, transformers'"],
                "< 0.25",
                lambda r: r < 0.25,
            ),
        ],
        notes={
            "python -c pass (s), the interpreter's own start-up": round(floor, 3),
            "blip caption --help (s)": round(caption_time, 3),
            "why a command's --help costs more than blip --help": "the command's module and its options are "
            "built, and typer validates the root's --install-completion / --show-completion values through "
            "pydantic (importing it: about 60 ms here); blip --help lists the commands without either",
        },
        tables={"slowest imports of blip --help (python -X importtime)": import_profile(blip)},
    )


if __name__ == "__main__":
    main()
