"""Accelerate for every trainer: one way to build the Accelerator, run on the main process only
where it matters, keep CPU runs deterministic, and release the process-wide state afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, parse_flag_from_env

from blip_toolkit.errors import UsageError
from blip_toolkit.log import verbosity

TRACKER_DIR = "trackers"


def cpu_only(cpu: bool) -> bool:
    """Whether the run will be on CPU (forced by the flag or ACCELERATE_USE_CPU, or no GPU)."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return cpu or forced or not torch.cuda.is_available()


def check_mixed_precision(mixed_precision: str, cpu: bool) -> None:
    if mixed_precision == "fp16" and cpu_only(cpu):
        raise UsageError(
            "--mixed-precision fp16 needs a GPU; on CPU use bf16 (slow where it is emulated) or no"
        )


def make_accelerator(
    *,
    output_dir: str,
    mixed_precision: str,
    grad_accum: int,
    cpu: bool,
    find_unused_parameters: bool,
    log_with: list[str] | None = None,
) -> Accelerator:
    if verbosity() <= 0:
        logging.getLogger("accelerate").setLevel(logging.ERROR)
    # DDP's notice for batches where no parameter went unused is noise (find_unused_parameters is
    # asked for only where some batches leave parameters without a gradient).
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")
    return Accelerator(
        mixed_precision=mixed_precision,
        # Our own flag, passed here (accelerate launch's --gradient_accumulation_steps is DeepSpeed-only).
        gradient_accumulation_steps=grad_accum,
        cpu=cpu,
        # The scheduler is stepped once per optimizer step by the trainer (the wrapped one would step
        # once per process and step: it assumes schedules counted in single-process batches).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        log_with=log_with or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=os.path.join(str(output_dir), TRACKER_DIR),
            automatic_checkpoint_naming=False,
        ),
    )


@contextlib.contextmanager
def deterministic_on_cpu(accelerator: Accelerator) -> Iterator[None]:
    """Deterministic kernels while training on CPU, restored afterwards. Since torch 2.1,
    index_put_(accumulate=True) (the backward of gathering rows by index, e.g. the hard negatives of
    retrieval training) adds in parallel with atomics on CPU, so two runs on 2+ threads differed in
    the last bits; the deterministic path costs nothing measurable here. Not on GPUs, where it would
    need CUBLAS_WORKSPACE_CONFIG and cost speed."""
    if accelerator.device.type != "cpu":
        yield
        return
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@contextlib.contextmanager
def quiet_unless_main(accelerator: Accelerator) -> Iterator[None]:
    """Only the main process logs (warnings and errors too would repeat once per process)."""
    if accelerator.is_main_process:
        yield
        return
    blip_logger = logging.getLogger("blip")
    old = blip_logger.level
    blip_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        blip_logger.setLevel(old)


def release_accelerator(accelerator: Accelerator) -> None:
    """Let a later run in the same process build a new Accelerator with other settings (the state
    is a process-wide singleton). A multi-process run keeps its process group."""
    with contextlib.suppress(Exception):
        accelerator.free_memory()
    single = accelerator.num_processes == 1
    AcceleratorState._reset_state(reset_partial_state=single)
    GradientState._reset_state()
    if single:
        PartialState._reset_state()


class _SingleProcess:
    """PartialState's interface for a plain single-process run."""

    process_index, num_processes, is_main_process, device = 0, 1, True, None

    def wait_for_everyone(self) -> None:
        pass


def process_state(*, cpu: bool = False):
    """Rank, world size and barrier of a job that is not a training run (extraction, dataset
    inference): Accelerate's PartialState under a multi-process launch, else a single-process
    stand-in."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _SingleProcess()
    # PartialState only builds a gloo (CPU) process group when told to: AcceleratorState reads
    # ACCELERATE_USE_CPU, PartialState does not.
    state = PartialState(
        cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    )
    if state.num_processes != world:
        # Independent "rank 0" processes would all write the same outputs.
        raise UsageError(
            f"launched as {world} processes (WORLD_SIZE) but no process group was set up; on CPU "
            "launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N"
        )
    return state
