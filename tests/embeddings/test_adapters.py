"""Encoder adapters and the target head against direct transformers calls."""

from __future__ import annotations

import json

import pytest
import torch

from blip_toolkit.data.images import open_image
from blip_toolkit.embeddings.head import TargetHead
from blip_toolkit.errors import ModelLoadError, UsageError
from blip_toolkit.models.adapter_base import TargetAdapter
from blip_toolkit.models.adapters import find_adapter, load_encoder


def _pixels(adapter, images):
    return adapter.image_processor(images=[open_image(p) for p in images], return_tensors="pt")[
        "pixel_values"
    ]


def test_clip_target_matches_transformers(enc, sample_images):
    from transformers import AutoTokenizer, CLIPModel

    adapter = load_encoder(str(enc["clip"]), "target")
    assert isinstance(adapter, TargetAdapter) and adapter.has_cls and adapter.grid == 4
    model = CLIPModel.from_pretrained(enc["clip"]).eval()
    pixels = _pixels(adapter, sample_images[:3])
    tokens, global_emb = adapter.encode_image(pixels)
    texts = ["a photo of a cat", "two cats laying on a couch"]
    with torch.no_grad():
        ref_tokens = model.vision_model(pixel_values=pixels).last_hidden_state
        ref_global = model.get_image_features(pixel_values=pixels).pooler_output
        encoded = AutoTokenizer.from_pretrained(enc["clip"])(texts, padding=True, return_tensors="pt")
        ref_text = model.get_text_features(**encoded).pooler_output
    assert tokens.shape == (3, 17, 32)
    torch.testing.assert_close(tokens, ref_tokens)
    torch.testing.assert_close(global_emb, ref_global)
    torch.testing.assert_close(adapter.encode_text(texts), ref_text)
    # The head is visual_projection(post_layernorm(CLS)): it reproduces the encoder's embedding.
    head = adapter.head("cls", has_cls=True)
    torch.testing.assert_close(head(tokens), ref_global)


def test_blip2_cond_loads_only_the_vision_tower(enc, sample_images):
    from transformers import Blip2ForConditionalGeneration

    adapter = load_encoder(str(enc["blip2-opt"]), "cond")
    assert type(adapter.vision).__name__ == "Blip2VisionModel"  # no Q-Former, no language model
    full = Blip2ForConditionalGeneration.from_pretrained(enc["blip2-opt"]).eval()
    pixels = _pixels(adapter, sample_images[:2])
    with torch.no_grad():
        reference = full.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(adapter.tokens(pixels), reference)


@pytest.mark.parametrize("kind", ["blip-caption", "blip-vqa", "blip-itm", "blip2-itm", "clip"])
def test_every_family_can_condition(enc, sample_images, kind):
    import transformers

    adapter = load_encoder(str(enc[kind]), "cond")
    config = json.loads((enc[kind] / "config.json").read_text())
    full = getattr(transformers, config["architectures"][0]).from_pretrained(enc[kind]).eval()
    pixels = _pixels(adapter, sample_images[:1])
    with torch.no_grad():
        reference = full.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(adapter.tokens(pixels), reference)


def test_blip_itm_target(enc, sample_images):
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    adapter = load_encoder(str(enc["blip-itm"]), "target")
    model = BlipForImageTextRetrieval.from_pretrained(enc["blip-itm"]).eval()
    pixels = _pixels(adapter, sample_images[:2])
    texts = ["a photo of a cat", "a dog"]
    tokens, global_emb = adapter.encode_image(pixels)
    text_emb = adapter.encode_text(texts)
    encoded = AutoTokenizer.from_pretrained(enc["blip-itm"])(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        itc = model(
            input_ids=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            pixel_values=pixels,
            use_itm_head=False,
        ).itm_score  # cosine of normalised vision_proj / text_proj
    cosine = (
        torch.nn.functional.normalize(global_emb, dim=-1) @ torch.nn.functional.normalize(text_emb, dim=-1).T
    )
    torch.testing.assert_close(cosine, itc)
    torch.testing.assert_close(adapter.head("cls", has_cls=True)(tokens), global_emb)


def test_siglip_target_uses_its_pooling_head(enc, sample_images, tmp_path):
    from transformers import AutoTokenizer, SiglipModel

    adapter = load_encoder(str(enc["siglip"]), "target")
    assert not adapter.has_cls and adapter.default_pooling(False) == "map"
    model = SiglipModel.from_pretrained(enc["siglip"]).eval()
    pixels = _pixels(adapter, sample_images[:2])
    tokens, global_emb = adapter.encode_image(pixels)
    encoded = AutoTokenizer.from_pretrained(enc["siglip"])(
        ["a photo of a cat"], padding="max_length", max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(global_emb, model.get_image_features(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(
            adapter.encode_text(["a photo of a cat"]),
            model.get_text_features(input_ids=encoded.input_ids).pooler_output,
        )
    head = adapter.head("map", has_cls=False)
    head.save(tmp_path / "head.safetensors")
    loaded = TargetHead.load(tmp_path / "head.safetensors")
    torch.testing.assert_close(loaded(tokens), global_emb)
    with pytest.raises(UsageError, match="cls\\+patch"):
        adapter.head("cls", has_cls=False)


def test_head_save_load_round_trip(enc, sample_images, tmp_path):
    adapter = load_encoder(str(enc["clip"]), "target")
    tokens, _ = adapter.encode_image(_pixels(adapter, sample_images[:2]))
    head = adapter.head("mean", has_cls=True, info={"note": "x"})
    head.save(tmp_path / "h.safetensors")
    loaded = TargetHead.load(tmp_path / "h.safetensors")
    assert loaded.config() == head.config() and loaded.info == {"note": "x"}
    # mean pooling leaves the CLS token out
    patches_mean = tokens[:, 1:].mean(1)
    expected = adapter.model.visual_projection(adapter.model.vision_model.post_layernorm(patches_mean))
    torch.testing.assert_close(loaded(tokens), expected)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception, match="bad.safetensors"):
        TargetHead.load(tmp_path / "bad.safetensors")


def test_blip2_and_captioning_blip_are_refused_as_targets(enc):
    with pytest.raises(UsageError, match="BLIP-2 cannot be the target.*CLIP.*SigLIP.*BLIP ITM"):
        load_encoder(str(enc["blip2-opt"]), "target")
    with pytest.raises(UsageError, match="BlipForImageTextRetrieval"):
        load_encoder(str(enc["blip-caption"]), "target")


def test_unsupported_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="unsupported encoder.*bert.*supported: CLIP"):
        find_adapter({"model_type": "bert", "architectures": ["BertModel"]}, "some/bert")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported encoder"):
        load_encoder(str(tmp_path), "cond")


def test_vision_tower_with_missing_weights_is_refused(enc, tmp_path):
    """transformers would initialise missing weights randomly with a log line; we refuse."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "clip"
    shutil.copytree(enc["clip"], copy)
    weights = load_file(copy / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "vision_model.encoder.layers.0." not in k},
        copy / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ModelLoadError, match="not in the checkpoint"):
        load_encoder(str(copy), "cond")
