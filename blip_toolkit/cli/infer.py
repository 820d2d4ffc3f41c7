"""`blip caption`, `blip vqa`, `blip retrieval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.options import (
    BatchSizeOpt,
    CpusPerActorOpt,
    DeviceOpt,
    DtypeOpt,
    Engine,
    EngineOpt,
    FormatOpt,
    GpusPerActorOpt,
    ImageColumnOpt,
    KeyColumnOpt,
    ManifestOpt,
    MaxPixelsOpt,
    ModelOpt,
    NumActorsOpt,
    OutputFormat,
    OverwriteOpt,
    QuantizeOpt,
    RayAddressOpt,
    ResumeOpt,
    RetryFailedOpt,
    TrustRemoteCodeOpt,
)
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS

NumBeamsOpt = Annotated[int, typer.Option("--num-beams", min=1, help="Beam search width (1 = greedy).")]
MinNewOpt = Annotated[
    int, typer.Option("--min-new-tokens", min=0, help="Generate at least this many tokens.")
]
SampleOpt = Annotated[bool, typer.Option("--sample", help="Sample instead of greedy / beam decoding.")]
TopPOpt = Annotated[
    float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --sample).")
]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", min=0.0, help="Sampling temperature (with --sample).")
]
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        help="Write the records to FILE (.jsonl, .parquet or .tsv, by extension; local or s3:// / gs:// / "
        "hf://), resumable, in input order; without it they stream to stdout.",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--num-workers",
        min=0,
        help="DataLoader processes decoding images while the model runs [default: per the machine].",
        show_default=False,
    ),
]
AllowPipeOpt = Annotated[
    bool, typer.Option("--allow-pipe", help="Accept 'pipe:' webdataset URLs (they run shell commands).")
]
InputsArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Images: files, directories (recursive), glob patterns, - (paths on stdin), webdataset "
        ".tar shards and brace patterns (data/{00000..00099}.tar), Parquet files or datasets.save_to_disk "
        "directories; local or remote (s3://, gs://, hf://, https://).",
        show_default=False,
    ),
]
GenSeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Seed for --sample (same batch size = same output).")
]


def _generation(max_new_tokens, min_new_tokens, num_beams, sample, top_p, temperature, seed):
    from blip_toolkit.predictors.generation import GenerationOptions

    return GenerationOptions(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=num_beams,
        sample=sample,
        top_p=top_p,
        temperature=temperature,
        seed=seed,
    )


def caption(
    inputs: InputsArg = None,
    manifest: ManifestOpt = None,
    model: ModelOpt = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            help="Conditional captioning: the caption continues this text (which is not repeated in the output); InstructBLIP: the instruction [default: 'A short image caption.'].",
        ),
    ] = None,
    batch_size: BatchSizeOpt = 8,
    num_beams: NumBeamsOpt = 1,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Maximum caption length in tokens.")
    ] = 30,
    min_new_tokens: MinNewOpt = 0,
    sample: SampleOpt = False,
    top_p: TopPOpt = 0.9,
    temperature: TemperatureOpt = 1.0,
    seed: GenSeedOpt = None,
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    retry_failed: RetryFailedOpt = False,
    num_workers: WorkersOpt = None,
    allow_pipe: AllowPipeOpt = False,
    image_column: ImageColumnOpt = "image",
    key_column: KeyColumnOpt = None,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    num_actors: NumActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = 0.0,
    cpus_per_actor: CpusPerActorOpt = 1.0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    trust_remote_code: TrustRemoteCodeOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Caption images with a BLIP, BLIP-2 or InstructBLIP checkpoint.

    Text output is [bold]path<TAB>caption[/] per image; json/jsonl give {"image", "caption"} or
    {"image", "error"} (webdataset: {"shard", "key", ...}). With --output the records go to the file
    and stdout gets a summary (json/jsonl). Bad images are recorded and skipped (exit 3).

    [bold]Examples[/]

      blip caption photo.jpg
      blip caption photos/ --batch-size 16 --format jsonl > captions.jsonl
      blip caption 'shards/{00000..00099}.tar' --output captions.parquet --resume
      blip caption 'hf://datasets/org/name/data/*.parquet' --image-column image --output caps.parquet
      blip caption s3://bucket/shards/ --output s3://bucket/captions.parquet --retry-failed
      blip caption 'shards/{00000..09999}.tar' --output caps.parquet --engine ray --ray-address auto --gpus-per-actor 1
      find shots -name '*.png' | blip caption - --model Salesforce/blip2-opt-2.7b --prompt "a photo of"
    """
    from blip_toolkit.cli.common import ray_options, run_inference
    from blip_toolkit.pipeline.outputs import item_name
    from blip_toolkit.predictors.caption import CaptionOptions, caption_task

    options = CaptionOptions(
        prompt=prompt,
        batch_size=batch_size,
        max_pixels=max_pixels,
        generation=_generation(max_new_tokens, min_new_tokens, num_beams, sample, top_p, temperature, seed),
        num_workers=num_workers,
    )
    run_inference(
        "caption",
        inputs=inputs,
        manifest=manifest,
        model=model,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quantize=quantize and quantize.value,
        options=options,
        make_task=lambda runner: caption_task(runner, options),
        fingerprint=options.fingerprint(),
        output=output,
        resume=resume,
        overwrite=overwrite,
        retry_failed=retry_failed,
        allow_pipe=allow_pipe,
        ray=ray_options(engine, ray_address, num_actors, gpus_per_actor, cpus_per_actor),
        columns=(image_column, key_column, None),
        fmt=fmt.value,
        text_line=lambda r: f"{item_name(r)}\t{r['caption']}",
        what="image",
    )


