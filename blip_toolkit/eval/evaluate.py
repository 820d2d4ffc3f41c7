"""`blip eval caption | vqa | retrieval`: one evaluation end to end, from the dataset files (and a
model or a predictions file) to the report dict that the CLI prints and `--out` writes.

Each evaluation:

1. reads and checks the annotations (eval/annotations.py), before any model loads;
2. gets the predictions: from `--predictions FILE`, or by generating them with `--model` through
   `generate_records` (the one place that runs a model for captions / answers), optionally saved
   with `--save-predictions` so they can be scored again;
3. scores them (eval/caption_metrics.py, eval/vqa_accuracy.py, or the retrieval protocol of
   eval/retrieval_protocol.py over eval/itm_features.py);
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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from blip_toolkit import __version__
from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, InputItem
from blip_toolkit.engine.outputs import check_output_file
from blip_toolkit.errors import InputError, PartialFailure, UsageError
from blip_toolkit.eval.annotations import (
    MAX_LISTED,
    CaptionAnnotations,
    ImageKeys,
    VqaAnnotations,
    listed,
    read_caption_annotations,
    read_predictions,
    read_vqa_annotations,
    read_vqa_manifest,
)
from blip_toolkit.eval.caption_metrics import pycocoevalcap_version, require_java, score_captions
from blip_toolkit.eval.itm_features import MAX_TEXT_TOKENS, MAX_WORDS, ItmModel, itm_ops
from blip_toolkit.eval.recall import parse_bytes
from blip_toolkit.eval.retrieval_protocol import SCORES, lavis_metrics, run_protocol
from blip_toolkit.eval.vqa_accuracy import ScoredQuestion, vqa_accuracy
from blip_toolkit.fsutil import atomic_write, sha256_file
from blip_toolkit.runtime.caption import CaptionOptions, caption_images
from blip_toolkit.runtime.device import resolve_device, resolve_dtype
from blip_toolkit.runtime.generation import GenerationOptions
from blip_toolkit.runtime.itm import ENC_TOKEN
from blip_toolkit.runtime.loading import load_model, open_runner
from blip_toolkit.runtime.vqa import DEFAULT_TEMPLATE, VqaOptions, answer_questions

logger = logging.getLogger("blip")

SCALE_NOTE = "scores are x100, as papers report them"
# BLIP's published captioning setting (LAVIS blip_caption_base_coco: beams 3, max_len 20, min_len 5,
# prompt "a picture of "). LAVIS's lengths count the decoder's [DEC] start token and the 3 prompt
# tokens, so they are 16 and 1 new tokens.
CAPTION_PROMPT = "a picture of "
CAPTION_BEAMS = 3
CAPTION_MAX_NEW_TOKENS = 16
CAPTION_MIN_NEW_TOKENS = 1
# LAVIS blip_vqav2 generation: beams 3, max_len 10, min_len 1 (answer tokens).
VQA_BEAMS = 3
VQA_MAX_NEW_TOKENS = 10
VQA_MIN_NEW_TOKENS = 1
# LAVIS's k_test: 256 for COCO, 128 for Flickr30k.
K_TEST_COCO = 256
K_TEST_FLICKR = 128


@dataclass
class GenerateConfig:
    """How `--model` generates (the same options as `blip caption` / `blip vqa`)."""

    model: str
    prompt: str | None = None  # caption prompt (the caption continues it)
    template: str = DEFAULT_TEMPLATE  # VQA, BLIP-2 only
    num_beams: int = 1
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    trust_remote_code: bool = False

    def generation(self) -> GenerationOptions:
        return GenerationOptions(
            max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, num_beams=self.num_beams
        )


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


# ----------------------------------------------------------------------------- generation


def generate_records(
    task: str, config: GenerateConfig, images: list[str], questions: list[str] | None = None
) -> tuple[str, Iterator[dict]]:
    """Captions (task "caption") or answers ("vqa") for `images` with the model and decoding options
    of `config`: (the checkpoint's family name, records in input order, `{"image", "caption"}` /
    `{"image", "question", "answer"}` or with an `"error"`). The one place that generates."""
    runner = open_runner(
        config.model,
        task,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
    )
    items = [InputItem(path) for path in images]
    family = runner.loaded.family.name
    if task == "caption":
        options = CaptionOptions(
            prompt=config.prompt or None,
            batch_size=config.batch_size,
            max_pixels=config.max_pixels,
            generation=config.generation(),
        )
        return family, caption_images(runner, items, options)
    options = VqaOptions(
        template=config.template,
        batch_size=config.batch_size,
        max_pixels=config.max_pixels,
        generation=config.generation(),
    )
    return family, answer_questions(runner, items, list(questions or []), options)


def _save_records(path: str, records: list[dict]) -> None:
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _decoding(task: str, config: GenerateConfig, family: str) -> dict[str, Any]:
    out = asdict(config)
    for key in ("model", "device", "dtype", "batch_size", "max_pixels", "trust_remote_code"):
        out.pop(key)
    if task == "caption":
        out.pop("template")
    else:
        out.pop("prompt")
        if not family.startswith("blip2"):
            out["template"] = None  # BLIP VQA checkpoints take the bare question
    out["sample"] = False
    return out


# ----------------------------------------------------------------------------- caption


def evaluate_caption(config: CaptionEvalConfig) -> dict[str, Any]:
    """Caption metrics (pycocoevalcap) of a model's or a file's captions; the report dict."""
    _one_source(config.predictions, config.generate)
    dataset = read_caption_annotations(config.annotations)
    if config.java:
        require_java()  # before any generation: fail in a second, not after an hour of captioning
    if config.save_predictions:
        check_output_file(config.save_predictions, overwrite=config.overwrite)
    missing: list[dict[str, str]] = []
    notes: list[str] = []
    report: dict[str, Any] = _header("caption", dataset.describe(), config.images)

    if config.generate is not None:
        root = _require_root(config.images, "--model")
        present, absent = _split_present(dataset, root)
        missing += [{"item": im.file, "reason": "image not found"} for im in absent]
        _warn_missing_images(absent, root)
        started = time.perf_counter()
        family, records = generate_records(
            "caption", config.generate, [_join(root, im.file) for im in present]
        )
        records = list(records)
        report["generation_seconds"] = time.perf_counter() - started
        if config.save_predictions:
            _save_records(config.save_predictions, records)
        predictions = {}
        for image, record in zip(present, records):
            if "error" in record:
                missing.append({"item": image.file, "reason": record["error"]})
            else:
                predictions[image.id] = record["caption"]
        report["model"] = {"source": config.generate.model, "family": family}
        report["decoding"] = _decoding("caption", config.generate, family)
        report["predictions"] = {"saved_to": config.save_predictions} if config.save_predictions else None
    else:
        predictions, unmatched, failed = _caption_predictions(dataset, config.predictions, config.images)
        report["predictions"] = {"file": config.predictions, "sha256": sha256_file(config.predictions)}
        report["model"] = None
        report["decoding"] = None
        if unmatched:
            notes.append(f"{len(unmatched)} prediction(s) name no image of the annotations and were ignored")
            logger.warning(
                "%s: %d prediction(s) name no image of %s and are ignored: %s",
                config.predictions,
                len(unmatched),
                dataset.path,
                listed(unmatched),
            )
        failed_by_id = dict(failed)
        for image in dataset.images:
            if image.id not in predictions:
                reason = failed_by_id.get(image.id, "no prediction")
                missing.append({"item": image.file or image.id, "reason": reason})

    if not predictions:
        raise InputError(f"no image of {dataset.path} has a caption to score ({_reasons(missing)})")
    scores = score_captions(dataset.references(), predictions, java=config.java)
    notes += scores.notes
    report.update(
        scale=SCALE_NOTE,
        metrics=scores.metrics,
        comparable=scores.comparable,
        tokenizer=scores.tokenizer,
        scored=len(predictions),
        missing=_missing(missing, len(dataset.images), config.allow_missing),
        notes=notes,
    )
    return report


def _caption_predictions(dataset: CaptionAnnotations, path: str, root: str | None):
    """({image id: caption}, unmatched image names, [(image id, error)] of failed records)."""
    preds = read_predictions(path, "caption", id_key="image")
    keys = ImageKeys([im.id for im in dataset.images], [im.file for im in dataset.images], root)
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    unmatched: list[str] = []
    for p in preds.records:
        image_id = keys.find(p.record.get("image_id")) or keys.find(p.record.get("image"))
        if image_id is None:
            unmatched.append(str(p.record.get("image", p.record.get("image_id"))))
            continue
        if image_id in out:
            raise InputError(
                f"{path}:{p.line}: a second caption for image {image_id!r} (first at line {first_line[image_id]})"
            )
        out[image_id] = p.record["caption"]
        first_line[image_id] = p.line
    failed = []
    for p in preds.failed:
        image_id = keys.find(p.record.get("image_id")) or keys.find(p.record.get("image"))
        if image_id is not None and image_id not in out:
            failed.append((image_id, str(p.record["error"])))
    return out, unmatched, failed


# ----------------------------------------------------------------------------- VQA


def read_vqa_dataset(config: VqaEvalConfig) -> VqaAnnotations:
    if config.manifest and (config.questions or config.annotations):
        raise UsageError("give --manifest or --questions with --annotations, not both")
    if config.manifest:
        return read_vqa_manifest(config.manifest)
    if not (config.questions and config.annotations):
        raise UsageError("give --questions and --annotations (VQAv2 files), or --manifest FILE.tsv")
    return read_vqa_annotations(config.questions, config.annotations, image_pattern=config.image_pattern)


def evaluate_vqa(config: VqaEvalConfig) -> dict[str, Any]:
    """Official VQA accuracy of a model's or a file's answers; the report dict."""
    _one_source(config.predictions, config.generate)
    dataset = read_vqa_dataset(config)
    if config.save_predictions:
        check_output_file(config.save_predictions, overwrite=config.overwrite)
    missing: list[dict[str, str]] = []
    notes: list[str] = []
    report: dict[str, Any] = _header("vqa", dataset.describe(), config.images)
    root = config.images if dataset.format == "vqav2" else None

    if config.generate is not None:
        if dataset.format == "vqav2":
            root = _require_root(config.images, "--model")
            if dataset.image_pattern is None:
                raise UsageError(
                    f"{dataset.files[0]} has no data_subtype to name its images; pass --image-pattern "
                    "(e.g. 'COCO_val2014_{image_id:012d}.jpg')"
                )
        paths = {item.question_id: _join(root, item.image) if root else item.image for item in dataset.items}
        present = [item for item in dataset.items if Path(paths[item.question_id]).is_file()]
        absent = [item for item in dataset.items if not Path(paths[item.question_id]).is_file()]
        missing += [
            {"item": item.question_id, "reason": f"image not found: {paths[item.question_id]}"}
            for item in absent
        ]
        if absent:
            images = sorted({paths[item.question_id] for item in absent})
            logger.warning(
                "%d image(s) not found, their questions are left out: %s", len(images), listed(images)
            )
        started = time.perf_counter()
        family, records = generate_records(
            "vqa",
            config.generate,
            [paths[item.question_id] for item in present],
            [item.question for item in present],
        )
        records = list(records)
        report["generation_seconds"] = time.perf_counter() - started
        if config.save_predictions:
            _save_records(
                config.save_predictions,
                [{"question_id": item.question_id, **record} for item, record in zip(present, records)],
            )
        answers: dict[str, str] = {}
        for item, record in zip(present, records):
            if "error" in record:
                missing.append({"item": item.question_id, "reason": record["error"]})
            else:
                answers[item.question_id] = record["answer"]
        report["model"] = {"source": config.generate.model, "family": family}
        report["decoding"] = _decoding("vqa", config.generate, family)
        report["predictions"] = {"saved_to": config.save_predictions} if config.save_predictions else None
    else:
        answers, unmatched, failed = _vqa_predictions(dataset, config.predictions, root)
        report["model"] = None
        report["decoding"] = None
        report["predictions"] = {"file": config.predictions, "sha256": sha256_file(config.predictions)}
        if unmatched:
            notes.append(f"{len(unmatched)} prediction(s) match no question and were ignored")
            logger.warning(
                "%s: %d prediction(s) match no question and are ignored: %s",
                config.predictions,
                len(unmatched),
                listed(unmatched),
            )
        failed_by_id = dict(failed)
        for item in dataset.items:
            if item.question_id not in answers:
                missing.append(
                    {"item": item.question_id, "reason": failed_by_id.get(item.question_id, "no prediction")}
                )

    if not answers:
        raise InputError(f"no question has an answer to score ({_reasons(missing)})")
    scored = [item for item in dataset.items if item.question_id in answers]
    few = sum(1 for item in scored if len(item.answers) < 10)
    if few:
        note = (
            f"{few} of {len(scored)} questions have fewer than 10 human answers; the VQA metric assumes 10 "
            "(with one answer it is 0 whatever the prediction): compare exact_match for such data"
        )
        notes.append(note)
        logger.warning(note)
    result = vqa_accuracy(
        ScoredQuestion(
            question_id=item.question_id,
            prediction=answers[item.question_id],
            answers=item.answers,
            answer_type=item.answer_type,
            question_type=item.question_type,
            multiple_choice_answer=item.multiple_choice_answer,
        )
        for item in scored
    )
    result.pop("per_question")
    report.update(
        scale=SCALE_NOTE,
        metrics=result,
        comparable=True,
        scored=len(scored),
        missing=_missing(missing, len(dataset.items), config.allow_missing),
        notes=notes,
    )
    return report


def _vqa_predictions(dataset: VqaAnnotations, path: str, root: str | None):
    """({question_id: answer}, unmatched descriptions, [(question_id, error)])."""
    preds = read_predictions(path, "answer", id_key="question_id")
    by_id = {item.question_id: item for item in dataset.items}
    by_pair: dict[tuple[str, str], str | None] = {}
    for item in dataset.items:
        if item.image is None:
            continue
        keys = [(_abs_path(_join(root, item.image) if root else item.image), item.question.strip())]
        keys.append((item.image, item.question.strip()))
        keys.append((os.path.basename(item.image), item.question.strip()))
        for key in keys:
            # an (image, question) pair asked twice cannot say which one a prediction answers
            by_pair[key] = None if key in by_pair and by_pair[key] != item.question_id else item.question_id

    def find(record: dict) -> str | None:
        if record.get("question_id") is not None:
            qid = str(record["question_id"])
            return qid if qid in by_id else None
        image, question = record.get("image"), record.get("question")
        if image is None or question is None:
            return None
        question = str(question).strip()
        for key in (
            (_abs_path(str(image)), question),
            (str(image), question),
            (os.path.basename(str(image)), question),
        ):
            if by_pair.get(key):
                return by_pair[key]
        return None

    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    unmatched: list[str] = []
    for p in preds.records:
        qid = find(p.record)
        if qid is None:
            unmatched.append(_describe_vqa_record(p.record))
            continue
        if qid in out:
            raise InputError(
                f"{path}:{p.line}: a second answer for question {qid} (first at line {first_line[qid]})"
            )
        out[qid] = p.record["answer"]
        first_line[qid] = p.line
    failed = []
    for p in preds.failed:
        qid = find(p.record)
        if qid is not None and qid not in out:
            failed.append((qid, str(p.record["error"])))
    return out, unmatched, failed


def _describe_vqa_record(record: dict) -> str:
    if record.get("question_id") is not None:
        return f"question_id {record['question_id']}"
    return f"{record.get('image')!s}: {record.get('question')!s}"


# ----------------------------------------------------------------------------- retrieval


def default_k_test(annotations: str) -> int:
    """LAVIS's k_test: 128 for Flickr30k (a file name containing 'flickr'), 256 otherwise (COCO)."""
    return K_TEST_FLICKR if "flickr" in Path(annotations).name.lower() else K_TEST_COCO


