"""The `blip` application and its single error boundary."""

from __future__ import annotations

import importlib
import os
import re
import sys
import traceback
from difflib import get_close_matches

import typer
from typer._click.exceptions import UsageError  # typer 0.2x vendors click: its own UsageError
from typer.core import TyperCommand, TyperGroup

from blip_toolkit import __version__
from blip_toolkit.errors import EXIT_ERROR, BlipError

# Every command: the cli module that registers it, and its one-line help (what `blip --help` lists
# without importing that module; tests/cli/test_startup.py checks each line against the command's own).
COMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("infer", "Caption images with a BLIP, BLIP-2 or InstructBLIP checkpoint."),
    "vqa": ("infer", "Answer questions about images (BLIP VQA, BLIP-2 or InstructBLIP)."),
    "retrieval": (
        "infer",
        "Rank candidate texts for each image (ITM/ITC, or likelihood for generative BLIP-2 / InstructBLIP).",
    ),
    "finetune": (
        "finetune",
        "Fine-tune a BLIP, BLIP-2 or InstructBLIP checkpoint for captioning, VQA or retrieval.",
    ),
    "extract-embeddings": (
        "embeddings",
        "Write patch-token embedding shards of two frozen encoders (the training data of train-dit).",
    ),
    "eval-recall": ("embeddings", "Recall@K of image features against the target encoder's text embeddings."),
    "train-dit": (
        "dit",
        "Train the CLIP-feature DiT: generate target-encoder tokens from conditioning tokens (rectified flow).",
    ),
    "sample": ("dit", "Generate target tokens with a trained DiT for the images of an embeddings directory."),
    "demo": ("demo", "Run every command on the bundled digits, offline, and report the measured quality."),
    "ui": ("ui", "Serve captioning, VQA and retrieval as a local web page and API (Gradio)."),
    "eval": (
        "eval",
        "Benchmark scores as the papers compute them: COCO caption metrics (pycocoevalcap), the official "
        "VQA accuracy, and LAVIS's ITC + ITM re-ranked retrieval recall.",
    ),
}
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class LazyCommands(TyperGroup):
    """The command group, loading a command's module only when that command runs or shows its own
    help: `blip --help` lists the commands from COMMANDS (bench/bench_startup.py measures why: building
    every command's options costs more than the rest of the start-up)."""

    _listing = False

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in COMMANDS:
            return None
        if self._listing:
            return TyperCommand(cmd_name, short_help=COMMANDS[cmd_name][1])
        if cmd_name not in self.commands:
            self.commands.update(load_commands(COMMANDS[cmd_name][0]))
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:  # typer suggests among the loaded commands only: among all, then
            matches = get_close_matches(args[0], list(COMMANDS)) if args else []
            if matches and "Did you mean" not in exc.message:
                exc.message = (
                    f"{exc.message.rstrip('.')}. Did you mean {', '.join(repr(m) for m in matches)}?"
                )
            raise

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def load_commands(module_name: str) -> dict:
    """{name: click command} of the commands that `blip_toolkit.cli.<module_name>` registers."""
    module = importlib.import_module(f"blip_toolkit.cli.{module_name}")
    holder = typer.Typer(
        rich_markup_mode="rich", pretty_exceptions_enable=False, context_settings=CONTEXT_SETTINGS
    )
    module.register(holder)
    built = typer.main.get_command(holder)
    return dict(built.commands) if isinstance(built, TyperGroup) else {built.name: built}


app = typer.Typer(
    name="blip",
    cls=LazyCommands,
    help="BLIP / BLIP-2 captioning, VQA, retrieval and fine-tuning; CLIP-feature diffusion.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings=CONTEXT_SETTINGS,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"blip {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Only warnings and errors on stderr; no progress bars."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging, including library warnings."),
) -> None:
    """BLIP / BLIP-2 captioning, VQA, retrieval and fine-tuning; CLIP-feature diffusion.

    Results go to stdout (--format text|json|jsonl), logs and progress to stderr. Exit codes: 0 ok,
    1 error, 2 usage error, 3 finished but some items failed. BLIP_DEBUG=1 shows tracebacks.
    """
    from blip_toolkit.log import setup_logging  # rich's progress machinery: not for --help

    setup_logging(-1 if quiet else 1 if verbose else 0)


def _debug() -> bool:
    return os.environ.get("BLIP_DEBUG", "").strip() not in ("", "0", "false", "no")


# Options that take a list of values after one flag (`--k 1 5 10`); click options take exactly one
# value each, so the values are spread into repeated options (`--k 1 --k 5 --k 10`) before parsing.
# Each option: (the pattern of a bare value that still belongs to it, the commands it applies to or
# None for all). `--steps` is a single value elsewhere (train-dit, finetune): only `sample` spreads it.
_INT = re.compile(r"\d+")
_DECIMAL = re.compile(r"\d+(\.\d*)?|\.\d+")
MULTI_VALUE_OPTIONS: dict[str, tuple[re.Pattern, tuple[str, ...] | None]] = {
    "--k": (_INT, None),
    "--steps": (_INT, ("sample",)),
    "--cfg-scale": (_DECIMAL, ("sample",)),
}


def expand_multi_value_options(argv: list[str]) -> list[str]:
    command = next((token for token in argv if not token.startswith("-")), None)  # global options are flags
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        out.append(token)
        i += 1
        spec = MULTI_VALUE_OPTIONS.get(token)
        if spec is not None and (spec[1] is None or command in spec[1]) and i < len(argv):
            out.append(argv[i])
            i += 1
            while i < len(argv) and spec[0].fullmatch(argv[i]):  # further bare numbers: the same option
                out += [token, argv[i]]
                i += 1
    return out


def passive_thread_waits() -> None:
    """OpenMP threads that wait at the end of each parallel region sleep instead of spinning (unless
    OMP_WAIT_POLICY is set already). torch's CPU kernels run one OpenMP region per operator; with
    GNU OpenMP's default a thread spins before sleeping, and when other work shares the cores a
    spinning thread holds a core its partner needs: every small operator then waits for the
    scheduler. Measured on 2 shared cores (load average 10), BLIP-base decoding a batch of 8 took
    87 s spinning and 4.4 s passive; bench/bench_caption.py measures it as a lever. It must be set
    before torch loads OpenMP, which the CLI does lazily, after this."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of raising (the console script exits with it)."""
    passive_thread_waits()
    argv = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=argv, prog_name="blip")
    except SystemExit as exc:  # click's standalone mode: --help, usage errors (2), typer.Exit
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_ERROR)
    except BlipError as exc:
        if _debug():
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n" if exc.exit_code != 3 else f"{exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - the one boundary for unexpected failures
        if _debug():
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(
            f"error: {type(exc).__name__}: {message} (unexpected; rerun with BLIP_DEBUG=1 for the traceback)\n"
        )
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
