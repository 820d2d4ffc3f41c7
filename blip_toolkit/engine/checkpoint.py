"""Atomic training checkpoints: `DIR/checkpoints/step-N/` with the whole training state in
safetensors and JSON (see `CheckpointManager` and docs/formats.md), used by every trainer."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from blip_toolkit.engine.state import load_into, read_state, rng_state, set_rng_state, write_state
from blip_toolkit.errors import TrainingError
from blip_toolkit.fsutil import atomic_write, fsync_path, replace_dir, write_json

logger = logging.getLogger("blip")

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointManager:
    """Atomic checkpoint directories `root/step-N/` holding the training state in safetensors and JSON.

    A checkpoint is complete when its directory has the name `step-N` *and* holds the marker file
    (written last, after every process finished writing). Directories being written are named
    `.step-N.tmp`; a killed run leaves at most such a directory, which is never loaded and is
    removed by the next run. Only the newest `keep` complete checkpoints are kept.

    A checkpoint directory holds only safetensors and JSON (our security standard: nothing that can
    run code when loaded, so no torch.save files, and no Accelerate `save_state`, which writes its
    optimizer, scheduler and RNG states with torch.save):

        model.safetensors                  the (unwrapped) model's state_dict, tied weights stored once
        <name>.safetensors                 each extra module (`modules={"ema": ...}`)
        optimizer.safetensors + .json      optimizer tensors (`state.<param_id>.<name>`) + the rest
        scheduler.json                     LR scheduler state (+ scheduler.safetensors if it holds tensors)
        scaler.json                        the fp16 GradScaler state, when Accelerate has one
        rng-<rank>.safetensors + .json     python / numpy / torch / CUDA RNG states and the caller's
                                           generators, one pair per process
        trainer_state.json                 the caller's `state` + step, iteration, accelerator_step,
                                           num_processes, modules, generators
        COMPLETE                           written last

    Every process must call `save` and `load` (each writes and reads its own RNG files); only the
    main process writes the shared files and renames. Single-process and DDP runs only: DeepSpeed,
    FSDP and tensor/context parallelism shard the model and optimizer state, which needs
    Accelerate's own format.
    """

    def __init__(self, root: str | os.PathLike, *, keep: int | None = 2):
        self.root = Path(root)
        self.keep = keep

    @staticmethod
    def check_supported(accelerator) -> None:
        """Raise TrainingError for setups whose state this format cannot hold (call it before
        training, so a run does not fail at its first checkpoint)."""
        kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
        # DDP variants are named MULTI_<device>: every process holds the whole model and optimizer.
        problem = None if kind == "NO" or kind.startswith("MULTI_") else kind
        config = getattr(accelerator, "parallelism_config", None)
        if problem is None and config is not None:
            parts = [
                part for part in ("tp", "cp", "sp", "dp_shard") if getattr(config, f"{part}_enabled", False)
            ]
            problem = f"parallelism {'/'.join(parts)}" if parts else None
        if problem:
            raise TrainingError(
                f"checkpoints support single-process and DDP training (this run uses {problem}, whose "
                "sharded states need Accelerate's own format)",
                hint="launch without DeepSpeed / FSDP / model parallelism (accelerate launch --multi_gpu)",
            )

    # -- discovery

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        found = []
        if self.root.is_dir():
            for child in self.root.iterdir():
                match = _STEP_DIR.match(child.name)
                if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
                    found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def clean_incomplete(self) -> list[Path]:
        """Remove leftovers of interrupted saves (temp directories, step dirs without the marker)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for child in self.root.iterdir():
            incomplete_step = _STEP_DIR.match(child.name) and not (child / COMPLETE_MARKER).is_file()
            if child.is_dir() and (child.name.endswith(".tmp") or incomplete_step):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed

    # -- save / load

    def save(
        self,
        accelerator,
        step: int,
        state: dict[str, Any],
        *,
        model,
        optimizer,
        scheduler=None,
        modules: dict[str, Any] | None = None,
        generators: dict[str, Any] | None = None,
    ) -> Path:
        """Save the training state as `step-<step>` and return the final path.

        `state`: JSON-able values of the caller (data position, best metric, ...), returned by
        `load`. `model`, `optimizer`, `scheduler`: as returned by `accelerator.prepare` (or plain).
        `modules`: extra modules saved as `<name>.safetensors` (an EMA copy, ...). `generators`:
        `torch.Generator`s whose state is saved per process (a timestep sampler, ...)."""
        self.check_supported(accelerator)
        modules, generators = dict(modules or {}), dict(generators or {})
        _check_names(modules, generators)
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        main = accelerator.is_main_process

        def make_dir() -> None:
            if main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)

        def write_files() -> None:
            if main:
                # Under DDP every process holds the same weights and optimizer state: one copy.
                _save_module(accelerator.unwrap_model(model), tmp / MODEL_FILE)
                for name, module in modules.items():
                    _save_module(accelerator.unwrap_model(module), tmp / f"{name}.safetensors")
                write_state(tmp, "optimizer", optimizer.state_dict())
                if scheduler is not None:
                    write_state(tmp, "scheduler", scheduler.state_dict())
                if getattr(accelerator, "scaler", None) is not None:
                    write_state(tmp, "scaler", accelerator.scaler.state_dict())
            # RNG streams differ per process (dropout, sampled negatives, timesteps): each its own.
            write_state(tmp, f"rng-{accelerator.process_index}", rng_state(generators))

        # Each phase ends with an all-reduce of the failures (a barrier too): when one process
        # fails, all raise instead of the others waiting forever at the next collective.
        _on_all_processes(accelerator, make_dir, f"create {tmp}")
        _on_all_processes(accelerator, write_files, f"write {tmp}")
        # What save_state() did: the count of checkpoints saved (automatic checkpoint naming).
        accelerator.project_configuration.iteration += 1

        def finish() -> None:
            if not main:
                return
            record = {
                **state,
                "step": step,
                "iteration": accelerator.project_configuration.iteration,
                # Accelerate's micro-batch counter: its remainder decides which micro-batch of
                # a gradient accumulation cycle comes next (save_state kept it in its RNG file).
                "accelerator_step": int(accelerator.step),
                "num_processes": accelerator.num_processes,
                "modules": sorted(modules),
                "generators": sorted(generators),
            }
            write_json(tmp / TRAINER_STATE, record)
            with atomic_write(tmp / COMPLETE_MARKER) as handle:  # written last: the checkpoint is whole
                handle.write(json.dumps({"step": step}) + "\n")
            fsync_path(tmp)
            replace_dir(tmp, final)
            fsync_path(self.root)
            self._prune()

        _on_all_processes(accelerator, finish, f"complete {final}")
        return final

    def load(
        self,
        accelerator,
        path: str | os.PathLike,
        *,
        model,
        optimizer,
        scheduler=None,
        modules: dict[str, Any] | None = None,
        generators: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Restore what `save` wrote into the given objects (same arguments) and return the
        `trainer_state.json` record (the caller's `state` plus `step`, ...).

        Also restores `project_configuration.iteration` and Accelerate's micro-batch counter
        (`accelerator.step`), which a new process would otherwise have at 0. Reads only JSON and
        safetensors; a checkpoint in Accelerate's torch.save format is refused."""
        self.check_supported(accelerator)
        modules, generators = dict(modules or {}), dict(generators or {})
        _check_names(modules, generators)
        path = Path(path)
        if not (path / COMPLETE_MARKER).is_file():
            raise TrainingError(
                f"{path}: incomplete checkpoint (no {COMPLETE_MARKER} marker); not loading it"
            )
        unsafe = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pkl", ".pt", ".pth"))
        if unsafe:
            raise TrainingError(
                f"{path} holds torch.save files ({', '.join(unsafe)}: Accelerate's format, written by an "
                "older blip), which can run code when loaded; not loading it",
                hint="start a new run (--overwrite or another --output-dir); a finished run's model is "
                "unaffected",
            )
        try:
            state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{path}: unreadable {TRAINER_STATE} ({exc})") from exc
        if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
            raise TrainingError(
                f"{path} was written by {state['num_processes']} process(es); this run has {accelerator.num_processes}",
                hint="resume with the same number of processes (the data position and RNG states are per process)",
            )
        for kind, wanted in (("modules", modules), ("generators", generators)):
            missing = sorted(set(wanted) - set(state.get(kind, [])))
            if missing:
                raise TrainingError(
                    f"{path} has no saved {kind} {', '.join(missing)} "
                    f"(it has: {', '.join(state.get(kind, [])) or 'none'})"
                )

        def restore() -> None:
            _load_module(accelerator.unwrap_model(model), path / MODEL_FILE)
            for name, module in modules.items():
                _load_module(accelerator.unwrap_model(module), path / f"{name}.safetensors")
            load_into(optimizer, read_state(path, "optimizer"), path / "optimizer.json")
            if scheduler is not None:
                load_into(scheduler, read_state(path, "scheduler"), path / "scheduler.json")
            scaler = getattr(accelerator, "scaler", None)
            if scaler is not None:
                saved = read_state(path, "scaler") if (path / "scaler.json").is_file() else {}
                if saved:  # empty: the checkpoint was written without fp16; keep the fresh scale
                    load_into(scaler, saved, path / "scaler.json")
                else:
                    logger.warning("%s has no gradient scaler state; fp16 loss scaling starts afresh", path)
            # Last, so nothing above can draw from the restored streams.
            set_rng_state(
                read_state(path, f"rng-{accelerator.process_index}"),
                generators,
                path / f"rng-{accelerator.process_index}.json",
            )

        _on_all_processes(accelerator, restore, f"load {path}")
        # A new process has both counters at 0: without the iteration, automatic naming would start
        # again and overwrite or prune the wrong checkpoints; without the step, gradient
        # accumulation would restart its cycle at the wrong micro-batch.
        accelerator.project_configuration.iteration = int(state.get("iteration", state["step"]))
        if "accelerator_step" in state:
            accelerator.step = int(state["accelerator_step"])
        return state

    def _prune(self) -> None:
        if not self.keep or self.keep < 1:
            return
        done = self.complete()
        for _, path in done[: max(len(done) - self.keep, 0)]:
            shutil.rmtree(path, ignore_errors=True)


# Names of the files the manager writes itself; extra modules must not collide with them.
_RESERVED = {"model", "optimizer", "scheduler", "scaler", "trainer_state", COMPLETE_MARKER}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _check_names(modules: dict[str, Any], generators: dict[str, Any]) -> None:
    for kind, names in (("module", modules), ("generator", generators)):
        for name in names:
            valid = isinstance(name, str) and _NAME.match(name) and name not in _RESERVED
            if not valid or name.startswith("rng-"):
                raise TrainingError(
                    f"checkpoint {kind} name {name!r} is not allowed (letters, digits, _ and "
                    f"-; not one of {', '.join(sorted(_RESERVED))} or rng-*)"
                )


def _on_all_processes(accelerator, action: Callable[[], None], what: str) -> None:
    """Run `action` here, then agree across processes whether it failed anywhere (an all-reduce,
    so it is a barrier as well). A process whose action succeeded raises TrainingError when another
    one failed; the failing process re-raises its own error."""
    error: Exception | None = None
    try:
        action()
    except Exception as exc:  # re-raised below, once the other processes know
        error = exc
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(error is not None)], device=accelerator.device)
        failed = accelerator.reduce(flag, "sum")
        if error is None and float(failed.sum()) > 0:
            raise TrainingError(f"another process failed to {what} (its error is above)")
    if error is not None:
        raise error


# -- model weights


def _save_module(module, file: Path) -> None:
    """The module's full state_dict (frozen parameters and buffers too) as safetensors.
    `save_model` stores tied weights (BLIP's decoder output layer = its word embeddings) once."""
    save_model(module, str(file), metadata={"format": "pt"}, force_contiguous=True)
    fsync_path(file)


def _load_module(module, file: Path) -> None:
    """Load `file` into `module` in place (strict: every key must match, tied aliases excepted).
    Copying into the existing parameters keeps ties and the optimizer's references intact."""
    if not file.is_file():
        raise TrainingError(f"{file.parent}: {file.name} is missing")
    try:
        load_model(module, str(file), strict=True, device="cpu")
    except (RuntimeError, SafetensorError) as exc:
        raise TrainingError(f"{file} does not fit the model: {exc}") from exc