def evaluate_retrieval(config: RetrievalEvalConfig) -> dict[str, Any]:
    """Image-text retrieval recall as LAVIS publishes it (eval/retrieval_protocol.py); the report."""
    if config.score not in SCORES:
        raise UsageError(f"--score {config.score!r}: use one of {', '.join(SCORES)}")
    dataset = read_caption_annotations(config.annotations)
    k_test = config.k_test if config.k_test is not None else default_k_test(config.annotations)
    if k_test < 1:
        raise UsageError(f"--k-test must be at least 1, got {k_test}")
    budget = parse_bytes(config.max_memory)
    root = _require_root(config.images, "retrieval")
    present, absent = _split_present(dataset, root)
    missing = [{"item": im.file, "reason": "image not found"} for im in absent]
    _warn_missing_images(absent, root)
    if not present:
        raise InputError(f"none of the {len(dataset.images)} images of {dataset.path} is under {root}")

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    loaded = load_model(
        config.model, "retrieval", device=device, dtype=dtype, trust_remote_code=config.trust_remote_code
    )
    itm_ops(loaded.family)  # refuse generative checkpoints before encoding anything
    scorer = ItmModel(
        loaded,
        batch_size=config.batch_size,
        itm_batch_size=config.itm_batch_size or 4 * config.batch_size,
        max_pixels=config.max_pixels,
        cache_bytes=budget,
    )
    started = time.perf_counter()
    texts = [c for im in present for c in im.captions]
    text_image = torch.tensor([i for i, im in enumerate(present) for _ in im.captions], dtype=torch.int64)
    scorer.encode_texts(texts)
    encoded_images = scorer.encode_images([_join(root, im.file) for im in present])
    if encoded_images.failed:
        for index, error in encoded_images.failed.items():
            missing.append({"item": present[index].file, "reason": error})
        logger.warning("%d image(s) could not be read and are left out", len(encoded_images.failed))
        keep = torch.ones(len(present), dtype=torch.bool)
        keep[list(encoded_images.failed)] = False
        keep_texts = keep[text_image]
        new_index = torch.cumsum(keep.long(), 0) - 1
        scorer.restrict(keep, keep_texts)
        text_image = new_index[text_image[keep_texts]]
        present = [im for i, im in enumerate(present) if keep[i]]
        if not present:
            raise InputError(f"none of the images of {dataset.path} could be read")
    encode_seconds = time.perf_counter() - started
    image_feat, text_feat = scorer.image_feat, scorer.text_feat
    result = run_protocol(
        image_feat,
        text_feat,
        text_image.to(text_feat.device),
        scorer.similarity,
        scorer.itm_scores,
        score=config.score,
        k_test=k_test,
        scores_per_pair=scorer.scores_per_pair,
        max_memory_bytes=max(16 << 20, budget // 8),
    )
    total_seconds = time.perf_counter() - started
    num_images, num_texts = len(present), len(text_image)
    report = _header("retrieval", dataset.describe(), config.images)
    report.update(
        model={"source": config.model, "family": loaded.family.name},
        scale="recall in %, as LAVIS reports it (txt = image-to-text, img = text-to-image)",
        metrics=lavis_metrics(result.recall),
        recall=result.recall.to_dict(),
        protocol={
            "score": config.score,
            "k_test": k_test,
            "k_i2t": result.k_i2t,
            "k_t2i": result.k_t2i,
            "itm_pairs": result.itm_pairs,
            "shortlist_entries": result.shortlist_entries,
            "all_pairs": num_images * num_texts,
            "text_preprocessing": f'LAVIS pre_caption (lower-case, .!"()*#:;~ removed, <= {MAX_WORDS} words), '
            f"<= {MAX_TEXT_TOKENS} tokens",
            "itm_first_token": "[ENC]"
            if ENC_TOKEN in scorer.loaded.tokenizer.get_vocab() and scorer.loaded.family.name == "blip-itm"
            else "as tokenized",
            "ties": "pessimistic",
        },
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        seconds={"encode": encode_seconds, "total": total_seconds},
        vision_passes=scorer.vision_passes,
        comparable=True,
        scored={"images": num_images, "texts": num_texts},
        missing=_missing(missing, len(dataset.images), config.allow_missing),
        notes=[],
    )
    return report


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


def render_text(report: dict[str, Any]) -> list[str]:
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


def _header(task: str, dataset: dict[str, Any], images: str | None) -> dict[str, Any]:
    return {
        "task": task,
        "tool": {"name": "blip-toolkit", "version": __version__, "pycocoevalcap": pycocoevalcap_version()},
        "dataset": dataset,
        "images": images,
    }


def _missing(missing: list[dict[str, str]], total: int, allowed: bool) -> dict[str, Any]:
    return {
        "count": len(missing),
        "total": total,
        "allowed": allowed,
        "reasons": _reasons(missing),
        "items": missing[:MAX_LISTED],
    }


def _reasons(missing: list[dict[str, str]]) -> str:
    """'2 image not found: a.jpg, b.jpg; 1 no prediction: c.jpg' (each list cut at MAX_LISTED)."""
    if not missing:
        return "none"
    groups: dict[str, list[str]] = {}
    for m in missing:
        groups.setdefault(_reason_kind(m["reason"]), []).append(m["item"])
    return "; ".join(f"{len(items)} {kind}: {listed(items)}" for kind, items in groups.items())


def _reason_kind(reason: str) -> str:
    if reason.startswith("image not found"):
        return "image not found"
    if reason == "no prediction":
        return "no prediction"
    return "failed"


def _one_source(predictions: str | None, generate: GenerateConfig | None) -> None:
    if (predictions is None) == (generate is None):
        raise UsageError(
            "give either --model (to generate) or --predictions FILE (to score), not both or neither"
        )


def _require_root(images: str | None, what: str) -> str:
    if not images:
        raise UsageError(f"{what} needs the image root: pass --images DIR")
    if not Path(images).is_dir():
        raise InputError(f"{images}: no such image directory")
    return images


def _join(root: str | None, file: str) -> str:
    return os.path.join(root, file) if root else file


def _abs_path(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _split_present(dataset: CaptionAnnotations, root: str):
    dataset.require_files()
    present, absent = [], []
    for image in dataset.images:
        (present if Path(_join(root, image.file)).is_file() else absent).append(image)
    return present, absent


def _warn_missing_images(absent, root: str) -> None:
    if absent:
        logger.warning(
            "%d image(s) not found under %s, left out: %s",
            len(absent),
            root,
            listed([im.file for im in absent]),
        )
