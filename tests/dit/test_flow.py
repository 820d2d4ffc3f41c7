"""Rectified-flow path, timestep sampling and loss, against closed forms and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blip_toolkit.dit.config import FlowConfig
from blip_toolkit.dit.flow import (
    flow_loss,
    info_nce,
    interpolate,
    predicted_clean,
    same_rows,
    sample_t,
    target_velocity,
)
from blip_toolkit.dit.normalize import TokenNormalizer
from blip_toolkit.errors import ConfigError


def pair(seed: int = 0, shape=(4, 6, 5)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(
        shape, generator=gen, dtype=torch.float64
    )


def test_path_endpoints():
    x_0, x_1 = pair()
    torch.testing.assert_close(interpolate(x_0, x_1, torch.zeros(4, dtype=torch.float64)), x_0)
    torch.testing.assert_close(interpolate(x_0, x_1, torch.ones(4, dtype=torch.float64)), x_1)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    expected = torch.stack([(1 - t[i]) * x_0[i] + t[i] * x_1[i] for i in range(4)])
    torch.testing.assert_close(interpolate(x_0, x_1, t), expected)


def test_velocity_is_the_time_derivative_of_the_path():
    x_0, x_1 = pair(1)
    h = 1e-6
    for value in (0.1, 0.5, 0.9):
        t = torch.full((4,), value, dtype=torch.float64)
        finite_difference = (interpolate(x_0, x_1, t + h) - interpolate(x_0, x_1, t - h)) / (2 * h)
        torch.testing.assert_close(finite_difference, target_velocity(x_0, x_1), rtol=1e-6, atol=1e-6)


def test_predicted_clean_inverts_the_path():
    x_0, x_1 = pair(2)
    t = torch.tensor([0.0, 0.3, 0.7, 0.99], dtype=torch.float64)
    x_t = interpolate(x_0, x_1, t)
    torch.testing.assert_close(predicted_clean(x_t, t, target_velocity(x_0, x_1)), x_1)


def test_t_sampling_distributions_and_reproducibility():
    uniform = sample_t(20000, FlowConfig(), generator=torch.Generator().manual_seed(0))
    assert float(uniform.min()) >= 0 and float(uniform.max()) < 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.var()) - 1 / 12) < 0.005
    again = sample_t(20000, FlowConfig(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform, again)
    cfg = FlowConfig(t_sampling="logit-normal", logit_normal_mean=0.5, logit_normal_std=0.8)
    t = sample_t(20000, cfg, generator=torch.Generator().manual_seed(1))
    logits = torch.log(t / (1 - t))
    assert abs(float(logits.mean()) - 0.5) < 0.03 and abs(float(logits.std()) - 0.8) < 0.03


def test_flow_config_validation():
    with pytest.raises(ConfigError, match="t_sampling"):
        FlowConfig(t_sampling="cosine")
    with pytest.raises(ConfigError, match="cond_dropout"):
        FlowConfig(cond_dropout=1.0)
    with pytest.raises(ConfigError, match="target_norm"):
        FlowConfig(target_norm="minmax")
    assert FlowConfig.from_dict(FlowConfig(cond_dropout=0.2).to_dict()) == FlowConfig(cond_dropout=0.2)


class RecordingModel:
    """A stand-in velocity model: returns `fn(x_t, t)` and records what it was called with."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, x_t, t, cond, cond_mask=None, drop=None):
        self.calls.append({"x_t": x_t, "t": t, "cond": cond, "cond_mask": cond_mask, "drop": drop})
        return self.fn(x_t, t)


