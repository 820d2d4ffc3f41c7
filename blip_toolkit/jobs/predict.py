"""A predictor's run, named once: `Prediction` (the task, its options, how to build its batch task
from a loaded model, the fingerprint of what defines its records), built by `captioning`,
`answering` and `ranking`, and what the CLI, `blip eval`, the UI and the demo hand to
`jobs.inference` (`run_to_file`, `stream_records`). The functions below run one over a list of
images or a pipeline source with a model already loaded, in input order (the Python API)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from blip_toolkit.data.images import InputItem
from blip_toolkit.jobs.inference import infer_records
from blip_toolkit.pipeline.sources import Source, list_source
from blip_toolkit.predictors.caption import caption_task
from blip_toolkit.predictors.options import CaptionOptions, RetrievalOptions, VqaOptions
from blip_toolkit.predictors.retrieval import RetrievalTask
from blip_toolkit.predictors.vqa import vqa_task


@dataclass
class Prediction:
    task: str  # caption, vqa or retrieval: what the checkpoint must support
    options: Any  # CaptionOptions, VqaOptions or RetrievalOptions
    make_task: Callable[[Any], Any]  # runner -> the batch task
    fingerprint: dict  # what a resumed --output run must keep


def captioning(options: CaptionOptions) -> Prediction:
    return Prediction("caption", options, lambda runner: caption_task(runner, options), options.fingerprint())


def answering(options: VqaOptions, question: str | None = None) -> Prediction:
    """`question`: the one question asked of every image (else each item carries its own)."""
    fingerprint = {**options.fingerprint(), "question": question}
    return Prediction("vqa", options, lambda runner: vqa_task(runner, options), fingerprint)


def ranking(options: RetrievalOptions, texts: list[str]) -> Prediction:
    return Prediction(
        "retrieval", options, lambda runner: RetrievalTask(runner, texts, options), options.fingerprint(texts)
    )


def caption_source(runner, source: Source, options: CaptionOptions) -> Iterator[dict]:
    """Yield `{"image", "caption"}` (or `{"shard", "key", ...}` for webdataset; `{..., "error"}` for an
    item that failed) per input, in input order."""
    return infer_records(runner, caption_task(runner, options), source, options.settings())


def caption_images(runner, items: list[InputItem], options: CaptionOptions) -> Iterator[dict]:
    """Yield `{"image", "caption"}` (or `{"image", "error"}`) per input, in input order.

    With a prompt, the caption continues it and the prompt itself is removed at token level, so the
    same `--prompt` used in `blip finetune` gives the fine-tuned continuation."""
    source = list_source([i.path for i in items], errors=[i.error for i in items])
    return caption_source(runner, source, options)


def answer_source(runner, source: Source, options: VqaOptions) -> Iterator[dict]:
    """Yield `{..., "question", "answer"}` (or `{..., "question", "error"}`) per item, in order."""
    return infer_records(runner, vqa_task(runner, options), source, options.settings())


def answer_questions(
    runner, items: list[InputItem], questions: list[str], options: VqaOptions
) -> Iterator[dict]:
    """Yield `{"image", "question", "answer"}` (or `{"image", "question", "error"}`) per pair, in order."""
    source = list_source([i.path for i in items], questions, errors=[i.error for i in items])
    return answer_source(runner, source, options)


def rank_texts(runner, items: list[InputItem], texts: list[str], options: RetrievalOptions) -> Iterator[dict]:
    """Yield, per image in input order, `{"image", "results": [...]}` with one entry per text
    (`rank`, `text`, `score`, `probability`, and `itm`/`itc` where they apply), best first (the best
    `options.top` when set), or `{"image", "error"}`. With `options.shortlist` = k, only the image's
    k texts of highest ITC are re-scored by ITM and listed (probabilities over those k)."""
    source = list_source([i.path for i in items], errors=[i.error for i in items])
    return rank_source(runner, source, texts, options)


def rank_source(runner, source: Source, texts: list[str], options: RetrievalOptions) -> Iterator[dict]:
    return infer_records(runner, RetrievalTask(runner, texts, options), source, options.settings())
