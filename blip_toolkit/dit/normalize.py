"""Normalisation of the target tokens the DiT learns to generate.

Flow matching starts from N(0, I) noise, so training is best conditioned when the data has a
comparable scale per dimension. Three methods:

- none: tokens as the target encoder gives them.
- l2: every token rescaled to unit RMS (L2 norm sqrt(D), the norm of a typical noise vector, rather
  than 1, which would make each dimension ~1/sqrt(D) against unit-variance noise). The original
  per-token norms are discarded, so `decode` cannot restore them: it rescales every token to the mean
  token norm of the training data (stored at fit time). Use it when consumers only care about
  directions (cosine similarity, retrieval).
- standardize: per-dimension (x - mean) / std with mean and std over all training tokens (every
  position of every sample), exact inverse in `decode`.

Statistics are accumulated in one streaming pass (Chan et al.'s pairwise update of count, mean and
sum of squared deviations, in float64), so the training set never has to fit in memory. They are
exported as a dict of tensors (for the checkpoint's safetensors) plus JSON metadata (for its
config.json), and restored from the same pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from blip_toolkit.dit.config import TARGET_NORMS
from blip_toolkit.errors import ConfigError, InputError

METHODS = TARGET_NORMS
TENSOR_PREFIX = "normalizer."


class TokenStatistics:
    """Streaming per-dimension mean / variance and mean L2 norm of tokens [..., D]."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)  # sum of squared deviations from the mean
        self.norm_sum = 0.0

    def update(self, tokens: torch.Tensor) -> None:
        """Add a batch of tokens [..., D] (all leading dimensions are tokens)."""
        if tokens.shape[-1] != self.dim:
            raise InputError(
                f"token statistics: expected tokens of dimension {self.dim}, got {tokens.shape[-1]}"
            )
        x = tokens.detach().reshape(-1, self.dim).to(device="cpu", dtype=torch.float64)  # [T, D]
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(dim=0)  # [D]
        batch_m2 = (x - batch_mean).square().sum(dim=0)  # [D]
        total = self.count + n
        delta = batch_mean - self.mean
        # Chan, Golub & LeVeque (1979): merge (count, mean, M2) of two sets exactly.
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta.square() * (self.count * n / total)
        self.count = total
        self.norm_sum += float(torch.linalg.vector_norm(x, dim=-1).sum())

    def variance(self, unbiased: bool = True) -> torch.Tensor:
        """Per-dimension variance [D] (unbiased by default, as torch.var)."""
        denominator = self.count - 1 if unbiased else self.count
        if denominator <= 0:
            raise InputError("token statistics: not enough tokens to estimate a variance")
        return self.m2 / denominator

    def std(self, unbiased: bool = True) -> torch.Tensor:
        return self.variance(unbiased).sqrt()

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / self.count if self.count else float("nan")


class TokenNormalizer:
    """encode() before training, decode() after sampling. See the module docstring for the methods.

    mean / std [D] (standardize), mean_norm (l2: the training tokens' mean L2 norm, used by decode).
    `eps` floors the std so constant dimensions do not divide by zero.
    """

    def __init__(
        self,
        method: str = "none",
        *,
        dim: int | None = None,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        mean_norm: float | None = None,
        eps: float = 1e-6,
        count: int = 0,
    ):
        if method not in METHODS:
            raise ConfigError(f"target normalisation {method!r} is unknown (use one of {', '.join(METHODS)})")
        if method == "standardize" and (mean is None or std is None):
            raise ConfigError("standardize normalisation needs mean and std (fit it on the training tokens)")
        if method == "l2" and mean_norm is None:
            raise ConfigError("l2 normalisation needs the mean token norm (fit it on the training tokens)")
        if dim is None and mean is not None:
            dim = mean.shape[-1]
        self.method = method
        self.dim = dim
        self.mean = mean.float() if mean is not None else None
        self.std = std.float().clamp_min(eps) if std is not None else None
        self.mean_norm = mean_norm
        self.eps = eps
        self.count = count

    @classmethod
    def fit(cls, method: str, batches: Iterable[torch.Tensor], *, eps: float = 1e-6) -> TokenNormalizer:
        """Fit on an iterable of token batches [..., D] in one streaming pass."""
        if method == "none":
            return cls("none")
        stats: TokenStatistics | None = None
        for tokens in batches:
            if stats is None:
                stats = TokenStatistics(tokens.shape[-1])
            stats.update(tokens)
        if stats is None or stats.count == 0:
            raise InputError(f"{method} normalisation: no training tokens to fit on")
        return cls.from_statistics(method, stats, eps=eps)

    @classmethod
    def from_statistics(cls, method: str, stats: TokenStatistics, *, eps: float = 1e-6) -> TokenNormalizer:
        if method == "standardize":
            return cls(method, mean=stats.mean, std=stats.std(), eps=eps, count=stats.count)
        return cls(method, dim=stats.dim, mean_norm=stats.mean_norm, eps=eps, count=stats.count)

    def _check(self, x: torch.Tensor) -> None:
        if self.dim is not None and x.shape[-1] != self.dim:
            raise InputError(
                f"{self.method} normalisation was fitted on {self.dim}-dim tokens, got {x.shape[-1]}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [..., D] -> normalised tokens [..., D]."""
        if self.method == "none":
            return x
        self._check(x)
        if self.method == "standardize":
            return (x - self.mean.to(x)) / self.std.to(x)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
        return x * (math.sqrt(x.shape[-1]) / norm.clamp_min(self.eps))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens [..., D] -> the target encoder's space. Exact inverse for standardize;
        for l2, every token gets the training data's mean norm (the true norms are not recoverable)."""
        if self.method == "none":
            return x
        self._check(x)
        if self.method == "standardize":
            return torch.addcmul(self.mean.to(x), x, self.std.to(x))
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
        return x * (self.mean_norm / norm.clamp_min(self.eps))

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors for safetensors, JSON-able metadata); `from_export` restores the normaliser."""
        tensors = {}
        if self.mean is not None:
            tensors[TENSOR_PREFIX + "mean"] = self.mean.detach().cpu().contiguous()
            tensors[TENSOR_PREFIX + "std"] = self.std.detach().cpu().contiguous()
        metadata = {
            "method": self.method,
            "dim": self.dim,
            "mean_norm": self.mean_norm,
            "eps": self.eps,
            "count": self.count,
        }
        return tensors, metadata

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> TokenNormalizer:
        try:
            method = metadata["method"]
            return cls(
                method,
                dim=metadata.get("dim"),
                mean=tensors.get(TENSOR_PREFIX + "mean"),
                std=tensors.get(TENSOR_PREFIX + "std"),
                mean_norm=metadata.get("mean_norm"),
                eps=metadata.get("eps", 1e-6),
                count=metadata.get("count", 0),
            )
        except KeyError as exc:
            raise InputError(f"normaliser metadata lacks {exc.args[0]!r}") from exc
