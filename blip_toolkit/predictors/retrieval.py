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

from typing import Any

import torch
from PIL import Image
from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

from blip_toolkit.data.batching import check_text
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.models.fast_attention import text_attention_is_fused
from blip_toolkit.models.itm import ITM_OPS, itm_input_ids
from blip_toolkit.predictors.generation import forbidden_tokens
from blip_toolkit.predictors.options import ITM_SCORES, RetrievalOptions


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


class RetrievalEncoder:
    """The DataLoader-worker half of retrieval: a decoded image -> its pixel values."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image, text=None) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.processor(images=[image], return_tensors="pt")["pixel_values"]}


class RetrievalTask:
    """Ranking of the candidate texts for each prepared image (see pipeline/stream.py)."""

    name = "retrieval"

    def __init__(self, runner, texts: list[str], options: RetrievalOptions):
        if not texts:
            raise InputError("no candidate texts given")
        loaded = runner.loaded
        self.texts, self.options = list(texts), options
        self.score_kind = resolve_score(loaded.family, options.score)
        if options.shortlist is not None and self.score_kind not in ("itm+itc", "itm"):
            raise UsageError(
                "--shortlist re-scores the best ITC texts with the ITM head: it needs an ITM checkpoint "
                "and --score itm+itc or itm"
            )
        forbidden = forbidden_tokens(loaded)
        for number, text in enumerate(texts, start=1):
            if not text.strip():
                raise InputError(f"candidate text {number} is empty")
            check_text(text, forbidden, what=f"candidate text {number}")
        self.encoder = RetrievalEncoder(loaded.processor)
        self.ranked_fields = ("rank", "text", "score", "probability") + (
            () if self.score_kind == "likelihood" else ("itm", "itc", "itm_probability")
        )
        self._cache: dict[
            str, Any
        ] = {}  # per model object: text features survive batches, not a CPU fallback

    def start(self) -> None:
        pass

    def group(self, item) -> int:
        return 0

    def run(self, runner, items: list) -> list[dict]:
        pixel_values = torch.cat([item.inputs["pixel_values"] for item in items])

        def score(loaded):
            scorer = _SCORERS[loaded.family.name]
            return scorer(
                loaded,
                pixel_values,
                self.texts,
                self.score_kind,
                self._cache,
                pair_batch=self.options.batch_size * 4,
                **({"shortlist": self.options.shortlist} if self.options.shortlist is not None else {}),
            )

        per_image = runner.run(score)
        return [{"results": _ranked(self.texts, columns)[: self.options.top]} for columns in per_image]

    def error_fields(self, item) -> dict:
        return {}


def _ranked(texts: list[str], columns: dict[str, Any]) -> list[dict]:
    """Entries of the texts that have a score (all, or a shortlist: NaN elsewhere), best first."""
    scores = columns["score"]
    scored = [i for i in range(len(texts)) if not torch.isnan(scores[i])]
    probabilities = torch.zeros_like(scores, dtype=torch.float64)
    probabilities[scored] = torch.softmax(scores[scored].double(), dim=0)
    # Stable sort: equal scores keep the order the texts were given in.
    order = sorted(scored, key=lambda i: -float(scores[i]))
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


def _pixels(loaded, pixel_values):
    return pixel_values.to(loaded.device, loaded.dtype)


def _tokens(loaded, texts):
    encoded = loaded.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return encoded["input_ids"].to(loaded.device), encoded["attention_mask"].to(loaded.device)


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


def _shortlist_pairs(itc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, text index) of each image's `k` texts of highest ITC ([I, T] -> two [I * k]),
    pairs of one image together."""
    k = min(k, itc.shape[1])
    text_index = itc.topk(k, dim=1).indices  # [I, k]
    image_index = torch.arange(itc.shape[0]).unsqueeze(1).expand(-1, k)
    return image_index.reshape(-1), text_index.reshape(-1)


def _score_itm(
    loaded, pixel_values, texts, score_kind, cache, *, pair_batch: int, shortlist: int | None = None
) -> list[dict]:
    """ITM checkpoints (BLIP and BLIP-2) through the one scorer (models/itm.py): text features once
    per model, image features per batch, the ITM head per (image, text) pair in chunks: every pair,
    or each image's `shortlist` texts of highest ITC (the other entries are NaN: not ranked)."""
    ops = ITM_OPS[loaded.family.name]
    model = loaded.model
    n_images = pixel_values.shape[0]
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
        image_embeds, image_feat = ops.image(model, _pixels(loaded, pixel_values))
        itc = ops.similarity(image_feat, cache["text_feat"]).float()
        itm = None
        if score_kind != "itc":
            itm = torch.full((n_images, len(texts), 2), float("nan"))
            if shortlist is None:
                images, chosen = _all_pairs(n_images, len(texts))
            else:
                images, chosen = _shortlist_pairs(itc.cpu(), shortlist)
            per_image = len(images) // max(1, n_images)
            if hasattr(ops, "itm_grouped") and text_attention_is_fused(model):
                # each image's keys / values projected once for all its texts (models/itm.py)
                for image_rows, pair_rows in _grouped_chunks(n_images, per_image, pair_batch):
                    txt_idx = chosen[pair_rows]
                    logits = ops.itm_grouped(
                        model,
                        image_embeds[image_rows],
                        cache["itm_ids"][txt_idx],
                        cache["attention_mask"][txt_idx],
                    )
                    itm[images[pair_rows], txt_idx] = logits.float().cpu()
            else:
                for start in range(0, len(images), pair_batch):
                    img_idx, txt_idx = images[start : start + pair_batch], chosen[start : start + pair_batch]
                    logits = ops.itm(
                        model,
                        image_embeds[img_idx],
                        cache["itm_ids"][txt_idx],
                        cache["attention_mask"][txt_idx],
                    )
                    itm[img_idx, txt_idx] = logits.float().cpu()
    return _columns(score_kind, itc.cpu(), itm)