def vqa(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="IMAGE QUESTION; or, with --question, images / folders / globs / webdataset shards.",
            show_default=False,
        ),
    ] = None,
    question: Annotated[
        str | None,
        typer.Option("--question", "-q", help="Ask this question of every image given.", show_default=False),
    ] = None,
    manifest: Annotated[
        str | None,
        typer.Option("--manifest", help="TSV of image<TAB>question rows (a third answer column is ignored)."),
    ] = None,
    model: ModelOpt = None,
    template: Annotated[
        str,
        typer.Option(
            "--template",
            help="BLIP-2 prompt; {} is replaced by the question. BLIP VQA checkpoints take the bare question.",
        ),
    ] = "Question: {} Answer:",
    batch_size: BatchSizeOpt = 8,
    num_beams: NumBeamsOpt = 1,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Maximum answer length in tokens.")
    ] = 10,
    min_new_tokens: MinNewOpt = 0,
    sample: SampleOpt = False,
    top_p: TopPOpt = 0.9,
    temperature: TemperatureOpt = 1.0,
    seed: GenSeedOpt = None,
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    retry_failed: RetryFailedOpt = False,
    num_workers: WorkersOpt = None,
    allow_pipe: AllowPipeOpt = False,
    image_column: ImageColumnOpt = "image",
    key_column: KeyColumnOpt = None,
    text_column: Annotated[
        str | None,
        typer.Option("--text-column", help="Parquet / Arrow inputs: the column holding each row's question."),
    ] = None,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    num_actors: NumActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = 0.0,
    cpus_per_actor: CpusPerActorOpt = 1.0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    trust_remote_code: TrustRemoteCodeOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Answer questions about images (BLIP VQA, BLIP-2 or InstructBLIP).

    Text output is [bold]path<TAB>question<TAB>answer[/] per pair; json/jsonl give
    {"image", "question", "answer"} or {..., "error"}.

    [bold]Examples[/]

      blip vqa photo.jpg "what is the man holding?"
      blip vqa --manifest questions.tsv --format jsonl
      blip vqa 'shards/{000..009}.tar' --question "how many people?" --output answers.jsonl
      blip vqa questions.parquet --text-column question --output answers.parquet
      blip vqa photo.jpg "how many dogs?" --model Salesforce/blip2-flan-t5-xl
    """
    from blip_toolkit.cli.common import ray_options, run_inference
    from blip_toolkit.errors import UsageError
    from blip_toolkit.pipeline.outputs import item_name
    from blip_toolkit.predictors.vqa import VqaOptions, vqa_task

    options = VqaOptions(
        template=template,
        batch_size=batch_size,
        max_pixels=max_pixels,
        generation=_generation(max_new_tokens, min_new_tokens, num_beams, sample, top_p, temperature, seed),
        num_workers=num_workers,
    )
    args = list(args or [])
    if manifest is not None and (args or question is not None):
        raise UsageError("give IMAGE QUESTION, --question with images, or --manifest; not several")
    if question is not None and text_column is not None:
        raise UsageError(
            "--question asks every image the same question; --text-column reads one per row: give one"
        )
    if manifest is None and question is None and text_column is None:
        if len(args) != 2:
            raise UsageError("give IMAGE and QUESTION (or images with --question, or --manifest FILE.tsv)")
        args, question = args[:1], args[1]
    if question is not None and not question.strip():
        raise UsageError("the question is empty")
    run_inference(
        "vqa",
        inputs=args,
        manifest=manifest,
        question=question,
        manifest_schema="questions",
        model=model,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quantize=quantize and quantize.value,
        options=options,
        make_task=lambda runner: vqa_task(runner, options),
        fingerprint={**options.fingerprint(), "question": question},
        output=output,
        resume=resume,
        overwrite=overwrite,
        retry_failed=retry_failed,
        allow_pipe=allow_pipe,
        ray=ray_options(engine, ray_address, num_actors, gpus_per_actor, cpus_per_actor),
        columns=(image_column, key_column, text_column),
        fmt=fmt.value,
        text_line=lambda r: f"{item_name(r)}\t{r['question']}\t{r['answer']}",
        what="question",
    )


def retrieval(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="IMAGE TEXT... (the first is the image), or only images / shards with --texts-file.",
            show_default=False,
        ),
    ] = None,
    texts_file: Annotated[
        Path | None,
        typer.Option(
            "--texts-file",
            help="Candidate texts, one per line; then every argument is an image.",
            dir_okay=False,
        ),
    ] = None,
    manifest: ManifestOpt = None,
    model: ModelOpt = None,
    score: Annotated[
        str | None,
        typer.Option(
            "--score",
            help="itm, itc or itm+itc for ITM checkpoints [default: itm+itc]; generative BLIP-2 uses likelihood.",
        ),
    ] = None,
    top: Annotated[
        int | None, typer.Option("--top", min=1, help="Keep only the best N texts per image.")
    ] = None,
    batch_size: BatchSizeOpt = 8,
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    retry_failed: RetryFailedOpt = False,
    num_workers: WorkersOpt = None,
    allow_pipe: AllowPipeOpt = False,
    image_column: ImageColumnOpt = "image",
    key_column: KeyColumnOpt = None,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    num_actors: NumActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = 0.0,
    cpus_per_actor: CpusPerActorOpt = 1.0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    trust_remote_code: TrustRemoteCodeOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Rank candidate texts for each image (ITM/ITC, or likelihood for generative BLIP-2 / InstructBLIP).

    Every text gets a score, a probability (softmax over the candidates) and a rank. Text output is
    [bold]path<TAB>rank<TAB>score<TAB>probability<TAB>text[/]; json/jsonl give one object per image.

    [bold]Examples[/]

      blip retrieval photo.jpg "a dog on a beach" "a cat on a sofa"
      blip retrieval photos/ --texts-file captions.txt --top 3 --format jsonl
      blip retrieval 'shards/{000..009}.tar' --texts-file labels.txt --top 5 --output ranked.parquet
      blip retrieval photo.jpg "a red car" "a bus" --model Salesforce/blip2-itm-vit-g --score itc
    """
    from blip_toolkit.cli.common import ray_options, read_texts_file, run_inference
    from blip_toolkit.errors import UsageError
    from blip_toolkit.pipeline.outputs import item_name
    from blip_toolkit.predictors.retrieval import RetrievalOptions, RetrievalTask

    options = RetrievalOptions(
        score=score, batch_size=batch_size, max_pixels=max_pixels, top=top, num_workers=num_workers
    )
    args = list(args or [])
    if texts_file is not None:
        texts, images = read_texts_file(texts_file), args
    elif manifest is not None:
        texts, images = args, []
    else:
        if len(args) < 2:
            raise UsageError("give IMAGE and at least one TEXT (or --texts-file with images)")
        images, texts = args[:1], args[1:]
    if not texts:
        raise UsageError("no candidate texts given")

    def text_line(record):
        return "\n".join(
            f"{item_name(record)}\t{r['rank']}\t{r['score']:.4f}\t{r['probability']:.4f}\t{r['text']}"
            for r in record["results"]
        )

    run_inference(
        "retrieval",
        inputs=images,
        manifest=manifest,
        model=model,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quantize=quantize and quantize.value,
        options=options,
        make_task=lambda runner: RetrievalTask(runner, texts, options),
        fingerprint=options.fingerprint(texts),
        output=output,
        resume=resume,
        overwrite=overwrite,
        retry_failed=retry_failed,
        allow_pipe=allow_pipe,
        ray=ray_options(engine, ray_address, num_actors, gpus_per_actor, cpus_per_actor),
        columns=(image_column, key_column, None),
        fmt=fmt.value,
        text_line=text_line,
        what="image",
    )


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)
    app.command("vqa")(vqa)
    app.command("retrieval")(retrieval)
