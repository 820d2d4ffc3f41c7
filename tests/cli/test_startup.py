"""`blip --help` and each command's --help import no torch, numpy or PIL: the CLI imports the library
lazily so that help and usage errors answer at once (bench/bench_startup.py measures the time). The
top-level help lists the commands without importing their modules, from a table that must say what
each command's own help says."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blip_toolkit.cli.main import COMMANDS, load_commands

HEAVY = ("torch", "numpy", "PIL", "transformers")


def _loaded_after(argv: list[str], modules: tuple[str, ...]) -> tuple[str, list[str]]:
    code = (
        "import sys\n"
        "from blip_toolkit.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('loaded:', ','.join(m for m in {modules!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.splitlines()[-1]
    return proc.stdout, [m for m in last.removeprefix("loaded:").strip().split(",") if m]


@pytest.mark.parametrize(
    "command", [[], ["caption"], ["finetune"], ["extract-embeddings"], ["eval", "vqa"], ["sample"]]
)
def test_help_imports_no_heavy_library(command):
    stdout, loaded = _loaded_after(command + ["--help"], HEAVY)
    assert "Usage" in stdout
    assert loaded == [], loaded


MODULES = tuple(f"blip_toolkit.cli.{m}" for m in sorted({m for m, _ in COMMANDS.values()}))


def test_top_level_help_lists_every_command_without_importing_them():
    stdout, loaded = _loaded_after(["--help"], MODULES)
    assert loaded == []
    for name in COMMANDS:
        assert f" {name} " in stdout


def test_a_command_loads_only_its_own_module():
    stdout, loaded = _loaded_after(["caption", "--help"], MODULES)
    assert "Usage: blip caption" in " ".join(stdout.split())
    assert loaded == ["blip_toolkit.cli.infer"]


def test_the_command_table_says_what_the_commands_say():
    registered = {}
    for module in {m for m, _ in COMMANDS.values()}:
        for name, command in load_commands(module).items():
            registered[name] = (
                module,
                " ".join((command.short_help or command.help).split("\n\n")[0].split()),
            )
    assert registered == {name: (module, " ".join(text.split())) for name, (module, text) in COMMANDS.items()}


def test_a_mistyped_command_is_suggested():
    proc = subprocess.run(
        [sys.executable, "-m", "blip_toolkit", "captoin"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Did you mean 'caption'?" in " ".join(proc.stderr.split()).replace("│", "")


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_openmp_threads_wait_passively_unless_told_otherwise(given):
    """Set before torch loads OpenMP (cli/main.py passive_thread_waits); a user's setting wins."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = (
        "import os\nfrom blip_toolkit.cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print('policy:', os.environ.get('OMP_WAIT_POLICY'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"policy: {given or 'PASSIVE'}"
