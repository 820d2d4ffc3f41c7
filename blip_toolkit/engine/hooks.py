"""What a training task supplies to the engine: `TrainingTask`, the hooks that `Trainer`
(engine/trainer.py) calls. A task subclasses `Trainer` and overrides these: its declarations (run
kind, what a --resume may change, the best metric, when to evaluate and save), the model (`build`),
the micro-batches from a position (`micro_batches`), the loss (`loss`), the evaluation (`evaluate`),
what else a checkpoint holds, and the export (`export`).

Exact resume: the data position is the number of micro-batches consumed; a task's `micro_batches`
must give the same batches from any position as an uninterrupted run does (its order may depend
only on the seed and the position), and random streams other than the global ones are declared
in `generators` so their states are saved per process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TrainingTask:
    """The hooks of a training task, with their defaults (those without one raise
    NotImplementedError)."""

    kind = ""  # blip_run.json "kind", e.g. "blip-finetune"
    output_flag = "--output-dir"
    resume_free: tuple[str, ...] = ()  # config keys a --resume may change ("section." frees a section)
    best_metric: str | None = None  # lower is better; the best evaluation's export goes to best/
    eval_at_epoch_end = False
    checkpoint_at_epoch_end = False  # when save_every is 0
    nan_hint: str | None = None

    def config_record(self) -> dict[str, Any]:
        """The resolved config (blip_run.json "config"; compared on --resume)."""
        raise NotImplementedError

    def run_fields(self) -> dict[str, Any]:
        """More fields of blip_run.json (what the run trains on)."""
        return {}

    def check_previous_run(self, previous: dict[str, Any]) -> None:
        """Refuse to resume a run whose blip_run.json says it trained on other data (UsageError)."""

    def build(self, checkpoint: Path | None) -> nn.Module:
        """The model to train (not yet prepared), built on every process with the same weights.
        `checkpoint`: the checkpoint being resumed from, if any (its weights are loaded later)."""
        raise NotImplementedError

    def resolve_total_steps(self) -> int:
        raise NotImplementedError

    def micro_batches(self, start: int) -> Iterator[tuple[Any, bool]]:
        """(batch, last micro-batch of an epoch?) from micro-batch `start` on, the same batches an
        uninterrupted run gets from there."""
        raise NotImplementedError

    def loss(self, batch: Any) -> torch.Tensor:
        """The loss of one micro-batch on this process (`self.model` is the prepared model). Its mean
        over processes is what is recorded."""
        raise NotImplementedError

    def batch_samples(self, batch: Any) -> int:
        """Samples in this process's micro-batch (for samples/s)."""
        raise NotImplementedError

    def epoch_value(self) -> float | int:
        return 0

    def eval_enabled(self) -> bool:
        return False

    def evaluate(self, model: nn.Module) -> dict[str, Any] | None:
        """Metrics of `model` (in eval mode, under no_grad, global RNG restored afterwards); called on
        every process, returns the metrics on the main process (None elsewhere)."""
        return None

    def export(self, directory: Path, model: nn.Module) -> None:
        """Write the usable model into `directory` (config.json is moved last when published)."""
        raise NotImplementedError

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Extra modules saved in every checkpoint (not restored: `build` reads them if needed)."""
        return {}

    def generators(self) -> dict[str, torch.Generator]:
        """Random generators of the task whose states are saved per process."""
        return {}

    def data_state(self) -> dict[str, Any]:
        """What the checkpoint's data position refers to (checked by `check_resumed_state`)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def check_resumed_state(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint whose data no longer matches (raise TrainingError)."""

    def legacy_micro_batches(self, state: dict[str, Any]) -> int:
        """The data position of a checkpoint that predates `micro_batches`."""
        return 0

    def after_checkpoint(self, path: Path) -> None:
        """Main process, after a checkpoint is complete."""

    def describe_start(self) -> None:
        """Log what is about to be trained."""

    def finish_fields(self) -> dict[str, Any]:
        return {}

    def result(self, elapsed: float) -> Any:
        raise NotImplementedError
