"""`blip eval caption | vqa | retrieval`: benchmark scores computed as the reference implementations do."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.derive import derived, options
from blip_toolkit.cli.options import (
    BatchSizeOpt,
    FormatOpt,
    MaxPixelsOpt,
    OutputFormat,
    OverwriteOpt,
)
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.models.spec import LoadSpec
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, VqaOptions

app = typer.Typer(
    name="eval",
    help="Benchmark scores as the papers compute them: COCO caption metrics (pycocoevalcap), the official "
    "VQA accuracy, and LAVIS's ITC + ITM re-ranked retrieval recall.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

ImagesOpt = Annotated[
    Path | None,
    typer.Option(
        "--images", help="Image root: the annotation's file names are relative to it.", file_okay=False
    ),
]
PredictionsOpt = Annotated[
    Path | None,
    typer.Option(
        "--predictions",
        help="Score this JSON / JSONL file instead of generating (e.g. `blip caption --format jsonl` output).",
        dir_okay=False,
        show_default=False,
    ),
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-missing", help="Exit 0 when some items have no prediction or image (they are listed)."
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Also write the report (every number, inputs' sha256) as JSON here.",
        dir_okay=False,
    ),
]
SavePredictionsOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-predictions", help="With --model: write the generated records (JSONL) here.", dir_okay=False
    ),
]
# The decoding options `blip eval` offers, with the papers' settings as defaults. BLIP's published
# captioning setting: LAVIS blip_caption_base_coco, beams 3, max_len 20, min_len 5, prompt "a picture
# of "; LAVIS's lengths count the decoder's [DEC] start token and the 3 prompt tokens, so they are 16
# and 1 new tokens. VQA: LAVIS blip_vqav2, beams 3, max_len 10, min_len 1 (answer tokens).
DECODING = ("num_beams", "max_new_tokens", "min_new_tokens")
CAPTION_DECODING = dict(num_beams=3, max_new_tokens=16, min_new_tokens=1)
VQA_DECODING = dict(num_beams=3, max_new_tokens=10, min_new_tokens=1)


def _finish(report: dict, out: Path | None, fmt: OutputFormat) -> None:
    from blip_toolkit.cli.output import Emitter
    from blip_toolkit.fsutil import write_json
    from blip_toolkit.jobs.evaluate import check_complete

    if out is not None:
        write_json(out, report)
    if fmt == OutputFormat.text:
        typer.echo("\n".join(render_text(report)))
    else:
        with Emitter(fmt.value, single=True) as emitter:
            emitter.emit(report)
    check_complete(report)


def _generate(load: LoadSpec, predictor, decoding: GenerationOptions):
    """With --model: generate with the predictor's options and these decoding options."""
    from dataclasses import replace

    from blip_toolkit.jobs.evaluate import GenerateConfig

    return GenerateConfig(load, replace(predictor, generation=decoding)) if load.model else None


def _check_out(out: Path | None, overwrite: bool) -> None:
    from blip_toolkit.engine.outputs import check_output_file

    if out is not None:
        check_output_file(out, overwrite=overwrite)


