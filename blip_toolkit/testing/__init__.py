"""Builders of tiny real checkpoints (tests, benchmarks, the demo). See `checkpoints.py`."""

from blip_toolkit.testing.checkpoints import KINDS, ModelSize, build_all, build_checkpoint

__all__ = ["KINDS", "ModelSize", "build_all", "build_checkpoint"]
