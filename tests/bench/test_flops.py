"""The FLOP counts behind the benchmarks' roofline (bench/_flops.py) equal what torch's
FlopCounterMode counts on real BLIP models running the same passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import _flops  # noqa: E402

from blip_toolkit.models.itm import BlipItmOps  # noqa: E402


@pytest.fixture(scope="module")
def config():
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    text = dict(
        small, encoder_hidden_size=64, vocab_size=500, bos_token_id=30, sep_token_id=2, pad_token_id=0
    )
    return BlipConfig(text_config=text, vision_config=dict(small, image_size=64, patch_size=16))


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        result = fn()
    return counter.get_total_flops(), result


@pytest.mark.parametrize("steps", [1, 7])
def test_caption(config, steps):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    flops, out = counted(
        lambda: model.generate(
            pixel_values=torch.randn(2, 3, 64, 64), max_new_tokens=steps, min_new_tokens=steps
        )
    )
    assert out.shape[1] - 1 == steps
    assert flops == 2 * _flops.caption_flops(config, steps)["total"]


def test_vqa(config):
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config).eval()
    ids = torch.randint(5, 400, (2, 6))
    flops, out = counted(
        lambda: model.generate(
            input_ids=ids, pixel_values=torch.randn(2, 3, 64, 64), max_new_tokens=5, min_new_tokens=5
        )
    )
    assert flops == 2 * _flops.vqa_flops(config, 6, out.shape[1] - 1)["total"]


def test_retrieval(config):
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config).eval()
    ids, mask = torch.randint(5, 400, (3, 6)), torch.ones(3, 6, dtype=torch.long)

    def rank():
        embeds, image_feat = BlipItmOps.image(model, torch.randn(2, 3, 64, 64))
        text_feat = BlipItmOps.text(model, ids, mask)
        BlipItmOps.similarity(image_feat, text_feat)
        pairs = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 2])
        BlipItmOps.itm(model, embeds[pairs[0]], ids[pairs[1]], mask[pairs[1]])

    flops, _ = counted(rank)
    assert flops == _flops.retrieval_flops(config, images=2, texts=3, tokens=6, pairs=4)
