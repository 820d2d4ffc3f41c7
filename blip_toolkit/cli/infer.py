"""`blip caption`, `blip vqa`, `blip retrieval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    ManifestOpt,
    MaxPixelsOpt,
    ModelOpt,
    OutputFormat,
    QuantizeOpt,
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
GenSeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Seed for --sample (same batch size = same output).")
]


def _generation(max_new_tokens, min_new_tokens, num_beams, sample, top_p, temperature, seed):
    from blip_toolkit.runtime.generation import GenerationOptions

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
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Images: files, directories (recursive), glob patterns, or - to read paths from stdin.",
            show_default=False,
        ),
    ] = None,
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
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    trust_remote_code: TrustRemoteCodeOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Caption images with a BLIP, BLIP-2 or InstructBLIP checkpoint.

    Text output is [bold]path<TAB>caption[/] per image; json/jsonl give {"image", "caption"} or
    {"image", "error"}. Bad images are reported and skipped (exit 3).

    [bold]Examples[/]

      blip caption photo.jpg
      blip caption photos/ --batch-size 16 --format jsonl > captions.jsonl
      find shots -name '*.png' | blip caption - --model Salesforce/blip2-opt-2.7b --prompt "a photo of"
    """
    from blip_toolkit.cli.common import emit_all, image_items
    from blip_toolkit.runtime.caption import CaptionOptions, caption_images
    from blip_toolkit.runtime.loading import DEFAULT_MODELS, open_runner

    options = CaptionOptions(
        prompt=prompt,
        batch_size=batch_size,
        max_pixels=max_pixels,
        generation=_generation(max_new_tokens, min_new_tokens, num_beams, sample, top_p, temperature, seed),
    )
    items, _ = image_items(inputs, manifest)
    runner = open_runner(
        model or DEFAULT_MODELS["caption"],
        "caption",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quantize=quantize and quantize.value,
    )
    emit_all(
        caption_images(runner, items, options),
        fmt.value,
        lambda r: f"{r['image']}\t{r['caption']}",
        what="image",
    )


def vqa(
    image: Annotated[str | None, typer.Argument(help="The image.", show_default=False)] = None,
    question: Annotated[str | None, typer.Argument(help="The question.", show_default=False)] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest",
            help="TSV of image<TAB>question rows (a third answer column is ignored).",
            dir_okay=False,
        ),
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
      blip vqa photo.jpg "how many dogs?" --model Salesforce/blip2-flan-t5-xl
    """
    from blip_toolkit.cli.common import emit_all, image_items
    from blip_toolkit.errors import UsageError
    from blip_toolkit.runtime.loading import DEFAULT_MODELS, open_runner
    from blip_toolkit.runtime.vqa import VqaOptions, answer_questions

    options = VqaOptions(
        template=template,
        batch_size=batch_size,
        max_pixels=max_pixels,
        generation=_generation(max_new_tokens, min_new_tokens, num_beams, sample, top_p, temperature, seed),
    )
    if manifest is not None:
        if image or question:
            raise UsageError("give IMAGE QUESTION or --manifest, not both")
        items, rows = image_items(None, manifest, schema="questions")
        questions = [row["question"] for row in rows]
    else:
        if not image or question is None:
            raise UsageError("give IMAGE and QUESTION (or --manifest FILE.tsv)")
        if not question.strip():
            raise UsageError("the question is empty")
        items, _ = image_items([image], None)
        questions = [question] * len(items)
    runner = open_runner(
        model or DEFAULT_MODELS["vqa"],
        "vqa",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quantize=quantize and quantize.value,
    )
    emit_all(
        answer_questions(runner, items, questions, options),
        fmt.value,
        lambda r: f"{r['image']}\t{r['question']}\t{r['answer']}",
        what="question",
    )


def retrieval(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="IMAGE TEXT... (the first is the image), or only images with --texts-file.",
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
        int | None, typer.Option("--top", min=1, help="Show only the best N texts per image.")
    ] = None,
    batch_size: BatchSizeOpt = 8,
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
      blip retrieval photo.jpg "a red car" "a bus" --model Salesforce/blip2-itm-vit-g --score itc
    """
    from blip_toolkit.cli.common import emit_all, image_items
    from blip_toolkit.errors import InputError, UsageError
    from blip_toolkit.runtime.loading import DEFAULT_MODELS, open_runner
    from blip_toolkit.runtime.retrieval import RetrievalOptions, rank_texts

    options = RetrievalOptions(score=score, batch_size=batch_size, max_pixels=max_pixels)
    args = list(args or [])
    if texts_file is not None:
        try:
            lines = texts_file.read_bytes().decode("utf-8").splitlines()
        except FileNotFoundError as exc:
            raise InputError(f"{texts_file}: no such file") from exc
        except UnicodeDecodeError as exc:
            line = texts_file.read_bytes()[: exc.start].count(b"\n") + 1
            raise InputError(f"{texts_file}:{line}: not valid UTF-8") from exc
        texts = [line.strip() for line in lines if line.strip()]
        if not texts:
            raise InputError(f"{texts_file}: no texts")
        images = args
    else:
        if manifest is not None:
            texts, images = args, []
        else:
            if len(args) < 2:
                raise UsageError("give IMAGE and at least one TEXT (or --texts-file with images)")
            images, texts = args[:1], args[1:]
    if not texts:
        raise UsageError("no candidate texts given")
    items, _ = image_items(images or None, manifest)
    runner = open_runner(
        model or DEFAULT_MODELS["retrieval"],
        "retrieval",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quantize=quantize and quantize.value,
    )

    def shown(records):
        for record in records:
            if top is not None and "results" in record:
                record = {**record, "results": record["results"][:top]}
            yield record

    def text_line(record):
        return "\n".join(
            f"{record['image']}\t{r['rank']}\t{r['score']:.4f}\t{r['probability']:.4f}\t{r['text']}"
            for r in record["results"]
        )

    emit_all(shown(rank_texts(runner, items, texts, options)), fmt.value, text_line, what="image")


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)
    app.command("vqa")(vqa)
    app.command("retrieval")(retrieval)