def _all_pairs(n_images: int, n_texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, text index) of every pair, the texts of one image together."""
    return torch.arange(n_images).repeat_interleave(n_texts), torch.arange(n_texts).repeat(n_images)


def _grouped_chunks(n_images: int, per_image: int, pair_batch: int):
    """(image rows, pair rows) slices of ITM passes of about `pair_batch` pairs over pairs laid out
    `per_image` per image: whole images per pass, or parts of one image's texts when it has more."""
    if per_image <= pair_batch:
        step = max(1, pair_batch // per_image)
        for first in range(0, n_images, step):
            last = min(n_images, first + step)
            yield slice(first, last), slice(first * per_image, last * per_image)
        return
    for image in range(n_images):
        for start in range(0, per_image, pair_batch):
            stop = min(per_image, start + pair_batch)
            yield slice(image, image + 1), slice(image * per_image + start, image * per_image + stop)


def _score_blip2_likelihood(loaded, pixel_values, texts, score_kind, cache, *, pair_batch: int) -> list[dict]:
    """Generative BLIP-2 and InstructBLIP: mean log-likelihood per text token, given the image (and,
    for InstructBLIP, its instruction). The image features (Q-Former output projected into the LM)
    are computed once per image and reused for every text; the text inputs are built once per run."""
    model = loaded.model
    instruction = loaded.family.default_prompt if loaded.family.instruct else None
    if cache.get("model") is not model:
        cache.clear()
        chunks = [texts[start : start + pair_batch] for start in range(0, len(texts), pair_batch)]
        cache.update(
            model=model, chunks=[(c, _text_inputs(loaded.processor, model, c, instruction)) for c in chunks]
        )
    rows = []
    with torch.inference_mode():
        features = _image_features(loaded, pixel_values, instruction)
        for i in range(pixel_values.shape[0]):
            parts = [
                _mean_log_likelihood(
                    model,
                    inputs,
                    _expand_features(features, i, len(chunk)),
                    loaded.device,
                    instruct=instruction is not None,
                )
                for chunk, inputs in cache["chunks"]
            ]
            rows.append({"score": torch.cat(parts)})
    return rows


def _image_features(loaded, pixel_values, instruction: str | None):
    """The language model's image inputs; InstructBLIP's Q-Former reads the instruction as well."""
    count = pixel_values.shape[0]
    pixel_values = _pixels(loaded, pixel_values)
    if instruction is None:
        return loaded.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    qformer = loaded.processor.qformer_tokenizer([instruction] * count, return_tensors="pt")
    return loaded.model.get_image_features(
        pixel_values=pixel_values,
        qformer_input_ids=qformer["input_ids"].to(loaded.device),
        qformer_attention_mask=qformer["attention_mask"].to(loaded.device),
        return_dict=True,
    )


def _expand_features(features, index: int, n: int):
    pooled = features.pooler_output[index : index + 1].expand(n, -1, -1)
    return BaseModelOutputWithVisionQformerOutputs(pooler_output=pooled, last_hidden_state=None)


def _text_inputs(processor, model, texts: list[str], instruction: str | None = None) -> dict:
    """The token inputs of the likelihood pass for `texts` (after InstructBLIP's `instruction`); they
    do not depend on the image. The processor lays out the <image> placeholders only when it is given
    an image, so it gets a 1x1 one whose pixels are not used (the features come from the real image)."""
    placeholder = Image.new("RGB", (1, 1))
    if model.config.use_decoder_only_language_model:
        # <image> x Q, bos, (instruction,) text, right-padded: the text positions count from the left.
        joined = [f"{instruction} {t}" for t in texts] if instruction else texts
        encoded = processor(
            images=[placeholder], text=joined, padding=True, padding_side="right", return_tensors="pt"
        )
        prefix = (
            len(processor.tokenizer(instruction)["input_ids"]) if instruction else 1
        )  # bos (+ instruction)
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "text_start": model.config.num_query_tokens + prefix,
        }
    # Encoder: <image> x Q (+ instruction) (+ </s>); decoder: the text, scored as labels.
    encoded = processor(images=[placeholder], text=[instruction or ""] * len(texts), return_tensors="pt")
    labels = processor.tokenizer(texts, padding=True, return_tensors="pt")
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": labels["input_ids"],
        "label_mask": labels["attention_mask"],
    }


def _mean_log_likelihood(model, inputs: dict, image_features, device, *, instruct: bool = False):
    """Mean log p(text token | image, instruction, previous tokens) over each text's own tokens."""
    # InstructBLIP's forward takes the Q-Former text positionally; the features are given already.
    extra = {"qformer_input_ids": None} if instruct else {}
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs["attention_mask"].to(device)
    if model.config.use_decoder_only_language_model:
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
        text_start = inputs["text_start"]
        positions = torch.arange(targets.shape[1], device=device) + 1
        mask = (attention_mask[:, 1:] == 1) & (positions >= text_start).unsqueeze(0)
    else:
        mask = inputs["label_mask"].to(device) == 1
        label_ids = inputs["labels"].to(device).masked_fill(~mask, -100)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
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
