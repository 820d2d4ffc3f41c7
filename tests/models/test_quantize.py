"""--quantize on CPU: int8 is torch's dynamic int8 quantization of the same Linear layers
transformers' bitsandbytes path would quantize, 4bit is bitsandbytes' NF4; results equal the same
quantization applied by hand with the libraries' own calls; an empty output of a quantized model is
an error for that item; a combination that cannot run is one usage line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers
from torch import nn

from blip_toolkit.data.images import open_image
from blip_toolkit.errors import UsageError
from blip_toolkit.models.loading import load_model
from blip_toolkit.models.quantize import check_quantize, linear_layers


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def captions(cli, model, images, *extra):
    result = cli("caption", *images, "--model", model, "--format", "jsonl", "--max-new-tokens", "6", *extra)
    return result, [json.loads(line) for line in result.stdout.splitlines()]


def direct_captions(model, processor, images):
    out = []
    for path in images:
        inputs = processor(images=open_image(path), return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=6)[0]
        out.append(processor.decode(ids[1:], skip_special_tokens=True).strip())
    return out


def test_int8_on_cpu_is_torch_dynamic_int8_of_the_layers_bitsandbytes_would_quantize(
    cli, tiny_models, sample_images
):
    path = tiny_models["blip-caption"]
    loaded = load_model(str(path), "caption", quantize="int8")
    quantized = {
        n for n, m in loaded.model.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
    }
    plain = {n for n, m in loaded.model.named_modules() if type(m) is nn.Linear}
    # The output layer (tied to the word embeddings) stays in float, as transformers keeps it for
    # bitsandbytes; every other Linear is int8.
    assert plain == {"text_decoder.cls.predictions.decoder"}
    assert any(n.startswith("vision_model.") for n in quantized) and any(
        n.startswith("text_decoder.") for n in quantized
    )

    # Reference: the plain transformers model quantized by hand with torch's own call.
    reference = transformers.BlipForConditionalGeneration.from_pretrained(path).eval()
    names = linear_layers(reference)
    assert set(names) == quantized
    torch.ao.quantization.quantize_dynamic(
        reference,
        dict.fromkeys(names, torch.ao.quantization.per_channel_dynamic_qconfig),
        dtype=torch.qint8,
        inplace=True,
    )
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    images = sample_images[:4]
    result, records = captions(cli, path, images, "--quantize", "int8")
    assert result.code == 0, result.stderr
    assert [r["caption"] for r in records] == direct_captions(reference, processor, images)


@pytest.mark.parametrize(
    "shape", [(96, 48), (64, 64), (96, 128), (40, 128), (128, 96), (32, 192), (33, 64), (64, 32)]
)
def test_the_packing_rule_is_the_one_bitsandbytes_packs_by(shape):
    """Our rule for which layers bitsandbytes' AVX512-BF16 path can take, checked against its own
    packing function (plain torch, so this runs on every CPU, with or without the flags)."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from blip_toolkit.models.quantize import cpu_packing_problem

    out_features, in_features = shape
    weight = torch.randn(out_features, in_features)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
    try:
        _convert_weight_packed_for_cpu(packed, state)
        packs = True
    except (RuntimeError, AssertionError):
        packs = False
    assert (cpu_packing_problem(out_features, in_features, state.blocksize) is None) == packs


def _has_packed_path() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


