"""Training helpers shared by the fine-tuning and DiT trainers, on Accelerate.

- `seed_everything`: python, numpy and torch RNGs from one seed.
- `build_optimizer` / `warmup_cosine_schedule`: AdamW (no weight decay on biases, norms and other
  1-D parameters, as BLIP/LAVIS and transformers' Trainer do) with a linear warmup then cosine decay.
- `CheckpointManager`: `DIR/checkpoints/step-N/` written atomically (a temp directory renamed into
  place once complete, with a marker file written last), holding Accelerate's state (model,
  optimizer, scheduler, per-process RNG, gradient-accumulation counter) plus our own
  `trainer_state.json` (step counter, data position, best metric, ...). Loading restores
  `project_configuration.iteration`, which `load_state` leaves at 0 (a known Accelerate pitfall).
- `MetricsWriter`: `metrics.jsonl`, truncated back to the checkpoint's step on resume.
- `check_finite`: stop on NaN/Inf with a message that says what to try.
- `metric_line`: the compact console line.

Nothing here imports torch or accelerate at module level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from blip_toolkit.errors import TrainingError
from blip_toolkit.fsutil import atomic_write, replace_dir, write_json

logger = logging.getLogger("blip")

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy and torch (all devices) with the same seed on every process, so
    a run is reproducible and every process starts from the same initial state."""
    from accelerate.utils import set_seed

    set_seed(seed)


# ----------------------------------------------------------------------------- optimizer and schedule


def parameter_groups(named_parameters: Iterable[tuple[str, Any]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed (matrices, embeddings, query tokens) and undecayed
    (biases, LayerNorm weights: every parameter with fewer than 2 dimensions) groups, as LAVIS
    (`p.ndim < 2 or "bias" in n or "ln" in n`) and transformers' Trainer do. Frozen ones are left out."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model, *, learning_rate: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8):
    """AdamW over the trainable parameters of `model` (see `parameter_groups`).

    The fused kernel (CPU and CUDA, one pass over each parameter instead of a dozen elementwise
    ops; transformers' Trainer defaults to it too) when this torch has it, else the default."""
    import torch

    groups = parameter_groups(model.named_parameters(), weight_decay)
    if not groups:
        raise TrainingError("no trainable parameters (everything is frozen)")
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier after `step` optimizer steps: linear from 0 to 1 over `warmup_steps`,
    then a half cosine from 1 down to `min_ratio` at `total_steps` (and `min_ratio` after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A LambdaLR with `warmup_cosine_factor`. Step it once per optimizer step.

    The first step uses lr * 1/warmup (not 0, which would waste a step); with no warmup the first
    step uses the full learning rate."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio))


# ----------------------------------------------------------------------------- checkpoints


class CheckpointManager:
    """Atomic checkpoint directories `root/step-N/`.

    A checkpoint is complete when its directory has the name `step-N` *and* holds the marker file
    (written last, after every process finished writing). Directories being written are named
    `.step-N.tmp`; a killed run leaves at most such a directory, which is never loaded and is
    removed by the next run. Only the newest `keep` complete checkpoints are kept.

    Every process must call `save` and `load` (Accelerate writes one RNG file per process); only the
    main process writes our own files and renames.
    """

    def __init__(self, root: str | os.PathLike, *, keep: int | None = 2):
        self.root = Path(root)
        self.keep = keep

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

    def save(self, accelerator, step: int, state: dict[str, Any]) -> Path:
        """Save Accelerate's state and `state` (JSON: our step counter, data position, ...) as
        `step-<step>`. Returns the final path."""
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # Accelerate writes the model (safetensors), optimizer, scheduler, gradient scaler and one
        # RNG file per process (python, numpy, torch, cuda states and its accumulation step).
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {**state, "step": step, "iteration": accelerator.project_configuration.iteration,
                     "num_processes": accelerator.num_processes}
            write_json(tmp / TRAINER_STATE, state)
            with atomic_write(tmp / COMPLETE_MARKER) as handle:  # written last: the checkpoint is whole
                handle.write(json.dumps({"step": step}) + "\n")
            _fsync_dir(tmp)
            replace_dir(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, path: str | os.PathLike) -> dict[str, Any]:
        """Restore Accelerate's state from `path` and return our `trainer_state.json`."""
        path = Path(path)
        if not (path / COMPLETE_MARKER).is_file():
            raise TrainingError(f"{path}: incomplete checkpoint (no {COMPLETE_MARKER} marker); not loading it")
        try:
            state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{path}: unreadable {TRAINER_STATE} ({exc})") from exc
        if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
            raise TrainingError(
                f"{path} was written by {state['num_processes']} process(es); this run has {accelerator.num_processes}",
                hint="resume with the same number of processes (the data position and RNG states are per process)",
            )
        # Tied weights (BLIP's decoder ties its output layer to the word embeddings) are stored once
        # in safetensors; the alias is restored by the tie, hence strict=False.
        accelerator.load_state(str(path), strict=False)
        # load_state() does not restore the checkpoint counter: without this, automatic naming would
        # start again at 0 and overwrite or prune the wrong checkpoints.
        accelerator.project_configuration.iteration = int(state.get("iteration", state["step"]))
        return state

    def _prune(self) -> None:
        if not self.keep or self.keep < 1:
            return
        done = self.complete()
        for _, path in done[: max(len(done) - self.keep, 0)]:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """Append one JSON object per line to `metrics.jsonl` (main process only; others no-op)."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_json_safe(record), ensure_ascii=False) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill is dropped
                records.append(json.loads(line))
        return records

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drop records after `step` (written by a run killed after its last checkpoint); returns the
        records kept."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        if self.enabled:
            with atomic_write(self.path) as handle:
                for record in kept:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return kept


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def check_finite(value: float, *, step: int, what: str = "loss", hint: str | None = None) -> None:
    """Stop training when `value` is NaN or Inf (the run cannot recover; the last checkpoint is intact)."""
    if not math.isfinite(value):
        raise TrainingError(
            f"the {what} became {value} at step {step}; training stopped (the last complete checkpoint is kept)",
            hint=hint or "lower --learning-rate, keep --grad-clip on, or use --mixed-precision bf16 instead of fp16",
        )


def metric_line(record: dict[str, Any], *, total_steps: int | None = None) -> str:
    """`step 40/200 | epoch 1 | loss 2.3141 | lr 1.00e-05 | 35.1 samples/s` (and the eval keys)."""
    parts = []
    step = record.get("step")
    if step is not None:
        parts.append(f"step {step}/{total_steps}" if total_steps else f"step {step}")
    if "epoch" in record:
        parts.append(f"epoch {record['epoch']}")
    for key, value in record.items():
        if key in ("step", "epoch", "type", "time"):
            continue
        if isinstance(value, float):
            if key == "lr":
                parts.append(f"lr {value:.2e}")
            elif key.endswith("per_second"):
                parts.append(f"{value:.1f} {key.replace('_per_second', '')}/s")
            elif value != 0 and not 1e-3 <= abs(value) < 1e5:
                parts.append(f"{key} {value:.3e}")  # exploding gradient norms, tiny losses
            else:
                parts.append(f"{key} {value:.4f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{key} {value}")
    prefix = "eval " if record.get("type") == "eval" else ""
    return prefix + " | ".join(parts)


def emit(callback: Callable[[dict], None] | None, event: dict[str, Any]) -> None:
    """Call a progress callback, if any."""
    if callback is not None:
        callback(event)
