"""Training helpers shared by the fine-tuning and DiT trainers, on Accelerate.

- `seed_everything`: python, numpy and torch RNGs from one seed.
- `build_optimizer` / `warmup_cosine_schedule`: AdamW (no weight decay on biases, norms and other
  1-D parameters, as BLIP/LAVIS and transformers' Trainer do) with a linear warmup then cosine decay.
- `CheckpointManager`: `DIR/checkpoints/step-N/` written atomically (a temp directory renamed into
  place once complete, with a marker file written last), holding the training state in safetensors
  and JSON only (model, extra modules, optimizer, scheduler, gradient scaler, per-process RNG states
  and generators) plus `trainer_state.json` (step counter, data position, best metric, Accelerate's
  micro-batch counter and checkpoint iteration, ...). Not Accelerate's `save_state`: its optimizer,
  scheduler and RNG files are torch.save files, which can run code when loaded; our security
  standard allows only safetensors and JSON.
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
MODEL_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- seeding


class RunSummary:
    """For a training run's result dataclass with `history` and `is_main_process` fields."""

    def summary(self) -> dict[str, Any]:
        """The result without the history (what the CLI prints)."""
        from dataclasses import asdict

        data = asdict(self)
        data.pop("history")
        data.pop("is_main_process")
        return data


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


def build_optimizer(
    model,
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
):
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


@contextlib.contextmanager
def deterministic_on_cpu(accelerator):
    """Deterministic kernels while training on CPU, restored afterwards. Since torch 2.1,
    index_put_(accumulate=True) (the backward of gathering rows by index, e.g. the hard negatives of
    retrieval training) adds in parallel with atomics on CPU, so two runs on 2+ threads differed in
    the last bits; the deterministic path costs nothing measurable here. Not on GPUs, where it would
    need CUBLAS_WORKSPACE_CONFIG and cost speed."""
    import torch

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
def quiet_unless_main(accelerator):
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


def release_accelerator(accelerator) -> None:
    """Let a later run in the same process build a new Accelerator with other settings (the state
    is a process-wide singleton). A multi-process run keeps its process group."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    with contextlib.suppress(Exception):
        accelerator.free_memory()
    single = accelerator.num_processes == 1
    AcceleratorState._reset_state(reset_partial_state=single)
    GradientState._reset_state()
    if single:
        PartialState._reset_state()


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

        def write_state() -> None:
            if main:
                # Under DDP every process holds the same weights and optimizer state: one copy.
                _save_module(accelerator.unwrap_model(model), tmp / MODEL_FILE)
                for name, module in modules.items():
                    _save_module(accelerator.unwrap_model(module), tmp / f"{name}.safetensors")
                _write_state(tmp, "optimizer", optimizer.state_dict())
                if scheduler is not None:
                    _write_state(tmp, "scheduler", scheduler.state_dict())
                if getattr(accelerator, "scaler", None) is not None:
                    _write_state(tmp, "scaler", accelerator.scaler.state_dict())
            # RNG streams differ per process (dropout, sampled negatives, timesteps): each its own.
            _write_state(tmp, f"rng-{accelerator.process_index}", _rng_state(generators))

        # Each phase ends with an all-reduce of the failures (a barrier too): when one process
        # fails, all raise instead of the others waiting forever at the next collective.
        _on_all_processes(accelerator, make_dir, f"create {tmp}")
        _on_all_processes(accelerator, write_state, f"write {tmp}")
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
            _fsync(tmp)
            replace_dir(tmp, final)
            _fsync(self.root)
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
            _load_into(optimizer, _read_state(path, "optimizer"), path / "optimizer.json")
            if scheduler is not None:
                _load_into(scheduler, _read_state(path, "scheduler"), path / "scheduler.json")
            scaler = getattr(accelerator, "scaler", None)
            if scaler is not None:
                saved = _read_state(path, "scaler") if (path / "scaler.json").is_file() else {}
                if saved:  # empty: the checkpoint was written without fp16; keep the fresh scale
                    _load_into(scaler, saved, path / "scaler.json")
                else:
                    logger.warning("%s has no gradient scaler state; fp16 loss scaling starts afresh", path)
            # Last, so nothing above can draw from the restored streams.
            _set_rng_state(
                _read_state(path, f"rng-{accelerator.process_index}"),
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
# Markers of the JSON encoding of values that JSON has no type for (see `_encode`).
_TENSOR, _TUPLE, _INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"


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
        import torch

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
    from safetensors.torch import save_model

    save_model(module, str(file), metadata={"format": "pt"}, force_contiguous=True)
    _fsync(file)


def _load_module(module, file: Path) -> None:
    """Load `file` into `module` in place (strict: every key must match, tied aliases excepted).
    Copying into the existing parameters keeps ties and the optimizer's references intact."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not file.is_file():
        raise TrainingError(f"{file.parent}: {file.name} is missing")
    try:
        load_model(module, str(file), strict=True, device="cpu")
    except (RuntimeError, SafetensorError) as exc:
        raise TrainingError(f"{file} does not fit the model: {exc}") from exc