@pytest.mark.parametrize(
    "packed",
    [
        pytest.param(True, id="packed-where-the-cpu-has-it"),
        pytest.param(False, id="generic-path-forced"),
    ],
)
def test_4bit_on_cpu_is_bitsandbytes_nf4(cli, tiny_models, sample_images, monkeypatch, packed):
    """NF4 weights bit-identical to transformers' at-load bitsandbytes quantization, and the same
    captions. On a CPU with AVX512-BF16, bitsandbytes packs weights for its fused bf16 kernel (which
    crashed on the tiny model's 48-wide layers before guard_cpu_packing); both that path and the generic
    one are compared there. Elsewhere both cases run the generic path."""
    pytest.importorskip("bitsandbytes")
    from blip_toolkit.models.quantize import guard_cpu_packing

    if not packed:
        monkeypatch.setenv("BLIP_4BIT_CPU_PACKED", "0")
    path = tiny_models["blip-caption"]
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    reference = transformers.BlipForConditionalGeneration.from_pretrained(
        path, quantization_config=config, device_map={"": "cpu"}
    ).eval()
    # The reference takes the same per-layer path as ours: transformers' own load would crash on the
    # packed path's unsupported shapes exactly as we did.
    kept = guard_cpu_packing(reference)
    if _has_packed_path():
        assert kept, "the tiny model has layers the packed path cannot take"
        if packed:
            # Some layers do take the packed path, so it is really exercised here.
            assert any(getattr(m, "support_avx512bf16_for_cpu", False) for m in reference.modules()), (
                "no layer on the packed path"
            )
    # The same layers, with bit-identical packed weights and block scales.
    ours = load_model(str(path), "caption", quantize="4bit").model
    packed_layers = {n: m for n, m in reference.named_modules() if type(m).__name__ == "Linear4bit"}
    assert packed_layers and packed_layers.keys() == {
        n for n, m in ours.named_modules() if type(m).__name__ == "Linear4bit"
    }
    for name, layer in packed_layers.items():
        mine = ours.get_submodule(name)
        assert torch.equal(mine.weight.data, layer.weight.data), name
        assert torch.equal(mine.weight.quant_state.absmax, layer.weight.quant_state.absmax), name
        assert mine.support_avx512bf16_for_cpu == layer.support_avx512bf16_for_cpu, name
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    images = sample_images[:3]
    result, records = captions(cli, path, images, "--quantize", "4bit")
    assert result.code == 0, result.stderr
    assert [r["caption"] for r in records] == direct_captions(reference, processor, images)


@pytest.mark.parametrize("kind", ["blip2-opt", "instructblip-vicuna"])
def test_vqa_and_retrieval_run_quantized(cli, tiny_models, sample_images, kind):
    path = tiny_models[kind]
    vqa = cli(
        "vqa", sample_images[0], "what is this?", "--model", path, "--quantize", "int8", "--format", "json"
    )
    assert vqa.code == 0, vqa.stderr
    ranked = cli(
        "retrieval", sample_images[0], "a photo of a cat", "a red car", "--model", path, "--quantize", "int8",
        "--format", "json",
    )  # fmt: skip
    assert ranked.code == 0, ranked.stderr
    floats = cli(
        "retrieval", sample_images[0], "a photo of a cat", "a red car", "--model", path, "--format", "json"
    )
    got = {r["text"]: r["score"] for r in json.loads(ranked.stdout)[0]["results"]}
    expected = {r["text"]: r["score"] for r in json.loads(floats.stdout)[0]["results"]}
    # int8 weights move mean token log-likelihoods a little, not wholesale.
    for text, score in expected.items():
        assert got[text] == pytest.approx(score, rel=0.05, abs=0.05)


@pytest.fixture(scope="module")
def silent_captioner(tiny_models, tmp_path_factory):
    """A real BLIP captioner whose first generated token is always [SEP] (its eos): the empty output
    a broken quantized model gives (transformers #30383)."""
    path = tiny_models["blip-caption"]
    model = transformers.BlipForConditionalGeneration.from_pretrained(path)
    processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[processor.tokenizer.sep_token_id] = 1e4
    out = tmp_path_factory.mktemp("silent") / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_an_empty_output_of_a_quantized_model_is_an_error_for_that_item(cli, silent_captioner, sample_images):
    images = sample_images[:2]
    result, records = captions(cli, silent_captioner, images, "--quantize", "int8")
    assert result.code == 1 and "all 2 image(s) failed" in result.stderr  # every item failed
    assert all("error" in r and "caption" not in r for r in records)
    assert "generated nothing" in records[0]["error"] and "#30383" in records[0]["error"]
    # Without --quantize an empty caption is what the model says, and it is written as such.
    result, records = captions(cli, silent_captioner, images)
    assert result.code == 0 and [r["caption"] for r in records] == ["", ""]


def test_combinations_that_cannot_run_are_one_usage_line(cli, tiny_models, sample_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the quantize extra were not installed
    result = cli("caption", sample_images[0], "--model", tiny_models["blip-caption"], "--quantize", "4bit")
    assert result.code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "bitsandbytes" in result.stderr
    with pytest.raises(UsageError, match="CPU or CUDA"):
        check_quantize("int8", "meta")
    result = cli("caption", sample_images[0], "--model", tiny_models["blip-caption"], "--quantize", "int4")
    assert result.code == 2
