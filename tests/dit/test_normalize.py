"""Target normalisation: streaming statistics against torch.mean / torch.std over all the data,
round trips, and export / restore through safetensors + JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip_toolkit.dit.normalize import LayoutStatistics, TokenNormalizer, TokenStatistics
from blip_toolkit.errors import ConfigError, InputError


def uneven_batches(seed: int = 0, dim: int = 6):
    """Token batches [B, N, D] of different sizes, with a large offset (a test of numerical stability:
    the naive sum-of-squares formula loses precision there)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, dim, dtype=torch.float64)
    return [
        torch.randn(b, n, dim, generator=gen, dtype=torch.float64) * scale + 1000.0
        for b, n in ((3, 5), (1, 5), (7, 5), (2, 5), (1, 1))
    ]


def test_streaming_statistics_equal_full_data_statistics():
    batches = uneven_batches()
    stats = TokenStatistics(6)
    for batch in batches:
        stats.update(batch)
    everything = torch.cat([b.reshape(-1, 6) for b in batches])
    assert stats.count == everything.shape[0]
    torch.testing.assert_close(stats.mean, everything.mean(dim=0), rtol=0, atol=1e-10)
    torch.testing.assert_close(stats.std(), everything.std(dim=0), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        stats.variance(unbiased=False), everything.var(dim=0, unbiased=False), rtol=1e-10, atol=0
    )
    assert math.isclose(stats.mean_norm, float(everything.norm(dim=-1).mean()), rel_tol=1e-12)


def test_statistics_of_float32_batches():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 9, 5, generator=gen) * 2 - 3 for _ in range(6)]
    stats = TokenStatistics(5)
    for batch in batches:
        stats.update(batch)
    everything = torch.cat(batches).reshape(-1, 5).double()
    torch.testing.assert_close(stats.mean, everything.mean(dim=0))
    torch.testing.assert_close(stats.std(), everything.std(dim=0))


def test_standardize_round_trip_and_moments():
    batches = [b.float() for b in uneven_batches(2)]
    normalizer = TokenNormalizer.fit("standardize", batches)
    everything = torch.cat([b.reshape(-1, 6) for b in batches])
    encoded = normalizer.encode(everything)
    torch.testing.assert_close(encoded.mean(dim=0), torch.zeros(6), rtol=0, atol=1e-3)
    torch.testing.assert_close(encoded.std(dim=0), torch.ones(6), rtol=0, atol=1e-3)
    torch.testing.assert_close(normalizer.decode(encoded), everything, rtol=1e-6, atol=1e-3)


def test_l2_encodes_to_unit_rms_and_decodes_to_the_mean_norm():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(5, 8, 16, generator=gen) * torch.rand(5, 8, 1, generator=gen) * 4
    normalizer = TokenNormalizer.fit("l2", [tokens[:2], tokens[2:]])
    mean_norm = float(tokens.norm(dim=-1).mean())
    assert math.isclose(normalizer.mean_norm, mean_norm, rel_tol=1e-6)
    encoded = normalizer.encode(tokens)
    torch.testing.assert_close(encoded.norm(dim=-1), torch.full((5, 8), 4.0))  # sqrt(16)
    decoded = normalizer.decode(encoded)
    torch.testing.assert_close(decoded.norm(dim=-1), torch.full((5, 8), mean_norm))
    cosine = torch.nn.functional.cosine_similarity(decoded, tokens, dim=-1)
    torch.testing.assert_close(cosine, torch.ones(5, 8))


def test_none_is_the_identity():
    normalizer = TokenNormalizer.fit("none", [])
    x = torch.randn(2, 3, 4)
    assert normalizer.encode(x) is x and normalizer.decode(x) is x


@pytest.mark.parametrize("method", ["none", "l2", "standardize"])
def test_export_and_restore_through_safetensors_and_json(method, tmp_path):
    batches = [b.float() for b in uneven_batches(4)]
    normalizer = TokenNormalizer.fit(method, batches)
    tensors, metadata = normalizer.export()
    path = tmp_path / "model.safetensors"
    save_file({"some.weight": torch.zeros(2), **tensors}, str(path))
    restored = TokenNormalizer.from_export(load_file(str(path)), json.loads(json.dumps(metadata)))
    x = torch.cat([b.reshape(-1, 6) for b in batches])
    assert restored.method == method
    torch.testing.assert_close(restored.encode(x), normalizer.encode(x))
    torch.testing.assert_close(restored.decode(x), normalizer.decode(x))


