"""`blip extract-embeddings` and `blip eval-recall`: wiring only. Their settings' options are derived
from the fields of `ExtractConfig` and `RecallConfig` (cli/derive.py): the field is the setting's one
home (name, type, default, help)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.derive import derived, options
from blip_toolkit.cli.options import (
    CpusPerActorOpt,
    Engine,
    EngineOpt,
    FormatOpt,
    GpusPerActorOpt,
    NumActorsOpt,
    OutputFormat,
    OverwriteOpt,
    RayAddressOpt,
)
from blip_toolkit.jobs.extract_config import ExtractConfig
from blip_toolkit.jobs.recall_config import RecallConfig


@derived(settings=options(ExtractConfig))
def extract_embeddings(
    source: Annotated[
        list[str],
        typer.Argument(
            help="A folder of images (captions from same-name .txt files), a TSV manifest (image<TAB>caption), webdataset .tar shards / brace patterns such as 'data/{000..009}.tar', or Parquet files / datasets.save_to_disk directories (captions from --text-column); local or remote (s3://, gs://, hf://, https://).",
            show_default=False,
        ),
    ],
    *,
    settings: ExtractConfig,
    # The engine options stay hand-written (shared with caption / vqa / retrieval, cli/options.py).
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    num_actors: NumActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = 0.0,
    cpus_per_actor: CpusPerActorOpt = 1.0,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="Summary format on stdout.")
    ] = OutputFormat.text,
) -> None:
    """Write patch-token embedding shards of two frozen encoders (the training data of train-dit).

    Per image: conditioning tokens, target tokens and the target's own image embedding; per
    caption: the target's text embedding; plus [bold]target_head.safetensors[/] (tokens -> global
    embedding). Bad images are skipped and listed in errors.jsonl (exit 3). Runs on several processes
    under [bold]accelerate launch[/] with the same result.

    [bold]Examples[/]

      blip extract-embeddings photos/ --out emb/ --pool 8
      blip extract-embeddings captions.tsv --out emb/ --tokens cls+patch --target-encoder openai/clip-vit-large-patch14
      blip extract-embeddings 'shards/{000..099}.tar' --out emb/ --resume
      blip extract-embeddings 'hf://datasets/org/name/data/*.parquet' --text-column caption --out emb/
      blip extract-embeddings 's3://bucket/{00000..09999}.tar' --out emb/ --engine ray --ray-address auto --gpus-per-actor 1
      accelerate launch --multi_gpu --num_processes 4 -m blip_toolkit extract-embeddings 'shards/{000..099}.tar' --out emb/
    """
    import dataclasses
    import os

    # MKL picks kernels by memory alignment unless told otherwise, so the same batch can round
    # differently in another process layout; STRICT CNR mode makes shards bitwise independent of the
    # number of processes at no measured cost. Read when MKL initialises: before torch is imported.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    from blip_toolkit.cli.common import ray_options
    from blip_toolkit.cli.output import Emitter
    from blip_toolkit.errors import PartialFailure
    from blip_toolkit.jobs.extract import extract_embeddings as run

    config = dataclasses.replace(settings, source=source)
    summary = run(config, ray=ray_options(engine, ray_address, num_actors, gpus_per_actor, cpus_per_actor))
    if not summary.is_main:
        return
    with Emitter(
        fmt.value,
        lambda r: (
            f"{r['out']}: {r['samples']} images, {r['captions']} captions, "
            f"{r['shards']} shards, {r['errors']} errors"
        ),
        single=True,
    ) as emitter:
        emitter.emit(summary.to_dict())
    if summary.errors:
        raise PartialFailure(
            f"{summary.errors} image(s) or input(s) failed (listed in {summary.errors_file}); "
            "the rest were extracted"
        )


def _ks(values: list[str]) -> list[int]:
    from blip_toolkit.errors import UsageError

    out = []
    for value in values:
        for part in value.replace(",", " ").split():
            if not part.isdigit() or int(part) < 1:
                raise UsageError(f"--k {part!r}: K must be a positive integer")
            out.append(int(part))
    return out


# given=True: RecallConfig also needs the directory argument and the parsed --k, so the command builds
# it from the flags that were given (the others keep the field defaults).
@derived(settings=options(RecallConfig, given=True))
def eval_recall(
    directory: Annotated[
        Path, typer.Argument(help="An extract-embeddings output directory.", show_default=False)
    ],
    *,
    settings: dict,
    k: Annotated[
        list[str] | None,
        typer.Option(
            "--k",
            help="K values: --k 1 5 10, --k 1,5,10 or --k 1 --k 5. \\[default: 1 5 10]",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Also write the full report as JSON here.", dir_okay=False),
    ] = None,
    update_run: Annotated[
        bool,
        typer.Option(
            "--update-run",
            help="With a sweep of held-out images: make its best setting (steps, cfg scale) the sampling default "
            "of the DiT checkpoint that generated it (its config.json 'sample').",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Recall@K of image features against the target encoder's text embeddings.

    Scores the target encoder's own embedding ([bold]baseline[/]), the ground-truth tokens pooled and
    projected by the target head ([bold]gt-pooled[/]) and, with --generated, generated tokens, in both
    directions (image-to-text counts a hit when any caption of the image is in the top K). A sweep
    directory of blip sample gets one row per setting and the best setting. Text output is a table in
    %; --format json gives every number as fractions. Warns when the generated images trained the DiT.

    [bold]Examples[/]

      blip eval-recall emb/
      blip eval-recall emb/ --generated samples.safetensors --k 1 5 10 --format json
      blip eval-recall emb/ --generated sweep/ --k 1 5 --update-run
      blip eval-recall emb/ --dedupe-captions --max-memory 512MB --out recall.json
    """
    from blip_toolkit.cli.output import Emitter
    from blip_toolkit.engine.outputs import check_output_file
    from blip_toolkit.fsutil import write_json
    from blip_toolkit.jobs.eval_recall import evaluate_recall

    if out is not None:
        check_output_file(out, overwrite=overwrite)
    config = RecallConfig(dir=str(directory), **({"ks": _ks(k)} if k else {}), **settings)
    report = evaluate_recall(config)
    if update_run:
        from blip_toolkit.dit.sample import set_sample_defaults
        from blip_toolkit.jobs.eval_recall import tuned_defaults

        run, steps, scale, evidence = tuned_defaults(report)
        report["updated_run"] = str(set_sample_defaults(run, steps=steps, cfg_scale=scale, evidence=evidence))
    if out is not None:
        write_json(out, report)
    if fmt == OutputFormat.text:
        from rich.console import Console

        console = Console(highlight=False, soft_wrap=True)
        console.print(render_table(report))
        if "sweep" in report:
            console.print(render_sweep(report))
        for line in render_cosines(report):
            console.print(line)
    else:
        with Emitter(fmt.value, single=True) as emitter:
            emitter.emit(report)


