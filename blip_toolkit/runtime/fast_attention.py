"""A fused attention kernel for BLIP's vision tower.

transformers' `BlipAttention` (the ViT of every BLIP checkpoint) only has an eager path: it builds
the full [B, heads, 577, 577] score matrix at 384 px, scales it in a separate pass, softmaxes it and
copies it again, which is about a third of the vision encoder's time on CPU. The same computation
through `torch.nn.functional.scaled_dot_product_attention` uses a fused (flash-style) kernel and
never materialises the matrix. The result equals the eager one within float rounding (see
tests/runtime/test_fast_attention.py); greedy captions are unchanged.

BLIP-2's vision tower already dispatches through transformers' attention interface (SDPA by
default), so it needs nothing. Set BLIP_EAGER_ATTENTION=1 to keep transformers' own code path.
The fused path does not return attention probabilities (nothing in blip asks for them).
"""

from __future__ import annotations

import os
import types

import torch.nn.functional as F
from transformers.models.blip.modeling_blip import BlipAttention


def _sdpa_forward(self, hidden_states, **kwargs):
    batch, length, width = hidden_states.shape
    qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    # [3, B, heads, L, head_dim]: the same layout the eager forward uses
    context = F.scaled_dot_product_attention(
        qkv[0], qkv[1], qkv[2], dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
    )  # [B, heads, L, head_dim]
    return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


def use_fused_vision_attention(model) -> int:
    """Swap the forward of every BlipAttention in `model` for the fused one; returns how many."""
    if os.environ.get("BLIP_EAGER_ATTENTION", "").strip() not in ("", "0"):
        return 0

    count = 0
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(_sdpa_forward, module)
            count += 1
    return count
