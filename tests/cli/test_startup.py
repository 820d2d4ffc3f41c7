"""`blip --help` and each command's --help import no torch, numpy or PIL: the CLI imports the library
lazily so that help and usage errors answer at once (bench/bench_startup.py measures the time)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "PIL", "transformers")


@pytest.mark.parametrize(
    "command", [[], ["caption"], ["finetune"], ["extract-embeddings"], ["eval", "vqa"], ["sample"]]
)
def test_help_imports_no_heavy_library(command):
    code = (
        "import sys\n"
        "from blip_toolkit.cli.main import main\n"
        f"try:\n    main({command + ['--help']!r})\nexcept SystemExit:\n    pass\n"
        f"print('loaded:', ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "loaded: ", proc.stdout.splitlines()[-1]
