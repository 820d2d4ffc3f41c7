"""`blip extract-embeddings` and `blip eval-recall`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.options import (
    BatchSizeOpt,
    CpusPerActorOpt,
    DeviceOpt,
    Engine,
    EngineOpt,
    FormatOpt,
    GpusPerActorOpt,
    ImageColumnOpt,
    KeyColumnOpt,
    MaxPixelsOpt,
    NumActorsOpt,
    OutputFormat,
    OverwriteOpt,
    QuantizeOpt,
    RayAddressOpt,
    ResumeOpt,
    TrustRemoteCodeOpt,
    choice_enum,
)
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.embeddings.format import (
    CROP_MODES,
    DEFAULT_COND,
    DEFAULT_TARGET,
    HEAD_POOLINGS,
    STORAGE_DTYPES,
    TOKEN_LAYOUTS,
)

Tokens = choice_enum("Tokens", TOKEN_LAYOUTS)
HeadPool = choice_enum("HeadPool", HEAD_POOLINGS)
StorageDtype = choice_enum("StorageDtype", STORAGE_DTYPES)
Crop = choice_enum("Crop", CROP_MODES)


def extract_embeddings(
    source: Annotated[
        list[str],
        typer.Argument(
            help="A folder of images (captions from same-name .txt files), a TSV manifest (image<TAB>caption), webdataset .tar shards / brace patterns such as 'data/{000..009}.tar', or Parquet files / datasets.save_to_disk directories (captions from --text-column); local or remote (s3://, gs://, hf://, https://).",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Output directory, local (train-dit memory-maps the shards; see docs/formats.md, 'Embedding shards').",
        ),
    ],
    cond_encoder: Annotated[
        str,
        typer.Option(
            "--cond-encoder",
            help="Conditioning encoder: CLIP, SigLIP, BLIP, BLIP-2 or a bare vision tower (only its vision tower is loaded).",
        ),
    ] = DEFAULT_COND,
    target_encoder: Annotated[
        str,
        typer.Option(
            "--target-encoder",
            help="Target encoder: CLIP, SigLIP or BLIP ITM (gives text embeddings and its own image embedding).",
        ),
    ] = DEFAULT_TARGET,
    tokens: Annotated[
        Tokens, typer.Option("--tokens", help="Tokens stored: the patch grid, or CLS + patch grid.")
    ] = Tokens.patch,
    pool: Annotated[
        int | None,
        typer.Option(
            "--pool",
            min=1,
            help="Average-pool the patch grid to NxN (8 -> 64 tokens, as BLIP3-o pools its target features); the CLS token is not pooled. [default: no pooling]",
            show_default=False,
        ),
    ] = None,
    cond_tokens: Annotated[
        Tokens | None,
        typer.Option(
            "--cond-tokens",
            help="Token layout of the conditioning encoder. [default: --tokens]",
            show_default=False,
        ),
    ] = None,
    cond_pool: Annotated[
        int | None,
        typer.Option(
            "--cond-pool",
            min=0,
            help="Pooling of the conditioning grid (0: none). [default: --pool]",
            show_default=False,
        ),
    ] = None,
    head_pool: Annotated[
        HeadPool | None,
        typer.Option(
            "--head-pool",
            help="How the target head pools tokens to the global embedding. [default: cls for cls+patch, mean for patch; SigLIP: map]",
            show_default=False,
        ),
    ] = None,
    crop: Annotated[
        Crop,
        typer.Option(
            "--crop",
            help="center: cut every image to its centred square once, before both processors, so token (i, j) "
            "of both encoders sees the same pixels (BLIP / BLIP-2 processors squash, CLIP's crop). none: each "
            "processor gets the whole image.",
        ),
    ] = Crop.center,
    dtype: Annotated[
        StorageDtype, typer.Option("--dtype", help="Storage dtype of the embeddings.")
    ] = StorageDtype.float16,
    encoder_dtype: Annotated[
        str,
        typer.Option(
            "--encoder-dtype",
            help="Dtype the encoders run in: auto (float32 on CPU, float16 on CUDA), float32, float16, bfloat16.",
        ),
    ] = "auto",
    quantize: QuantizeOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 32,
    shard_size: Annotated[
        int,
        typer.Option(
            "--shard-size",
            min=1,
            help="Images per output shard (also the memory bound: one shard of outputs).",
        ),
    ] = 256,
    num_workers: Annotated[
        int,
        typer.Option(
            "--num-workers", min=0, help="DataLoader processes decoding images while the encoders run."
        ),
    ] = 2,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    allow_pipe: Annotated[
        bool, typer.Option("--allow-pipe", help="Accept 'pipe:' webdataset URLs (they run shell commands).")
    ] = False,
    image_column: ImageColumnOpt = "image",
    key_column: KeyColumnOpt = None,
    text_column: Annotated[
        str | None,
        typer.Option(
            "--text-column",
            help="Parquet / Arrow inputs: the column of captions (a string or a list of strings).",
        ),
    ] = None,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    num_actors: NumActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = 0.0,
    cpus_per_actor: CpusPerActorOpt = 1.0,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
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
    import os

    # MKL picks kernels by memory alignment unless told otherwise, so the same batch can round
    # differently in another process layout; STRICT CNR mode makes shards bitwise independent of the
    # number of processes at no measured cost. Read when MKL initialises: before torch is imported.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    from blip_toolkit.cli.common import ray_options
    from blip_toolkit.cli.output import Emitter
    from blip_toolkit.errors import PartialFailure
    from blip_toolkit.jobs.extract import extract_embeddings as run
    from blip_toolkit.jobs.extract_config import ExtractConfig

    config = ExtractConfig(
        source=source,
        out=str(out),
        cond_encoder=cond_encoder,
        target_encoder=target_encoder,
        tokens=tokens.value,
        pool=pool,
        cond_tokens=cond_tokens.value if cond_tokens else None,
        cond_pool=cond_pool,
        head_pool=head_pool.value if head_pool else None,
        crop=crop.value,
        dtype=dtype.value,
        encoder_dtype=encoder_dtype,
        quantize=quantize.value if quantize else None,
        device=device,
        batch_size=batch_size,
        shard_size=shard_size,
        num_workers=num_workers,
        max_pixels=max_pixels,
        allow_pipe=allow_pipe,
        image_column=image_column,
        key_column=key_column,
        text_column=text_column,
        resume=resume,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
    )
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


def eval_recall(
    directory: Annotated[
        Path, typer.Argument(help="An extract-embeddings output directory.", show_default=False)
    ],
    generated: Annotated[
        Path | None,
        typer.Option(
            "--generated",
            help="Generated target tokens: a safetensors file written by blip sample, or its sweep directory "
            "(several --steps / --cfg-scale values: every setting is scored, the best one reported).",
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="Comma-separated: baseline, gt-pooled, generated. [default: all available]",
            show_default=False,
        ),
    ] = None,
    k: Annotated[
        list[str] | None,
        typer.Option(
            "--k",
            help="K values: --k 1 5 10, --k 1,5,10 or --k 1 --k 5. [default: 1 5 10]",
            show_default=False,
        ),
    ] = None,
    dedupe_captions: Annotated[
        bool,
        typer.Option(
            "--dedupe-captions",
            help="Treat identical caption strings as one text (positive for every image that has it).",
        ),
    ] = False,
    max_memory: Annotated[
        str,
        typer.Option("--max-memory", help="Memory budget of the similarity computation, e.g. 2GB or 512MiB."),
    ] = "2GB",
    device: Annotated[
        str, typer.Option("--device", help="Where the similarity blocks are computed (cpu, cuda, cuda:N).")
    ] = "cpu",
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
    from blip_toolkit.jobs.eval_recall import RecallConfig, evaluate_recall

    if out is not None:
        check_output_file(out, overwrite=overwrite)
    chosen = [f.strip() for f in features.split(",") if f.strip()] if features is not None else None
    config = RecallConfig(
        dir=str(directory),
        features=chosen,
        generated=str(generated) if generated else None,
        ks=_ks(k) if k else [1, 5, 10],
        dedupe_captions=dedupe_captions,
        max_memory=max_memory,
        device=device,
    )
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
