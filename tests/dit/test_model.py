"""The DiT against references: explicit-math attention, repeated-K/V multi-head attention for GQA,
the relative-position property of RoPE, masks, the null condition, adaLN-Zero initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip_toolkit.dit.config import DIT_PRESETS, DiTConfig
from blip_toolkit.dit.model import (
    Conditioning,
    CrossAttention,
    DiT,
    RMSNorm,
    SelfAttention,
    attention,
    rms_norm,
)
from blip_toolkit.dit.rope import (
    apply_rope,
    grid_positions,
    grid_rope_angles,
    rope_axis_pairs,
    rope_table,
    sequence_rope_angles,
    token_layout,
)
from blip_toolkit.errors import ConfigError


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second OpenMP thread only adds synchronisation (and contention on shared CI).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> DiTConfig:
    values = dict(
        preset="tiny",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        target_dim=12,
        cond_dim=20,
        num_tokens=16,
        num_cond_tokens=9,
    )
    values.update(overrides)
    return DiTConfig(**values)


def perturb_zero_init(model: DiT, seed: int = 0) -> None:
    """Give the zero-initialised layers (adaLN modulation, final modulation, output) random values."""
    gen = torch.Generator().manual_seed(seed)
    layers = [block.modulation for block in model.blocks] + [model.final_modulation, model.output_proj]
    with torch.no_grad():
        for layer in layers:
            for param in layer.parameters():
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def inputs(config: DiTConfig, batch: int = 3, num_cond_tokens: int | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    m = num_cond_tokens or config.num_cond_tokens
    x_t = torch.randn(batch, config.num_tokens, config.target_dim, generator=gen)
    t = torch.rand(batch, generator=gen)
    cond = torch.randn(batch, m, config.cond_dim, generator=gen)
    return x_t, t, cond


# ---------------------------------------------------------------------------------------------------- config


def test_presets_and_kv_default():
    expected = {"tiny": (384, 6, 6), "small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 16, 16)}
    for name, (hidden, layers, heads) in expected.items():
        cfg = DiTConfig(preset=name)
        assert (cfg.resolved_hidden_size, cfg.resolved_num_layers, cfg.resolved_num_heads) == (
            hidden,
            layers,
            heads,
        )
        assert cfg.resolved_num_kv_heads == heads // 2
        assert cfg.head_dim == 64
    assert set(DIT_PRESETS) == set(expected)
    assert DiTConfig(preset="small", num_kv_heads=8).resolved_num_kv_heads == 8


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="preset"):
        DiTConfig(preset="huge")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        DiTConfig(preset="small", num_kv_heads=3)
    with pytest.raises(ConfigError, match="multiple of 4"):
        DiTConfig(preset="small", hidden_size=48, num_heads=8)  # head dim 6
    with pytest.raises(ConfigError, match="target_dim"):
        DiT.from_config(DiTConfig(preset="tiny"))
    cfg = tiny_config().resolved()
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        DiTConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})
    model = DiT.from_config(tiny_config(num_kv_heads=None))
    assert model.config.num_kv_heads == 2 and model.config.mlp_hidden_dim == 256


# ---------------------------------------------------------------------------------------------------- layers


def test_rmsnorm_matches_torch():
    x = torch.randn(4, 7, 64)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        RMSNorm(64, affine=False)(x), F.rms_norm(x, (64,), None, 1e-6), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("weight_shape", [None, (16,), (3, 16)])
def test_rms_norm_gradients_match_autograd_reference(weight_shape):
    """The hand-written backward against autograd through torch's own rms_norm (and gradcheck)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = None
    if weight_shape is not None:
        weight = (torch.rand(weight_shape, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    grad = torch.randn(2, 5, 3, 16, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(
        rms_norm(x, weight, 1e-6), [x] + ([weight] if weight is not None else []), grad
    )
    ref_out = F.rms_norm(x, (16,), None, 1e-6) * (weight if weight is not None else 1)
    ref = torch.autograd.grad(ref_out, [x] + ([weight] if weight is not None else []), grad)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x[:1, :2], weight))


def reference_attention(q, k, v, mask=None):
    """Explicit softmax(q k^T / sqrt(d)) v with K/V heads repeated to the query heads.
    q [B, L, H, Dh], k/v [B, S, Hkv, Dh], mask [B, S] bool -> [B, L, H * Dh]."""
    heads, kv_heads = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bhls,bshd->blhd", scores.softmax(dim=-1), v)
    return out.flatten(2)


def test_gqa_attention_matches_explicit_reference():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 6, 8, generator=gen)
    k = torch.randn(2, 7, 2, 8, generator=gen)
    v = torch.randn(2, 7, 2, 8, generator=gen)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    torch.testing.assert_close(attention(q, k, v), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        attention(q, k, v, mask[:, None, None, :]), reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5
    )