# -- everything else: JSON + safetensors


def _write_state(directory: Path, name: str, value: Any) -> None:
    """`value` (a state_dict: nested dicts, lists, tuples, scalars, tensors) as `<name>.json`, with
    its tensors in `<name>.safetensors` (only written when there are some)."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    encoded = _encode(value, "", tensors)
    if tensors:
        file = directory / f"{name}.safetensors"
        save_file(_unshared(tensors), str(file), metadata={"format": "pt"})
        _fsync(file)
    write_json(directory / f"{name}.json", encoded)


def _read_state(directory: Path, name: str) -> Any:
    """The value `_write_state(directory, name, value)` wrote."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = directory / f"{name}.json"
    try:
        encoded = json.loads(file.read_text(encoding="utf-8"))
        tensor_file = directory / f"{name}.safetensors"
        tensors = load_file(str(tensor_file), device="cpu") if tensor_file.is_file() else {}
    except FileNotFoundError as exc:
        raise TrainingError(f"{directory}: {Path(exc.filename or file).name} is missing") from exc
    except (OSError, ValueError, SafetensorError) as exc:
        raise TrainingError(f"{directory}: unreadable {name} state ({exc})") from exc
    return _decode(encoded, tensors, file)


def _encode(value: Any, path: str, tensors: dict[str, Any]) -> Any:
    """A JSON-able copy of `value`; tensors go to `tensors[path]` (path: dotted keys, e.g.
    `state.3.exp_avg`) and leave `{"__tensor__": path}`. Tuples (AdamW's betas) and dicts with int
    keys (optimizer state by parameter id) get markers so they come back as they were."""
    import numpy as np
    import torch

    def child(key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise TrainingError(f"two state values map to the tensor name {path!r}")
        tensors[path] = value.detach().to("cpu").contiguous()
        return {_TENSOR: path}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, child(i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, child(i), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if value and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {_INT_KEYS: {str(k): _encode(v, child(k), tensors) for k, v in value.items()}}
        for key in value:
            if not isinstance(key, str) or key.startswith("__"):
                raise TrainingError(
                    f"cannot store the key {key!r} at {path or 'the top'} of a checkpoint state"
                )
        return {k: _encode(v, child(k), tensors) for k, v in value.items()}
    raise TrainingError(
        f"cannot store a {type(value).__name__} at {path or 'the top'} of a checkpoint state "
        "(JSON values and tensors only)"
    )


def _decode(value: Any, tensors: dict[str, Any], file: Path) -> Any:
    """Inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors, file) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        if _TENSOR in value:
            try:
                return tensors[value[_TENSOR]]
            except KeyError:
                raise TrainingError(
                    f"{file}: tensor {value[_TENSOR]!r} is missing from its safetensors file"
                ) from None
        if _TUPLE in value:
            return tuple(_decode(v, tensors, file) for v in value[_TUPLE])
        if _INT_KEYS in value:
            return {int(k): _decode(v, tensors, file) for k, v in value[_INT_KEYS].items()}
    return {k: _decode(v, tensors, file) for k, v in value.items()}


def _unshared(tensors: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors that share memory; copy the second and later users of a storage."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


def _load_into(obj, state: Any, file: Path) -> None:
    """`obj.load_state_dict(state)` (optimizer, scheduler, scaler; Accelerate's wrappers delegate)."""
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise TrainingError(f"{file} does not fit this {type(obj).__name__}: {exc}") from exc


# -- random number generators


def _rng_state(generators: dict[str, Any]) -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device, the given generators)."""
    import random

    import numpy as np
    import torch

    version, internal, gauss_next = random.getstate()
    algorithm, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        # The MT19937 key is uint32: int64 holds it exactly and every safetensors reader knows it.
        "numpy": {
            "algorithm": algorithm,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: generator.get_state() for name, generator in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, Any], file: Path) -> None:
    import random

    import numpy as np
    import torch

    try:
        python, numpy_state = state["python"], state["numpy"]
        internal = tuple(int(x) for x in python["state"].tolist())
        random.setstate((python["version"], internal, python["gauss_next"]))
        np.random.set_state(
            (
                numpy_state["algorithm"],
                numpy_state["key"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TrainingError(f"{file}: unusable RNG state ({type(exc).__name__}: {exc})") from exc
    if torch.cuda.is_available():
        saved = state.get("cuda") or []
        count = torch.cuda.device_count()
        if len(saved) != count:
            logger.warning(
                "%s: saved CUDA RNG states for %d device(s), this process sees %d; restoring %d",
                file,
                len(saved),
                count,
                min(len(saved), count),
            )
        for device, device_state in enumerate(saved[:count]):
            torch.cuda.set_rng_state(device_state, device)


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk (the directory rename makes a checkpoint visible:
    its files must be on disk before that)."""
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
            hint=hint
            or "lower --learning-rate, keep --grad-clip on, or use --mixed-precision bf16 instead of fp16",
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
