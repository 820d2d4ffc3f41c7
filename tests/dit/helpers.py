"""The synthetic embedding writer lives in the package (benchmarks use it too)."""

from blip_toolkit.testing.embeddings import DIMS, TINY, write_embeddings

__all__ = ["DIMS", "TINY", "write_embeddings"]
