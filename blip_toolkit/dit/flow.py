"""Rectified flow (Liu et al. 2022; Lipman et al. 2022): the probability path, timestep sampling and
the training loss. The ODE solvers are in dit/solver.py.

Names used throughout: x_0 noise ~ N(0, I), x_1 data, x_t = (1 - t) x_0 + t x_1, t in [0, 1]
(t = 0 is pure noise), target velocity d x_t / dt = x_1 - x_0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip_toolkit.dit.config import FlowConfig
from blip_toolkit.dit.normalize import TokenNormalizer
from blip_toolkit.engine.distributed import gather_all
from blip_toolkit.errors import ConfigError

# ----------------------------------------------------------------------------------------------------
# The path


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t [B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def interpolate(x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t x_1 for x_0, x_1 [B, ...] and t [B]."""
    t = _per_sample(t, x_1)
    return torch.lerp(x_0, x_1, t)  # one fused op: x_0 + t (x_1 - x_0)


def target_velocity(x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """d x_t / dt along the straight path: x_1 - x_0 (independent of t)."""
    return x_1 - x_0


@dataclass
class PathSample:
    """A point of the straight path: x_0 noise, x_1 data, t [B], x_t, and the target velocity dx_t."""

    x_0: torch.Tensor
    x_1: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    dx_t: torch.Tensor


def sample_path(x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor) -> PathSample:
    """x_t and the target velocity at times t [B] between noise x_0 and data x_1 [B, ...]."""
    return PathSample(x_0, x_1, t, interpolate(x_0, x_1, t), target_velocity(x_0, x_1))


def predicted_clean(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x_1 implied by a velocity prediction: x_t + (1 - t) v. Exact when v = x_1 - x_0."""
    return x_t + (1 - _per_sample(t, x_t)) * velocity


def sample_t(
    batch_size: int,
    config: FlowConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training timesteps [B] in [0, 1): uniform, or sigmoid(N(mean, std)) (logit-normal)."""
    if config.t_sampling == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    normal = torch.randn(batch_size, generator=generator, device=device)
    return torch.sigmoid(config.logit_normal_mean + config.logit_normal_std * normal)


# ----------------------------------------------------------------------------------------------------
# The loss


def info_nce(
    predicted: torch.Tensor, target: torch.Tensor, temperature: float, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) between paired embeddings predicted [B, E] and target [B, E]:
    row i of each is the positive of row i of the other, the rest of the batch the negatives.
    positives [B, B] bool (optional, symmetric, true on the diagonal): which (predicted i, target j)
    pairs are positives; with several per row the loss is -log of their summed softmax probability
    (an identical caption of another image describes this image too: not a negative)."""
    predicted = F.normalize(predicted, dim=-1)
    target = F.normalize(target, dim=-1)
    logits = predicted @ target.T / temperature  # [B, B]
    if positives is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def multi_positive(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hits = scores.masked_fill(~mask, float("-inf")).logsumexp(dim=1)  # [B]
        return (scores.logsumexp(dim=1) - hits).mean()

    return (multi_positive(logits, positives) + multi_positive(logits.T, positives.T)) / 2


def same_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: which rows of x [B, E] are identical (the same caption gives the same text
    embedding)."""
    return (x[:, None, :] == x[None, :, :]).all(dim=-1)


def flow_loss(
    model: Callable[..., torch.Tensor],
    x_1: torch.Tensor,
    cond: torch.Tensor,
    config: FlowConfig,
    *,
    x_0: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target_tokens: torch.Tensor | None = None,
    normalizer: TokenNormalizer | None = None,
    text: torch.Tensor | None = None,
    has_text: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rectified-flow training loss for one batch (the one `train-dit` optimises).

    x_1 [B, N, Dt] target tokens (already normalised by `normalizer.encode`, if any); cond [B, M, Dc];
    cond_mask [B, M] bool or None. The noise x_0 [B, N, Dt], the times t [B] and the condition-dropout
    mask drop [B] (bool) are drawn from `generator` (on x_1's device) unless given (the trainer draws
    them per global batch, dit/data.py). `model(x_t, t, cond, cond_mask, drop=drop)` is a DiT.

    With `config.contrastive_weight > 0`, `project(tokens [B, N, Dt]) -> [B, E]` (the target head:
    the pooling and projection eval-recall scores generated tokens with) and `target_tokens`
    [B, N, Dt] (the batch's ground-truth tokens, in the target encoder's space, not normalised) add a
    symmetric InfoNCE term between project(decoded predicted clean tokens) and project(target_tokens):
    the same pooled quantity on both sides, the one recall ranks (head(generated tokens) is the
    "generated" feature, head(ground truth) the "gt-pooled" one). Not the encoder's own global
    embedding: with mean pooling of patches it is another quantity (the CLS token's projection), which
    the head of even perfect tokens does not reproduce. The negatives are the rest of the global
    batch (gathered from every process under data parallelism, so N processes train what one does).
    Samples whose condition was dropped are left out of it: without a condition the prediction
    cannot know which image it belongs to.

    With `config.contrastive_positive = "text"` the positive of each image is `text` [B, E] (the
    embedding of one of its captions, in the target encoder's joint space; `has_text` [B] bool marks
    the images that have one, the others are left out) instead of project(target_tokens); rows with
    identical texts are positives of each other (`same_rows`). With `config.contrastive_space =
    "tokens"` the term compares the predicted clean tokens with x_1 in the normalised space, each
    image's tokens flattened into one vector (no head).

    Returns (loss, parts) where parts holds detached scalars "loss", "mse" and "contrastive".
    """
    batch = x_1.shape[0]
    if x_0 is None:
        x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)  # [B, N, Dt]
    if t is None:
        t = sample_t(batch, config, generator=generator, device=x_1.device)  # [B]
    if drop is None and config.cond_dropout > 0:
        drop = torch.rand(batch, generator=generator, device=x_1.device) < config.cond_dropout  # [B]
    path = sample_path(x_0, x_1, t)
    v_pred = model(path.x_t, t, cond, cond_mask, drop=drop).float()  # [B, N, Dt]
    mse = F.mse_loss(v_pred, path.dx_t)
    loss = mse
    contrastive = torch.zeros((), device=x_1.device)
    if config.contrastive_weight > 0:
        if config.contrastive_positive == "auto":
            raise ConfigError(
                "flow.contrastive_positive = 'auto' is resolved from the data before training",
                hint="pass config.for_data(has_captions) to flow_loss",
            )
        by_text = config.contrastive_positive == "text"
        on_tokens = config.contrastive_space == "tokens"
        if not on_tokens and (project is None or (text if by_text else target_tokens) is None):
            needed = "the texts (captions' embeddings)" if by_text else "the ground-truth target tokens"
            raise ConfigError(
                f"flow.contrastive_weight > 0 needs the target head and {needed}",
                hint="pass project= and "
                + ("text=" if by_text else "target_tokens=")
                + " to flow_loss, or set contrastive_weight = 0",
            )
        keep = ~drop if drop is not None else torch.ones(batch, dtype=torch.bool, device=x_1.device)
        if by_text and has_text is not None:
            keep = keep & has_text
        x_1_hat = predicted_clean(path.x_t, t, v_pred)  # [B, N, Dt]
        if on_tokens:  # normalised space, one flattened vector per image
            predicted, positive = x_1_hat.flatten(1), x_1.flatten(1)
        else:
            if normalizer is not None:
                x_1_hat = normalizer.decode(x_1_hat)
            predicted = project(x_1_hat)  # [B, E]
            if by_text:
                positive = text
            else:
                with torch.no_grad():
                    positive = project(target_tokens)  # [B, E]: what recall calls gt-pooled
        # Negatives from the whole global batch: every process gathers every process's rows and
        # computes the same loss, the single-process one (each process's gradient reaches its own rows
        # through the gather, summed over processes, which DDP's averaging undoes).
        predicted = gather_all(predicted, grad=True)  # [G, E]
        positive = gather_all(positive.to(predicted.dtype), grad=False)
        keep = gather_all(keep, grad=False)  # [G]
        if int(keep.sum()) >= 2:  # InfoNCE needs at least one negative
            positive = positive[keep]
            positives = same_rows(positive) if by_text and not on_tokens else None
            contrastive = info_nce(predicted[keep], positive, config.contrastive_temperature, positives)
            loss = loss + config.contrastive_weight * contrastive
    parts = {"loss": loss.detach(), "mse": mse.detach(), "contrastive": contrastive.detach()}
    return loss, parts