@app.command("caption")
@derived(
    caption=options(CaptionOptions, exclude=("num_workers",), prompt="a picture of "),
    decoding=options(GenerationOptions, only=DECODING, panel="Decoding", **CAPTION_DECODING),
    load=options(LoadSpec, exclude=("quantize",), panel="Model"),
)
def caption(
    annotations: Annotated[
        Path,
        typer.Argument(
            help="COCO caption JSON ({images, annotations}) or Karpathy split JSON.", dir_okay=False
        ),
    ],
    *,
    images: ImagesOpt = None,
    predictions: PredictionsOpt = None,
    caption: CaptionOptions,
    decoding: GenerationOptions,
    load: LoadSpec,
    java: Annotated[
        bool,
        typer.Option(
            "--java/--no-java",
            help="--no-java: BLEU / ROUGE-L / CIDEr with a Python tokenizer, not comparable to published numbers.",
        ),
    ] = True,
    allow_missing: AllowMissingOpt = False,
    save_predictions: SavePredictionsOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; SPICE when installed) with pycocoevalcap.

    Scores are x100. The decoding defaults are BLIP's published setting (LAVIS: beams 3, max_len 20,
    min_len 5, prompt "a picture of "; LAVIS's lengths count the [DEC] token and the 3 prompt tokens,
    hence 16 and 1 new tokens). Exit 3 when images have no caption to score, unless --allow-missing.

    [bold]Examples[/]

      blip eval caption coco_karpathy_test_gt.json --predictions captions.jsonl
      blip eval caption coco_karpathy_test.json --images coco/ --model Salesforce/blip-image-captioning-base
      blip eval caption test.json --predictions preds.json --no-java --format json --out report.json
    """
    from blip_toolkit.jobs.eval_caption import evaluate_caption
    from blip_toolkit.jobs.evaluate import CaptionEvalConfig

    _check_out(out, overwrite)
    generate = _generate(load, caption, decoding)
    config = CaptionEvalConfig(
        annotations=str(annotations),
        images=str(images) if images else None,
        predictions=str(predictions) if predictions else None,
        generate=generate,
        java=java,
        allow_missing=allow_missing,
        save_predictions=str(save_predictions) if save_predictions else None,
        overwrite=overwrite,
    )
    _finish(evaluate_caption(config), out, fmt)


@app.command("vqa")
@derived(
    vqa=options(VqaOptions, exclude=("num_workers",)),
    decoding=options(GenerationOptions, only=DECODING, panel="Decoding", **VQA_DECODING),
    load=options(LoadSpec, exclude=("quantize",), panel="Model"),
)
def vqa(
    *,
    questions: Annotated[
        Path | None,
        typer.Option("--questions", help="VQAv2 questions JSON.", dir_okay=False, show_default=False),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations", help="VQAv2 annotations JSON (10 answers per question).", dir_okay=False
        ),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest", help="Or a TSV: image<TAB>question<TAB>answer[|answer...].", dir_okay=False
        ),
    ] = None,
    images: ImagesOpt = None,
    image_pattern: Annotated[
        str | None,
        typer.Option(
            "--image-pattern",
            help="VQAv2 image file from {image_id}. \\[default: COCO_<data_subtype>_{image_id:012d}.jpg]",
        ),
    ] = None,
    predictions: PredictionsOpt = None,
    vqa: VqaOptions,
    decoding: GenerationOptions,
    load: LoadSpec,
    allow_missing: AllowMissingOpt = False,
    save_predictions: SavePredictionsOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Official VQA accuracy (overall, per answer type and question type) and exact match, x100.

    Answers are normalised as the official VQAv2 script does; accuracy is the mean over the 10
    leave-one-out subsets of min(#humans agreeing / 3, 1). Predictions: {"question_id", "answer"} or
    {"image", "question", "answer"} records (e.g. `blip vqa --format jsonl` output).

    [bold]Examples[/]

      blip eval vqa --questions v2_OpenEnded_mscoco_val2014_questions.json \\
          --annotations v2_mscoco_val2014_annotations.json --predictions answers.json
      blip eval vqa --manifest qa.tsv --model Salesforce/blip-vqa-base --save-predictions answers.jsonl
    """
    from blip_toolkit.jobs.eval_vqa import evaluate_vqa
    from blip_toolkit.jobs.evaluate import VqaEvalConfig

    _check_out(out, overwrite)
    generate = _generate(load, vqa, decoding)
    config = VqaEvalConfig(
        questions=str(questions) if questions else None,
        annotations=str(annotations) if annotations else None,
        manifest=str(manifest) if manifest else None,
        images=str(images) if images else None,
        image_pattern=image_pattern,
        predictions=str(predictions) if predictions else None,
        generate=generate,
        allow_missing=allow_missing,
        save_predictions=str(save_predictions) if save_predictions else None,
        overwrite=overwrite,
    )
    _finish(evaluate_vqa(config), out, fmt)


