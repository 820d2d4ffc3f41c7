"""Shared fixtures: tiny real checkpoints (built once per test run, shared by the pytest-xdist
workers), the bundled sample photos, and an in-process CLI runner that returns exit code, stdout and
stderr.

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`); each worker and the
processes it starts use one CPU thread, so the two workers do not fight over the two cores."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import ray_token

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Set before torch is imported (OpenMP reads it once); inherited by the processes tests start.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Ray's single-machine mode: every Ray server the tests start listens on 127.0.0.1 and drivers reach it
# there (tests/servers.py ray_head). Read when ray is imported, so set before any test module imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.update({k: v for k, v in ray_token().items() if v is not None})  # the heads' token
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
# `--dtype auto` is bfloat16 on CPUs with fast bf16 matmul (models/device.py); the tests compare with
# float32 transformers calls, so the suite pins float32 on every machine (tests/predictors/test_bf16.py
# tests bfloat16 itself). Inherited by the processes tests start.
os.environ.setdefault("BLIP_CPU_AUTO_DTYPE", "float32")


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


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """A directory built once per test run by `build(path)`, shared by every xdist worker (the first
    one to get the lock builds it; the others wait and reuse it)."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common base directory
    path = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "DONE").is_file():
            build(path)
            (path / "DONE").write_text("")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{kind: checkpoint dir} for every family in tests.builders.KINDS."""
    from tests.builders import KINDS, build_all

    root = shared_dir(tmp_path_factory, "tiny-models", build_all)
    return {kind: root / kind for kind in KINDS}


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


# --------------------------------------------------------------------------------- CPU time report
# BLIP_TEST_CPU=1: report the CPU seconds each test used (this process and the processes it ran),
# which, unlike wall time, hardly changes when other work shares the machine.
_CPU: dict[str, float] = {}


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not os.environ.get("BLIP_TEST_CPU"):
        yield
        return
    start = _cpu_seconds()
    yield
    _CPU[item.nodeid] = _cpu_seconds() - start


def pytest_terminal_summary(terminalreporter):
    if not _CPU:
        return
    terminalreporter.write_line(f"CPU seconds: {sum(_CPU.values()):.1f} in all; the most expensive tests:")
    for nodeid, seconds in sorted(_CPU.items(), key=lambda kv: -kv[1])[:40]:
        terminalreporter.write_line(f"{seconds:8.1f}  {nodeid}")


def pytest_collection_modifyitems(config, items):
    """Multi-process tests belong to the end-to-end tier (`make test-e2e`)."""
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.e2e)