def render_table(report: dict):
    """A Rich table of a recall report (recall in %), for the text output."""
    from rich.table import Table

    ks = report["ks"]
    title = (
        f"recall@K: {report['num_images']} images, {report['num_texts']} texts"
        f"{' (deduplicated)' if report['dedupe_captions'] else ''}, target {report['target_encoder']}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("features", no_wrap=True)
    for direction in ("i2t", "t2i"):
        for k in ks:
            table.add_column(f"{direction} R@{k}", justify="right", no_wrap=True)
    for name, result in report["features"].items():
        cells = [f"{100 * result[d][f'R@{k}']:.2f}" for d in ("i2t", "t2i") for k in ks]
        table.add_row(name, *cells)  # median / mean ranks: in the JSON output
    return table


def render_sweep(report: dict):
    """A Rich table of a sweep: recall (%) and the standardised token cosine per setting; the best
    setting after it."""
    from rich.table import Table

    ks = report["ks"]
    best = report["best"]
    table = Table(title="guidance / steps sweep (generated features)", title_justify="left")
    for name in ("steps", "cfg"):
        table.add_column(name, justify="right")
    for direction in ("i2t", "t2i"):
        for k in ks:
            table.add_column(f"{direction} R@{k}", justify="right", no_wrap=True)
    table.add_column("token cos", justify="right")
    for row in report["sweep"]:
        cos = row["cosine"].get("generated_tokens_vs_target")
        mark = " *" if row["file"] == best["file"] else ""
        table.add_row(
            str(row["steps"]),
            f"{row['cfg_scale']:g}{mark}",
            *(f"{100 * row[d][f'R@{k}']:.2f}" if d in row else "-" for d in ("i2t", "t2i") for k in ks),
            f"{cos:.4f}" if cos is not None else "-",
        )
    table.caption = f"* best: steps {best['steps']}, cfg {best['cfg_scale']:g} ({report['best_rule']})" + (
        f"; now the default of {report['updated_run']}" if report.get("updated_run") else ""
    )
    table.caption_justify = "left"
    return table


COSINE_LABELS = {
    "generated_tokens_vs_target": "mean cosine, generated vs ground-truth tokens (standardised)",
    "generated_tokens_vs_target_raw": "mean cosine, generated vs ground-truth tokens (raw)",
    "generated_global_vs_baseline": "mean cosine, generated global vs baseline",
    "generated_global_vs_gt_pooled": "mean cosine, generated global vs gt-pooled",
    "gt_pooled_vs_baseline": "mean cosine, gt-pooled vs baseline",
}


def render_cosines(report: dict) -> list[str]:
    prefix = "best setting: " if "sweep" in report else ""
    return [
        f"{prefix if k.startswith('generated') else ''}{COSINE_LABELS.get(k, k)}: "
        + (f"{v:.4f}" if v is not None else "n/a (one image)")
        for k, v in report["cosine"].items()
    ]


def register(app: typer.Typer) -> None:
    app.command("extract-embeddings")(extract_embeddings)
    app.command("eval-recall")(eval_recall)
