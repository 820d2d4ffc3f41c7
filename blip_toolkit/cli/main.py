"""The `blip` application and its single error boundary."""

from __future__ import annotations

import os
import re
import sys
import traceback

import typer

from blip_toolkit import __version__
from blip_toolkit.errors import EXIT_ERROR, BlipError
from blip_toolkit.log import setup_logging

app = typer.Typer(
    name="blip",
    help="BLIP / BLIP-2 captioning, VQA, retrieval and fine-tuning; CLIP-feature diffusion.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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
    setup_logging(-1 if quiet else 1 if verbose else 0)


def _register() -> None:
    # Command modules import only typer at module level; torch and transformers load on use.
    from blip_toolkit.cli import demo, dit, embeddings, finetune, infer, ui
    from blip_toolkit.cli import eval as eval_commands

    infer.register(app)
    finetune.register(app)
    embeddings.register(app)
    dit.register(app)
    demo.register(app)
    ui.register(app)
    eval_commands.register(app)


_register()


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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of raising (the console script exits with it)."""
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
