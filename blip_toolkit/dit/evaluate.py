"""Held-out metrics of a DiT (`train-dit`'s evaluation): a pure function of the model, the eval set
and the settings, so the numbers of a run can be recomputed from its export."""

from __future__ import annotations

import torch
from torch import nn

from blip_toolkit.dit.data import STREAM_EVAL_LOSS, EvalSet, sample_noise
from blip_toolkit.dit.flow import sample_path
from blip_toolkit.dit.normalize import TokenNormalizer
from blip_toolkit.dit.solver import generate
from blip_toolkit.embeddings.head import TargetHead
from blip_toolkit.engine.seeding import mix_seed
from blip_toolkit.metrics.recall import mean_cosine, merge_identical_captions, retrieval_recall


@torch.no_grad()
def evaluate_dit(
    model: nn.Module,
    eval_set: EvalSet,
    *,
    normalizer: TokenNormalizer,
    head: TargetHead,
    steps: int = 10,
    cfg_scale: float = 1.0,
    solver: str = "euler",
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    recall: bool = True,
    device=None,
) -> dict[str, float]:
    """Held-out metrics of a DiT on an `EvalSet` (dit/data.py).

    val_loss: flow-matching MSE (normalised space) at one random t per image; vel_cos: mean token
    cosine of the predicted vs the true velocity there (t and x_0 per image from (seed, image index));
    patch_cos: mean token cosine of the sampled tokens (`solver.generate` with the noise `blip sample
    --seed` uses) vs the ground truth, both standardised with the per-dimension mean and std of the
    evaluated ground-truth tokens (the CLS token with its own), as eval-recall's token cosine is: on raw
    CLIP tokens a few huge dimensions make any two tokens' cosine high; patch_cos_raw: the same on the
    raw tokens (patch_cos is absent when a single image is evaluated); global_cos: cosine of
    head(sampled) vs head(ground truth);
    est_r@1: image-to-text recall@1 of head(sampled) among the distinct captions of the evaluated
    images (identical strings are one text, positive for every image that has it, as `eval-recall
    --dedupe-captions`: otherwise a caption shared by many images, e.g. a class name, is a tie that
    recall's pessimistic tie rule always counts as a miss); images without a caption are left out;
    absent when there are no captions."""
    device = torch.device(device or next(model.parameters()).device)
    n = len(eval_set)
    _, tokens, dim = eval_set.target.shape
    generated = torch.empty(n, head.embed_dim)
    truth = torch.empty(n, head.embed_dim)
    # One image has no spread to standardise by: then patch_cos is left out.
    has_cls = bool(getattr(getattr(model, "config", None), "has_cls", False))
    reference = TokenNormalizer.fit("standardize", [eval_set.target], has_cls=has_cls) if n >= 2 else None
    squared = vel_cos = patch_cos = patch_cos_raw = 0.0
    for lo in range(0, n, batch_size):
        index = eval_set.index[lo : lo + batch_size]
        b = int(index.shape[0])
        cond = eval_set.cond[lo : lo + b].to(device)  # [b, M, Dc]
        target = eval_set.target[lo : lo + b].to(device)  # [b, N, Dt]
        t, x_0 = _eval_loss_noise(index, seed, (tokens, dim))
        path = sample_path(x_0.to(device), normalizer.encode(target), t.to(device))
        v_pred = model(path.x_t, path.t, cond).float()  # [b, N, Dt]
        squared += float((v_pred - path.dx_t).double().square().sum())
        vel_cos += mean_cosine(v_pred, path.dx_t) * b
        x_0 = sample_noise(index, seed, (tokens, dim), dtype=next(model.parameters()).dtype, device=device)
        sampled = generate(
            model,
            cond,
            x_0=x_0,
            steps=steps,
            cfg_scale=cfg_scale,
            solver=solver,
            shift=shift,
            normalizer=normalizer,
        ).float()  # [b, N, Dt]
        patch_cos_raw += mean_cosine(sampled, target) * b
        if reference is not None:
            patch_cos += mean_cosine(reference.encode(sampled), reference.encode(target)) * b
        generated[lo : lo + b] = head(sampled).float().cpu()
        truth[lo : lo + b] = head(target).float().cpu()
    metrics = {
        "val_loss": squared / (n * tokens * dim),
        "vel_cos": vel_cos / n,
        "patch_cos": patch_cos / n,
        "patch_cos_raw": patch_cos_raw / n,
        "global_cos": mean_cosine(generated, truth),
    }
    if reference is None:
        del metrics["patch_cos"]
    if recall and eval_set.text_emb.shape[0]:
        metrics["est_r@1"] = _estimated_recall(eval_set, generated)
    return metrics


def _eval_loss_noise(
    index: torch.Tensor, seed: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [b], x_0 [b, N, Dt]) of the evaluation loss, per image from (seed, image index)."""
    generator = torch.Generator()
    t = torch.empty(len(index))
    x_0 = torch.empty(len(index), *shape)
    for row, i in enumerate(index.tolist()):
        generator.manual_seed(mix_seed(seed, STREAM_EVAL_LOSS, i))
        t[row] = torch.rand((), generator=generator)
        x_0[row] = torch.randn(shape, generator=generator)
    return t, x_0


def _estimated_recall(eval_set: EvalSet, generated: torch.Tensor) -> float:
    """Image-to-text recall@1 of the generated globals among the eval set's distinct captions."""
    n = len(eval_set)
    images = torch.unique(eval_set.caption_image)  # images with at least one caption, sorted
    remap = torch.full((n,), -1, dtype=torch.int64)
    remap[images] = torch.arange(len(images))
    count = eval_set.text_emb.shape[0]
    strings = eval_set.captions if len(eval_set.captions) == count else [str(i) for i in range(count)]
    first, pair_image, pair_text = merge_identical_captions(strings, eval_set.caption_image)
    result = retrieval_recall(generated[images], eval_set.text_emb[first], remap[pair_image], pair_text, (1,))
    return result.i2t[1]
