"""`blip eval caption`: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap (jobs/evaluate.py describes
the steps every evaluation shares)."""

from __future__ import annotations

import logging
import time
from typing import Any

from blip_toolkit.engine.outputs import check_output_file
from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import sha256_file
from blip_toolkit.jobs.evaluate import (
    SCALE_NOTE,
    CaptionEvalConfig,
    decoding_options,
    generate_records,
    join_root,
    missing_reasons,
    missing_summary,
    one_source,
    report_header,
    require_root,
    save_records,
    split_present,
    warn_missing_images,
)
from blip_toolkit.metrics.annotations import (
    CaptionAnnotations,
    ImageKeys,
    listed,
    read_caption_annotations,
    read_predictions,
)
from blip_toolkit.metrics.caption_metrics import require_java, score_captions

logger = logging.getLogger("blip")


# ----------------------------------------------------------------------------- caption


def evaluate_caption(config: CaptionEvalConfig) -> dict[str, Any]:
    """Caption metrics (pycocoevalcap) of a model's or a file's captions; the report dict."""
    one_source(config.predictions, config.generate)
    dataset = read_caption_annotations(config.annotations)
    if config.java:
        require_java()  # before any generation: fail in a second, not after an hour of captioning
    if config.save_predictions:
        check_output_file(config.save_predictions, overwrite=config.overwrite)
    missing: list[dict[str, str]] = []
    notes: list[str] = []
    report: dict[str, Any] = report_header("caption", dataset.describe(), config.images)

    if config.generate is not None:
        root = require_root(config.images, "--model")
        present, absent = split_present(dataset, root)
        missing += [{"item": im.file, "reason": "image not found"} for im in absent]
        warn_missing_images(absent, root)
        started = time.perf_counter()
        family, records = generate_records(
            "caption", config.generate, [join_root(root, im.file) for im in present]
        )
        records = list(records)
        report["generation_seconds"] = time.perf_counter() - started
        if config.save_predictions:
            save_records(config.save_predictions, records)
        predictions = {}
        for image, record in zip(present, records):
            if "error" in record:
                missing.append({"item": image.file, "reason": record["error"]})
            else:
                predictions[image.id] = record["caption"]
        report["model"] = {"source": config.generate.load.model, "family": family}
        report["decoding"] = decoding_options("caption", config.generate, family)
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
        raise InputError(f"no image of {dataset.path} has a caption to score ({missing_reasons(missing)})")
    scores = score_captions(dataset.references(), predictions, java=config.java)
    notes += scores.notes
    report.update(
        scale=SCALE_NOTE,
        metrics=scores.metrics,
        comparable=scores.comparable,
        tokenizer=scores.tokenizer,
        scored=len(predictions),
        missing=missing_summary(missing, len(dataset.images), config.allow_missing),
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
