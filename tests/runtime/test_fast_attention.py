"""The fused vision attention computes what transformers' eager BlipAttention computes."""

from __future__ import annotations

import copy

import torch
from transformers import BlipConfig, BlipVisionModel

from blip_toolkit.runtime.fast_attention import use_fused_vision_attention


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
