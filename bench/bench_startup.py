"""CLI start-up: `blip --help` versus `python -c "import torch, transformers"` (torch and
transformers must load lazily, only when a command needs them). Best of several runs each."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from _common import parse_args, report, target


def best_time(command: list[str], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    runs = 3 if args.quick else 7
    blip = os.path.join(os.path.dirname(sys.executable), "blip")
    help_time = best_time([blip, "--help"], runs)
    command_help = best_time([blip, "caption", "--help"], runs)
    imports = best_time([sys.executable, "-c", "import torch, transformers"], runs)
    rows = [
        {"command": "blip --help", "seconds": help_time},
        {"command": "blip caption --help", "seconds": command_help},
        {"command": "python -c 'import torch, transformers'", "seconds": imports},
    ]
    report(
        "startup",
        rows,
        targets=[
            target("blip --help (s)", help_time, "< 0.5", help_time < 0.5),
            target(
                "blip --help / import torch, transformers",
                help_time / imports,
                "< 0.25",
                help_time / imports < 0.25,
            ),
        ],
    )


if __name__ == "__main__":
    main()