def test_gqa_self_attention_equals_mha_with_repeated_kv_heads():
    """kv_heads < heads is multi-head attention whose K/V projection rows are repeated per group."""
    torch.manual_seed(0)
    hidden, heads, kv_heads = 32, 4, 2
    head_dim = hidden // heads
    gqa = SelfAttention(hidden, heads, kv_heads, eps=1e-6)
    mha = SelfAttention(hidden, heads, heads, eps=1e-6)
    wq, wk, wv = gqa.qkv.weight.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])

    def repeat_heads(w):
        return (
            w.view(kv_heads, head_dim, hidden).repeat_interleave(heads // kv_heads, dim=0).reshape(-1, hidden)
        )

    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([wq, repeat_heads(wk), repeat_heads(wv)]))
        mha.out.weight.copy_(gqa.out.weight)
        for norm in ("q_norm", "k_norm"):
            getattr(gqa, norm).weight.copy_(torch.rand(head_dim) + 0.5)
            getattr(mha, norm).weight.copy_(getattr(gqa, norm).weight)
    x = torch.randn(2, 16, hidden)
    rope = rope_table(grid_rope_angles(grid_positions(16, False)[0], (0, 2, 2), 100.0), x.device)
    torch.testing.assert_close(gqa(x, rope), mha(x, rope), rtol=1e-5, atol=1e-5)
    # and both equal the attention written out op by op
    q = (x @ wq.T).unflatten(-1, (heads, head_dim))
    k = (x @ wk.T).unflatten(-1, (kv_heads, head_dim))
    v = (x @ wv.T).unflatten(-1, (kv_heads, head_dim))
    q = apply_rope(F.rms_norm(q, (head_dim,), gqa.q_norm.weight, 1e-6), rope)
    k = apply_rope(F.rms_norm(k, (head_dim,), gqa.k_norm.weight, 1e-6), rope)
    expected = reference_attention(q, k, v) @ gqa.out.weight.T
    torch.testing.assert_close(gqa(x, rope), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- RoPE


def rotated_scores(table: torch.Tensor, head_dim: int, seed: int = 0) -> torch.Tensor:
    """scores[i, j] = <R_i q, R_j k> for fixed random q, k placed at every position of the table."""
    gen = torch.Generator().manual_seed(seed)
    length = table.shape[0]
    q = torch.randn(head_dim, generator=gen).expand(1, length, 1, head_dim).contiguous()
    k = torch.randn(head_dim, generator=gen).expand(1, length, 1, head_dim).contiguous()
    q_rot, k_rot = apply_rope(q, table)[0, :, 0], apply_rope(k, table)[0, :, 0]  # [L, Dh]
    return q_rot.double() @ k_rot.double().T


def assert_depends_only_on_offset(scores: torch.Tensor, positions: list[tuple]) -> None:
    by_offset: dict[tuple, list[float]] = {}
    for i, pi in enumerate(positions):
        for j, pj in enumerate(positions):
            by_offset.setdefault(tuple(a - b for a, b in zip(pi, pj, strict=True)), []).append(
                float(scores[i, j])
            )
    spread = max(max(v) - min(v) for v in by_offset.values())
    assert spread < 1e-4, spread
    means = [sum(v) / len(v) for v in by_offset.values()]
    assert max(means) - min(means) > 0.1  # the score does depend on the offset


def test_token_layouts():
    assert token_layout(16, False) == ("grid", 4)
    assert token_layout(17, True) == ("cls_grid", 4)
    assert token_layout(257, True) == ("cls_grid", 16)
    assert token_layout(17, False) == ("sequence", 0)
    assert token_layout(16, True) == ("sequence", 0)
    assert token_layout(10, False) == ("sequence", 0)


def test_rope_2d_grid_is_axial_and_relative():
    head_dim = 16
    positions, side = grid_positions(16, False)
    assert side == 4
    # row-major: token i is at (i // 4, i % 4)
    expected = torch.tensor([[0.0, i // 4, i % 4] for i in range(16)], dtype=torch.float64)
    torch.testing.assert_close(positions, expected)
    pairs = rope_axis_pairs(head_dim, reserve_cls_axis=False)
    assert pairs == (0, 4, 4)
    angles = grid_rope_angles(positions, pairs, 100.0)  # [16, 8]
    # the first half of the pairs turns with the row only, the second half with the column only
    torch.testing.assert_close(angles[:, :4], angles[torch.arange(16) // 4 * 4, :4])
    torch.testing.assert_close(angles[:, 4:], angles[torch.arange(16) % 4, 4:])
    scores = rotated_scores(rope_table(angles, torch.device("cpu")), head_dim)
    assert_depends_only_on_offset(scores, [(i // 4, i % 4) for i in range(16)])


def test_rope_sequence_fallback_is_relative():
    head_dim = 16
    table = rope_table(sequence_rope_angles(11, head_dim, 100.0), torch.device("cpu"))
    assert_depends_only_on_offset(rotated_scores(table, head_dim), [(i,) for i in range(11)])


def test_rope_cls_layout():
    head_dim = 16
    positions, side = grid_positions(17, True)
    pairs = rope_axis_pairs(head_dim, reserve_cls_axis=True)
    assert sum(pairs) == head_dim // 2 and pairs[0] >= 2 and pairs[1] == pairs[2] >= 1
    # CLS sits at the grid centre, one unit along the CLS axis; patches at 0 on that axis
    torch.testing.assert_close(positions[0], torch.tensor([1.0, 1.5, 1.5], dtype=torch.float64))
    assert bool((positions[1:, 0] == 0).all())
    table = rope_table(grid_rope_angles(positions, pairs, 100.0), torch.device("cpu"))
    # patch-to-patch scores still depend only on the 2-D offset
    scores = rotated_scores(table, head_dim)
    assert_depends_only_on_offset(scores[1:, 1:], [(i // side, i % side) for i in range(16)])
    # the CLS rotation differs from every patch's
    distance = (table[1:, 0] - table[0, 0]).abs().amax(dim=-1)
    assert float(distance.min()) > 0.5


def test_cross_attention_rope_maps_cond_grid_onto_target_grid():
    model = DiT(tiny_config(num_tokens=16, num_cond_tokens=4))
    rope_self, rope_q, rope_k = model.rope_tables(16, 4, torch.device("cpu"))
    assert rope_q is rope_self
    # a 2x2 conditioning grid on a 4x4 target grid: cell centres at 0.5 and 2.5
    cond_positions = torch.tensor([[0.0, r, c] for r in (0.5, 2.5) for c in (0.5, 2.5)], dtype=torch.float64)
    expected = rope_table(grid_rope_angles(cond_positions, model._rope_pairs, model.config.rope_theta), "cpu")
    torch.testing.assert_close(rope_k, expected)
    # a conditioning sequence that is not a grid: position-free cross-attention
    assert model.rope_tables(16, 7, torch.device("cpu"))[1:] == (None, None)
    assert DiT(tiny_config(cross_attention_rope=False)).rope_tables(16, 9, torch.device("cpu"))[1:] == (
        None,
        None,
    )


# ---------------------------------------------------------------------------------------------------- model


def test_zero_output_at_init_and_not_after_perturbation():
    model = DiT(tiny_config())
    x_t, t, cond = inputs(model.config)
    out = model(x_t, t, cond)
    assert out.shape == x_t.shape
    assert bool((out == 0).all())
    perturb_zero_init(model)
    out = model(x_t, t, cond)
    assert float(out.detach().abs().mean()) > 1e-2
    assert torch.isfinite(out).all()


def test_blocks_start_as_the_identity():
    """adaLN-Zero: with only the output layer made non-zero, the model equals the same model without
    its blocks (every block passes the residual stream through unchanged)."""
    model = DiT(tiny_config())
    with torch.no_grad():
        model.output_proj.weight.normal_()
    x_t, t, cond = inputs(model.config)
    out = model(x_t, t, cond).detach()
    assert float(out.abs().mean()) > 1e-2
    model.blocks = torch.nn.ModuleList()
    torch.testing.assert_close(model(x_t, t, cond).detach(), out)


@pytest.mark.parametrize("num_cond_tokens", [9, 7])  # a 3x3 grid (cross RoPE) and a plain sequence
def test_cross_attention_mask_hides_padded_tokens(num_cond_tokens):
    model = DiT(tiny_config(num_cond_tokens=num_cond_tokens))
    perturb_zero_init(model)
    x_t, t, cond = inputs(model.config)
    mask = torch.ones(3, num_cond_tokens, dtype=torch.bool)
    mask[0, -3:] = False
    mask[2, :2] = False
    changed = cond.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), cond.shape[-1]) * 10
    out = model(x_t, t, cond, mask)
    torch.testing.assert_close(model(x_t, t, changed, mask), out, rtol=1e-5, atol=1e-6)
    # without the mask the same change does matter, and so does a change of a real token
    assert not torch.allclose(model(x_t, t, changed), model(x_t, t, cond), atol=1e-4)
    changed_real = cond.clone()
    changed_real[0, 0] += 5.0
    assert not torch.allclose(model(x_t, t, changed_real, mask)[0], out[0], atol=1e-4)
    torch.testing.assert_close(model(x_t, t, changed_real, mask)[1:], out[1:], rtol=1e-5, atol=1e-6)


def test_null_output_equals_attention_over_null_tokens():
    """The shortcut for dropped rows against the attention it replaces: every key/value the null token."""
    torch.manual_seed(0)
    cross = CrossAttention(32, 4, 2, eps=1e-6)
    with torch.no_grad():
        cross.k_norm.weight.copy_(torch.rand(8) + 0.5)
    x = torch.randn(3, 16, 32)
    null = torch.randn(1, 1, 32)
    context = torch.randn(3, 9, 32)
    rope_q = rope_table(grid_rope_angles(grid_positions(16, False)[0], (0, 2, 2), 100.0), "cpu")
    rope_k = rope_table(grid_rope_angles(grid_positions(9, False, scale=4 / 3)[0], (0, 2, 2), 100.0), "cpu")
    reference_null = cross.attend(x, null.expand(3, 9, 32), None, rope_q, rope_k)
    torch.testing.assert_close(cross.null_output(null).expand_as(x), reference_null, rtol=1e-5, atol=1e-5)
    # a mixed batch: row 1 conditioned, rows 0 and 2 dropped
    keep = torch.tensor([1])
    cond = Conditioning(context[keep], None, keep, null, rope_q, rope_k)
    out = cross(x, cond)
    torch.testing.assert_close(out[1:2], cross.attend(x[1:2], context[1:2], None, rope_q, rope_k))
    torch.testing.assert_close(out[[0, 2]], reference_null[[0, 2]], rtol=1e-5, atol=1e-5)
    everything = Conditioning(context, None, None, null, rope_q, rope_k)
    torch.testing.assert_close(cross(x, everything), cross.attend(x, context, None, rope_q, rope_k))


def test_dropped_condition_is_the_null_condition():
    model = DiT(tiny_config())
    perturb_zero_init(model)
    x_t, t, cond = inputs(model.config)
    drop = torch.tensor([True, False, True])
    out = model(x_t, t, cond, drop=drop)
    # dropped samples ignore their condition and equal the unconditional (cond=None) prediction
    other = torch.randn_like(cond)
    out_other = model(x_t, t, other, drop=drop)
    torch.testing.assert_close(out_other[drop], out[drop], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x_t, t, None)[drop], out[drop], rtol=1e-5, atol=1e-5)
    # kept samples are the plain conditional prediction
    torch.testing.assert_close(model(x_t, t, cond)[~drop], out[~drop], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[~drop], out_other[~drop], atol=1e-4)
    # a dropped sample is unconditional even when its padding mask would hide every token
    mask = torch.zeros(3, model.config.num_cond_tokens, dtype=torch.bool)
    mask[1] = True
    torch.testing.assert_close(model(x_t, t, cond, mask, drop=drop)[drop], out[drop], rtol=1e-5, atol=1e-5)


def test_cls_layout_model_and_scalar_t():
    model = DiT(tiny_config(num_tokens=17, has_cls=True, num_cond_tokens=10, cond_has_cls=True))
    perturb_zero_init(model)
    x_t, t, cond = inputs(model.config)
    out = model(x_t, 0.5, cond)
    assert out.shape == (3, 17, 12)
    torch.testing.assert_close(out, model(x_t, torch.full((3,), 0.5), cond))
    assert not torch.allclose(out, model(x_t, 0.25, cond), atol=1e-4)


def test_samples_are_independent_of_the_batch():
    model = DiT(tiny_config())
    perturb_zero_init(model)
    x_t, t, cond = inputs(model.config, batch=4)
    full = model(x_t, t, cond)
    torch.testing.assert_close(model(x_t[1:2], t[1:2], cond[1:2]), full[1:2], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_same_output_and_gradients():
    reference = DiT(tiny_config())
    perturb_zero_init(reference)
    checkpointed = DiT(tiny_config(gradient_checkpointing=True))
    checkpointed.load_state_dict(reference.state_dict())
    x_t, t, cond = inputs(reference.config)
    losses = []
    for model in (reference, checkpointed):
        model.train()
        loss = model(x_t, t, cond).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p_ref), (_, p_ckpt) in zip(
        reference.named_parameters(), checkpointed.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_ckpt.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
