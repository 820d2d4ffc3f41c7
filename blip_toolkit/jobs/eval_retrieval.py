"""`blip eval retrieval`: LAVIS's protocol (ITC for all pairs, the top k_test re-ranked with ITM + ITC),
R@1/5/10 both directions (jobs/evaluate.py describes the steps every evaluation shares)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from blip_toolkit.config import parse_bytes
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.jobs.eval_itm_features import MAX_TEXT_TOKENS, MAX_WORDS, ItmModel, itm_ops, pre_caption
from blip_toolkit.jobs.evaluate import (
    K_TEST_COCO,
    K_TEST_FLICKR,
    RetrievalEvalConfig,
    join_root,
    missing_summary,
    report_header,
    require_root,
    split_present,
    warn_missing_images,
)
from blip_toolkit.metrics.annotations import (
    read_caption_annotations,
)
from blip_toolkit.metrics.recall import merge_identical_captions
from blip_toolkit.metrics.retrieval_protocol import SCORES, lavis_metrics, run_protocol
from blip_toolkit.models.device import resolve_device, resolve_dtype
from blip_toolkit.models.itm import ENC_TOKEN
from blip_toolkit.models.loading import load_model

logger = logging.getLogger("blip")


# ----------------------------------------------------------------------------- retrieval


def default_k_test(annotations: str) -> int:
    """LAVIS's k_test: 128 for Flickr30k (a file name containing 'flickr'), 256 otherwise (COCO)."""
    return K_TEST_FLICKR if "flickr" in Path(annotations).name.lower() else K_TEST_COCO


def evaluate_retrieval(config: RetrievalEvalConfig) -> dict[str, Any]:
    """Image-text retrieval recall as LAVIS publishes it (metrics/retrieval_protocol.py); the report."""
    if config.score not in SCORES:
        raise UsageError(f"--score {config.score!r}: use one of {', '.join(SCORES)}")
    dataset = read_caption_annotations(config.annotations)
    k_test = config.k_test if config.k_test is not None else default_k_test(config.annotations)
    if k_test < 1:
        raise UsageError(f"--k-test must be at least 1, got {k_test}")
    budget = parse_bytes(config.max_memory)
    root = require_root(config.images, "retrieval")
    present, absent = split_present(dataset, root)
    missing = [{"item": im.file, "reason": "image not found"} for im in absent]
    warn_missing_images(absent, root)
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
    captions = [c for im in present for c in im.captions]
    caption_image = torch.tensor([i for i, im in enumerate(present) for _ in im.captions], dtype=torch.int64)
    if config.dedupe_captions:
        first, pair_image, pair_text = merge_identical_captions(
            [pre_caption(c) for c in captions], caption_image
        )
        texts = [captions[i] for i in first]
    else:
        texts, pair_image, pair_text = captions, caption_image, torch.arange(len(captions))
    scorer.encode_texts(texts)
    encoded_images = scorer.encode_images([join_root(root, im.file) for im in present])
    if encoded_images.failed:
        for index, error in encoded_images.failed.items():
            missing.append({"item": present[index].file, "reason": error})
        logger.warning("%d image(s) could not be read and are left out", len(encoded_images.failed))
        keep = torch.ones(len(present), dtype=torch.bool)
        keep[list(encoded_images.failed)] = False
        kept_pairs = keep[pair_image]
        keep_texts = torch.zeros(len(texts), dtype=torch.bool)
        keep_texts[pair_text[kept_pairs]] = True  # a text stays while one of its images does
        scorer.restrict(keep, keep_texts)
        pair_image = (torch.cumsum(keep.long(), 0) - 1)[pair_image[kept_pairs]]
        pair_text = (torch.cumsum(keep_texts.long(), 0) - 1)[pair_text[kept_pairs]]
        present = [im for i, im in enumerate(present) if keep[i]]
        texts = [t for t, k in zip(texts, keep_texts.tolist()) if k]
        if not present:
            raise InputError(f"none of the images of {dataset.path} could be read")
    encode_seconds = time.perf_counter() - started
    image_feat, text_feat = scorer.image_feat, scorer.text_feat
    result = run_protocol(
        image_feat,
        text_feat,
        None,
        scorer.similarity,
        scorer.itm_scores,
        score=config.score,
        k_test=k_test,
        scores_per_pair=scorer.scores_per_pair,
        max_memory_bytes=max(16 << 20, budget // 8),
        positives=(pair_image, pair_text),
    )
    total_seconds = time.perf_counter() - started
    num_images, num_texts = len(present), len(texts)
    report = report_header("retrieval", dataset.describe(), config.images)
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
            "dedupe_captions": config.dedupe_captions,
        },
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        seconds={"encode": encode_seconds, "total": total_seconds},
        vision_passes=scorer.vision_passes,
        comparable=True,
        scored={"images": num_images, "texts": num_texts},
        missing=missing_summary(missing, len(dataset.images), config.allow_missing),
        notes=[],
    )
    return report
