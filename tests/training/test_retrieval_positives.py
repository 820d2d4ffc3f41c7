"""Retrieval training with repeated captions: rows that share the image or the (normalised) text are
positives of each other, so an identical caption of another image is never used as a negative."""

from __future__ import annotations

import pytest
import torch
import transformers

from blip_toolkit.models.itm import ITM_OPS, itm_input_ids
from blip_toolkit.models.loading import FAMILIES
from blip_toolkit.training.data import make_examples
from blip_toolkit.training.modules import build_module, retrieval_positives


def test_examples_number_distinct_texts_after_normalisation():
    records = [
        {"image": f"{i}.jpg", "line": i + 1, "text": t}
        for i, t in enumerate(["A cat.", "a  cat", "a dog", "a cat"])
    ]
    examples = make_examples(records, "retrieval", FAMILIES["blip-itm"], prompt=None, template="{}")
    assert [e.text_id for e in examples] == [0, 0, 1, 0]
    assert [e.image_id for e in examples] == [0, 1, 2, 3]


def test_positives_are_same_image_or_same_text():
    image_ids = torch.tensor([0, 1, 2, 2])
    text_ids = torch.tensor([0, 0, 1, 2])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(retrieval_positives(image_ids, text_ids, image_ids, text_ids), expected)


@pytest.mark.parametrize("kind", ["blip-itm", "blip2-itm"])
def test_identical_texts_are_never_sampled_as_itm_negatives(tiny_models, sample_images, monkeypatch, kind):
    path = tiny_models[kind]
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    model_class = (
        transformers.BlipForImageTextRetrieval
        if kind == "blip-itm"
        else transformers.Blip2ForImageTextRetrieval
    )
    model = model_class.from_pretrained(path)
    module = build_module(
        "retrieval", model, FAMILIES[kind], frozen_parts=[], label_smoothing=0.0, temperature=0.07
    )
    from PIL import Image

    texts = ["a photo of a cat"] * 3 + ["a red car parked next to a tree"]
    encoded = processor.tokenizer(texts, padding=True, return_tensors="pt")
    batch = {
        "pixel_values": processor(
            images=[Image.open(p).convert("RGB") for p in sample_images[:4]], return_tensors="pt"
        )["pixel_values"],
        "input_ids": encoded["input_ids"],
        "itm_input_ids": itm_input_ids(kind, processor.tokenizer, encoded["input_ids"]),
        "attention_mask": encoded["attention_mask"],
        "image_id": torch.arange(4),
        "text_id": torch.tensor([0, 0, 0, 1]),
    }
    seen = []
    ops = ITM_OPS[kind]
    real_itm = ops.itm

    def recording_itm(model, image_embeds, input_ids, attention_mask):
        seen.append(input_ids.clone())
        return real_itm(model, image_embeds, input_ids, attention_mask)

    monkeypatch.setattr(ops, "itm", recording_itm)
    cat, car = batch["itm_input_ids"][0], batch["itm_input_ids"][3]
    for seed in range(20):
        module(batch, generator=torch.Generator().manual_seed(seed))
        ids = seen[-1]
        # rows 0..3 are the positives; rows 4..7 the negative texts of images 0..3
        negatives = ids[4:8]
        assert all(torch.equal(negatives[i], car) for i in range(3)), (
            "a cat image got 'a photo of a cat' as a negative"
        )
        assert torch.equal(negatives[3], cat)
