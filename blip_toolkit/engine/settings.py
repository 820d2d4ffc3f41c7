"""The training loop's settings, declared once: `LoopSettings` is the `[train]` section of `blip
train-dit`'s config and the loop part of `blip finetune`'s (both subclass it), and the engine reads
the config itself, with no copy in between. `RunPlace` is where and how a run writes (output
directory, --resume / --overwrite, evaluation schedule, the checked trackers). No torch here: the CLI
reads these classes for its options and help."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from blip_toolkit.config import MixedPrecision, setting


@dataclass
class LoopSettings:
    """Optimisation and loop settings; a trainer's config subclasses this and may change a default
    with `default_of` (the help and spellings stay the ones declared here)."""

    learning_rate: float = setting(
        1e-4, help="Peak AdamW learning rate (linear warmup, then cosine).", flags=("--lr",)
    )
    weight_decay: float = setting(0.0, help="AdamW weight decay (not on biases and norms).")
    warmup_steps: int = setting(0, help="Linear warmup steps, then cosine decay.")
    min_lr_ratio: float = setting(0.0, help="The cosine decays to the learning rate times this.")
    beta1: float = setting(0.9, help="AdamW beta1.")
    beta2: float = setting(0.999, help="AdamW beta2.")
    grad_accum: int = setting(1, help="Micro-batches per optimizer step.")
    grad_clip: float = setting(1.0, help="Clip the gradient norm to this (0 = off).")
    # The effective decay is min(ema_decay, (1 + step) / (10 + step)): early on the EMA follows the
    # weights instead of averaging in the random initialisation.
    ema_decay: float = setting(
        0.0, help="> 0: keep a float32 EMA of the weights; it is what is evaluated and exported."
    )
    seed: int = setting(
        0, help="Random seed of the weights, data order and noise (same seed = same run on CPU)."
    )
    mixed_precision: MixedPrecision = setting("no", help="no, fp16 (GPU only) or bf16.")
    cpu: bool = setting(False, help="Train on CPU even when a GPU is present.")
    log_every: int = setting(10, help="A console / metrics line every N steps.")
    save_every: int | None = setting(
        0,
        help="Checkpoint every N optimizer steps (blip finetune also validates then); unset: at each "
        "epoch's end (finetune), 0: at the end only.",
    )
    keep_checkpoints: int = setting(2, help="Checkpoints kept for --resume.")
    log_with: list[str] = setting(
        factory=list,
        help="Experiment trackers through Accelerate (tensorboard, wandb, ...; must be installed); "
        "repeat or comma-separate.",
    )

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)


def default_of(
    cls: type, name: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING
) -> Any:
    """The field `name` of settings class `cls` with another default (for a subclass), keeping its
    help and spellings: one declaration of the setting, a default per trainer."""
    base = {f.name: f for f in dataclasses.fields(cls)}[name]
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=base.metadata)
    return field(default=default, metadata=base.metadata)


@dataclass
class RunPlace:
    """Where and how a training run writes: the run directory, whether it resumes or replaces an
    earlier run there, when it evaluates (every N steps; 0: at epoch ends for epoch-based tasks, else
    only after the last step), whether the EMA is what is evaluated, and the checked trackers."""

    output_dir: str
    resume: bool = False
    overwrite: bool = False
    eval_every: int = 0
    eval_ema: bool = True
    trackers: list[str] = field(default_factory=list)
