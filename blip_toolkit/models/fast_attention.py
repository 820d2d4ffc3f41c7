"""Fused attention kernels for BLIP's vision tower and text transformer.

transformers' `BlipAttention` (the ViT of every BLIP checkpoint) only has an eager path: it builds
the full [B, heads, 577, 577] score matrix at 384 px, scales it in a separate pass, softmaxes it and
copies it again, which is about a third of the vision encoder's time on CPU. The same computation
through `torch.nn.functional.scaled_dot_product_attention` uses a fused (flash-style) kernel and
never materialises the matrix. The result equals the eager one within float rounding (see
tests/models/test_fast_attention.py); greedy captions are unchanged.

BLIP's text transformer (`BlipTextSelfAttention`: the caption decoder, the VQA question encoder and
answer decoder, the ITM text encoder) is eager only as well; `use_fused_text_attention` gives it the
same SDPA path (the key / value caching is transformers' own, copied). It also takes grouped pairs:
ITM scores several texts against one image, and transformers projects that image's 577 tokens to
keys and values once per (image, text) pair, which was most of retrieval's time; given the images
once and their texts in consecutive groups, the fused path projects each image once and attends
with the group's queries as one sequence (the same attention, row by row). Measured in
bench/bench_caption.py, bench_vqa.py, bench_retrieval.py: the decoder and the VQA encoder gain
nothing from SDPA alone, so only ITM models (models/loading.py open_runner) use it.

BLIP-2's vision tower already dispatches through transformers' attention interface (SDPA by
default), so it needs nothing. Set BLIP_EAGER_ATTENTION=1 to keep transformers' own code path.
The fused path does not return attention probabilities (nothing in blip asks for them).
"""

from __future__ import annotations

import math
import os
import types

import torch
import torch.nn.functional as F
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention


def _sdpa_forward(self, hidden_states, **kwargs):
    batch, length, width = hidden_states.shape
    qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    # [3, B, heads, L, head_dim]: the same layout the eager forward uses
    context = F.scaled_dot_product_attention(
        qkv[0], qkv[1], qkv[2], dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
    )  # [B, heads, L, head_dim]
    return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


def _text_sdpa_forward(
    self,
    hidden_states,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    past_key_values=None,
    **kwargs,
):
    """transformers' BlipTextSelfAttention.forward (5.x), with SDPA instead of matmul-softmax-matmul.
    The masks are the additive ones BlipTextModel builds (or None); SDPA adds them the same way."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.attention_head_size)
    query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, heads, L, head_dim]

    is_cross_attention = encoder_hidden_states is not None
    attention_mask = encoder_attention_mask if is_cross_attention else attention_mask

    is_updated = False
    cache = None
    if past_key_values is not None:
        if isinstance(past_key_values, EncoderDecoderCache):
            is_updated = past_key_values.is_updated.get(self.layer_idx)
            cache = (
                past_key_values.cross_attention_cache
                if is_cross_attention
                else past_key_values.self_attention_cache
            )
        else:
            cache = past_key_values

    current_states = encoder_hidden_states if is_cross_attention else hidden_states
    if is_cross_attention and past_key_values is not None and is_updated:
        key = cache.layers[self.layer_idx].keys  # the image keys / values, computed at the first step
        value = cache.layers[self.layer_idx].values
    else:
        kv_shape = (*current_states.shape[:-1], -1, self.attention_head_size)
        key = self.key(current_states).view(kv_shape).transpose(1, 2)  # [B, heads, S, head_dim]
        value = self.value(current_states).view(kv_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = cache.update(key, value, self.layer_idx)
            if is_cross_attention and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[self.layer_idx] = True

    if attention_mask is not None:
        attention_mask = attention_mask.to(device=query.device)
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
    batch, groups = query.shape[0], key.shape[0]
    if groups != batch:  # cross-attention of grouped pairs (models/itm.py BlipItmOps.itm_grouped)
        query = _grouped_queries(query, groups, attention_mask)
    context = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=self.dropout.p if self.training else 0.0,
        scale=1.0 / math.sqrt(self.attention_head_size),
    )  # [B, heads, L, head_dim] ([groups, heads, per_group * L, head_dim] for grouped pairs)
    if groups != batch:
        context = _ungrouped(context, batch)
    context = context.transpose(1, 2).reshape(*input_shape, self.all_head_size)
    return context, None


def _grouped_queries(query: torch.Tensor, groups: int, mask) -> torch.Tensor:
    """Queries of `batch` texts, `batch // groups` consecutive ones per image, against the keys /
    values of the `groups` images, projected once per image instead of once per text: the rows of one
    image's texts become one longer query sequence against that image. Each query row's softmax runs
    over its own image's keys, as before, so the result is the same attention.
    [B, heads, L, d] -> [groups, heads, (B / groups) * L, d]."""
    batch, heads, length, dim = query.shape
    if batch % groups or (mask is not None and mask.shape[-2] != 1):
        raise ValueError(f"{batch} queries do not split into {groups} groups with one key mask per group")
    per = batch // groups
    return (
        query.reshape(groups, per, heads, length, dim)
        .transpose(1, 2)
        .reshape(groups, heads, per * length, dim)
    )


def _ungrouped(context: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of `_grouped_queries` for the attention output."""
    groups, heads, rows, dim = context.shape
    per = batch // groups
    return (
        context.reshape(groups, heads, per, rows // per, dim)
        .transpose(1, 2)
        .reshape(batch, heads, rows // per, dim)
    )


def _eager_requested() -> bool:
    return os.environ.get("BLIP_EAGER_ATTENTION", "").strip() not in ("", "0")


def use_fused_vision_attention(model) -> int:
    """Swap the forward of every BlipAttention in `model` for the fused one; returns how many."""
    if _eager_requested():
        return 0

    count = 0
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(_sdpa_forward, module)
            count += 1
    return count


def use_fused_text_attention(model) -> int:
    """Swap the forward of every BlipTextSelfAttention in `model` (self- and cross-attention of
    BLIP's text encoder / decoder) for the fused one; returns how many."""
    if _eager_requested():
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, BlipTextSelfAttention):
            module.forward = types.MethodType(_text_sdpa_forward, module)
            count += 1
    return count


def text_attention_is_fused(module) -> bool:
    """Whether every BlipTextSelfAttention of `module` runs the fused forward (which also takes
    grouped cross-attention pairs), and it has at least one."""
    layers = [m for m in module.modules() if isinstance(m, BlipTextSelfAttention)]
    return bool(layers) and all(getattr(m.forward, "__func__", None) is _text_sdpa_forward for m in layers)
