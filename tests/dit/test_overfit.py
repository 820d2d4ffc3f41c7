"""End to end: a tiny DiT trained with flow_loss (plain torch loop) learns to generate the target
tokens of 16 fixed samples from their conditioning tokens, sampled with generate()."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from blip_toolkit.dit.config import DiTConfig, FlowConfig
from blip_toolkit.dit.flow import flow_loss
from blip_toolkit.dit.model import DiT
from blip_toolkit.dit.solver import generate

SAMPLES, TOKENS, TARGET_DIM, COND_TOKENS, COND_DIM = 16, 16, 32, 16, 48


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cond [16, 16, 48] random; target x_1 [16, 16, 32] = a fixed two-layer tanh map of each
    conditioning token, rescaled to unit RMS per token."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(SAMPLES, COND_TOKENS, COND_DIM, generator=gen)
    w_1 = torch.randn(COND_DIM, 64, generator=gen) / COND_DIM**0.5
    w_2 = torch.randn(64, TARGET_DIM, generator=gen) / 8
    x_1 = torch.tanh(cond @ w_1) @ w_2
    return x_1 / x_1.square().mean(dim=-1, keepdim=True).sqrt(), cond


def mean_cosine(samples: torch.Tensor, x_1: torch.Tensor) -> float:
    return float(F.cosine_similarity(samples, x_1, dim=-1).mean())


def test_tiny_dit_overfits_16_samples():
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    try:
        torch.manual_seed(0)
        x_1, cond = make_data()
        config = DiTConfig(
            preset="tiny",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            target_dim=TARGET_DIM,
            cond_dim=COND_DIM,
            num_tokens=TOKENS,
            num_cond_tokens=COND_TOKENS,
        )
        model = DiT(config)
        flow = FlowConfig(contrastive_weight=0.0)  # plain MSE: uniform t, 10% condition dropout
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        generator = torch.Generator().manual_seed(0)

        def sample() -> torch.Tensor:
            return generate(model, cond, steps=20, generator=torch.Generator().manual_seed(1))

        untrained = mean_cosine(sample(), x_1)
        assert untrained < 0.3  # zero velocity: the samples are the noise
        start, cosine, step = time.perf_counter(), untrained, 0
        while step < 2000 and cosine <= 0.95:
            for _ in range(100):
                loss, _ = flow_loss(model, x_1, cond, flow, generator=generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
            cosine = mean_cosine(sample(), x_1)
        elapsed = time.perf_counter() - start
        assert cosine > 0.95, f"mean cosine {cosine:.3f} after {step} steps ({elapsed:.1f} s)"
        # the samples follow the condition: with the conditions permuted, they match the permuted targets
        permutation = torch.roll(torch.arange(SAMPLES), 1)
        permuted = generate(model, cond[permutation], steps=20, generator=torch.Generator().manual_seed(2))
        assert mean_cosine(permuted, x_1[permutation]) > 0.9
        assert mean_cosine(permuted, x_1) < 0.5
    finally:
        torch.set_num_threads(previous_threads)
