"""The dataset inference engine: webdataset and files give the same records as the in-memory API;
records do not depend on the batch size or the number of DataLoader workers; bad tars are recorded
item by item; BLIP-2 unprompted captioning equals transformers' own `generate(pixel_values=...)`."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

from blip_toolkit.data.images import InputItem, open_image
from blip_toolkit.jobs.predict import (
    answer_questions,
    answer_source,
    caption_images,
    caption_source,
    rank_source,
    rank_texts,
)
from blip_toolkit.models.loading import open_runner
from blip_toolkit.pipeline.sources import list_source, open_inputs
from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, RetrievalOptions, VqaOptions
from tests.builders.wds import photo_tars, write_tar

GEN = GenerationOptions(max_new_tokens=5)


@pytest.fixture(scope="module")
def caption_runner(tiny_models):
    return open_runner(str(tiny_models["blip-caption"]), "caption", device="cpu")


@pytest.fixture
def tars(tmp_path, sample_images):
    return photo_tars(tmp_path / "wds", sample_images)


def _caption(runner, source, batch_size, workers):
    options = CaptionOptions(batch_size=batch_size, generation=GEN, num_workers=workers)
    return list(caption_source(runner, source, options))


def test_webdataset_equals_files_whatever_the_batch_size_and_workers(
    caption_runner, tars, sample_images, one_thread
):
    reference = list(
        caption_images(
            caption_runner, [InputItem(str(p)) for p in sample_images], CaptionOptions(generation=GEN)
        )
    )
    assert len({r["caption"] for r in reference}) > 1  # the tiny model tells the photos apart
    source = open_inputs([str(tars[0].parent / "part-{000..002}.tar")])
    runs = {(b, w): _caption(caption_runner, source, b, w) for b, w in [(8, 0), (1, 2), (3, 2), (2, 1)]}
    expected = [
        {"shard": f"part-{t:03d}", "key": f"{i:04d}", "caption": r["caption"]}
        for i, (t, r) in enumerate(zip([0, 0, 0, 1, 1, 1, 2, 2], reference))
    ]
    for setting, records in runs.items():
        assert records == expected, setting
    # Files through workers: the same records as the in-memory API, in input order.
    files = list_source([str(p) for p in sample_images])
    assert _caption(caption_runner, files, 3, 2) == reference


def test_vqa_prompt_lengths_with_workers(tiny_models, sample_images, one_thread):
    """Questions of several token lengths, batched and spread over workers: answers equal one-at-a-time."""
    runner = open_runner(str(tiny_models["blip2-opt"]), "vqa", device="cpu")
    questions = ["what is this?", "how many dogs are there?", "what color is the car?", "is it red?"] * 2
    items = [InputItem(str(p)) for p in sample_images]
    single = [
        r["answer"]
        for item, q in zip(items, questions)
        for r in answer_questions(runner, [item], [q], VqaOptions(batch_size=1, generation=GEN))
    ]
    source = list_source([i.path for i in items], questions)
    batched = list(answer_source(runner, source, VqaOptions(batch_size=4, generation=GEN, num_workers=2)))
    assert [r["answer"] for r in batched] == single
    assert [r["question"] for r in batched] == questions


def test_retrieval_over_webdataset_with_top(tiny_models, tars, sample_images, one_thread):
    runner = open_runner(str(tiny_models["blip-itm"]), "retrieval", device="cpu")
    texts = ["a photo of a cat", "a photo of a dog", "a red car"]
    full = list(rank_texts(runner, [InputItem(str(p)) for p in sample_images], texts, RetrievalOptions()))
    source = open_inputs([str(t) for t in tars])
    top = list(rank_source(runner, source, texts, RetrievalOptions(top=2, batch_size=3, num_workers=2)))
    # Ranks and texts exactly; scores within float rounding (another batch size sums in another order).
    assert [[(e["rank"], e["text"]) for e in r["results"]] for r in top] == [
        [(e["rank"], e["text"]) for e in r["results"][:2]] for r in full
    ]
    for got, want in zip(top, full):
        for a, b in zip(got["results"], want["results"]):
            numbers = [k for k in a if k not in ("rank", "text")]
            assert {k: a[k] for k in numbers} == pytest.approx({k: b[k] for k in numbers}, rel=1e-5, abs=1e-6)
    assert [(r["shard"], r["key"]) for r in top][:4] == [
        ("part-000", "0000"),
        ("part-000", "0001"),
        ("part-000", "0002"),
        ("part-001", "0003"),
    ]


def test_corrupt_member_and_truncated_tar_are_recorded(caption_runner, tmp_path, sample_images, one_thread):
    good = [p.read_bytes() for p in sample_images[:3]]
    corrupt = write_tar(
        tmp_path / "corrupt.tar",
        [
            {"__key__": "a", "jpg": good[0]},
            {"__key__": "b", "jpg": b"\xff\xd8\xff\xe0 not a jpeg"},
            {"__key__": "c", "txt": "no image member"},
            {"__key__": "d", "jpg": good[1]},
        ],
    )
    whole = write_tar(tmp_path / "whole.tar", [{"__key__": k, "jpg": d} for k, d in zip("xyz", good)])
    truncated = tmp_path / "truncated.tar"
    data = whole.read_bytes()
    truncated.write_bytes(data[: 512 + len(good[0]) + 512 + 100])  # header, x.jpg, then y.jpg cut short
    records = _caption(caption_runner, open_inputs([str(corrupt), str(truncated)]), 2, 0)
    expected_ok = {
        r["image"]: r["caption"]
        for r in caption_images(
            caption_runner, [InputItem(str(p)) for p in sample_images[:2]], CaptionOptions(generation=GEN)
        )
    }
    assert [(r["shard"], r["key"]) for r in records] == [
        ("corrupt", "a"),
        ("corrupt", "b"),
        ("corrupt", "c"),
        ("corrupt", "d"),
        ("truncated", "x"),
        ("truncated", None),
    ]
    assert records[0]["caption"] == expected_ok[str(sample_images[0])]
    assert records[3]["caption"] == expected_ok[str(sample_images[1])]
    assert "corrupt.tar#b.jpg" in records[1]["error"]
    assert "no image member" in records[2]["error"] and "corrupt.tar#c" in records[2]["error"]
    assert records[4]["caption"] == expected_ok[str(sample_images[0])]
    assert "truncated.tar" in records[5]["error"] and "caption" not in records[5]


def test_blip2_opt_unprompted_equals_generate_pixel_values_without_tokenizer_bos(
    tiny_models, tmp_path, sample_images
):
    """A tokenizer that adds no BOS: an empty prompt through the processor would start without one;
    transformers' generate(pixel_values=...) starts from <image> x Q and the LM's BOS, and so do we."""
    from blip_toolkit.models.scratch.tokenizers import opt_tokenizer

    path = tmp_path / "opt-nobos"
    shutil.copytree(tiny_models["blip2-opt"], path)
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    processor.tokenizer = opt_tokenizer(add_bos_token=False)
    assert processor.tokenizer("")["input_ids"] == []  # really no BOS of its own
    processor.save_pretrained(path)
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    assert (
        processor(images=open_image(sample_images[0]), text="", return_tensors="pt")["input_ids"].shape[1]
        == 4
    )
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(path).eval()
    runner = open_runner(str(path), "caption", device="cpu")
    ours = [
        r["caption"]
        for r in caption_images(
            runner, [InputItem(str(p)) for p in sample_images], CaptionOptions(generation=GEN)
        )
    ]
    expected = []
    for p in sample_images:
        pixel_values = processor(images=open_image(p), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.generate(pixel_values=pixel_values, max_new_tokens=5)[0]
        expected.append(processor.decode(out, skip_special_tokens=True).strip())
    assert ours == expected and len(set(expected)) > 1


def test_blip2_t5_unprompted_is_lavis_empty_prompt(tiny_models, sample_images):
    """Flan-T5 has no BOS: transformers' generate(pixel_values=...) cannot start it, LAVIS feeds the
    encoder the image tokens and the tokenized empty prompt; so do we."""
    path = tiny_models["blip2-t5"]
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(path).eval()
    image = open_image(sample_images[0])
    with pytest.raises(AttributeError):
        model.generate(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"])
    runner = open_runner(str(path), "caption", device="cpu")
    ours = [
        r["caption"]
        for r in caption_images(
            runner, [InputItem(str(p)) for p in sample_images], CaptionOptions(generation=GEN)
        )
    ]
    expected = []
    for p in sample_images:
        inputs = processor(images=open_image(p), text="", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5)[0]
        expected.append(processor.decode(out, skip_special_tokens=True).strip())
    assert ours == expected
