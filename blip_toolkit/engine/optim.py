"""Optimizer, learning-rate schedule and EMA of the weights, shared by every trainer.

AdamW without weight decay on biases, norms and other 1-D parameters (as BLIP / LAVIS and
transformers' Trainer), a linear warmup then a cosine decay, and a float32 EMA (DiT's `update_ema`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from blip_toolkit.errors import TrainingError


def parameter_groups(named_parameters: Iterable[tuple[str, Any]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed (matrices, embeddings, query tokens) and undecayed
    (biases, LayerNorm weights: every parameter with fewer than 2 dimensions) groups, as LAVIS
    (`p.ndim < 2 or "bias" in n or "ln" in n`) and transformers' Trainer do. Frozen ones are left out."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of `model` (see `parameter_groups`).

    The fused kernel (CPU and CUDA, one pass over each parameter instead of a dozen elementwise
    ops; transformers' Trainer defaults to it too) when this torch has it, else the default."""
    groups = parameter_groups(model.named_parameters(), weight_decay)
    if not groups:
        raise TrainingError("no trainable parameters (everything is frozen)")
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier after `step` optimizer steps: linear from 0 to 1 over `warmup_steps`,
    then a half cosine from 1 down to `min_ratio` at `total_steps` (and `min_ratio` after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A LambdaLR with `warmup_cosine_factor`. Step it once per optimizer step.

    The first step uses lr * 1/warmup (not 0, which would waste a step); with no warmup the first
    step uses the full learning rate."""
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio))


class Ema:
    """A float32 exponential moving average of a model's weights (DiT's `update_ema`), kept in
    `module` (a frozen copy in eval mode). The effective decay is min(decay, (1 + step) / (10 + step)),
    so early on the average follows the weights instead of averaging in the random initialisation."""

    def __init__(self, model: nn.Module, decay: float, device=None):
        self.decay = decay
        self.module = copy.deepcopy(model).float().requires_grad_(False).eval()
        if device is not None:
            self.module.to(device)
        self.targets: list[torch.Tensor] = []
        self.sources: list[torch.Tensor] = []

    def track(self, model: nn.Module) -> None:
        """Follow `model`'s parameters (same order as the copy); detached views share their storage,
        so they see every optimizer update."""
        self.targets = list(self.module.parameters())
        self.sources = [p.detach() for p in model.parameters()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.targets, self.sources, 1.0 - decay)
