"""Retrieval scores equal the models' own forward passes (ITC and ITM heads) and, for generative
BLIP-2, the negative of transformers' own language-model loss; batching does not change them."""

from __future__ import annotations

import pytest
import torch
import transformers

from blip_toolkit.data.images import InputItem, open_image
from blip_toolkit.errors import UsageError
from blip_toolkit.jobs.predict import rank_texts
from blip_toolkit.models.loading import open_runner
from blip_toolkit.predictors.options import RetrievalOptions

TEXTS = ["a photo of a cat", "a dog", "two cats laying on a couch", "a red car parked next to a tree"]


def _by_text(record):
    return {r["text"]: r for r in record["results"]}


def _rank(tiny_models, sample_images, kind, score=None, batch_size=3, images=4):
    runner = open_runner(str(tiny_models[kind]), "retrieval", device="cpu")
    items = [InputItem(str(p)) for p in sample_images[:images]]
    return list(rank_texts(runner, items, TEXTS, RetrievalOptions(score=score, batch_size=batch_size)))


def _itm_inputs(processor, image, text):
    """BLIP's ITM input as LAVIS trains and evaluates it: the text's first token is [ENC], not [CLS]."""
    inputs = processor(images=image, text=text, return_tensors="pt")
    inputs["input_ids"][:, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    return inputs


def test_blip_itm_scores_equal_the_model_forward(tiny_models, sample_images):
    path = tiny_models["blip-itm"]
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    model = transformers.BlipForImageTextRetrieval.from_pretrained(path).eval()
    records = _rank(tiny_models, sample_images, "blip-itm")
    for record, image_path in zip(records, sample_images):
        image = open_image(image_path)
        with torch.no_grad():
            itc = model(
                **processor(images=image, text=TEXTS, padding=True, return_tensors="pt"), use_itm_head=False
            ).itm_score[0]
            itm = torch.stack([model(**_itm_inputs(processor, image, t)).itm_score[0] for t in TEXTS])
        got = _by_text(record)
        for i, text in enumerate(TEXTS):
            assert got[text]["itc"] == pytest.approx(float(itc[i]), abs=1e-5)
            assert got[text]["itm"] == pytest.approx(float(itm[i, 1]), abs=1e-5)
            assert got[text]["score"] == pytest.approx(float(itm[i, 1] + itc[i]), abs=1e-5)
            assert got[text]["itm_probability"] == pytest.approx(float(itm[i].softmax(-1)[1]), abs=1e-5)
        assert [r["rank"] for r in record["results"]] == [1, 2, 3, 4]
        scores = [r["score"] for r in record["results"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(r["probability"] for r in record["results"]) == pytest.approx(1.0)


def test_blip2_itm_scores_equal_the_model_forward(tiny_models, sample_images):
    path = tiny_models["blip2-itm"]
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(path).eval()
    records = _rank(tiny_models, sample_images, "blip2-itm")
    for record, image_path in zip(records, sample_images):
        image = open_image(image_path)
        with torch.no_grad():
            itc = model(
                **processor(images=image, text=TEXTS, padding=True, return_tensors="pt")
            ).logits_per_image[0]
            itm = torch.stack(
                [
                    model(
                        **processor(images=image, text=t, return_tensors="pt"),
                        use_image_text_matching_head=True,
                    ).logits_per_image[0]
                    for t in TEXTS
                ]
            )
        got = _by_text(record)
        for i, text in enumerate(TEXTS):
            assert got[text]["itc"] == pytest.approx(float(itc[i]), abs=1e-5)
            assert got[text]["itm"] == pytest.approx(float(itm[i, 1]), abs=1e-5)


@pytest.mark.parametrize("kind", ["blip2-opt", "blip2-t5"])
def test_generative_blip2_scores_are_mean_token_log_likelihoods(tiny_models, sample_images, kind):
    path = tiny_models[kind]
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(path).eval()
    num_queries = model.config.num_query_tokens
    records = _rank(tiny_models, sample_images, kind, images=2)
    for record, image_path in zip(records, sample_images):
        image = open_image(image_path)
        got = _by_text(record)
        for text in TEXTS:
            # Reference: transformers' own loss (mean NLL of the text tokens), one text at a time.
            with torch.no_grad():
                if kind == "blip2-opt":
                    inputs = processor(images=image, text=text, return_tensors="pt")
                    labels = inputs["input_ids"].clone()
                    labels[:, : num_queries + 1] = -100  # not the <image> placeholders, not the bos
                else:
                    inputs = processor(images=image, text="", return_tensors="pt")
                    labels = processor.tokenizer(text, return_tensors="pt")["input_ids"]
                loss = model(**inputs, labels=labels).loss
            assert got[text]["score"] == pytest.approx(-float(loss), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("kind", ["blip-itm", "blip2-itm", "blip2-opt"])
def test_batching_does_not_change_scores(tiny_models, sample_images, kind):
    batched = _rank(tiny_models, sample_images, kind, batch_size=4, images=4)
    single = _rank(tiny_models, sample_images, kind, batch_size=1, images=4)
    for a, b in zip(batched, single):
        for x, y in zip(a["results"], b["results"]):
            assert x["text"] == y["text"]
            assert x["score"] == pytest.approx(y["score"], abs=1e-5)


def test_score_choice_and_family_mismatch(tiny_models, sample_images):
    itc_only = _rank(tiny_models, sample_images, "blip-itm", score="itc", images=1)[0]
    assert all("itm" not in r and r["score"] == r["itc"] for r in itc_only["results"])
    with pytest.raises(UsageError, match="likelihood"):
        _rank(tiny_models, sample_images, "blip2-opt", score="itm", images=1)
