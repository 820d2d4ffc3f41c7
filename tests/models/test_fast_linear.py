"""oneDNN-packed Linear layers compute what torch's Linear computes (within float rounding), runners
use them on CPU only where nothing else changes the layers, and greedy outputs stay those of a direct
transformers call (tests/predictors/test_generation.py checks captions and answers through the runner)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blip_toolkit.models.fast_linear import PackedLinear, pack_linear_layers, packing_available
from blip_toolkit.models.loading import load_model, open_runner

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN linear operators")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (1, 1, 48), (3, 600, 48)])
def test_float32_forward_equals_torch_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 96, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected = linear(x)
        got = packed(x)
        exact = torch.nn.functional.linear(
            x.double(), linear.weight.double(), None if not bias else linear.bias.double()
        )
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # float32 arithmetic in another summation order: as close to the exact result as torch's own
    assert (got.double() - exact).abs().max() <= 4 * (expected.double() - exact).abs().max() + 1e-6


def test_non_contiguous_input():
    torch.manual_seed(1)
    linear = nn.Linear(32, 16)
    x = torch.randn(32, 6).t()  # [6, 32], not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_is_a_bfloat16_linear():
    torch.manual_seed(2)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    with torch.inference_mode():
        got = PackedLinear(linear)(x)
        exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    assert got.dtype == torch.bfloat16
    # one bfloat16 rounding of the result (8 bits of mantissa), accumulation in float32
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-2).all()


def test_packing_replaces_every_float_linear_and_keeps_the_outputs(tiny_models):
    source = str(tiny_models["blip-caption"])
    plain = load_model(source, "caption").model
    packed_model = load_model(source, "caption").model
    count = sum(type(m) is nn.Linear for m in packed_model.modules())
    assert pack_linear_layers(packed_model, "cpu") == count > 0
    assert not any(type(m) is nn.Linear for m in packed_model.modules())
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[1, 5, 9, 3], [1, 7, 2, 3]])
    with torch.inference_mode():
        expected = plain(pixel_values=pixels, input_ids=ids).logits
        got = packed_model(pixel_values=pixels, input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_runners_pack_on_cpu_unless_quantized_or_turned_off(tiny_models, monkeypatch):
    source = str(tiny_models["blip-caption"])

    def packed_layers(runner):
        return sum(isinstance(m, PackedLinear) for m in runner.loaded.model.modules())

    assert packed_layers(open_runner(source, "caption", device="cpu")) > 0
    assert packed_layers(open_runner(source, "caption", device="cpu", quantize="int8")) == 0
    # load_model alone (what fine-tuning builds on) keeps trainable torch layers
    assert not any(isinstance(m, PackedLinear) for m in load_model(source, "caption").model.modules())
    monkeypatch.setenv("BLIP_PACKED_LINEAR", "0")
    assert packed_layers(open_runner(source, "caption", device="cpu")) == 0
