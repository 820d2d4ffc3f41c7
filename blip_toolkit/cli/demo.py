"""`blip demo`: the whole toolkit, end to end, offline, on the bundled handwritten digits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.options import FormatOpt, OutputFormat, OverwriteOpt


def demo(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Directory for the data, models, report and figures.", file_okay=False
        ),
    ] = Path("demo-output"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Fewer pairs and steps: about 2 minutes instead of 12 on 2 CPU cores (every stage above chance).",
        ),
    ] = False,
    no_java: Annotated[
        bool,
        typer.Option(
            "--no-java",
            help="Caption metrics without Java (as `blip eval caption --no-java`: BLEU, ROUGE-L, CIDEr with a "
            "Python tokenizer, no METEOR; not comparable to published numbers).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data split and of every model.")] = 0,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Run every command on the bundled digits, offline, and report the measured quality.

    The task: two digits side by side. Trains small BLIP captioning, VQA and retrieval models from
    scratch (fine-tune), captions the held-out test pairs, answers five kinds of question about them and
    ranks the 100 captions of all ordered pairs (dataset inference with --output, scored by `blip eval
    caption|vqa|retrieval`), extracts embedding shards, trains a DiT to generate the retrieval model's
    image features from the captioning model's, tunes its guidance on held-out pairs, samples the test
    pairs and measures their recall. Writes report.md, report.json and PNG figures into --out; prints a
    summary table.

    [bold]Examples[/]

      blip demo
      blip demo --quick --out /tmp/demo --overwrite
      blip demo --format json > report.json
    """
    from blip_toolkit.demo.run import DemoConfig, run_demo
    from blip_toolkit.log import stderr_console

    console = stderr_console()
    result = run_demo(
        DemoConfig(out=str(out), quick=quick, seed=seed, overwrite=overwrite, java=not no_java),
        progress=lambda text: console.print(text),
    )
    if fmt != OutputFormat.text:
        from blip_toolkit.cli.output import Emitter
        from blip_toolkit.demo.report import load_report

        with Emitter(fmt.value, single=True) as emitter:
            emitter.emit(load_report(result.out))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"blip demo ({result.mode}): every number on held-out test images")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for row in result.summary_rows():
        table.add_row(*row)
    table.add_row("total", "", f"{result.total_seconds:.1f}")
    stdout = Console(highlight=False)
    stdout.print(table)
    stdout.print(f"report: {result.report_md}  (figures in {Path(result.out) / 'figures'})")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