def test_flow_loss_matches_manual_computation():
    gen = torch.Generator().manual_seed(0)
    x_1 = torch.randn(8, 4, 3, generator=gen)
    cond = torch.randn(8, 5, 2, generator=gen)
    cfg = FlowConfig(cond_dropout=0.5, contrastive_weight=0.0)
    model = RecordingModel(lambda x_t, t: 0.5 * x_t)
    loss, parts = flow_loss(model, x_1, cond, cfg, generator=torch.Generator().manual_seed(3))
    # replay the generator in the documented order: noise, t, dropout
    replay = torch.Generator().manual_seed(3)
    x_0 = torch.randn(x_1.shape, generator=replay)
    t = torch.rand(8, generator=replay)
    drop = torch.rand(8, generator=replay) < 0.5
    x_t = (1 - t[:, None, None]) * x_0 + t[:, None, None] * x_1
    expected = ((0.5 * x_t - (x_1 - x_0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["mse"], expected)
    assert float(parts["contrastive"]) == 0.0
    call = model.calls[0]
    torch.testing.assert_close(call["t"], t)
    assert torch.equal(call["drop"], drop) and 0 < int(drop.sum()) < 8
    # same seed, same loss; no dropout -> no drop flags
    again, _ = flow_loss(model, x_1, cond, cfg, generator=torch.Generator().manual_seed(3))
    assert float(again) == float(loss)
    flow_loss(model, x_1, cond, FlowConfig(cond_dropout=0.0, contrastive_weight=0.0))
    assert model.calls[-1]["drop"] is None


def test_dropout_rate_and_logit_normal_t_reach_the_model():
    x_1 = torch.randn(4000, 1, 1)
    model = RecordingModel(lambda x_t, t: torch.zeros_like(x_t))
    cfg = FlowConfig(cond_dropout=0.1, t_sampling="logit-normal", contrastive_weight=0.0)
    flow_loss(model, x_1, torch.zeros(4000, 1, 1), cfg, generator=torch.Generator().manual_seed(0))
    call = model.calls[0]
    assert abs(call["drop"].float().mean().item() - 0.1) < 0.02
    assert abs(torch.logit(call["t"]).std().item() - 1.0) < 0.05


def brute_force_info_nce(a, b, temperature):
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [float(a[i] @ b[j]) / temperature for j in range(n)]
        col = [float(a[j] @ b[i]) / temperature for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
        total += -(col[i] - math.log(sum(math.exp(c) for c in col)))
    return total / (2 * n)


def test_info_nce_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(5, 7, generator=gen, dtype=torch.float64),
        torch.randn(5, 7, generator=gen, dtype=torch.float64),
    )
    assert abs(float(info_nce(a, b, 0.1)) - brute_force_info_nce(a, b, 0.1)) < 1e-9


def test_contrastive_term_compares_the_head_of_predicted_and_true_tokens_of_kept_samples():
    """InfoNCE between head(predicted clean tokens) and head(ground-truth tokens): the same pooled,
    projected quantity on both sides, the one eval-recall ranks (head(generated) vs gt-pooled). With a
    perfect velocity model both sides are the same embeddings."""
    gen = torch.Generator().manual_seed(0)
    batch, n, dt, e = 6, 4, 3, 5
    x_1 = torch.randn(batch, n, dt, generator=gen, dtype=torch.float64)
    cond = torch.randn(batch, 2, 2, generator=gen, dtype=torch.float64)
    head = torch.nn.Linear(dt, e).double()
    seen = []

    def project(tokens):
        seen.append(tokens.detach().clone())
        return head(tokens.mean(dim=1))  # mean-pool + linear, [B, E]

    # A perfect velocity model (it knows x_1): x_1_hat = x_t + (1 - t) v is exactly x_1.
    def oracle(x_t, t):
        return (x_1 - x_t) / (1 - t[:, None, None])

    cfg = FlowConfig(
        cond_dropout=0.3, contrastive_weight=0.5, contrastive_positive="image", contrastive_temperature=0.2
    )
    model = RecordingModel(oracle)
    loss, parts = flow_loss(
        model, x_1, cond, cfg, generator=torch.Generator().manual_seed(5), project=project, target_tokens=x_1
    )
    keep = ~model.calls[0]["drop"]
    assert 2 <= int(keep.sum()) < batch
    # The ground truth's head and the prediction's head, of every sample (gathered whole across
    # processes under data parallelism); the loss keeps the kept samples' rows only (below).
    assert len(seen) == 2
    for tokens in seen:
        torch.testing.assert_close(tokens, x_1)
    with torch.no_grad():
        embedded = project(x_1[keep])
        expected = brute_force_info_nce(embedded, embedded, 0.2)
    assert abs(float(parts["contrastive"]) - expected) < 1e-6
    assert float(parts["mse"]) < 1e-12
    assert abs(float(loss.detach()) - 0.5 * expected) < 1e-6
    loss.backward()  # the prediction side carries the gradient
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0


def test_contrastive_term_decodes_normalised_tokens():
    """The prediction is decoded to the target encoder's space before the head, the ground truth is
    given there: both reach the head as the raw tokens."""
    gen = torch.Generator().manual_seed(0)
    x_1 = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64) * 3 + 1
    normalizer = TokenNormalizer.fit("standardize", [x_1])
    x_1_norm = normalizer.encode(x_1)
    seen = []

    def project(tokens):
        seen.append(tokens.detach())
        return tokens.mean(dim=1)

    def oracle(x_t, t):
        return (x_1_norm - x_t) / (1 - t[:, None, None])

    cfg = FlowConfig(cond_dropout=0.0, contrastive_weight=1.0, contrastive_positive="image")
    flow_loss(
        RecordingModel(oracle),
        x_1_norm,
        x_1,
        cfg,
        project=project,
        target_tokens=x_1,
        normalizer=normalizer,
        generator=torch.Generator().manual_seed(3),
    )
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], x_1)
    # the prediction went through the oracle's division by 1 - t and the normaliser's float32 statistics
    torch.testing.assert_close(seen[1], x_1, rtol=1e-5, atol=1e-6)


