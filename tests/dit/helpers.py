"""The synthetic embedding writer lives in the package (benchmarks use it too)."""

from tests.builders.embeddings import DIMS, TINY, write_embeddings

__all__ = ["DIMS", "TINY", "write_embeddings"]
