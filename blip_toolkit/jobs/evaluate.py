"""What `blip eval caption | vqa | retrieval` share (the tasks are in jobs/eval_caption.py,
vqa_eval.py and retrieval_eval.py): one evaluation end to end, from the dataset files (and a
model or a predictions file) to the report dict that the CLI prints and `--out` writes.

Each evaluation:

1. reads and checks the annotations (metrics/annotations.py), before any model loads;
2. gets the predictions: from `--predictions FILE`, or by generating them with `--model` through
   `generate_records` (the one place that runs a model for captions / answers), optionally saved
   with `--save-predictions` so they can be scored again;
3. scores them (metrics/caption_metrics.py, metrics/vqa_accuracy.py, or the retrieval protocol of
   metrics/retrieval_protocol.py over jobs/eval_itm_features.py);
4. returns a report that records what is needed to reproduce the number: the tool version, the
   dataset files with their sha256, the model or the predictions file (sha256), the decoding
   options, and which items were not scored and why.

Items that cannot be scored (an image missing from the root or failing to load, no prediction for an
image / question) are left out, listed in the report (`missing`) and on stderr; `check_complete`
turns them into exit code 3 unless `allow_missing`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_toolkit import __version__
from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, InputItem
from blip_toolkit.errors import InputError, PartialFailure, UsageError
from blip_toolkit.fsutil import atomic_write
from blip_toolkit.jobs.predict import answer_questions, caption_images
from blip_toolkit.metrics.annotations import (
    MAX_LISTED,
    CaptionAnnotations,
    listed,
)
from blip_toolkit.metrics.caption_metrics import pycocoevalcap_version
from blip_toolkit.models.loading import open_spec
from blip_toolkit.models.spec import LoadSpec
from blip_toolkit.predictors.options import CaptionOptions, VqaOptions

logger = logging.getLogger("blip")

SCALE_NOTE = "scores are x100, as papers report them"
# LAVIS's k_test: 256 for COCO, 128 for Flickr30k.
K_TEST_COCO = 256
K_TEST_FLICKR = 128


@dataclass
class GenerateConfig:
    """How `--model` generates: what to load and the predictor's options (CaptionOptions for caption,
    VqaOptions for vqa; the same as `blip caption` / `blip vqa`)."""

    load: LoadSpec
    options: CaptionOptions | VqaOptions


@dataclass
class CaptionEvalConfig:
    annotations: str
    images: str | None = None  # image root (the annotation's file names are relative to it)
    predictions: str | None = None
    generate: GenerateConfig | None = None
    java: bool = True
    allow_missing: bool = False
    save_predictions: str | None = None
    overwrite: bool = False


@dataclass
class VqaEvalConfig:
    questions: str | None = None  # VQAv2 questions file (with `annotations`)
    annotations: str | None = None
    manifest: str | None = None  # or a TSV manifest
    images: str | None = None
    image_pattern: str | None = None
    predictions: str | None = None
    generate: GenerateConfig | None = None
    allow_missing: bool = False
    save_predictions: str | None = None
    overwrite: bool = False


@dataclass
class RetrievalEvalConfig:
    annotations: str
    images: str
    model: str
    score: str = "itm+itc"
    k_test: int | None = None  # None: 128 for a Flickr30k file (name contains "flickr"), else 256
    batch_size: int = 8
    itm_batch_size: int | None = None  # None: 4 x batch_size
    max_memory: str | int = "4GB"
    device: str = "auto"
    dtype: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    trust_remote_code: bool = False
    allow_missing: bool = False
    # Identical captions (after LAVIS's pre_caption) as one text, positive for every image that has
    # it: with templated or class captions, copies of a text would tie and count as misses.
    dedupe_captions: bool = False


# ----------------------------------------------------------------------------- generation


def generate_records(
    task: str, config: GenerateConfig, images: list[str], questions: list[str] | None = None
) -> tuple[str, Iterator[dict]]:
    """Captions (task "caption") or answers ("vqa") for `images` with the model and decoding options
    of `config`: (the checkpoint's family name, records in input order, `{"image", "caption"}` /
    `{"image", "question", "answer"}` or with an `"error"`). The one place that generates."""
    runner = open_spec(config.load, task)
    items = [InputItem(path) for path in images]
    family = runner.loaded.family.name
    if task == "caption":
        return family, caption_images(runner, items, config.options)
    return family, answer_questions(runner, items, list(questions or []), config.options)


def save_records(path: str, records: list[dict]) -> None:
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def decoding_options(task: str, config: GenerateConfig, family: str) -> dict[str, Any]:
    """The report's decoding settings: the prompt (caption) or template (vqa; None for BLIP VQA, which
    takes the bare question), beams and lengths."""
    options, generation = config.options, config.options.generation
    if task == "caption":
        out: dict[str, Any] = {"prompt": options.prompt}
    else:
        out = {"template": options.template if family.startswith("blip2") else None}
    out.update(
        num_beams=generation.num_beams,
        max_new_tokens=generation.max_new_tokens,
        min_new_tokens=generation.min_new_tokens,
        sample=False,
    )
    return out


# ----------------------------------------------------------------------------- common


def check_complete(report: dict[str, Any]) -> None:
    """PartialFailure (exit 3) when items were left out and that was not allowed."""
    missing = report.get("missing") or {}
    if missing.get("count") and not missing.get("allowed"):
        what = {"caption": "image", "retrieval": "image", "vqa": "question"}[report["task"]]
        raise PartialFailure(
            f"{missing['count']} of {missing['total']} {what}(s) were not scored ({missing['reasons']}); the "
            "scores above cover the rest (pass --allow-missing to accept that)"
        )


def report_header(task: str, dataset: dict[str, Any], images: str | None) -> dict[str, Any]:
    return {
        "task": task,
        "tool": {"name": "blip-toolkit", "version": __version__, "pycocoevalcap": pycocoevalcap_version()},
        "dataset": dataset,
        "images": images,
    }


def missing_summary(missing: list[dict[str, str]], total: int, allowed: bool) -> dict[str, Any]:
    return {
        "count": len(missing),
        "total": total,
        "allowed": allowed,
        "reasons": missing_reasons(missing),
        "items": missing[:MAX_LISTED],
    }


def missing_reasons(missing: list[dict[str, str]]) -> str:
    """'2 image not found: a.jpg, b.jpg; 1 no prediction: c.jpg' (each list cut at MAX_LISTED)."""
    if not missing:
        return "none"
    groups: dict[str, list[str]] = {}
    for m in missing:
        groups.setdefault(reason_kind(m["reason"]), []).append(m["item"])
    return "; ".join(f"{len(items)} {kind}: {listed(items)}" for kind, items in groups.items())


def reason_kind(reason: str) -> str:
    if reason.startswith("image not found"):
        return "image not found"
    if reason == "no prediction":
        return "no prediction"
    return "failed"


def one_source(predictions: str | None, generate: GenerateConfig | None) -> None:
    if (predictions is None) == (generate is None):
        raise UsageError(
            "give either --model (to generate) or --predictions FILE (to score), not both or neither"
        )


def require_root(images: str | None, what: str) -> str:
    if not images:
        raise UsageError(f"{what} needs the image root: pass --images DIR")
    if not Path(images).is_dir():
        raise InputError(f"{images}: no such image directory")
    return images


def join_root(root: str | None, file: str) -> str:
    return os.path.join(root, file) if root else file


def abs_path(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def split_present(dataset: CaptionAnnotations, root: str):
    dataset.require_files()
    present, absent = [], []
    for image in dataset.images:
        (present if Path(join_root(root, image.file)).is_file() else absent).append(image)
    return present, absent


def warn_missing_images(absent, root: str) -> None:
    if absent:
        logger.warning(
            "%d image(s) not found under %s, left out: %s",
            len(absent),
            root,
            listed([im.file for im in absent]),
        )