def test_contrastive_positive_is_what_eval_recall_calls_gt_pooled(tmp_path):
    """On shards in the real format the positive of each image is the run's target head of its stored
    tokens, computed as eval-recall computes its gt-pooled feature (`TargetHead.embed`), and the
    prediction side is the same head of the decoded prediction, as `blip sample` writes "global"."""
    from blip_toolkit.embeddings.shard_reader import EmbeddingShards
    from tests.builders.embeddings import write_embeddings

    shards = EmbeddingShards(write_embeddings(tmp_path / "emb", samples=6, shard_size=6, dtype=torch.float32))
    head = shards.head()
    target = shards.rows(np.arange(6), "target")  # [6, 16, 16]
    normalizer = TokenNormalizer.fit("standardize", [target])
    x_1 = normalizer.encode(target)
    embedded = []

    def project(tokens):
        embedded.append(head(tokens))
        return embedded[-1]

    def oracle(x_t, t):
        return (x_1 - x_t) / (1 - t[:, None, None])

    cfg = FlowConfig(
        cond_dropout=0.0, contrastive_weight=1.0, contrastive_positive="image", contrastive_temperature=0.1
    )
    flow_loss(
        RecordingModel(oracle),
        x_1,
        torch.zeros(6, 1, 1),
        cfg,
        project=project,
        target_tokens=target,
        normalizer=normalizer,
        generator=torch.Generator().manual_seed(0),
    )
    positive, predicted = embedded  # the ground truth first (no gradient), then the prediction
    torch.testing.assert_close(positive, head.embed(target))  # eval-recall's gt-pooled
    torch.testing.assert_close(predicted, head(normalizer.decode(x_1)), rtol=1e-5, atol=1e-5)


def test_contrastive_without_head_is_a_config_error():
    cfg = FlowConfig(contrastive_weight=0.1, contrastive_positive="image")
    with pytest.raises(ConfigError, match="contrastive"):
        flow_loss(RecordingModel(lambda x_t, t: x_t), torch.randn(2, 3, 4), torch.randn(2, 1, 1), cfg)


