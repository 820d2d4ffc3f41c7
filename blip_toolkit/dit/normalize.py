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

With a `cls+patch` layout the CLS token (position 0) gets statistics of its own: its distribution is
nothing like the patch tokens' (CLIP ViT-L's CLS has other large dimensions and another norm), and
standardising it with the patches' mean and std would leave it far from N(0, I). Statistics are then
kept per position class (`LayoutStatistics`: "cls" = position 0, "patch" = the rest).

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


class LayoutStatistics:
    """`TokenStatistics` per position class of a token layout: `patch` for every token, or, with
    `has_cls`, `cls` for position 0 and `patch` for the others. `update` takes tokens [..., N, D]."""

    def __init__(self, dim: int, has_cls: bool = False):
        self.dim = dim
        self.has_cls = has_cls
        self.patch = TokenStatistics(dim)
        self.cls = TokenStatistics(dim) if has_cls else None

    def update(self, tokens: torch.Tensor) -> None:
        if self.cls is None:
            self.patch.update(tokens)
            return
        if tokens.dim() < 2 or tokens.shape[-2] < 2:
            raise InputError(
                f"cls+patch token statistics need tokens [..., N >= 2, D], got {list(tokens.shape)}"
            )
        self.cls.update(tokens[..., :1, :])
        self.patch.update(tokens[..., 1:, :])

    @property
    def count(self) -> int:
        return self.patch.count + (self.cls.count if self.cls is not None else 0)

    def classes(self) -> list[TokenStatistics]:
        """The statistics in a fixed order: [patch] or [patch, cls]."""
        return [self.patch] if self.cls is None else [self.patch, self.cls]


