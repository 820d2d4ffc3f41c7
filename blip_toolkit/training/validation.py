"""Validation metrics of fine-tuning, computed with the code the commands use: greedy generation
through predictors/generation.py (`blip caption` / `blip vqa`) and ITC + ITM re-ranking through the one
scorer of models/itm.py (`blip retrieval`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from blip_toolkit.models.itm import ITM_OPS, itm_input_ids
from blip_toolkit.models.loading import LoadedModel
from blip_toolkit.predictors.generation import generate, prompt_length
from blip_toolkit.predictors.options import GenerationOptions
from blip_toolkit.training.data import Example, normalize_text


def _loaded(model, processor, family, device):
    return LoadedModel(
        source="<training>",
        family=family,
        model=model,
        processor=processor,
        device=device,
        dtype=next(model.parameters()).dtype,
    )


def generated_texts(
    model,
    processor,
    family,
    examples: list[Example],
    images: Callable[[Example], Any],
    *,
    prompt_of: Callable[[Example], str | None],
    max_new_tokens: int,
    batch_size: int,
    device,
) -> list[str]:
    """Greedy generation with the same code as `blip caption` / `blip vqa` (predictors/generation.py),
    in batches of equal prompt token length (so no prompt padding changes the output)."""
    loaded = _loaded(model, processor, family, device)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[prompt_length(loaded, prompt_of(e))].append(i)
    out: list[str] = [""] * len(examples)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts = [prompt_of(examples[i]) for i in chunk]
            texts = generate(
                loaded, [images(examples[i]) for i in chunk], prompts if prompts[0] else None, options
            )
            for i, text in zip(chunk, texts):
                out[i] = text
    return out


def exact_match(
    model,
    processor,
    family,
    examples: list[Example],
    images,
    *,
    max_new_tokens: int,
    batch_size: int,
    device,
) -> float:
    """Fraction of examples whose greedy caption / answer equals the target (after normalize_text).
    BLIP VQA checkpoints take the bare question (already in `prefix`)."""
    texts = generated_texts(
        model,
        processor,
        family,
        examples,
        images,
        prompt_of=lambda e: e.prefix or None,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
    )
    hits = sum(normalize_text(t) == normalize_text(e.target) for t, e in zip(texts, examples))
    return hits / max(len(examples), 1)


def recall_at_1(
    model, processor, family, examples: list[Example], images, *, batch_size: int, device, rerank: int = 16
) -> float:
    """Image-to-text recall@1 among all validation texts: ITC ranks every text, the top `rerank` are
    re-scored with ITM + ITC (LAVIS's protocol; `blip retrieval`'s default itm+itc score). A hit when
    the best text belongs to the image (any of its rows) or is identical to one of its texts."""
    ops = ITM_OPS[family.name]
    tokenizer = processor.tokenizer
    first_of_image: dict[int, Example] = {}
    for e in examples:
        first_of_image.setdefault(e.image_id, e)
    distinct = list(first_of_image.values())
    texts_of_image: dict[int, set[int]] = {}
    for e in examples:
        texts_of_image.setdefault(e.image_id, set()).add(e.text_id)
    with torch.no_grad():
        encoded = tokenizer(
            [e.target for e in examples], padding="longest", truncation=True, return_tensors="pt"
        )
        all_ids, all_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        itm_ids = itm_input_ids(family.name, tokenizer, all_ids)
        chunk = batch_size * 4
        text_feat = torch.cat(
            [
                ops.text(model, all_ids[i : i + chunk], all_mask[i : i + chunk])
                for i in range(0, len(examples), chunk)
            ]
        )  # [T, E]
        hits = 0
        k = min(rerank, len(examples))
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            pixels = processor(images=[images(e) for e in chunk], return_tensors="pt")["pixel_values"].to(
                device
            )
            image_embeds, image_feat = ops.image(model, pixels)
            itc = ops.similarity(image_feat, text_feat).float()  # [b, T]
            top = itc.topk(k, dim=1).indices  # [b, k]
            for row, e in enumerate(chunk):
                candidates = top[row]
                embeds = image_embeds[row : row + 1].expand(k, *image_embeds.shape[1:])
                itm = ops.itm(model, embeds, itm_ids[candidates], all_mask[candidates]).float()[:, 1]
                best = candidates[int(torch.argmax(itm + itc[row, candidates]))]
                hits += int(examples[int(best)].text_id in texts_of_image[e.image_id])
    return hits / max(len(distinct), 1)