@app.command("retrieval")
@derived(load=options(LoadSpec, exclude=("quantize",), panel="Model"))
def retrieval(
    annotations: Annotated[
        Path,
        typer.Argument(
            help="Karpathy-style test JSON (image -> captions) or COCO caption JSON.", dir_okay=False
        ),
    ],
    *,
    images: ImagesOpt = None,
    load: LoadSpec,
    score: Annotated[
        str, typer.Option("--score", help="itm+itc (LAVIS's re-ranking) or itc alone.")
    ] = "itm+itc",
    k_test: Annotated[
        int | None,
        typer.Option(
            "--k-test",
            min=1,
            help="Candidates re-ranked by ITM per image and per text. \\[default: 128 for a "
            "file named *flickr*, else 256 (LAVIS's COCO setting)]",
        ),
    ] = None,
    batch_size: BatchSizeOpt = 8,
    itm_batch_size: Annotated[
        int | None,
        typer.Option("--itm-batch-size", min=1, help="Pairs per ITM pass. \\[default: 4 x --batch-size]"),
    ] = None,
    max_memory: Annotated[
        str,
        typer.Option("--max-memory", help="Cache for image patch embeddings (the ITC blocks use 1/8 of it)."),
    ] = "4GB",
    dedupe_captions: Annotated[
        bool,
        typer.Option(
            "--dedupe-captions",
            help="Identical captions as one text, positive for every image that has it (templated or class captions).",
        ),
    ] = False,
    allow_missing: AllowMissingOpt = False,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Image-text retrieval R@1/5/10 both ways as LAVIS publishes it (BLIP / BLIP-2 ITM checkpoints).

    ITC ranks all pairs (in memory-bounded blocks); the top --k-test texts of every image and images
    of every text are re-scored as ITM "match" logit + ITC. Image-to-text is a hit when any of the
    image's captions is in the top K.

    [bold]Examples[/]

      blip eval retrieval coco_karpathy_test.json --images coco/ --model Salesforce/blip-itm-base-coco
      blip eval retrieval flickr30k_test.json --images flickr30k/ --model Salesforce/blip-itm-base-flickr
      blip eval retrieval test.json --images imgs/ --model my-itm --score itc --format json
    """
    from blip_toolkit.errors import UsageError
    from blip_toolkit.jobs.eval_retrieval import evaluate_retrieval
    from blip_toolkit.jobs.evaluate import RetrievalEvalConfig

    if not load.model:
        raise UsageError("retrieval needs --model (a BLIP or BLIP-2 ITM checkpoint)")
    _check_out(out, overwrite)
    config = RetrievalEvalConfig(
        annotations=str(annotations),
        images=str(images) if images else "",
        model=load.model,
        score=score,
        k_test=k_test,
        batch_size=batch_size,
        itm_batch_size=itm_batch_size,
        max_memory=max_memory,
        device=load.device,
        dtype=load.dtype,
        max_pixels=max_pixels,
        trust_remote_code=load.trust_remote_code,
        allow_missing=allow_missing,
        dedupe_captions=dedupe_captions,
    )
    _finish(evaluate_retrieval(config), out, fmt)


def render_text(report: dict) -> list[str]:
    """The report as `name<TAB>value` lines for the text output (2 decimals; json has full precision)."""
    task = report["task"]
    missing = report["missing"]
    if task == "caption":
        lines = [
            f"# caption metrics on {report['scored']} of {missing['total']} images, x100 "
            f"(pycocoevalcap {report['tool']['pycocoevalcap']}, {report['tokenizer']} tokenizer"
            f"{'' if report['comparable'] else '; NOT comparable to published numbers'})"
        ]
        lines += [f"{name}\t{value:.2f}" for name, value in report["metrics"].items()]
    elif task == "vqa":
        metrics = report["metrics"]
        lines = [
            f"# VQA accuracy on {report['scored']} of {missing['total']} questions, x100 (official VQAv2 metric)"
        ]
        lines += [f"overall\t{metrics['overall']:.2f}", f"exact_match\t{metrics['exact_match']:.2f}"]
        lines += [f"answer_type {name}\t{value:.2f}" for name, value in metrics["per_answer_type"].items()]
    else:
        protocol = report["protocol"]
        how = protocol["score"] + (f", k_test {protocol['k_test']}" if protocol["score"] != "itc" else "")
        lines = [
            f"# retrieval recall in %, {report['scored']['images']} images x {report['scored']['texts']} texts "
            f"({how}; {protocol['itm_pairs']} ITM pairs)"
        ]
        lines += [
            f"{name}\t{value:.2f}" for name, value in report["metrics"].items() if name != "agg_metrics"
        ]
    return lines


def register(root: typer.Typer) -> None:
    root.add_typer(app)
