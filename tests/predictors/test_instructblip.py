"""InstructBLIP (Flan-T5 and Vicuna / LLaMA language models) through the same loading layer as BLIP-2:
family detection, captioning with the default instruction or --prompt, VQA and likelihood retrieval
give what a direct transformers call gives, and batched runs equal one-at-a-time runs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from blip_toolkit.data.images import InputItem, open_image
from blip_toolkit.errors import TaskNotSupportedError
from blip_toolkit.jobs.predict import answer_questions, caption_images, rank_texts
from blip_toolkit.models.loading import DEFAULT_INSTRUCTION, detect_family, inspect_source, open_runner
from blip_toolkit.predictors.generation import forbidden_tokens
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, RetrievalOptions, VqaOptions
from blip_toolkit.training.modules import check_trainable

KINDS = ["instructblip-t5", "instructblip-vicuna"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def direct(tiny_models):
    """kind -> (processor, model) loaded with plain transformers calls."""
    out = {}
    for kind in KINDS:
        path = tiny_models[kind]
        out[kind] = (
            transformers.AutoProcessor.from_pretrained(path, backend="pil"),
            transformers.InstructBlipForConditionalGeneration.from_pretrained(path).eval(),
        )
    return out


def direct_generate(processor, model, image, text, **kwargs) -> str:
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)[0]
    if model.config.use_decoder_only_language_model:
        out = out[inputs["input_ids"].shape[1] :]  # every input id comes back first
    return processor.decode(out, skip_special_tokens=True).strip()


def test_detected_from_config_json_with_both_tokenizers(tiny_models):
    for kind, decoder_only in (("instructblip-t5", False), ("instructblip-vicuna", True)):
        resolved, family = inspect_source(str(tiny_models[kind]))
        assert family.name == kind and family.instruct and family.is_blip2
        assert family.decoder_only is decoder_only
        assert family.tasks == ("caption", "vqa", "retrieval")
        config = json.loads((tiny_models[kind] / "config.json").read_text())
        assert config["model_type"] == "instructblip"
        processor = transformers.AutoProcessor.from_pretrained(tiny_models[kind], backend="pil")
        # The Q-Former's own BERT tokenizer, with [DEC] as bos, truncating from the left.
        assert processor.qformer_tokenizer.bos_token == "[DEC]"
        assert processor.qformer_tokenizer.truncation_side == "left"
        assert processor.tokenizer.truncation_side == "left"
    vicuna = transformers.AutoTokenizer.from_pretrained(tiny_models["instructblip-vicuna"])
    # InstructBLIP Vicuna: LLaMA ids <unk>=0 <s>=1 </s>=2, with </s> as bos and unk, [PAD] added.
    assert vicuna.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert vicuna.bos_token == vicuna.eos_token == vicuna.unk_token == "</s>"
    assert vicuna.pad_token == "[PAD]"
    assert vicuna("a cat")["input_ids"][0] == 2
    # A hub config.json names the language model only in text_config (no architectures needed).
    assert detect_family({"model_type": "instructblip", "text_config": {"model_type": "llama"}}).name == (
        "instructblip-vicuna"
    )
    assert detect_family({"model_type": "instructblip", "text_config": {"model_type": "t5"}}).name == (
        "instructblip-t5"
    )


def test_reserved_tokens_include_the_qformer_tokenizers(tiny_models):
    runner = open_runner(str(tiny_models["instructblip-t5"]), "caption", device="cpu")
    forbidden = forbidden_tokens(runner.loaded)
    assert "[DEC]" in forbidden and "[SEP]" in forbidden and "<image>" in forbidden


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_with_the_default_instruction_equals_direct_call(
    tiny_models, direct, sample_images, kind, num_beams
):
    processor, model = direct[kind]
    runner = open_runner(str(tiny_models[kind]), "caption", device="cpu")
    options = CaptionOptions(
        batch_size=3, generation=GenerationOptions(max_new_tokens=6, num_beams=num_beams)
    )
    images = sample_images[:5]
    ours = [r["caption"] for r in caption_images(runner, [InputItem(str(p)) for p in images], options)]
    expected = [
        direct_generate(
            processor, model, open_image(p), DEFAULT_INSTRUCTION, max_new_tokens=6, num_beams=num_beams
        )
        for p in images
    ]
    assert ours == expected
    assert len(set(expected)) > 1, "the tiny model should caption different photos differently"


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_is_the_instruction_and_is_not_repeated(tiny_models, direct, sample_images, kind):
    processor, model = direct[kind]
    runner = open_runner(str(tiny_models[kind]), "caption", device="cpu")
    prompt = "a picture of"
    images = sample_images[:3]
    ours = caption_images(
        runner,
        [InputItem(str(p)) for p in images],
        CaptionOptions(prompt=prompt, generation=GenerationOptions(max_new_tokens=5)),
    )
    expected = [direct_generate(processor, model, open_image(p), prompt, max_new_tokens=5) for p in images]
    assert [r["caption"] for r in ours] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_vqa_equals_direct_call_and_batching_does_not_change_answers(
    tiny_models, direct, sample_images, kind
):
    processor, model = direct[kind]
    # Questions whose language-model token counts tie while their Q-Former token counts differ
    # ("what color is the car?" / "what digit is this?" for T5, "how many dogs are there?" / "is it a
    # cat?" for Vicuna) must not be padded together: the grouping key has both lengths.
    questions = [
        "what is this?",
        "how many dogs are there?",
        "what color is the car?",
        "what is it?",
        "is it red?",
        "what digit is this?",
        "is it a cat?",
    ]
    images = sample_images[: len(questions)]
    items = [InputItem(str(p)) for p in images]
    runner = open_runner(str(tiny_models[kind]), "vqa", device="cpu")
    options = VqaOptions(batch_size=4, generation=GenerationOptions(max_new_tokens=4))
    batched = [r["answer"] for r in answer_questions(runner, items, questions, options)]
    one_by_one = [
        r["answer"]
        for item, q in zip(items, questions)
        for r in answer_questions(
            runner, [item], [q], VqaOptions(batch_size=1, generation=options.generation)
        )
    ]
    assert batched == one_by_one
    expected = [
        direct_generate(processor, model, open_image(p), f"Question: {q} Answer:", max_new_tokens=4)
        for p, q in zip(images, questions)
    ]
    assert batched == expected


@pytest.mark.parametrize("kind", KINDS)
def test_retrieval_ranks_by_the_likelihood_a_direct_forward_gives(tiny_models, direct, sample_images, kind):
    """Reference: one full forward per (image, text) with labels on the text tokens only; the model's
    own mean cross-entropy is minus our score."""
    processor, model = direct[kind]
    texts = ["a cat", "a dog on a couch", "two cats laying on a couch"]
    images = sample_images[:3]
    runner = open_runner(str(tiny_models[kind]), "retrieval", device="cpu")
    records = list(
        rank_texts(runner, [InputItem(str(p)) for p in images], texts, RetrievalOptions(batch_size=2))
    )
    qformer = processor.qformer_tokenizer([DEFAULT_INSTRUCTION], return_tensors="pt")
    for record, path in zip(records, images):
        image = open_image(path)
        got = {r["text"]: r["score"] for r in record["results"]}
        for text in texts:
            if model.config.use_decoder_only_language_model:
                inputs = processor(images=image, text=f"{DEFAULT_INSTRUCTION} {text}", return_tensors="pt")
                prefix = model.config.num_query_tokens + len(
                    processor.tokenizer(DEFAULT_INSTRUCTION)["input_ids"]
                )
                labels = inputs["input_ids"].clone()
                labels[:, :prefix] = -100
            else:
                inputs = processor(images=image, text=DEFAULT_INSTRUCTION, return_tensors="pt")
                labels = processor.tokenizer([text], return_tensors="pt")["input_ids"]
            inputs["qformer_input_ids"] = qformer["input_ids"]
            inputs["qformer_attention_mask"] = qformer["attention_mask"]
            with torch.no_grad():
                loss = model(**inputs, labels=labels).loss
            assert got[text] == pytest.approx(-float(loss), rel=1e-4, abs=1e-4)
        assert [r["rank"] for r in record["results"]] == [1, 2, 3]


def test_instructblip_cannot_be_fine_tuned_for_retrieval(tiny_models):
    _, family = inspect_source(str(tiny_models["instructblip-vicuna"]))
    with pytest.raises(TaskNotSupportedError, match="likelihood"):
        check_trainable(family, "retrieval", "ib")