def test_constant_dimension_and_errors():
    tokens = torch.randn(10, 3)
    tokens[:, 1] = 5.0
    normalizer = TokenNormalizer.fit("standardize", [tokens])
    assert torch.isfinite(normalizer.encode(tokens)).all()
    torch.testing.assert_close(normalizer.decode(normalizer.encode(tokens)), tokens)
    with pytest.raises(InputError, match="3-dim"):
        normalizer.encode(torch.randn(2, 4))
    with pytest.raises(ConfigError):
        TokenNormalizer("minmax")
    with pytest.raises(ConfigError):
        TokenNormalizer("standardize")
    with pytest.raises(InputError, match="no training tokens"):
        TokenNormalizer.fit("standardize", [])
    with pytest.raises(InputError):
        TokenStatistics(3).update(torch.randn(2, 4))


def cls_tokens(seed: int = 5, batch: int = 6, patches: int = 9, dim: int = 8) -> torch.Tensor:
    """[B, 1 + P, D]: a CLS token on another scale and offset than the patches (as CLIP's is)."""
    gen = torch.Generator().manual_seed(seed)
    patch = torch.randn(batch, patches, dim, generator=gen) * 2 + 1
    cls = torch.randn(batch, 1, dim, generator=gen) * 10 - 30
    return torch.cat([cls, patch], dim=1)


def test_cls_token_is_standardised_with_its_own_statistics():
    tokens = cls_tokens()
    normalizer = TokenNormalizer.fit("standardize", [tokens[:2], tokens[2:]], has_cls=True)
    cls, patches = tokens[:, 0], tokens[:, 1:].reshape(-1, 8)
    torch.testing.assert_close(normalizer.cls_mean, cls.mean(0))
    torch.testing.assert_close(normalizer.cls_std, cls.std(0))
    torch.testing.assert_close(normalizer.mean, patches.mean(0))
    torch.testing.assert_close(normalizer.std, patches.std(0))
    encoded = normalizer.encode(tokens)
    torch.testing.assert_close(encoded[:, 0], (cls - cls.mean(0)) / cls.std(0))
    torch.testing.assert_close(encoded[:, 1:], (tokens[:, 1:] - patches.mean(0)) / patches.std(0))
    torch.testing.assert_close(normalizer.decode(encoded), tokens, rtol=1e-5, atol=1e-4)
    with pytest.raises(InputError, match="N >= 2"):
        normalizer.encode(torch.randn(3, 1, 8))


def test_l2_decodes_the_cls_token_to_its_own_mean_norm():
    tokens = cls_tokens(6)
    normalizer = TokenNormalizer.fit("l2", [tokens], has_cls=True)
    decoded = normalizer.decode(normalizer.encode(tokens))
    torch.testing.assert_close(
        decoded[:, 0].norm(dim=-1), torch.full((6,), float(tokens[:, 0].norm(dim=-1).mean()))
    )
    torch.testing.assert_close(
        decoded[:, 1:].norm(dim=-1), torch.full((6, 9), float(tokens[:, 1:].norm(dim=-1).mean()))
    )


@pytest.mark.parametrize("method", ["l2", "standardize"])
def test_cls_statistics_survive_export_and_old_exports_still_load(method, tmp_path):
    tokens = cls_tokens(7)
    normalizer = TokenNormalizer.fit(method, [tokens], has_cls=True)
    tensors, metadata = normalizer.export()
    save_file(tensors or {"unused": torch.zeros(1)}, str(tmp_path / "n.safetensors"))
    restored = TokenNormalizer.from_export(
        load_file(str(tmp_path / "n.safetensors")), json.loads(json.dumps(metadata))
    )
    assert restored.has_cls
    torch.testing.assert_close(restored.encode(tokens), normalizer.encode(tokens))
    torch.testing.assert_close(restored.decode(tokens), normalizer.decode(tokens))
    # An export written before CLS statistics existed: no has_cls / cls_* entries, one class of tokens.
    single = TokenNormalizer.fit(method, [tokens])
    old_tensors, old_metadata = single.export()
    old_tensors = {k: v for k, v in old_tensors.items() if "cls" not in k}
    old_metadata = {k: v for k, v in old_metadata.items() if "cls" not in k}
    old = TokenNormalizer.from_export(old_tensors, old_metadata)
    assert not old.has_cls
    torch.testing.assert_close(old.encode(tokens), single.encode(tokens))
    torch.testing.assert_close(old.decode(tokens), single.decode(tokens))


def test_layout_statistics_split_position_zero_from_the_rest():
    tokens = cls_tokens(8).double()
    stats = LayoutStatistics(8, has_cls=True)
    stats.update(tokens)
    assert stats.cls.count == 6 and stats.patch.count == 54 and stats.count == 60
    torch.testing.assert_close(stats.cls.mean, tokens[:, 0].mean(0))
    torch.testing.assert_close(stats.patch.std(), tokens[:, 1:].reshape(-1, 8).std(0))
