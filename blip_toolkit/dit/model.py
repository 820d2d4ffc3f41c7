"""The Diffusion Transformer of the CLIP-feature pipeline: predicts the rectified-flow velocity of the
target encoder's patch tokens, conditioned on another encoder's patch tokens.

A pure `nn.Module` (no loss, no I/O). The block is this toolkit's design (its specification's seed
variants), built from Lumina-Next's parts but not BLIP3-o's head (docs/architecture.md, "The DiT"):
grouped-query self-attention with QK RMSNorm and axial rotary positions, cross-attention to the
conditioning tokens, a SwiGLU MLP, RMSNorm before and after every sub-layer ("sandwich norm"), and
DiT's adaLN-Zero timestep modulation (Peebles & Xie 2023), so the untrained network predicts zero.

Rotary positions (dit/rope.py) follow the token layout: 2-D axial over a patch grid, with a third
axis for a CLS token, else 1-D.

Cross-attention: when both the target and the conditioning sequences are grids, the conditioning
grid is mapped onto the target grid (centres aligned, so a 24x24 grid lands on a 16x16 one) and
queries and keys are both rotated. The two encoders see the same pixels (extract-embeddings --crop
center cuts every image to one square before both processors), so this gives every target
patch a relative-position prior towards the conditioning patches of the same place in the image.
Otherwise cross-attention is position-free (the queries already carry position from self-attention).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from blip_toolkit.dit.config import DiTConfig
from blip_toolkit.dit.rope import (
    apply_rope,
    grid_positions,
    grid_rope_angles,
    rope_axis_pairs,
    rope_table,
    sequence_rope_angles,
    token_layout,
)

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


# ----------------------------------------------------------------------------------------------------
# Layers


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward. Autograd through the composite form runs about ten
    kernels per norm in the backward pass (the norm's own backward alone is a div, a mask and a
    multiply); this one runs three, and a block calls nine norms. On a shared 2-core CPU every kernel
    launch is also a thread barrier, so the count matters as much as the bytes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        # vector_norm, not a mean of squares: on this CPU, torch's mean(x * x) over the short rows of
        # QK-norm (64-wide heads) was several times slower than one fused norm reduction.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
        inv_rms = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))  # [..., 1]
        y = x * inv_rms  # [..., D]
        ctx.save_for_backward(y, inv_rms, weight)
        return y * weight if weight is not None else y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, inv_rms, weight = ctx.saved_tensors
        grad_y = grad * weight if weight is not None else grad  # [..., D]
        # Under autocast the saved y can be bfloat16 while the incoming grad is float32.
        y = y.to(grad_y.dtype)
        inv_rms = inv_rms.to(grad_y.dtype)
        # d/dx of y = x * rsqrt(mean(x^2) + eps) applied to grad_y: inv_rms * (grad_y - y * mean(grad_y * y))
        mean_dot = torch.linalg.vecdot(grad_y, y, dim=-1).unsqueeze(-1).div_(y.shape[-1])  # [..., 1]
        grad_x = torch.addcmul(grad_y, y, mean_dot, value=-1).mul_(inv_rms)  # [..., D]
        grad_weight = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (grad * y).sum_to_size(weight.shape)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight, for x [..., D] and weight broadcastable to [..., D]."""
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, optionally with a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, L, D] * (1 + scale [B, 1, D]) + shift [B, 1, D]."""
    return torch.addcmul(shift, x, 1 + scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention with grouped K/V heads, in token-major layout.

    q [B, L, H, Dh], k and v [B, S, Hkv, Dh] (Hkv divides H; query head h reads K/V head h // (H/Hkv)),
    mask [B, 1, 1, S] bool (True = attend) or None. Returns [B, L, H * Dh]. The transposes are views:
    SDPA takes strided inputs and its CPU kernel writes its output token-major, so the final reshape
    does not copy either."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if kv_heads != heads and not _SDPA_HAS_GQA:  # pragma: no cover - torch < 2.5
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
    extra = {"enable_gqa": True} if kv_heads != heads and _SDPA_HAS_GQA else {}
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, **extra
    )
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)  # [B, L, H * Dh]


class SelfAttention(nn.Module):
    """Grouped-query self-attention with one fused QKV projection, QK RMSNorm and rotary positions."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.out = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        """x [B, N, D], rope [N, 1, Dh/2] or None -> [B, N, D]."""
        heads, kv_heads = self.heads, self.kv_heads
        qkv = self.qkv(x).unflatten(-1, (-1, self.head_dim))  # [B, N, H + 2Hkv, Dh]
        qk, v = qkv.split([heads + kv_heads, kv_heads], dim=2)  # views
        # q and k share the token positions: normalise and rotate them in one pass each.
        qk_gain = torch.cat([self.q_norm.weight.expand(heads, -1), self.k_norm.weight.expand(kv_heads, -1)])
        qk = apply_rope(rms_norm(qk, qk_gain, self.q_norm.eps), rope)  # [B, N, H + Hkv, Dh]
        q, k = qk.split([heads, kv_heads], dim=2)  # views
        return self.out(attention(q, k, v))  # [B, N, D]


class Conditioning(NamedTuple):
    """What every block's cross-attention reads, prepared once per forward.

    context [K, M, D]: the projected, normalised conditioning tokens of the K conditioned samples
    (None when K = 0); mask [K, 1, 1, M] bool or None; keep_index [K]: which batch rows those are
    (None = every row, the common case); null_context [1, 1, D]: the normalised null condition
    that the other rows see; rope_q / rope_k: cross-attention rotations or None.
    """

    context: torch.Tensor | None
    mask: torch.Tensor | None
    keep_index: torch.Tensor | None
    null_context: torch.Tensor
    rope_q: torch.Tensor | None
    rope_k: torch.Tensor | None


class CrossAttention(nn.Module):
    """Grouped-query cross-attention from the tokens to the (already projected) conditioning tokens,
    with this block's own fused K/V projection.

    Rows whose condition is dropped attend to the null condition only. All their keys and values
    would be the same token, so the softmax weights do not matter and the output is that token's
    value, for every query: it is computed once ([1, 1, D]) instead of running the attention. In
    guidance this skips the cross-attention of the whole unconditional half of the batch.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.out = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        if cond.keep_index is None:
            return self.attend(x, cond.context, cond.mask, cond.rope_q, cond.rope_k)  # [B, N, D]
        out = self.null_output(cond.null_context).expand_as(x)  # [B, N, D], a view
        if cond.context is None:
            return out
        kept = x.index_select(0, cond.keep_index)  # [K, N, D]
        attended = self.attend(kept, cond.context, cond.mask, cond.rope_q, cond.rope_k)  # [K, N, D]
        return out.index_copy(0, cond.keep_index, attended)  # [B, N, D]

    def attend(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None,
        rope_q: torch.Tensor | None,
        rope_k: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [B, N, D], context [B, M, D], mask [B, 1, 1, M] bool or None -> [B, N, D]."""
        q = self.q(x).unflatten(-1, (-1, self.head_dim))  # [B, N, H, Dh]
        kv = self.kv(context).unflatten(-1, (-1, self.head_dim))  # [B, M, 2Hkv, Dh]
        k, v = kv.split([self.kv_heads, self.kv_heads], dim=2)  # views
        q = apply_rope(self.q_norm(q), rope_q)  # [B, N, H, Dh]
        k = apply_rope(self.k_norm(k), rope_k)  # [B, M, Hkv, Dh]
        return self.out(attention(q, k, v, mask))  # [B, N, D]

    def null_output(self, null_context: torch.Tensor) -> torch.Tensor:
        """The attention output [1, 1, D] of any query over keys/values that are all null_context [1, 1, D]."""
        v = self.kv(null_context).unflatten(-1, (-1, self.head_dim))[:, :, self.kv_heads :]  # [1, 1, Hkv, Dh]
        # query head h reads K/V head h // (H / Hkv), as in attention()
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=2)  # [1, 1, H, Dh]
        return self.out(v.flatten(2))  # [1, 1, D]


class SwiGLU(nn.Module):
    """Gated MLP, silu(x W_gate) * (x W_up) W_down, with gate and up fused in one matmul."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # 2 x [B, N, F]
        return self.down(F.silu(gate) * up)  # [B, N, D]


class DiTBlock(nn.Module):
    """Self-attention, cross-attention and MLP, each wrapped as
    x + gate * post_norm(sublayer(modulate(pre_norm(x), shift, scale))) with shift/scale/gate from
    the timestep (adaLN-Zero: the gates start at zero, so every block starts as the identity)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        # No learned gains on these norms: each is followed by a per-channel adaLN scale (pre-norms)
        # or gate (post-norms) that already provides one, so a gain would only add parameters and
        # two more passes over the activations per norm in training.
        self.self_norm_in = RMSNorm(hidden, eps, affine=False)
        self.self_attn = SelfAttention(hidden, heads, kv_heads, eps)
        self.self_norm_out = RMSNorm(hidden, eps, affine=False)
        self.cross_norm_in = RMSNorm(hidden, eps, affine=False)
        self.cross_attn = CrossAttention(hidden, heads, kv_heads, eps)
        self.cross_norm_out = RMSNorm(hidden, eps, affine=False)
        self.mlp_norm_in = RMSNorm(hidden, eps, affine=False)
        self.mlp = SwiGLU(hidden, mlp_hidden)
        self.mlp_norm_out = RMSNorm(hidden, eps, affine=False)
        self.modulation = nn.Linear(hidden, 9 * hidden)

    def forward(
        self, x: torch.Tensor, time_features: torch.Tensor, cond: Conditioning, rope_self: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, N, D], time_features silu(t_emb) [B, D] -> [B, N, D]."""
        mods = self.modulation(time_features).unsqueeze(1).chunk(9, dim=-1)  # 9 x [B, 1, D]
        shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp, gate_mlp = mods
        h = modulate(self.self_norm_in(x), shift_sa, scale_sa)  # [B, N, D]
        x = torch.addcmul(x, gate_sa, self.self_norm_out(self.self_attn(h, rope_self)))  # [B, N, D]
        h = modulate(self.cross_norm_in(x), shift_ca, scale_ca)  # [B, N, D]
        x = torch.addcmul(x, gate_ca, self.cross_norm_out(self.cross_attn(h, cond)))  # [B, N, D]
        h = modulate(self.mlp_norm_in(x), shift_mlp, scale_mlp)  # [B, N, D]
        return torch.addcmul(x, gate_mlp, self.mlp_norm_out(self.mlp(h)))  # [B, N, D]


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0
) -> torch.Tensor:
    """Sinusoidal features [B, dim] of t [B] in [0, 1] (scaled by 1000, so the frequency ladder of
    DiT's integer timesteps applies)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


# ----------------------------------------------------------------------------------------------------
# The model


class DiT(nn.Module):
    """Velocity network v(x_t, t | cond) for rectified flow over target-encoder tokens.

    Classifier-free guidance: a learned null condition `null_condition` [1, 1, D] (in the model's
    hidden space, where the projected conditioning tokens live) replaces the conditioning of the
    samples flagged by `drop` (or of the whole batch when cond is None). A dropped sample attends to
    the null token alone, so each block's cross-attention gives it that token's value, whatever its
    queries, positions or padding mask: a condition-free prediction inside an ordinary batch, which
    the training dropout and the batched cond/uncond forward of guidance both use. Its conditioning
    is neither projected nor attended to (see CrossAttention).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.require_data_dims()
        config = config.resolved()
        self.config = config
        hidden, heads, kv_heads = config.hidden_size, config.num_heads, config.num_kv_heads
        eps = config.norm_eps
        self.input_proj = nn.Linear(config.target_dim, hidden)
        # The conditioning is projected to the model width once per forward; each block then only
        # applies its own (hidden -> K/V) projection.
        self.cond_proj = nn.Linear(config.cond_dim, hidden)
        # No gain: it would fold into every block's K/V projection.
        self.cond_norm = RMSNorm(hidden, eps, affine=False)
        self.null_condition = nn.Parameter(torch.zeros(1, 1, hidden))
        self.time_mlp = nn.Sequential(
            nn.Linear(config.timestep_freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, heads, kv_heads, config.mlp_hidden_dim, eps) for _ in range(config.num_layers)
        )
        self.final_norm = RMSNorm(hidden, eps, affine=False)
        self.final_modulation = nn.Linear(hidden, 2 * hidden)
        self.output_proj = nn.Linear(hidden, config.target_dim)
        self.gradient_checkpointing = config.gradient_checkpointing
        self._rope_pairs = rope_axis_pairs(config.head_dim, config.has_cls or config.cond_has_cls)
        self._rope_cache: dict[tuple, tuple[torch.Tensor | None, ...]] = {}
        self.initialize_weights()
        # flow.contrastive_head = "learned": the head trained with the DiT (attach_text_head).
        self.text_head: nn.Module | None = None

    def attach_text_head(self, head: nn.Module) -> None:
        """Make `head` (tokens [B, N, Dt] -> [B, E]) part of the model, so the optimizer, the EMA,
        the processes' gradient sync and the checkpoints carry it as they carry the DiT's weights
        (saved as `text_head.*`). `forward` does not use it."""
        self.text_head = head

    @classmethod
    def from_config(cls, config: DiTConfig) -> DiT:
        return cls(config)

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) timestep MLP, and
        zero modulation and output layers, so the untrained model outputs exactly zero and every block
        starts as the identity (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.null_condition, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for layer in (self.final_modulation, self.output_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def rope_tables(
        self, num_tokens: int, num_cond_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(self-attention table [N, 1, Dh/2], cross-attention query table, cross-attention key table
        [M, 1, Dh/2]); the cross tables are None when the two sequences are not both grids. Cached
        per (N, M, device)."""
        key = (num_tokens, num_cond_tokens, device)
        if key not in self._rope_cache:
            cfg = self.config
            target = grid_positions(num_tokens, cfg.has_cls)
            if target is None:
                self_angles = sequence_rope_angles(num_tokens, cfg.head_dim, cfg.rope_theta)
            else:
                self_angles = grid_rope_angles(target[0], self._rope_pairs, cfg.rope_theta)
            rope_self = rope_table(self_angles, device)
            cond_layout = token_layout(num_cond_tokens, cfg.cond_has_cls)
            rope_q = rope_k = None
            if cfg.cross_attention_rope and target is not None and cond_layout[0] != "sequence":
                cond = grid_positions(num_cond_tokens, cfg.cond_has_cls, scale=target[1] / cond_layout[1])
                rope_q = rope_self
                rope_k = rope_table(grid_rope_angles(cond[0], self._rope_pairs, cfg.rope_theta), device)
            self._rope_cache[key] = (rope_self, rope_q, rope_k)
        return self._rope_cache[key]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None,
        cond_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity of the flow at (x_t, t) given the conditioning tokens.

        x_t [B, N, Dt]; t [B] in [0, 1] (0 = noise, 1 = data; a scalar is broadcast); cond [B, M, Dc],
        or None for an unconditional prediction of the whole batch; cond_mask [B, M] bool, True for
        real tokens (every sample needs at least one); drop [B] bool, True where the condition is
        replaced by the learned null condition. Returns the velocity [B, N, Dt].
        """
        batch, num_tokens, _ = x_t.shape
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((batch,), float(t), device=x_t.device)  # [B]
        cond_state, rope_self = self.prepare_conditioning(cond, cond_mask, drop, num_tokens)

        x = self.input_proj(x_t)  # [B, N, D]
        t_features = timestep_embedding(t, self.config.timestep_freq_dim).to(x.dtype)  # [B, F]
        time_features = F.silu(self.time_mlp(t_features))  # [B, D]
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            args = (x, time_features, cond_state, rope_self)
            x = checkpoint(block, *args, use_reentrant=False) if use_checkpoint else block(*args)  # [B, N, D]
        shift, scale = self.final_modulation(time_features).unsqueeze(1).chunk(2, dim=-1)  # 2 x [B, 1, D]
        x = modulate(self.final_norm(x), shift, scale)  # [B, N, D]
        velocity = self.output_proj(x)  # [B, N, Dt]
        if self.text_head is not None and torch.is_grad_enabled():
            # The learned head runs outside forward (flow_loss projects the predicted clean tokens).
            # A zero-valued dependency on its weights shows DDP (which searches for unused
            # parameters, condition dropout makes some) that forward uses them, so their gradient is
            # reduced once, in backward, instead of them being marked unused here and again there.
            velocity = velocity + 0.0 * sum(p.flatten()[0] for p in self.text_head.parameters())
        return velocity

    def prepare_conditioning(
        self,
        cond: torch.Tensor | None,
        cond_mask: torch.Tensor | None,
        drop: torch.Tensor | None,
        num_tokens: int,
    ) -> tuple[Conditioning, torch.Tensor | None]:
        """Project and normalise the conditioning of the samples that keep it (once for all blocks),
        and pick the rotary tables. Returns (conditioning, self-attention rope table)."""
        null_context = self.cond_norm(self.null_condition)  # [1, 1, D]
        keep_index = None
        if cond is None:
            cond = cond_mask = None
            keep_index = torch.zeros(0, dtype=torch.long, device=null_context.device)  # every row dropped
        elif drop is not None and bool(drop.any()):
            keep_index = (~drop).nonzero().squeeze(1)  # [K]
            cond = cond.index_select(0, keep_index)  # [K, M, Dc]
            cond_mask = cond_mask.index_select(0, keep_index) if cond_mask is not None else None  # [K, M]
        context = None
        if cond is not None and cond.shape[0] > 0:
            context = self.cond_norm(self.cond_proj(cond))  # [K, M, D]
        mask = cond_mask[:, None, None, :] if cond_mask is not None and context is not None else None
        num_cond_tokens = context.shape[1] if context is not None else 1
        rope_self, rope_q, rope_k = self.rope_tables(num_tokens, num_cond_tokens, null_context.device)
        return Conditioning(context, mask, keep_index, null_context, rope_q, rope_k), rope_self

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
