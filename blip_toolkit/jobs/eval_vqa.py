"""`blip eval vqa`: the official VQA accuracy, overall, per answer type and per question type, and
exact match (jobs/evaluate.py describes the steps every evaluation shares)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from blip_toolkit.engine.outputs import check_output_file
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.fsutil import sha256_file
from blip_toolkit.jobs.evaluate import (
    SCALE_NOTE,
    VqaEvalConfig,
    abs_path,
    decoding_options,
    generate_records,
    join_root,
    missing_reasons,
    missing_summary,
    one_source,
    report_header,
    require_root,
    save_records,
)
from blip_toolkit.metrics.annotations import (
    VqaAnnotations,
    listed,
    read_predictions,
    read_vqa_annotations,
    read_vqa_manifest,
)
from blip_toolkit.metrics.vqa_accuracy import ScoredQuestion, vqa_accuracy

logger = logging.getLogger("blip")


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
    one_source(config.predictions, config.generate)
    dataset = read_vqa_dataset(config)
    if config.save_predictions:
        check_output_file(config.save_predictions, overwrite=config.overwrite)
    missing: list[dict[str, str]] = []
    notes: list[str] = []
    report: dict[str, Any] = report_header("vqa", dataset.describe(), config.images)
    root = config.images if dataset.format == "vqav2" else None

    if config.generate is not None:
        if dataset.format == "vqav2":
            root = require_root(config.images, "--model")
            if dataset.image_pattern is None:
                raise UsageError(
                    f"{dataset.files[0]} has no data_subtype to name its images; pass --image-pattern "
                    "(e.g. 'COCO_val2014_{image_id:012d}.jpg')"
                )
        paths = {
            item.question_id: join_root(root, item.image) if root else item.image for item in dataset.items
        }
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
            save_records(
                config.save_predictions,
                [{"question_id": item.question_id, **record} for item, record in zip(present, records)],
            )
        answers: dict[str, str] = {}
        for item, record in zip(present, records):
            if "error" in record:
                missing.append({"item": item.question_id, "reason": record["error"]})
            else:
                answers[item.question_id] = record["answer"]
        report["model"] = {"source": config.generate.load.model, "family": family}
        report["decoding"] = decoding_options("vqa", config.generate, family)
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
        raise InputError(f"no question has an answer to score ({missing_reasons(missing)})")
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
        missing=missing_summary(missing, len(dataset.items), config.allow_missing),
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
        keys = [(abs_path(join_root(root, item.image) if root else item.image), item.question.strip())]
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
            (abs_path(str(image)), question),
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