class TokenNormalizer:
    """encode() before training, decode() after sampling. See the module docstring for the methods.

    mean / std [D] (standardize), mean_norm (l2: the training tokens' mean L2 norm, used by decode):
    the patch tokens' (every token's without a CLS). cls_mean / cls_std / cls_mean_norm: the CLS
    token's own (position 0 of tokens [..., N, D]), when the layout has one. `eps` floors the std so
    constant dimensions do not divide by zero.
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
        cls_mean: torch.Tensor | None = None,
        cls_std: torch.Tensor | None = None,
        cls_mean_norm: float | None = None,
        cls_count: int = 0,
        has_cls: bool = False,
    ):
        if method not in METHODS:
            raise ConfigError(f"target normalisation {method!r} is unknown (use one of {', '.join(METHODS)})")
        if method == "standardize" and (mean is None or std is None):
            raise ConfigError("standardize normalisation needs mean and std (fit it on the training tokens)")
        if method == "l2" and mean_norm is None:
            raise ConfigError("l2 normalisation needs the mean token norm (fit it on the training tokens)")
        if has_cls and method == "standardize" and (cls_mean is None or cls_std is None):
            raise ConfigError("standardize normalisation of a CLS token needs its own mean and std")
        if has_cls and method == "l2" and cls_mean_norm is None:
            raise ConfigError("l2 normalisation of a CLS token needs its own mean norm")
        if dim is None and mean is not None:
            dim = mean.shape[-1]
        self.method = method
        self.dim = dim
        self.mean = mean.float() if mean is not None else None
        self.std = std.float().clamp_min(eps) if std is not None else None
        self.mean_norm = mean_norm
        self.eps = eps
        self.count = count
        self.has_cls = has_cls and method != "none"
        self.cls_mean = cls_mean.float() if cls_mean is not None and self.has_cls else None
        self.cls_std = cls_std.float().clamp_min(eps) if cls_std is not None and self.has_cls else None
        self.cls_mean_norm = cls_mean_norm if self.has_cls else None
        self.cls_count = cls_count if self.has_cls else 0

    @classmethod
    def fit(
        cls, method: str, batches: Iterable[torch.Tensor], *, eps: float = 1e-6, has_cls: bool = False
    ) -> TokenNormalizer:
        """Fit on an iterable of token batches [..., N, D] (position 0 is the CLS token when `has_cls`;
        without, any [..., D]) in one streaming pass."""
        if method == "none":
            return cls("none")
        stats: LayoutStatistics | None = None
        for tokens in batches:
            if stats is None:
                stats = LayoutStatistics(tokens.shape[-1], has_cls)
            stats.update(tokens)
        if stats is None or stats.patch.count == 0:
            raise InputError(f"{method} normalisation: no training tokens to fit on")
        return cls.from_statistics(method, stats, eps=eps)

    @classmethod
    def from_statistics(
        cls, method: str, stats: TokenStatistics | LayoutStatistics, *, eps: float = 1e-6
    ) -> TokenNormalizer:
        """The normaliser of `stats` (one class of tokens, or a layout's classes)."""
        layout = stats if isinstance(stats, LayoutStatistics) else None
        patch = layout.patch if layout is not None else stats
        cls_stats = layout.cls if layout is not None else None
        extra: dict[str, Any] = {"has_cls": cls_stats is not None}
        if cls_stats is not None:
            extra["cls_count"] = cls_stats.count
            if method == "standardize":
                extra.update(cls_mean=cls_stats.mean, cls_std=cls_stats.std())
            else:
                extra["cls_mean_norm"] = cls_stats.mean_norm
        if method == "standardize":
            return cls(method, mean=patch.mean, std=patch.std(), eps=eps, count=patch.count, **extra)
        return cls(method, dim=patch.dim, mean_norm=patch.mean_norm, eps=eps, count=patch.count, **extra)

    def _check(self, x: torch.Tensor) -> None:
        if self.dim is not None and x.shape[-1] != self.dim:
            raise InputError(
                f"{self.method} normalisation was fitted on {self.dim}-dim tokens, got {x.shape[-1]}"
            )
        if self.has_cls and (x.dim() < 2 or x.shape[-2] < 2):
            raise InputError(
                f"{self.method} normalisation of cls+patch tokens needs tokens [..., N >= 2, D], got {list(x.shape)}"
            )

    def _per_class(self, x: torch.Tensor, apply) -> torch.Tensor:
        """apply(tokens, mean, std, mean_norm) on the patch tokens and, with a CLS token, on it with
        its own statistics."""
        if not self.has_cls:
            return apply(x, self.mean, self.std, self.mean_norm)
        first = apply(x[..., :1, :], self.cls_mean, self.cls_std, self.cls_mean_norm)  # [..., 1, D]
        rest = apply(x[..., 1:, :], self.mean, self.std, self.mean_norm)  # [..., N - 1, D]
        return torch.cat([first, rest], dim=-2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [..., D] (cls+patch: [..., N, D]) -> normalised tokens, same shape."""
        if self.method == "none":
            return x
        self._check(x)
        if self.method == "standardize":
            return self._per_class(x, lambda v, mean, std, _: (v - mean.to(v)) / std.to(v))
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
        return x * (math.sqrt(x.shape[-1]) / norm.clamp_min(self.eps))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens -> the target encoder's space. Exact inverse for standardize; for l2,
        every token gets the training data's mean norm (its class's: the CLS token its own), the true
        norms are not recoverable."""
        if self.method == "none":
            return x
        self._check(x)
        if self.method == "standardize":
            return self._per_class(x, lambda v, mean, std, _: torch.addcmul(mean.to(v), v, std.to(v)))

        def rescale(v, _mean, _std, mean_norm):
            norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)  # [..., 1]
            return v * (mean_norm / norm.clamp_min(self.eps))

        return self._per_class(x, rescale)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors for safetensors, JSON-able metadata); `from_export` restores the normaliser."""
        tensors = {}
        if self.mean is not None:
            tensors[TENSOR_PREFIX + "mean"] = self.mean.detach().cpu().contiguous()
            tensors[TENSOR_PREFIX + "std"] = self.std.detach().cpu().contiguous()
        if self.cls_mean is not None:
            tensors[TENSOR_PREFIX + "cls_mean"] = self.cls_mean.detach().cpu().contiguous()
            tensors[TENSOR_PREFIX + "cls_std"] = self.cls_std.detach().cpu().contiguous()
        metadata = {
            "method": self.method,
            "dim": self.dim,
            "mean_norm": self.mean_norm,
            "eps": self.eps,
            "count": self.count,
            "has_cls": self.has_cls,
            "cls_mean_norm": self.cls_mean_norm,
            "cls_count": self.cls_count,
        }
        return tensors, metadata

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> TokenNormalizer:
        """Restore from `export()`. Exports written before the CLS token had statistics of its own
        (no "has_cls" key) load as one class of tokens, as they were trained."""
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
                cls_mean=tensors.get(TENSOR_PREFIX + "cls_mean"),
                cls_std=tensors.get(TENSOR_PREFIX + "cls_std"),
                cls_mean_norm=metadata.get("cls_mean_norm"),
                cls_count=metadata.get("cls_count", 0),
                has_cls=bool(metadata.get("has_cls", False)),
            )
        except KeyError as exc:
            raise InputError(f"normaliser metadata lacks {exc.args[0]!r}") from exc
