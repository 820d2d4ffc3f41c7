"""The fused vision attention computes what transformers' eager BlipAttention computes."""

from __future__ import annotations

import copy

import torch
from transformers import BlipConfig, BlipVisionModel

from blip_toolkit.models.fast_attention import use_fused_text_attention, use_fused_vision_attention


def _models():
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            initializer_range=0.1,
        )
    ).vision_config
    eager = BlipVisionModel(config)
    fused = copy.deepcopy(eager)
    assert use_fused_vision_attention(fused) == 2
    return eager, fused


def test_forward_matches_eager():
    eager, fused = _models()
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = eager(pixel_values=pixels)
        got = fused(pixel_values=pixels)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_gradients_match_eager():
    eager, fused = _models()
    pixels = torch.randn(2, 3, 64, 64)
    eager(pixel_values=pixels).last_hidden_state.square().mean().backward()
    fused(pixel_values=pixels).last_hidden_state.square().mean().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BLIP_EAGER_ATTENTION", "1")
    model = BlipVisionModel(
        BlipConfig(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        ).vision_config
    )
    assert use_fused_vision_attention(model) == 0


def _text_models(cls_name: str):
    import transformers

    torch.manual_seed(0)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = BlipConfig(
        text_config=dict(small, encoder_hidden_size=64, vocab_size=120, bos_token_id=30, sep_token_id=2),
        vision_config=dict(small, image_size=32, patch_size=8, initializer_range=0.1),
    )
    eager = getattr(transformers, cls_name)(config).eval()
    fused = copy.deepcopy(eager)
    assert use_fused_text_attention(fused) > 0
    return eager, fused


def test_fused_text_attention_decodes_as_eager():
    """The caption decoder with its key / value cache: every step's logits, and the greedy tokens."""
    eager, fused = _text_models("BlipForConditionalGeneration")
    pixels = torch.randn(3, 3, 32, 32)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        expected = eager.generate(pixel_values=pixels, **kwargs)
        got = fused.generate(pixel_values=pixels, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_text_attention_masks_padding_as_eager():
    """The ITM text encoder: a padded batch (additive padding mask) cross-attending to image tokens."""
    eager, fused = _text_models("BlipForImageTextRetrieval")
    ids = torch.tensor([[1, 5, 9, 3, 0, 0], [1, 7, 2, 8, 4, 3]])
    mask = (ids != 0).long()
    image = torch.randn(2, 17, 64)
    image_mask = torch.ones(2, 17, dtype=torch.long)
    with torch.inference_mode():
        args = dict(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image, encoder_attention_mask=image_mask
        )
        expected = eager.text_encoder(**args).last_hidden_state
        got = fused.text_encoder(**args).last_hidden_state
        unimodal = fused.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        unimodal_eager = eager.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unimodal, unimodal_eager, rtol=1e-5, atol=1e-5)


def test_grouped_itm_pairs_score_as_expanded_pairs():
    """ITM of k texts per image with each image given once (its keys / values projected once) equals
    ITM of the expanded (image, text) pairs through transformers' eager attention."""
    from blip_toolkit.models.itm import BlipItmOps

    eager, fused = _text_models("BlipForImageTextRetrieval")
    images = torch.randn(3, 17, 64)
    ids = torch.randint(5, 100, (6, 5))
    ids[1, 3:] = 0  # some padding
    mask = (ids != 0).long()
    with torch.inference_mode():
        expected = BlipItmOps.itm(eager, images.repeat_interleave(2, dim=0), ids, mask)
        got = BlipItmOps.itm_grouped(fused, images, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
