"""How a training run is set up and what it returns: `LoopSettings` (the engine's settings, under the
same names in every trainer's config), `train()` (the Accelerator around a Trainer) and `RunSummary`
(the result without its history, as the CLI prints it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator

from blip_toolkit.engine.accelerate import (
    deterministic_on_cpu,
    make_accelerator,
    quiet_unless_main,
    release_accelerator,
)

if TYPE_CHECKING:  # the trainer imports this module
    from blip_toolkit.engine.trainer import Trainer


@dataclass
class LoopSettings:
    """The engine's settings. Every trainer's config has these fields under these names
    (`FinetuneConfig` flat, `TrainDiTConfig` in its [train] section).

    eval_every / save_every: every N optimizer steps (0: at epoch ends for epoch-based tasks, else
    never / only at the end). Evaluation and a checkpoint also happen after the last step."""

    output_dir: str
    learning_rate: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    eval_ema: bool = True
    seed: int = 0
    mixed_precision: str = "no"
    cpu: bool = False
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_with: list[str] = field(default_factory=list)
    resume: bool = False
    overwrite: bool = False


def train(
    make: Callable[[Accelerator], Trainer],
    settings: LoopSettings,
    *,
    find_unused_parameters: bool = False,
) -> Any:
    """Build the Accelerator, run `make(accelerator).run()` (main-process logging, deterministic CPU
    kernels) and release Accelerate's process-wide state afterwards."""
    accelerator = make_accelerator(
        output_dir=settings.output_dir,
        mixed_precision=settings.mixed_precision,
        grad_accum=settings.grad_accum,
        cpu=settings.cpu,
        find_unused_parameters=find_unused_parameters,
        log_with=settings.log_with,
    )
    try:
        with quiet_unless_main(accelerator), deterministic_on_cpu(accelerator):
            return make(accelerator).run()
    finally:
        release_accelerator(accelerator)


class RunSummary:
    """For a run's result dataclass with `history` and `is_main_process` fields."""

    def summary(self) -> dict[str, Any]:
        """The result without the history (what the CLI prints)."""
        data = asdict(self)
        data.pop("history")
        data.pop("is_main_process")
        return data
