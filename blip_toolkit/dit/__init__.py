"""CLIP-feature diffusion (BLIP3-o style): a DiT over target-encoder tokens, trained with rectified
flow and sampled with an ODE solver.

- config.py     DiTConfig, FlowConfig, size presets (no torch import)
- model.py      DiT: velocity network, a pure nn.Module
- flow.py       the path x_t, timestep sampling, flow_loss
- solver.py     Euler / Heun, classifier-free guidance, generate()
- normalize.py  target token normalisation (none / l2 / standardize) with streaming statistics
- data.py       streaming batches from EmbeddingShards (shuffle buffer, rank / worker split), eval set
- train.py      `blip train-dit`: TrainDiTConfig, run_train_dit, evaluate_dit
- checkpoint.py run directories: atomic exports, load_dit
- sample.py     `blip sample`: SampleConfig, run_sample, generate_tokens

Names resolve lazily, so `from blip_toolkit.dit import DiTConfig` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DIT_PRESETS": "config",
    "DiTConfig": "config",
    "FlowConfig": "config",
    "DiT": "model",
    "flow_loss": "flow",
    "interpolate": "flow",
    "sample_t": "flow",
    "target_velocity": "flow",
    "generate": "solver",
    "integrate": "solver",
    "guided_velocity": "solver",
    "TokenNormalizer": "normalize",
    "TokenStatistics": "normalize",
    "TrainDiTConfig": "train",
    "load_train_config": "train",
    "run_train_dit": "train",
    "evaluate_dit": "train",
    "SampleConfig": "sample",
    "run_sample": "sample",
    "generate_tokens": "sample",
    "load_dit": "sample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
