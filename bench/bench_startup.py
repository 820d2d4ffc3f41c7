"""CLI start-up: `blip --help` versus `python -c "import torch, transformers"` (torch and
transformers must load lazily, only when a command needs them). After one untimed run of each,
7 rounds (quick: 2, no untimed run), each running the three commands in turn; medians over the
rounds, with the per-round spread."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

from _common import interleaved_rounds, median_range, parse_args, ratio_target, report, target


def run(command: list[str]):
    return lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rounds, warmup = (2, 0) if args.quick else (7, 1)
    blip = os.path.join(os.path.dirname(sys.executable), "blip")
    commands = {
        "blip --help": [blip, "--help"],
        "blip caption --help": [blip, "caption", "--help"],
        "python -c 'import torch, transformers'": [sys.executable, "-c", "import torch, transformers"],
    }
    times = interleaved_rounds(
        {name: run(command) for name, command in commands.items()}, rounds, warmup=warmup
    )
    rows = [
        {"command": name, "seconds": statistics.median(t), "seconds median (min-max)": median_range(t)}
        for name, t in times.items()
    ]
    help_times = times["blip --help"]
    help_time = statistics.median(help_times)
    report(
        "startup",
        rows,
        quick=args.quick,
        targets=[
            target(
                "blip --help (s)",
                help_time,
                "< 0.5",
                help_time < 0.5,
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
    )


if __name__ == "__main__":
    main()