def brute_force_multi_positive_nce(a, b, positive, temperature):
    """Symmetric InfoNCE where row i's positives are the j with positive[i][j]: -log of their summed
    softmax probability, averaged over rows, both directions."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [math.exp(float(a[i] @ b[j]) / temperature) for j in range(n)]
        col = [math.exp(float(a[j] @ b[i]) / temperature) for j in range(n)]
        total += -math.log(sum(r for j, r in enumerate(row) if positive[i][j]) / sum(row))
        total += -math.log(sum(c for j, c in enumerate(col) if positive[j][i]) / sum(col))
    return total / (2 * n)


def test_info_nce_with_several_positives_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    b[3] = b[1]  # rows 1 and 3 share their text, rows 0, 2 and 5 another one
    b[2] = b[0]
    b[5] = b[0]
    positives = same_rows(b)
    assert positives.sum() == 6 + 2 + 6 and bool(positives[1, 3]) and not bool(positives[1, 2])
    expected = brute_force_multi_positive_nce(a, b, positives.tolist(), 0.2)
    assert abs(float(info_nce(a, b, 0.2, positives)) - expected) < 1e-9
    # one positive per row: the plain loss
    eye = torch.eye(6, dtype=torch.bool)
    assert abs(float(info_nce(a, b, 0.2, eye)) - float(info_nce(a, b, 0.2))) < 1e-12


def test_text_positive_contrastive_pulls_the_head_towards_each_images_caption():
    """contrastive_positive = "text": InfoNCE between head(predicted clean tokens) and the images'
    caption embeddings, identical captions positives of each other, images without a caption (and
    dropped conditions) left out; the ground-truth tokens are not needed."""
    gen = torch.Generator().manual_seed(0)
    batch, n, dt, e = 8, 3, 4, 5
    x_1 = torch.randn(batch, n, dt, generator=gen, dtype=torch.float64)
    text = torch.randn(batch, e, generator=gen, dtype=torch.float64)
    text[4] = text[2]  # two images with the same caption
    has_text = torch.ones(batch, dtype=torch.bool)
    has_text[6] = False
    head = torch.nn.Linear(dt, e).double()

    def project(tokens):
        return head(tokens.mean(dim=1))

    def oracle(x_t, t):
        return (x_1 - x_t) / (1 - t[:, None, None])

    cfg = FlowConfig(
        cond_dropout=0.2, contrastive_weight=0.5, contrastive_temperature=0.3, contrastive_positive="text"
    )
    model = RecordingModel(oracle)
    loss, parts = flow_loss(
        model,
        x_1,
        torch.zeros(batch, 1, 1, dtype=torch.float64),
        cfg,
        generator=torch.Generator().manual_seed(2),
        project=project,
        text=text,
        has_text=has_text,
    )
    keep = ~model.calls[0]["drop"] & has_text
    assert 2 <= int(keep.sum()) < batch - 1 and bool(keep[2]) and bool(keep[4])
    with torch.no_grad():
        kept_text = text[keep]
        positives = [
            [bool((kept_text[i] == kept_text[j]).all()) for j in range(len(kept_text))]
            for i in range(len(kept_text))
        ]
        expected = brute_force_multi_positive_nce(project(x_1[keep]), kept_text, positives, 0.3)
    assert abs(float(parts["contrastive"]) - expected) < 1e-6
    assert abs(float(loss.detach()) - float(parts["mse"]) - 0.5 * expected) < 1e-6
    loss.backward()
    assert float(head.weight.grad.abs().sum()) > 0
    with pytest.raises(ConfigError, match="texts"):
        flow_loss(model, x_1, torch.zeros(batch, 1, 1), cfg, project=project, target_tokens=x_1)


def test_contrastive_positive_is_checked():
    with pytest.raises(ConfigError, match="contrastive_positive"):
        FlowConfig(contrastive_positive="caption")


def test_token_space_contrastive_compares_flattened_normalised_tokens():
    """contrastive_space = "tokens": InfoNCE between the predicted clean tokens and x_1, both in the
    normalised space, each image flattened to one vector; no head is needed."""
    gen = torch.Generator().manual_seed(3)
    x_1 = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)

    def oracle(x_t, t):
        return (x_1 - x_t) / (1 - t[:, None, None])

    cfg = FlowConfig(
        cond_dropout=0.0,
        contrastive_weight=1.0,
        contrastive_temperature=0.5,
        contrastive_space="tokens",
        contrastive_positive="image",
    )
    _, parts = flow_loss(
        RecordingModel(oracle), x_1, torch.zeros(5, 1, 1), cfg, generator=torch.Generator().manual_seed(0)
    )
    flat = x_1.flatten(1)
    assert abs(float(parts["contrastive"]) - brute_force_info_nce(flat, flat, 0.5)) < 1e-6
    with pytest.raises(ConfigError, match="tokens"):
        FlowConfig(contrastive_space="tokens", contrastive_positive="text")
    with pytest.raises(ConfigError, match="uses no head"):
        FlowConfig(contrastive_space="tokens", contrastive_head="learned")
    with pytest.raises(ConfigError, match="contrastive_head 'own' is unknown"):
        FlowConfig(contrastive_head="own")
    assert FlowConfig(contrastive_head="learned").learned_head
    assert not FlowConfig(contrastive_head="learned", contrastive_weight=0).learned_head


def test_auto_positive_resolves_from_the_data():
    auto = FlowConfig()
    assert (auto.contrastive_weight, auto.contrastive_positive) == (0.5, "auto")
    assert auto.for_data(True) == FlowConfig(contrastive_positive="text")
    assert auto.for_data(False) == FlowConfig(contrastive_positive="image", contrastive_weight=0.0)
    assert FlowConfig(contrastive_space="tokens").for_data(True).contrastive_positive == "image"
    explicit = FlowConfig(contrastive_positive="image")
    assert explicit.for_data(True) is explicit and explicit.for_data(False) is explicit
    with pytest.raises(ConfigError, match="resolved from the data"):
        flow_loss(lambda x_t, t, c, m, drop=None: x_t, torch.zeros(2, 1, 1), torch.zeros(2, 1, 1), auto)
