"""Shared fixtures: tiny real checkpoints (built once per test run), the bundled sample photos, and
an in-process CLI runner that returns exit code, stdout and stderr."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"

# Tests run on 2 CPU threads and never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture
def one_thread():
    """One CPU thread for the test (tiny matrices run slower on two threads, badly so when the machine
    is shared); the thread count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def accelerator():
    """A single-process CPU Accelerator, reset afterwards (its state is a process-wide singleton)."""
    from accelerate import Accelerator

    from blip_toolkit.engine.accelerate import release_accelerator

    acc = Accelerator(cpu=True)
    yield acc
    release_accelerator(acc)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{kind: checkpoint dir} for every family in blip_toolkit.testing.KINDS."""
    from blip_toolkit.testing import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    return sorted(SAMPLES.glob("*.jpg"))


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run `blip ARGS...` in-process through the real entry point (its error boundary included)."""
    from blip_toolkit.cli.main import main

    def run(*args: str, stdin: str | None = None) -> CliResult:
        capsys.readouterr()
        old_stdin = sys.stdin
        if stdin is not None:
            import io

            sys.stdin = io.StringIO(stdin)
        try:
            code = main([str(a) for a in args])
        finally:
            sys.stdin = old_stdin
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
