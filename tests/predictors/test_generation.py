"""Captioning and VQA give exactly what a direct transformers call gives (greedy and beam search),
batched runs equal one-at-a-time runs, and prompts are removed at token level."""

from __future__ import annotations

import pytest
import torch
import transformers

from blip_toolkit.data.images import InputItem, open_image
from blip_toolkit.jobs.predict import answer_questions, caption_images
from blip_toolkit.models.loading import open_runner
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, VqaOptions

CLASSES = {
    "blip-caption": "BlipForConditionalGeneration",
    "blip-vqa": "BlipForQuestionAnswering",
    "blip2-opt": "Blip2ForConditionalGeneration",
    "blip2-t5": "Blip2ForConditionalGeneration",
}


def direct(path, kind):
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    model = getattr(transformers, CLASSES[kind]).from_pretrained(path).eval()
    return processor, model


def direct_generate(processor, model, image, text, **kwargs):
    """A plain transformers call. BLIP-2's generate cannot start a T5 decoder without a text input
    (its config has no bos), so BLIP-2 references pass the prompt or "" through the processor."""
    if text is None and isinstance(model, transformers.Blip2ForConditionalGeneration):
        text = ""
    inputs = (
        processor(images=image, text=text, return_tensors="pt")
        if text is not None
        else processor(images=image, return_tensors="pt")
    )
    with torch.no_grad():
        return inputs, model.generate(**inputs, **kwargs)[0]


@pytest.mark.parametrize("kind", ["blip-caption", "blip2-opt", "blip2-t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_equals_direct_call(tiny_models, sample_images, kind, num_beams):
    path = tiny_models[kind]
    processor, model = direct(path, kind)
    runner = open_runner(str(path), "caption", device="cpu")
    options = CaptionOptions(
        batch_size=3, generation=GenerationOptions(max_new_tokens=8, num_beams=num_beams)
    )
    ours = list(caption_images(runner, [InputItem(str(p)) for p in sample_images], options))
    expected = []
    for p in sample_images:
        _, out = direct_generate(processor, model, open_image(p), None, max_new_tokens=8, num_beams=num_beams)
        # Without a prompt the echoed prefix is only special tokens ([DEC], <image>, bos, decoder start).
        expected.append(processor.decode(out, skip_special_tokens=True).strip())
    assert [r["caption"] for r in ours] == expected
    assert [r["image"] for r in ours] == [str(p) for p in sample_images]
    assert len(set(expected)) > 1, "the tiny model should caption different photos differently"


@pytest.mark.parametrize("kind", ["blip-caption", "blip2-opt", "blip2-t5"])
def test_prompt_is_removed_at_token_level(tiny_models, sample_images, kind):
    path = tiny_models[kind]
    prompt = "a picture of"
    processor, model = direct(path, kind)
    runner = open_runner(str(path), "caption", device="cpu")
    ours = list(
        caption_images(
            runner,
            [InputItem(str(p)) for p in sample_images[:4]],
            CaptionOptions(prompt=prompt, generation=GenerationOptions(max_new_tokens=6)),
        )
    )
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for record, image_path in zip(ours, sample_images[:4]):
        inputs, out = direct_generate(processor, model, open_image(image_path), prompt, max_new_tokens=6)
        if kind == "blip2-t5":
            start = 1  # encoder-decoder: the prompt went to the encoder; the decoder starts fresh
        else:
            # BLIP echoes [DEC] + prompt; OPT returns every input id (<image> x Q, bos, prompt) first.
            start = inputs["input_ids"].shape[1] - (1 if kind == "blip-caption" else 0)
            assert out[start - len(prompt_ids) : start].tolist() == prompt_ids
        assert record["caption"] == processor.decode(out[start:], skip_special_tokens=True).strip()
        assert not record["caption"].startswith(prompt)


@pytest.mark.parametrize("kind", ["blip-vqa", "blip2-opt", "blip2-t5"])
def test_vqa_equals_direct_call_and_batching_does_not_change_answers(tiny_models, sample_images, kind):
    path = tiny_models[kind]
    processor, model = direct(path, kind)
    questions = [
        "what is this?",
        "how many dogs are there in the picture?",
        "what color is the car?",
        "what is it?",
        "what digit is this?",
        "is it red?",
    ]
    images = sample_images[: len(questions)]
    items = [InputItem(str(p)) for p in images]
    runner = open_runner(str(path), "vqa", device="cpu")
    options = VqaOptions(batch_size=4, generation=GenerationOptions(max_new_tokens=5))
    batched = [r["answer"] for r in answer_questions(runner, items, questions, options)]
    one_by_one = [
        r["answer"]
        for item, q in zip(items, questions)
        for r in answer_questions(
            runner, [item], [q], VqaOptions(batch_size=1, generation=options.generation)
        )
    ]
    assert batched == one_by_one

    expected = []
    for image_path, question in zip(images, questions):
        text = question if kind == "blip-vqa" else f"Question: {question} Answer:"
        inputs, out = direct_generate(processor, model, open_image(image_path), text, max_new_tokens=5)
        new = out[inputs["input_ids"].shape[1] :] if kind == "blip2-opt" else out
        expected.append(processor.decode(new, skip_special_tokens=True).strip())
    assert batched == expected


def test_sampling_is_reproducible_with_a_seed(tiny_models, sample_images):
    runner = open_runner(str(tiny_models["blip-caption"]), "caption", device="cpu")
    items = [InputItem(str(p)) for p in sample_images[:3]]

    def run(seed):
        options = CaptionOptions(
            generation=GenerationOptions(max_new_tokens=8, sample=True, top_p=0.9, temperature=1.5, seed=seed)
        )
        return [r["caption"] for r in caption_images(runner, items, options)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_bad_items_are_reported_in_place_and_the_rest_finish(tiny_models, sample_images, tmp_path):
    (tmp_path / "fake.jpg").write_text("not an image")
    items = [
        InputItem(str(sample_images[0])),
        InputItem(str(tmp_path / "fake.jpg")),
        InputItem("gone.jpg", "gone.jpg: no such file"),
        InputItem(str(sample_images[1])),
    ]
    runner = open_runner(str(tiny_models["blip-caption"]), "caption", device="cpu")
    records = list(
        caption_images(
            runner, items, CaptionOptions(batch_size=2, generation=GenerationOptions(max_new_tokens=4))
        )
    )
    assert [("caption" in r, "error" in r) for r in records] == [
        (True, False),
        (False, True),
        (False, True),
        (True, False),
    ]
    assert "not an image" in records[1]["error"]


def test_reserved_image_token_in_a_question_fails_that_item_only(tiny_models, sample_images):
    runner = open_runner(str(tiny_models["blip2-opt"]), "vqa", device="cpu")
    items = [InputItem(str(p)) for p in sample_images[:2]]
    records = list(
        answer_questions(
            runner,
            items,
            ["what is <image> this?", "what is this?"],
            VqaOptions(generation=GenerationOptions(max_new_tokens=3)),
        )
    )
    assert "<image>" in records[0]["error"] and "answer" in records[1]
