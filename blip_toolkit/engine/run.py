"""How a training run is set up and what it returns: `train()` (the Accelerator around a Trainer, from
the config's `LoopSettings` and the run's `RunPlace`, engine/settings.py) and `RunSummary` (the result
without its history, as the CLI prints it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator

from blip_toolkit.engine.accelerate import (
    deterministic_on_cpu,
    make_accelerator,
    quiet_unless_main,
    release_accelerator,
)
from blip_toolkit.engine.settings import LoopSettings, RunPlace

if TYPE_CHECKING:  # the trainer imports this module
    from blip_toolkit.engine.trainer import Trainer


def train(
    make: Callable[[Accelerator], Trainer],
    settings: LoopSettings,
    place: RunPlace,
    *,
    find_unused_parameters: bool = False,
) -> Any:
    """Build the Accelerator, run `make(accelerator).run()` (main-process logging, deterministic CPU
    kernels) and release Accelerate's process-wide state afterwards."""
    accelerator = make_accelerator(
        output_dir=place.output_dir,
        mixed_precision=settings.mixed_precision,
        grad_accum=settings.grad_accum,
        cpu=settings.cpu,
        find_unused_parameters=find_unused_parameters,
        log_with=place.trackers,
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
