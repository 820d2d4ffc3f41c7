"""Image-text retrieval: rank candidate texts for each image.

Scores, per family:
- BLIP ITM and BLIP-2 ITM checkpoints: `itc` (cosine of the projected image and text embeddings;
  BLIP-2 takes the max over its query embeddings), `itm` (the image-text matching head's "match"
  logit), or `itm+itc` (their sum: LAVIS's re-ranking score, the default).
- Generative BLIP-2 (OPT, Flan-T5): the mean token log-likelihood of the text given the image.
- InstructBLIP (Flan-T5, Vicuna): the same, given the image and the captioning instruction, which
  both the Q-Former and the language model read (LAVIS's InstructBLIP ranks candidates this way:
  `predict_class` in blip2_vicuna_instruct.py / blip2_t5_instruct.py).

`probability` is the softmax of the scores over the candidate texts of one image.

Image features are computed once per image and text features once per run; only the ITM head and
the likelihood need one pass per (image, text) pair, done in batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, InputItem
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.runtime.batching import check_text, fixed_batches, jobs_from_items, load_images, prefetched
from blip_toolkit.runtime.generation import forbidden_tokens
from blip_toolkit.runtime.itm import ITM_OPS, itm_input_ids

ITM_SCORES = ("itm+itc", "itm", "itc")


@dataclass
class RetrievalOptions:
    score: str | None = None  # None: itm+itc for ITM checkpoints, likelihood for generative BLIP-2
    batch_size: int = 8  # images per vision pass; (image, text) pairs per ITM/likelihood pass = 4x this
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.score is not None and self.score not in ITM_SCORES + ("likelihood",):
            raise UsageError(f"--score {self.score!r}: use one of {', '.join(ITM_SCORES)} or likelihood")


def resolve_score(family, score: str | None) -> str:
    if family.name in ("blip-itm", "blip2-itm"):
        if score == "likelihood":
            raise UsageError(
                f"--score likelihood needs a generative BLIP-2 checkpoint; {family.label} "
                f"checkpoints score with {', '.join(ITM_SCORES)}"
            )
        return score or "itm+itc"
    if score not in (None, "likelihood"):
        raise UsageError(
            f"--score {score}: a {family.label} checkpoint has no ITM/ITC heads; it ranks texts by "
            "likelihood (use an ITM checkpoint such as Salesforce/blip-itm-base-coco for itm/itc)"
        )
    return "likelihood"


def rank_texts(runner, items: list[InputItem], texts: list[str], options: RetrievalOptions) -> Iterator[dict]:
    """Yield, per image in input order, `{"image", "results": [...]}` with one entry per text
    (`rank`, `text`, `score`, `probability`, and `itm`/`itc` where they apply), best first, or
    `{"image", "error"}`."""
    if not texts:
        raise InputError("no candidate texts given")
    loaded = runner.loaded
    score_kind = resolve_score(loaded.family, options.score)
    forbidden = forbidden_tokens(loaded)
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise InputError(f"candidate text {number} is empty")
        check_text(text, forbidden, what=f"candidate text {number}")

    text_cache: dict[str, Any] = {}  # per model object: text features survive batches, not a CPU fallback

    def score_batch(model, images):
        scorer = _SCORERS[model.family.name]
        return scorer(model, images, texts, score_kind, text_cache, pair_batch=options.batch_size * 4)

    jobs = jobs_from_items(items)
    for batch, failed in prefetched(
        fixed_batches(jobs, options.batch_size), lambda b: load_images(b, options.max_pixels)
    ):
        results: dict[int, dict] = {
            job.index: {"image": job.image_path, "error": job.error} for job in failed
        }
        if batch.jobs:
            per_image = runner.run(lambda model, images=batch.images: score_batch(model, images))
            for job, columns in zip(batch.jobs, per_image):
                results[job.index] = {"image": job.image_path, "results": _ranked(texts, columns)}
        for index in sorted(results):
            yield results[index]


def _ranked(texts: list[str], columns: dict[str, Any]) -> list[dict]:
    scores = columns["score"]
    probabilities = torch.softmax(scores.double(), dim=0)
    # Stable sort: equal scores keep the order the texts were given in.
    order = sorted(range(len(texts)), key=lambda i: -float(scores[i]))
    out = []
    for rank, i in enumerate(order, start=1):
        entry = {
            "rank": rank,
            "text": texts[i],
            "score": float(scores[i]),
            "probability": float(probabilities[i]),
        }
        for key in ("itm", "itc", "itm_probability"):
            if key in columns:
                entry[key] = float(columns[key][i])
        out.append(entry)
    return out


def _pixels(loaded, images):
    pixel_values = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values.to(loaded.device, loaded.dtype)


def _tokens(loaded, texts):
    encoded = loaded.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return encoded["input_ids"].to(loaded.device), encoded["attention_mask"].to(loaded.device)


def _pairs(n_images: int, n_texts: int, chunk: int):
    """(image index, text index) tensors over all pairs, in chunks."""
    image_index = torch.arange(n_images).repeat_interleave(n_texts)
    text_index = torch.arange(n_texts).repeat(n_images)
    for start in range(0, len(image_index), chunk):
        yield image_index[start : start + chunk], text_index[start : start + chunk]


def _columns(score_kind: str, itc, itm_logits) -> list[dict]:
    """Per image: score plus the parts it was made of. itc [I, T]; itm_logits [I, T, 2] or None."""
    rows = []
    for i in range(itc.shape[0]):
        row = {"itc": itc[i]}
        if itm_logits is not None:
            row["itm"] = itm_logits[i, :, 1]
            row["itm_probability"] = torch.softmax(itm_logits[i].float(), dim=-1)[:, 1]
        row["score"] = {
            "itc": itc[i],
            "itm": row.get("itm"),
            "itm+itc": None if itm_logits is None else row["itm"] + itc[i],
        }[score_kind]
        rows.append(row)
    return rows


def _score_itm(loaded, images, texts, score_kind, cache, *, pair_batch: int) -> list[dict]:
    """ITM checkpoints (BLIP and BLIP-2) through the one scorer (runtime/itm.py): text features once
    per model, image features per batch, the ITM head per (image, text) pair in chunks."""
    ops = ITM_OPS[loaded.family.name]
    model = loaded.model
    with torch.inference_mode():
        if cache.get("model") is not model:
            cache.clear()
            input_ids, attention_mask = _tokens(loaded, texts)
            cache.update(
                model=model,
                itm_ids=itm_input_ids(loaded.family.name, loaded.tokenizer, input_ids),
                attention_mask=attention_mask,
                text_feat=ops.text(model, input_ids, attention_mask),
            )
        image_embeds, image_feat = ops.image(model, _pixels(loaded, images))
        itc = ops.similarity(image_feat, cache["text_feat"]).float()
        itm = None
        if score_kind != "itc":
            itm = torch.empty(len(images), len(texts), 2)
            for img_idx, txt_idx in _pairs(len(images), len(texts), pair_batch):
                logits = ops.itm(
                    model,
                    image_embeds[img_idx],
                    cache["itm_ids"][txt_idx],
                    cache["attention_mask"][txt_idx],
                )
                itm[img_idx, txt_idx] = logits.float().cpu()
    return _columns(score_kind, itc.cpu(), itm)


def _score_blip2_likelihood(loaded, images, texts, score_kind, cache, *, pair_batch: int) -> list[dict]:
    """Generative BLIP-2 and InstructBLIP: mean log-likelihood per text token, given the image (and,
    for InstructBLIP, its instruction). The image features (Q-Former output projected into the LM)
    are computed once per image and reused for every text."""
    model = loaded.model
    processor = loaded.processor
    instruction = loaded.family.default_prompt if loaded.family.instruct else None
    rows = []
    with torch.inference_mode():
        features = _image_features(loaded, images, instruction)
        for i, image in enumerate(images):
            scores = torch.empty(len(texts))
            for start in range(0, len(texts), pair_batch):
                chunk = texts[start : start + pair_batch]
                image_features = _expand_features(features, i, len(chunk))
                scores[start : start + len(chunk)] = _mean_log_likelihood(
                    model, processor, image, chunk, image_features, loaded.device, instruction=instruction
                )
            rows.append({"score": scores})
    return rows


def _image_features(loaded, images, instruction: str | None):
    """The language model's image inputs; InstructBLIP's Q-Former reads the instruction as well."""
    pixel_values = _pixels(loaded, images)
    if instruction is None:
        return loaded.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    qformer = loaded.processor.qformer_tokenizer([instruction] * len(images), return_tensors="pt")
    return loaded.model.get_image_features(
        pixel_values=pixel_values,
        qformer_input_ids=qformer["input_ids"].to(loaded.device),
        qformer_attention_mask=qformer["attention_mask"].to(loaded.device),
        return_dict=True,
    )


def _expand_features(features, index: int, n: int):
    pooled = features.pooler_output[index : index + 1].expand(n, -1, -1)
    return BaseModelOutputWithVisionQformerOutputs(pooler_output=pooled, last_hidden_state=None)


def _mean_log_likelihood(model, processor, image, texts, image_features, device, *, instruction=None):
    """Mean log p(text token | image, instruction, previous tokens) over each text's own tokens."""
    # InstructBLIP's forward takes the Q-Former text positionally; the features are given already.
    extra = {"qformer_input_ids": None} if instruction is not None else {}
    if model.config.use_decoder_only_language_model:
        # <image> x Q, bos, (instruction,) text: the processor builds it, right-padded (the text
        # positions below count from the left); the image is not re-processed per text.
        prefix_length = (
            len(processor.tokenizer(instruction)["input_ids"]) if instruction else 1
        )  # bos (+ instruction)
        joined = [f"{instruction} {t}" for t in texts] if instruction else texts
        encoded = processor(
            images=[image], text=joined, padding=True, padding_side="right", return_tensors="pt"
        )
        input_ids = encoded["input_ids"].to(device)
        attention_mask = encoded["attention_mask"].to(device)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=None,
            mm_encoder_outputs={"image": image_features},
            **extra,
        ).logits.float()
        targets = input_ids[:, 1:]
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        # Score only the text: not the <image> placeholders, the bos, the instruction or the padding.
        text_start = model.config.num_query_tokens + prefix_length
        positions = torch.arange(targets.shape[1], device=device) + 1
        mask = (attention_mask[:, 1:] == 1) & (positions >= text_start).unsqueeze(0)
    else:
        # Encoder: <image> x Q (+ instruction) (+ </s>); decoder: the text, scored as labels.
        encoded = processor(images=[image], text=[instruction or ""] * len(texts), return_tensors="pt")
        labels = processor.tokenizer(texts, padding=True, return_tensors="pt")
        label_ids = labels["input_ids"].to(device)
        mask = labels["attention_mask"].to(device) == 1
        label_ids = label_ids.masked_fill(~mask, -100)
        logits = model(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            pixel_values=None,
            mm_encoder_outputs={"image": image_features},
            labels=label_ids,
            **extra,
        ).logits.float()
        log_probs = (
            torch.log_softmax(logits, dim=-1).gather(-1, label_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        )
    return ((log_probs * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).cpu()


_SCORERS = {
    "blip-itm": _score_itm,
    "blip2-itm": _score_itm,
    "blip2-opt": _score_blip2_likelihood,
    "blip2-t5": _score_blip2_likelihood,
    "instructblip-t5": _score_blip2_likelihood,
    "instructblip-vicuna": _score_blip2_likelihood,
}
