"""train-dit's held-out metrics: the token cosine discriminates on CLIP-like tokens (a few dimensions of
huge magnitude shared by every token), where the raw cosine calls an untrained model's noise a match."""

from __future__ import annotations

import pytest
import torch

from blip_toolkit.dit.config import DiTConfig
from blip_toolkit.dit.data import EvalSet
from blip_toolkit.dit.evaluate import evaluate_dit
from blip_toolkit.dit.model import DiT
from blip_toolkit.dit.normalize import TokenNormalizer
from blip_toolkit.embeddings.head import TargetHead
from blip_toolkit.metrics.recall import mean_cosine

DT, DC, M = 16, 8, 16


def clip_like(n: int, patches: int, *, cls: bool, seed: int = 0) -> torch.Tensor:
    """[n, (1 +) patches, DT]: unit-variance tokens plus two dimensions of magnitude 40 / -25 in every
    token (CLIP ViT-L's pre-layernorm outliers), the CLS token on another offset."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, patches, DT, generator=gen)
    tokens[..., 0] += 40.0
    tokens[..., 1] -= 25.0
    if cls:
        first = torch.randn(n, 1, DT, generator=gen) * 0.5 - 10.0
        tokens = torch.cat([first, tokens], dim=1)
    return tokens


def eval_set(target: torch.Tensor) -> EvalSet:
    n = target.shape[0]
    return EvalSet(
        cond=torch.randn(n, M, DC, generator=torch.Generator().manual_seed(1)),
        target=target,
        index=torch.arange(n),
        text_emb=torch.empty(0, 4),
        caption_image=torch.empty(0, dtype=torch.int64),
        keys=[str(i) for i in range(n)],
    )


def untrained(num_tokens: int, cls: bool) -> DiT:
    torch.manual_seed(0)
    config = DiTConfig(
        preset="tiny",
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        target_dim=DT,
        cond_dim=DC,
        num_tokens=num_tokens,
        num_cond_tokens=M,
        has_cls=cls,
    ).resolved()
    return DiT(config).eval()  # zero output layer: velocity 0, samples = the decoded noise


@pytest.mark.parametrize("cls", [False, True])
def test_patch_cos_is_near_zero_for_noise_where_the_raw_cosine_is_near_one(cls):
    target = clip_like(12, 16, cls=cls)
    model = untrained(target.shape[1], cls)
    normalizer = TokenNormalizer.fit("standardize", [target], has_cls=cls)
    head = TargetHead(hidden_size=DT, embed_dim=4, pooling="mean", has_cls=cls)
    metrics = evaluate_dit(
        model, eval_set(target), normalizer=normalizer, head=head, steps=2, recall=False, batch_size=5
    )
    # The untrained model's samples are decoded noise: mean + std * N(0, I), unrelated to each target.
    assert metrics["patch_cos_raw"] > 0.9
    assert abs(metrics["patch_cos"]) < 0.1

    # patch_cos by hand: the sampled tokens (same noise as the evaluation) and the targets standardised
    # by the targets' own per-dimension mean and std (the CLS token by its own).
    from blip_toolkit.dit.data import sample_noise
    from blip_toolkit.dit.solver import generate

    x_0 = sample_noise(torch.arange(12), 0, tuple(target.shape[1:]))
    sampled = generate(model, eval_set(target).cond, x_0=x_0, steps=2, normalizer=normalizer)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        parts = [(0, 1), (1, None)] if cls else [(0, None)]
        out = []
        for lo, hi in parts:
            ref = target[:, lo:hi].reshape(-1, DT)
            out.append((x[:, lo:hi] - ref.mean(0)) / ref.std(0))
        return torch.cat(out, dim=1)

    assert metrics["patch_cos"] == pytest.approx(
        mean_cosine(standardise(sampled), standardise(target)), abs=1e-5
    )
    assert metrics["patch_cos_raw"] == pytest.approx(mean_cosine(sampled, target), abs=1e-5)


def test_one_evaluated_image_has_no_standardised_cosine():
    target = clip_like(1, 16, cls=False)
    metrics = evaluate_dit(
        untrained(16, False),
        eval_set(target),
        normalizer=TokenNormalizer("none"),
        head=TargetHead(hidden_size=DT, embed_dim=4, pooling="mean", has_cls=False),
        steps=1,
        recall=False,
    )
    assert "patch_cos" not in metrics and "patch_cos_raw" in metrics
