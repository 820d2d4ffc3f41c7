"""Which tokens of an encoder are stored: the CLS token kept or not, the patch grid average-pooled or
not (docs/formats.md, "Token layout and pooling")."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from blip_toolkit.errors import UsageError

logger = logging.getLogger("blip")


@dataclass(frozen=True)
class TokenLayout:
    """Which tokens of an encoder are stored: CLS kept or not, patch grid pooled to `pool` x `pool`.

    The encoder gives [B, (1 +) g*g, D]; `apply` returns [B, num_tokens, D] with the CLS token (when
    kept) first, then the (pooled) patch grid in row-major order. Pooling is torch's
    adaptive_avg_pool2d: equal to avg_pool2d with kernel g/pool when pool divides g, overlapping
    windows otherwise. The CLS token is never pooled."""

    has_cls: bool
    grid: int
    keep_cls: bool
    pool: int | None

    @property
    def side(self) -> int:
        return self.pool if self.pool else self.grid

    @property
    def num_tokens(self) -> int:
        return self.side * self.side + (1 if self.keep_cls else 0)

    @property
    def name(self) -> str:
        return "cls+patch" if self.keep_cls else "patch"

    def apply(self, tokens):
        """tokens [B, T, D] -> [B, num_tokens, D]."""
        patches = tokens[:, 1:] if self.has_cls else tokens  # [B, g*g, D]
        if self.pool and self.pool != self.grid:
            b, _, d = patches.shape
            grid = patches.transpose(1, 2).reshape(b, d, self.grid, self.grid)  # [B, D, g, g]
            grid = F.adaptive_avg_pool2d(grid, self.pool)  # [B, D, p, p]
            patches = grid.flatten(2).transpose(1, 2)  # [B, p*p, D]
        if self.keep_cls:
            patches = torch.cat([tokens[:, :1], patches], dim=1)  # [B, 1 + p*p, D]
        return patches.contiguous()


def token_layout(encoder, tokens: str, pool: int | None, *, flag: str) -> TokenLayout:
    keep_cls = tokens == "cls+patch"
    if keep_cls and not encoder.has_cls:
        raise UsageError(
            f"{flag} cls+patch: {encoder.source} ({encoder.spec.label}) has no CLS token; use patch"
        )
    if pool and pool > encoder.grid:
        raise UsageError(
            f"pool {pool} is larger than {encoder.source}'s {encoder.grid}x{encoder.grid} patch grid"
        )
    if pool and encoder.grid % pool:
        logger.warning(
            "%s: %dx%d grid is not divisible by %d; using adaptive average pooling (overlapping windows)",
            encoder.source,
            encoder.grid,
            encoder.grid,
            pool,
        )
    return TokenLayout(encoder.has_cls, encoder.grid, keep_cls, pool)
