"""Configs of the CLIP-feature DiT: `DiTConfig` (the network) and `FlowConfig` (the training objective).

Both hold plain scalars only, so `dataclasses.asdict(cfg)` is the JSON saved with every checkpoint and
`DiTConfig.from_dict(saved)` rebuilds the same network. This module does not import torch, so reading
a config (for `--help`, validation, or the CLI) stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from blip_toolkit.config import build_config, setting
from blip_toolkit.errors import ConfigError

# Size presets. head_dim is 64 everywhere (the width SDPA kernels are tuned for). The number of
# key/value heads defaults to heads // 2: grouped-query attention, this toolkit's choice (BLIP3-o's
# Lumina-Next head uses plain multi-head attention), which halves the K/V projections and the K/V
# memory of attention at no measurable quality cost in LLaMA-2/3 style models. Set `num_kv_heads`
# to `num_heads` for plain multi-head attention.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 384, "num_layers": 6, "num_heads": 6},
    "small": {"hidden_size": 512, "num_layers": 8, "num_heads": 8},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12},
    "large": {"hidden_size": 1024, "num_layers": 16, "num_heads": 16},
}

T_SAMPLINGS = ("uniform", "logit-normal")
# What the contrastive term pulls head(predicted tokens) towards (FlowConfig.contrastive_positive);
# "auto" is resolved from the data by `FlowConfig.for_data`.
CONTRASTIVE_POSITIVES = ("auto", "image", "text")
# Where the contrastive term compares prediction and positive (FlowConfig.contrastive_space).
CONTRASTIVE_SPACES = ("head", "tokens")
# Which head projects the predicted tokens in the contrastive term (FlowConfig.contrastive_head).
CONTRASTIVE_HEADS = ("target", "learned")
TARGET_NORMS = ("none", "l2", "standardize")
SolverName = Literal["euler", "heun"]
# The images `blip sample` generates for: all, or the run's own train / held-out split.
SplitName = Literal["all", "train", "eval"]
SPLITS: tuple[str, ...] = typing.get_args(SplitName)
SOLVERS: tuple[str, ...] = typing.get_args(SolverName)


def swiglu_hidden_dim(hidden_size: int, multiple_of: int = 256) -> int:
    """Inner width of the gated MLP: 2/3 of 4x hidden (same parameter count as a 4x GELU MLP, as in
    LLaMA and Lumina-Next), rounded up to a multiple of `multiple_of` so the matmuls stay aligned."""
    inner = int(2 * 4 * hidden_size / 3)
    return multiple_of * math.ceil(inner / multiple_of)


@dataclass
class DiTConfig:
    """Architecture of the DiT. Data dimensions are 0 until the data is known (a training config file
    need not name them); `DiT.from_config` requires them.

    preset: tiny | small | base | large; hidden_size, num_layers, num_heads, num_kv_heads and
        mlp_hidden_dim override the preset when set (None = from the preset).
    target_dim / num_tokens: Dt and N of the generated (target encoder) tokens.
    cond_dim / num_cond_tokens: Dc and M of the conditioning tokens (M is the expected length; the
        model accepts any M at run time, with an optional padding mask).
    has_cls / cond_has_cls: the token sequence is CLS followed by a square patch grid (N = 1 + g*g).
    cross_attention_rope: rotate cross-attention queries and keys by their grid positions (the
        conditioning grid mapped onto the target grid) when both sequences are grids.
    """

    preset: str = setting("small", help="DiT size: tiny, small, base or large.")
    target_dim: int = 0
    cond_dim: int = 0
    num_tokens: int = 0
    num_cond_tokens: int = 0
    has_cls: bool = False
    cond_has_cls: bool = False
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    mlp_hidden_dim: int | None = None
    cross_attention_rope: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    timestep_freq_dim: int = 256
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.preset not in DIT_PRESETS:
            raise ConfigError(f"dit.preset {self.preset!r} is unknown (use one of {', '.join(DIT_PRESETS)})")
        for name in ("target_dim", "cond_dim", "num_tokens", "num_cond_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"dit.{name} must be >= 0 (0 = taken from the data), got {getattr(self, name)}"
                )
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_hidden_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"dit.{name} must be positive, got {value}")
        hidden, heads, kv_heads = (
            self.resolved_hidden_size,
            self.resolved_num_heads,
            self.resolved_num_kv_heads,
        )
        if hidden % heads:
            raise ConfigError(f"dit.hidden_size {hidden} is not divisible by num_heads {heads}")
        if heads % kv_heads:
            raise ConfigError(f"dit.num_kv_heads {kv_heads} must divide num_heads {heads}")
        if (hidden // heads) % 4:
            # The 2-D axial rotary embedding gives half of the rotation pairs to rows, half to columns.
            raise ConfigError(
                f"dit head dim {hidden // heads} (hidden_size / num_heads) must be a multiple of 4"
            )
        if self.timestep_freq_dim <= 0 or self.timestep_freq_dim % 2:
            raise ConfigError(
                f"dit.timestep_freq_dim must be a positive even number, got {self.timestep_freq_dim}"
            )
        if self.rope_theta <= 1.0:
            raise ConfigError(f"dit.rope_theta must be > 1, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ConfigError(f"dit.norm_eps must be positive, got {self.norm_eps}")

    # The effective architecture (preset value unless overridden).
    @property
    def resolved_hidden_size(self) -> int:
        return self.hidden_size or DIT_PRESETS[self.preset]["hidden_size"]

    @property
    def resolved_num_layers(self) -> int:
        return self.num_layers or DIT_PRESETS[self.preset]["num_layers"]

    @property
    def resolved_num_heads(self) -> int:
        return self.num_heads or DIT_PRESETS[self.preset]["num_heads"]

    @property
    def resolved_num_kv_heads(self) -> int:
        if self.num_kv_heads:
            return self.num_kv_heads
        heads = self.resolved_num_heads
        return heads // 2 if heads % 2 == 0 else heads

    @property
    def resolved_mlp_hidden_dim(self) -> int:
        return self.mlp_hidden_dim or swiglu_hidden_dim(self.resolved_hidden_size)

    @property
    def head_dim(self) -> int:
        return self.resolved_hidden_size // self.resolved_num_heads

    def resolved(self) -> DiTConfig:
        """A copy with every preset-derived field written out, so a saved config does not depend on
        the preset table of a later version."""
        return dataclasses.replace(
            self,
            hidden_size=self.resolved_hidden_size,
            num_layers=self.resolved_num_layers,
            num_heads=self.resolved_num_heads,
            num_kv_heads=self.resolved_num_kv_heads,
            mlp_hidden_dim=self.resolved_mlp_hidden_dim,
        )

    def with_data_dims(
        self, *, target_dim: int, cond_dim: int, num_tokens: int, num_cond_tokens: int
    ) -> DiTConfig:
        """A copy with the dimensions read from the data (embedding shards)."""
        return dataclasses.replace(
            self,
            target_dim=target_dim,
            cond_dim=cond_dim,
            num_tokens=num_tokens,
            num_cond_tokens=num_cond_tokens,
        )

    def require_data_dims(self) -> None:
        missing = [
            n for n in ("target_dim", "cond_dim", "num_tokens", "num_cond_tokens") if getattr(self, n) <= 0
        ]
        if missing:
            raise ConfigError(
                f"dit: {', '.join(missing)} not set",
                hint="they come from the embedding shards; use DiTConfig.with_data_dims(...)",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "dit config") -> DiTConfig:
        """Rebuild from `to_dict()` output (a checkpoint's config.json); unknown keys are an error."""
        return build_config(cls, values, source=source)


@dataclass
class FlowConfig:
    """Rectified-flow training objective.

    t_sampling: uniform, or logit-normal (sigmoid of a normal with logit_normal_mean / _std; SD3's
        choice, which spends more training on the middle of the path).
    cond_dropout: probability that a sample's condition is replaced by the learned null condition
        (classifier-free guidance at sampling time needs the unconditional model too).
    contrastive_weight / contrastive_temperature: a symmetric InfoNCE between the pooled, projected
        predicted clean tokens (the target head's embedding, what recall ranks) and a positive per
        image, the rest of the batch the negatives (weight 0 = off). Default 0.5 at 0.07, the best
        of the weights and temperatures measured in docs/dit-recipes.md.
    contrastive_positive: text (the embedding of one of the image's captions, drawn per batch;
        identical captions in a batch are positives of each other): the generated embedding is pulled
        towards its text, as the target encoder's own image embedding was in its contrastive
        training; the only positive with which generated features beat the target encoder's own
        recall (docs/dit-recipes.md). image (the target head of the ground-truth tokens:
        eval-recall's gt-pooled feature): the term can at best reproduce the target's own ranking.
        auto (the default): text when the embeddings hold captions; without captions the term is off
        (`for_data`; the image positive measured no better than none).
    contrastive_space: head (the pooled, projected embedding above) or tokens (every normalised
        token of the prediction against the ground truth's, flattened into one vector per image;
        image positives only, so auto means image there).
    contrastive_head: target (the target encoder's own head, frozen: the generated features are
        scored exactly as the target's own) or learned (a copy of it trained with the DiT, saved in
        the run; `blip sample` then pools and projects with the learned head, so eval-recall's
        generated feature is the learned head's). docs/dit-recipes.md measured both.
    target_norm: none | l2 | standardize, the token normalisation applied to the targets before
        training (see dit/normalize.py); recorded here so sampling decodes the same way. Default
        standardize: CLIP ViT-L's pre-layernorm tokens have a few dimensions of huge magnitude, which
        without it dominate the velocity loss and sit far from the N(0, I) noise.
    """

    t_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    cond_dropout: float = 0.1
    contrastive_weight: float = 0.5
    contrastive_temperature: float = 0.07
    contrastive_positive: str = "auto"
    contrastive_space: str = "head"
    contrastive_head: str = "target"
    target_norm: str = "standardize"

    def __post_init__(self) -> None:
        choices = {
            "t_sampling": T_SAMPLINGS,
            "contrastive_positive": CONTRASTIVE_POSITIVES,
            "contrastive_space": CONTRASTIVE_SPACES,
            "contrastive_head": CONTRASTIVE_HEADS,
            "target_norm": TARGET_NORMS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"flow.{name} {getattr(self, name)!r} is unknown (use {' or '.join(allowed)})"
                )
        if self.logit_normal_std <= 0:
            raise ConfigError(f"flow.logit_normal_std must be positive, got {self.logit_normal_std}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"flow.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.contrastive_weight < 0:
            raise ConfigError(f"flow.contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.contrastive_temperature <= 0:
            raise ConfigError(
                f"flow.contrastive_temperature must be positive, got {self.contrastive_temperature}"
            )
        if self.contrastive_space == "tokens" and self.contrastive_positive == "text":
            raise ConfigError(
                "flow.contrastive_space = 'tokens' compares tokens with tokens: it needs contrastive_positive = 'image'"
            )
        if self.contrastive_head == "learned" and self.contrastive_space == "tokens":
            raise ConfigError(
                "flow.contrastive_head = 'learned' trains the head of the pooled space; "
                "contrastive_space = 'tokens' uses no head"
            )

    @property
    def learned_head(self) -> bool:
        """Whether the run trains a head of its own (one with a contrastive term needs it)."""
        return self.contrastive_head == "learned" and self.contrastive_weight > 0

    def for_data(self, has_captions: bool) -> FlowConfig:
        """This objective with contrastive_positive = "auto" resolved for embeddings that do or do
        not hold captions (what a run records and trains with)."""
        if self.contrastive_positive != "auto":
            return self
        if self.contrastive_space == "tokens":
            return dataclasses.replace(self, contrastive_positive="image")
        if has_captions:
            return dataclasses.replace(self, contrastive_positive="text")
        return dataclasses.replace(self, contrastive_positive="image", contrastive_weight=0.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "flow config") -> FlowConfig:
        return build_config(cls, values, source=source)
