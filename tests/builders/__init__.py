"""Fixtures of the tests and benchmarks: tiny checkpoints of every family (`build_all`, with a wide
initialisation so an untrained model's outputs depend on its input) and synthetic embedding shards
(`tests.builders.embeddings`). Outside the installed package: nothing at run time needs them."""

from __future__ import annotations

from pathlib import Path

from blip_toolkit.models.scratch.checkpoints import KINDS, ModelSize, build_checkpoint

# Tests use a wider initialisation than training would: with std 0.02 an untrained tiny model gives
# nearly the same caption for every image, which would make batched-vs-single and reference
# comparisons pass trivially. With 0.1 the outputs depend on the image.
TEST_SIZE = ModelSize(initializer_range=0.1)

__all__ = ["KINDS", "TEST_SIZE", "ModelSize", "build_all", "build_checkpoint"]


def build_all(
    root: str | Path, kinds: tuple[str, ...] = KINDS, *, seed: int = 0, size: ModelSize = TEST_SIZE
) -> dict[str, Path]:
    """Build every kind into `root/<kind>` (each with its own seed offset, so weights differ)."""
    root = Path(root)
    return {
        kind: build_checkpoint(kind, root / kind, size=size, seed=seed + i) for i, kind in enumerate(kinds)
    }
