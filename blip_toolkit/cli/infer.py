"""`blip caption`, `blip vqa`, `blip retrieval`: wiring only. Their options are derived (cli/derive.py)
from the library's settings: the predictor's options and decoding (predictors/options.py), what to
read, where to write and where to run (pipeline/spec.py), and what to load (models/spec.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.derive import derived, options
from blip_toolkit.cli.options import FormatOpt, OutputFormat
from blip_toolkit.models.spec import LoadSpec
from blip_toolkit.pipeline.spec import EngineSpec, InputSpec, OutputSpec
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, RetrievalOptions, VqaOptions

InputsArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Images: files, directories (recursive), glob patterns, - (paths on stdin), webdataset "
        ".tar shards and brace patterns (data/{00000..00099}.tar), Parquet files or datasets.save_to_disk "
        "directories; local or remote (s3://, gs://, hf://, https://).",
        show_default=False,
    ),
]
# The groups every dataset command shares; the predictor's own options come first.
COMMON = dict(
    output=options(OutputSpec),
    engine=options(EngineSpec, panel="Engine"),
    load=options(LoadSpec, panel="Model"),
)


def _display(fmt: OutputFormat, text_line, what: str):
    from blip_toolkit.cli.common import Display

    return Display(fmt.value, text_line, what)


def _name(record: dict) -> str:
    from blip_toolkit.pipeline.outputs import item_name

    return item_name(record)


@derived(
    caption=options(CaptionOptions, num_workers=None),
    decoding=options(GenerationOptions, panel="Decoding"),
    read=options(InputSpec, exclude=("text_column",)),
    **COMMON,
)
def caption(
    inputs: InputsArg = None,
    *,
    caption: CaptionOptions,
    decoding: GenerationOptions,
    read: InputSpec,
    output: OutputSpec,
    engine: EngineSpec,
    load: LoadSpec,
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
    from dataclasses import replace

    from blip_toolkit.cli.common import run_inference
    from blip_toolkit.jobs.predict import captioning

    prediction = captioning(replace(caption, generation=decoding))
    display = _display(fmt, lambda r: f"{_name(r)}\t{r['caption']}", "image")
    run_inference(prediction, read.open(inputs), load, output, engine, display)


@derived(
    vqa=options(VqaOptions, num_workers=None),
    decoding=options(GenerationOptions, max_new_tokens=10, panel="Decoding"),
    read=options(InputSpec),
    **COMMON,
)
def vqa(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="IMAGE QUESTION; or, with --question, images / folders / globs / webdataset shards.",
            show_default=False,
        ),
    ] = None,
    *,
    question: Annotated[
        str | None,
        typer.Option("--question", "-q", help="Ask this question of every image given.", show_default=False),
    ] = None,
    vqa: VqaOptions,
    decoding: GenerationOptions,
    read: InputSpec,
    output: OutputSpec,
    engine: EngineSpec,
    load: LoadSpec,
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
    from dataclasses import replace

    from blip_toolkit.cli.common import run_inference
    from blip_toolkit.jobs.predict import answering

    images, question = _vqa_inputs(list(args or []), question, read)
    prediction = answering(replace(vqa, generation=decoding), question)
    display = _display(fmt, lambda r: f"{_name(r)}\t{r['question']}\t{r['answer']}", "question")
    source = read.open(images, text=question, manifest_schema="questions")
    run_inference(prediction, source, load, output, engine, display)


def _vqa_inputs(args: list[str], question: str | None, read: InputSpec) -> tuple[list[str], str | None]:
    """(images, the one question for all) from IMAGE QUESTION, images with --question, a manifest, or
    a table's --text-column."""
    from blip_toolkit.errors import UsageError

    if read.manifest is not None and (args or question is not None):
        raise UsageError("give IMAGE QUESTION, --question with images, or --manifest; not several")
    if question is not None and read.text_column is not None:
        raise UsageError(
            "--question asks every image the same question; --text-column reads one per row: give one"
        )
    if read.manifest is None and question is None and read.text_column is None:
        if len(args) != 2:
            raise UsageError("give IMAGE and QUESTION (or images with --question, or --manifest FILE.tsv)")
        args, question = args[:1], args[1]
    if question is not None and not question.strip():
        raise UsageError("the question is empty")
    return args, question


@derived(
    retrieval=options(RetrievalOptions, num_workers=None),
    read=options(InputSpec, exclude=("text_column",)),
    **COMMON,
)
def retrieval(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="IMAGE TEXT... (the first is the image), or only images / shards with --texts-file.",
            show_default=False,
        ),
    ] = None,
    *,
    texts_file: Annotated[
        Path | None,
        typer.Option(
            "--texts-file",
            help="Candidate texts, one per line; then every argument is an image.",
            dir_okay=False,
        ),
    ] = None,
    retrieval: RetrievalOptions,
    read: InputSpec,
    output: OutputSpec,
    engine: EngineSpec,
    load: LoadSpec,
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
    from blip_toolkit.cli.common import read_texts_file, run_inference
    from blip_toolkit.errors import UsageError
    from blip_toolkit.jobs.predict import ranking

    args = list(args or [])
    if texts_file is not None:
        texts, images = read_texts_file(texts_file), args
    elif read.manifest is not None:
        texts, images = args, []
    else:
        if len(args) < 2:
            raise UsageError("give IMAGE and at least one TEXT (or --texts-file with images)")
        images, texts = args[:1], args[1:]
    if not texts:
        raise UsageError("no candidate texts given")

    def text_line(record):
        return "\n".join(
            f"{_name(record)}\t{r['rank']}\t{r['score']:.4f}\t{r['probability']:.4f}\t{r['text']}"
            for r in record["results"]
        )

    display = _display(fmt, text_line, "image")
    run_inference(ranking(retrieval, texts), read.open(images), load, output, engine, display)


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)
    app.command("vqa")(vqa)
    app.command("retrieval")(retrieval)
