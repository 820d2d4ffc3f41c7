"""`blip train-dit`: train the CLIP-feature DiT (BLIP3-o style) on embedding shards, with rectified flow,
on Accelerate (one CPU, one GPU, or many processes under `accelerate launch`).

    from blip_toolkit.dit.train import TrainDiTConfig, run_train_dit
    config = load_train_config("configs/dit-blip3o.toml", {"data.dir": "emb/", "out": "runs/dit"})
    result = run_train_dit(config)          # result.history: every metrics record

One function in phases (inputs, output directory, normaliser, model, optimizer, resume, data, eval set,
loop, export). The run directory:

    RUN/blip_run.json                  kind, status, the resolved config, the data it was trained on
    RUN/metrics.jsonl                  train records (every train.log_every steps), eval and checkpoint records
    RUN/checkpoints/step-N/            the DiT export (config.json, model / ema / normalizer / target_head
                                       .safetensors) + the training state for --resume (CheckpointManager)
    RUN/config.json, *.safetensors     the final DiT export: `blip sample --checkpoint RUN` (dit/checkpoint.py)
    RUN/trackers/                      tensorboard / wandb files when --log-with asks for them

Training is deterministic for a seed on CPU, and independent of the number of processes for the same
global batch (`train.batch_size` is the GLOBAL micro-batch; dit/data.py explains how): a resumed run
ends with the weights of an uninterrupted one, and 2 processes give the losses of 1.

Module level imports stay light (the CLI imports the config classes); torch and accelerate load in
`run_train_dit`. Only the main process writes files and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from blip_toolkit.dit.config import DiTConfig, FlowConfig
from blip_toolkit.errors import ConfigError, OutputExistsError, TrainingError, UsageError
from blip_toolkit.training.common import RunSummary

logger = logging.getLogger("blip")

RUN_FILE = "blip_run.json"
RUN_KIND = "blip-train-dit"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
TRACKER_DIR = "trackers"
TRACKER_PROJECT = "blip-train-dit"
# Settings that may change between an interrupted run and its --resume (everything else is locked:
# the data, the split, the model, the objective, the optimizer and the batch define what was trained).
RESUME_FREE = (
    "out",
    "resume",
    "overwrite",
    "data.dir",
    "data.num_workers",
    "data.max_open_shards",
    "data.verify",
    "train.steps",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_with",
    "train.mixed_precision",
    "train.cpu",
    "eval.",
    "sample.",
)


# ----------------------------------------------------------------------------------------------------
# Config


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    """[data]: where the embeddings are and how they are split and streamed.

    dir: the extract-embeddings output directory (--data). eval_shards: hold out the last N shards;
    eval_fraction: or hold out this fraction of the images (seeded by split_seed); neither: evaluate on
    the first training images. overfit: train on the first N training images only and evaluate on them
    (--overfit). shuffle_buffer: indices in the shuffle buffer (integers only: cheap). num_workers:
    DataLoader processes reading batches (0 = in the training process). max_open_shards: shards
    memory-mapped at once. stats_samples: images used to fit the target normaliser (0 = every
    training image). verify: shard checksums checked lazily (on first read), on open, or not at all."""

    dir: str = ""
    eval_shards: int = 0
    eval_fraction: float = 0.0
    split_seed: int = 0
    overfit: int = 0
    shuffle_buffer: int = 10_000
    num_workers: int = 0
    max_open_shards: int = 4
    stats_samples: int = 0
    verify: Literal["lazy", "open", "none"] = "lazy"

    def __post_init__(self) -> None:
        _need(self.eval_shards >= 0, f"data.eval_shards must be >= 0, got {self.eval_shards}")
        _need(
            0.0 <= self.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}"
        )
        _need(
            not (self.eval_shards and self.eval_fraction),
            "set data.eval_shards or data.eval_fraction, not both",
        )
        _need(self.overfit >= 0, f"data.overfit must be >= 0, got {self.overfit}")
        _need(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        _need(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _need(self.max_open_shards >= 1, f"data.max_open_shards must be >= 1, got {self.max_open_shards}")
        _need(self.stats_samples >= 0, f"data.stats_samples must be >= 0, got {self.stats_samples}")


@dataclass
class TrainConfig:
    """[train]: optimisation.

    steps: optimizer steps. batch_size: the GLOBAL micro-batch (split evenly across processes; the
    optimizer sees batch_size x grad_accum samples per step). lr: peak AdamW learning rate, reached
    after warmup_steps (linear), then a cosine down to lr x min_lr_ratio at `steps`. grad_clip: max
    gradient norm (0 = off). ema_decay: decay of the float32 EMA of the weights, updated every optimizer
    step; the effective decay is min(ema_decay, (1 + step) / (10 + step)), so early on the EMA follows
    the weights instead of averaging in the random initialisation (0 = no EMA). log_every: a train record
    (mean loss of the window) every N steps. save_every: checkpoint every N steps (0 = only at the end).
    log_with: Accelerate trackers (tensorboard, wandb, ...; must be installed). cpu: train on CPU even
    with a GPU."""

    steps: int = 10_000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 200
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = 50
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_with: list[str] = field(default_factory=list)
    cpu: bool = False

    def __post_init__(self) -> None:
        _need(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _need(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _need(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _need(math.isfinite(self.lr) and self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _need(
            0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
        )
        _need(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _need(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _need(
            0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0,
            "train.beta1 and train.beta2 must be in [0, 1)",
        )
        _need(
            math.isfinite(self.grad_clip) and self.grad_clip >= 0,
            f"train.grad_clip must be >= 0, got {self.grad_clip}",
        )
        _need(0.0 <= self.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        _need(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _need(self.save_every >= 0, f"train.save_every must be >= 0, got {self.save_every}")
        _need(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        self.log_with = [name.strip() for item in self.log_with for name in item.split(",") if name.strip()]


@dataclass
class EvalConfig:
    """[eval]: held-out metrics every `every` steps and at the end (0 = never).

    On at most max_samples held-out images: val_loss (flow MSE at random t), vel_cos (cosine of the
    predicted and true velocity), patch_cos / global_cos (tokens sampled with `steps` `solver` steps at
    cfg_scale vs the ground-truth tokens, and their pooled projections through the target head),
    est_r@1 (image-to-text recall@1 of the sampled globals among the held-out captions). ema: evaluate
    the EMA weights (what `blip sample` uses by default). seed: the noise (same as `sample --seed`)."""

    every: int = 500
    max_samples: int = 256
    batch_size: int = 64
    steps: int = 10
    solver: Literal["euler", "heun"] = "euler"
    cfg_scale: float | None = None  # None: sample.cfg_scale
    ema: bool = True
    seed: int = 0
    recall: bool = True

    def __post_init__(self) -> None:
        _need(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        _need(self.max_samples >= 1, f"eval.max_samples must be >= 1, got {self.max_samples}")
        _need(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _need(self.steps >= 1, f"eval.steps must be >= 1, got {self.steps}")
        _need(
            self.cfg_scale is None or self.cfg_scale >= 0,
            f"eval.cfg_scale must be >= 0, got {self.cfg_scale}",
        )


@dataclass
class SampleDefaults:
    """[sample]: the sampling settings stored with the model (`blip sample` uses them unless told
    otherwise): ODE steps, classifier-free guidance scale, solver (euler | heun), timestep shift."""

    steps: int = 30
    cfg_scale: float = 1.0
    solver: Literal["euler", "heun"] = "euler"
    shift: float = 1.0

    def __post_init__(self) -> None:
        _need(self.steps >= 1, f"sample.steps must be >= 1, got {self.steps}")
        _need(self.cfg_scale >= 0, f"sample.cfg_scale must be >= 0, got {self.cfg_scale}")
        _need(self.shift > 0, f"sample.shift must be positive, got {self.shift}")


@dataclass
class TrainDiTConfig:
    """Everything a train-dit run needs. Sections: [data], [model] (DiTConfig), [flow] (FlowConfig),
    [train], [eval], [sample]; `out`, `resume` and `overwrite` at the top level."""

    out: str = ""
    resume: bool = False
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleDefaults = field(default_factory=SampleDefaults)

    def __post_init__(self) -> None:
        _need(not (self.resume and self.overwrite), "--resume and --overwrite cannot be combined")


def load_train_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainDiTConfig:
    """Defaults, then the file (TOML / YAML / JSON) at `path`, then `overrides` (dotted keys,
    e.g. {"train.lr": 3e-4}; None values are skipped). Unknown keys are a ConfigError listing them."""
    from blip_toolkit.config import build_config, load_config_file

    values = load_config_file(path) if path is not None else {}
    return build_config(TrainDiTConfig, values, overrides, source=str(path) if path else "options")


def format_config(config: TrainDiTConfig, fmt: str = "toml") -> str:
    """The config as TOML (None values become comments: unset means the default / the preset) or JSON.
    Either parses back to the same config with `load_train_config`."""
    data = asdict(config)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    lines = ["# blip train-dit config (blip train-dit --config FILE); unset keys are commented out"]
    sections = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key not in sections:
            lines.append(_toml_line(key, value))
    for name, values in sections.items():
        lines += ["", f"[{name}]"]
        lines += [_toml_line(key, value) for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_line(key: str, value: Any) -> str:
    if value is None:
        return f"# {key} = (unset)"
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ----------------------------------------------------------------------------------------------------
# Result


@dataclass
class TrainDiTResult(RunSummary):
    """What a run did. `history` holds every metrics.jsonl record (train, eval, checkpoint)."""

    run_dir: str
    steps: int
    total_steps: int
    resumed_from_step: int | None
    num_parameters: int
    train_samples: int
    eval_samples: int
    eval_kind: str
    final_loss: float | None
    eval: dict[str, Any]
    train_samples_per_second: float | None
    elapsed_seconds: float
    is_main_process: bool = True
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_dit(
    model,
    eval_set,
    *,
    normalizer,
    head,
    steps: int = 10,
    cfg_scale: float = 1.0,
    solver: str = "euler",
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    recall: bool = True,
    device=None,
) -> dict[str, float]:
    """Held-out metrics of a DiT on an `EvalSet` (dit/data.py); pure function of its inputs.

    val_loss: flow-matching MSE (normalised space) at one random t per image; vel_cos: mean token
    cosine of the predicted vs the true velocity there (t and x_0 per image from (seed, image index));
    patch_cos: mean token cosine of the sampled tokens (`generate_tokens`, the noise `blip sample
    --seed` uses) vs the ground truth; global_cos: cosine of head(sampled) vs head(ground truth);
    est_r@1: image-to-text recall@1 of head(sampled) among the distinct captions of the evaluated
    images (identical strings are one text, positive for every image that has it, as `eval-recall
    --dedupe-captions`: otherwise a caption shared by many images, e.g. a class name, is a tie that
    recall's pessimistic tie rule always counts as a miss); images without a caption are left out;
    absent when there are no captions."""
    import torch

    from blip_toolkit.dit.data import STREAM_EVAL_LOSS, mix_seed
    from blip_toolkit.dit.flow import interpolate, target_velocity
    from blip_toolkit.dit.sample import generate_tokens
    from blip_toolkit.eval.recall import mean_cosine, retrieval_recall

    device = torch.device(device or next(model.parameters()).device)
    n = len(eval_set)
    _, tokens, dim = eval_set.target.shape
    generated = torch.empty(n, head.embed_dim)
    truth = torch.empty(n, head.embed_dim)
    squared = vel_cos = patch_cos = 0.0
    generator = torch.Generator()
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            index = eval_set.index[lo : lo + batch_size]
            b = int(index.shape[0])
            cond = eval_set.cond[lo : lo + b].to(device)  # [b, M, Dc]
            target = eval_set.target[lo : lo + b].to(device)  # [b, N, Dt]
            x_1 = normalizer.encode(target)
            t = torch.empty(b)
            x_0 = torch.empty(b, tokens, dim)
            for row, i in enumerate(index.tolist()):
                generator.manual_seed(mix_seed(seed, STREAM_EVAL_LOSS, i))
                t[row] = torch.rand((), generator=generator)
                x_0[row] = torch.randn((tokens, dim), generator=generator)
            t, x_0 = t.to(device), x_0.to(device)
            x_t = interpolate(x_0, x_1, t)
            v_pred = model(x_t, t, cond).float()  # [b, N, Dt]
            v_true = target_velocity(x_0, x_1)
            squared += float((v_pred - v_true).double().square().sum())
            vel_cos += mean_cosine(v_pred, v_true) * b
            sampled = generate_tokens(
                model,
                cond,
                index,
                seed=seed,
                steps=steps,
                cfg_scale=cfg_scale,
                solver=solver,
                shift=shift,
                normalizer=normalizer,
            ).float()
            patch_cos += mean_cosine(sampled, target) * b
            generated[lo : lo + b] = head(sampled).float().cpu()
            truth[lo : lo + b] = head(target).float().cpu()
    metrics = {
        "val_loss": squared / (n * tokens * dim),
        "vel_cos": vel_cos / n,
        "patch_cos": patch_cos / n,
        "global_cos": mean_cosine(generated, truth),
    }
    if recall and eval_set.text_emb.shape[0]:
        images = torch.unique(eval_set.caption_image)  # images with at least one caption, sorted
        remap = torch.full((n,), -1, dtype=torch.int64)
        remap[images] = torch.arange(len(images))
        text_emb, pair_image, pair_text = _distinct_captions(eval_set)
        result = retrieval_recall(generated[images], text_emb, remap[pair_image], pair_text, (1,))
        metrics["est_r@1"] = result.i2t[1]
    return metrics


def _distinct_captions(eval_set):
    """(text_emb [T, E], pair_image [P], pair_text [P]) with identical caption strings merged."""
    from blip_toolkit.eval.recall import merge_identical_captions

    count = eval_set.text_emb.shape[0]
    strings = eval_set.captions if len(eval_set.captions) == count else [str(i) for i in range(count)]
    first, pair_image, pair_text = merge_identical_captions(strings, eval_set.caption_image)
    return eval_set.text_emb[first], pair_image, pair_text


# ----------------------------------------------------------------------------------------------------
# Entry point


def run_train_dit(
    config: TrainDiTConfig, *, callback: Callable[[dict[str, Any]], None] | None = None
) -> TrainDiTResult:
    """Train a DiT as `config` says and write the run directory (module docstring).

    `callback(record)` is called on the main process with every metrics record: {"type": "train",
    "step", "epoch", "loss", "lr", "grad_norm", "samples_per_second"}, {"type": "eval", "step",
    "val_loss", "vel_cos", "patch_cos", "global_cos", "est_r@1"}, {"type": "checkpoint", "step",
    "path"}. An exception raised by the callback stops the run (the last complete checkpoint stays
    usable with `resume`). A NaN or Inf loss stops it with a TrainingError naming the step."""
    inputs = _check_inputs(config)
    accelerator = _make_accelerator(config, inputs)
    from blip_toolkit.training.common import deterministic_on_cpu, quiet_unless_main, release_accelerator

    try:
        with quiet_unless_main(accelerator), deterministic_on_cpu(accelerator):
            return _Trainer(config, inputs, accelerator, callback).run()
    finally:
        release_accelerator(accelerator)


# ----------------------------------------------------------------------------------------------------
# Phase 1: inputs (no writes)


@dataclass
class _Inputs:
    shards: Any  # EmbeddingShards
    split: Any  # DataSplit
    model_config: DiTConfig
    out: Path
    log_with: list[str]


def _check_inputs(config: TrainDiTConfig) -> _Inputs:
    """What can be checked before anything is built or written (on every process, so all stop
    together): required options, the embeddings, the split, the model dims, trackers, output policy."""
    import os

    from blip_toolkit.data.shards import EmbeddingShards
    from blip_toolkit.dit.data import split_indices

    problems = []
    if not config.data.dir:
        problems.append("--data is required (an extract-embeddings directory)")
    if not config.out:
        problems.append("--out is required (the run directory)")
    if problems:
        raise UsageError("; ".join(problems))
    shards = EmbeddingShards(config.data.dir, verify=config.data.verify, max_open=config.data.max_open_shards)
    split = split_indices(
        shards,
        eval_shards=config.data.eval_shards,
        eval_fraction=config.data.eval_fraction,
        split_seed=config.data.split_seed,
        overfit=config.data.overfit,
    )
    model_config = _model_config(config.model, shards)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    if config.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} (the global batch) is not divisible by the {world} "
            "processes",
            hint="each process takes an equal slice of every global batch",
        )
    if config.flow.contrastive_weight > 0 and config.train.batch_size < 2:
        raise ConfigError("flow.contrastive_weight > 0 needs train.batch_size >= 2 (in-batch negatives)")
    if config.train.mixed_precision == "fp16" and _cpu_only(config):
        raise UsageError(
            "--mixed-precision fp16 needs a GPU; on CPU use bf16 (slow where it is emulated) or no"
        )
    log_with = _check_trackers(config.train.log_with)
    out = Path(config.out)
    _check_output_dir(out, overwrite=config.overwrite, resume=config.resume)
    return _Inputs(shards, split, model_config, out, log_with)


def _model_config(model: DiTConfig, shards) -> DiTConfig:
    """The DiTConfig with the data's dims and token layouts; dims set in the config must match."""
    dims = shards.dims
    data = {
        "target_dim": dims["target_dim"],
        "cond_dim": dims["cond_dim"],
        "num_tokens": dims["target_tokens"],
        "num_cond_tokens": dims["cond_tokens"],
    }
    conflicts = [
        f"model.{k} = {getattr(model, k)} but {shards.root} has {v}"
        for k, v in data.items()
        if getattr(model, k) and getattr(model, k) != v
    ]
    if conflicts:
        raise ConfigError("; ".join(conflicts), hint="leave the data dims at 0 (taken from the embeddings)")
    encoders = shards.encoders
    layout = {
        "has_cls": encoders.get("target", {}).get("tokens") == "cls+patch",
        "cond_has_cls": encoders.get("cond", {}).get("tokens") == "cls+patch",
    }
    return dataclasses.replace(model, **data, **layout).resolved()


def _cpu_only(config: TrainDiTConfig) -> bool:
    import os

    import torch

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return config.train.cpu or forced or not torch.cuda.is_available()


def _check_trackers(names: list[str]) -> list[str]:
    """Requested Accelerate trackers, refused when unknown or not installed (Accelerate itself would
    skip a missing one silently)."""
    if not names:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    out = []
    for name in names:
        if name == "all":
            if not available:
                logger.warning(
                    "--log-with all: no tracker is installed (tensorboard, wandb, ...); logging to "
                    "metrics.jsonl only"
                )
            out.extend(sorted(available))
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UsageError(
                f"--log-with {name}: unknown tracker (use one of {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})"
            )
        if name not in available:
            raise UsageError(f"--log-with {name}: {name} is not installed", hint=f"pip install {name}")
        out.append(name)
    return sorted(set(out))


def _check_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """The refusals of fsutil.prepare_output_dir, checked without touching anything."""
    from blip_toolkit.fsutil import OWNED_MARKERS

    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    if not (path.is_dir() and any(path.iterdir())):
        return
    if resume:
        run_file = path / RUN_FILE
        kind = None
        with contextlib.suppress(OSError, ValueError):
            kind = json.loads(run_file.read_text(encoding="utf-8")).get("kind")
        if kind != RUN_KIND:
            raise OutputExistsError(
                f"{path} is not a train-dit run directory (no {RUN_FILE} of a train-dit run); cannot resume",
                hint="choose another --out",
            )
        return
    if not overwrite:
        raise OutputExistsError(
            f"{path} already exists and is not empty",
            hint="pass --resume to continue it or --overwrite to replace it",
        )
    if not any((path / marker).exists() for marker in OWNED_MARKERS):
        raise OutputExistsError(
            f"{path} is not empty and was not written by blip; refusing to clear it",
            hint="choose another --out",
        )


# ----------------------------------------------------------------------------------------------------
# Phase 2: accelerator


def _make_accelerator(config: TrainDiTConfig, inputs: _Inputs):
    import warnings

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from blip_toolkit.log import verbosity

    if verbosity() <= 0:
        logging.getLogger("accelerate").setLevel(logging.ERROR)
    train = config.train
    # Which parameters get a gradient varies from batch to batch: the learned null condition only when
    # some sample of this process's batch had its condition dropped (never with cond_dropout = 0), the
    # conditioning projections only when some sample kept it. DDP waits forever for a gradient that
    # never comes unless it looks for unused parameters (a walk of the autograd graph per step, small
    # next to a DiT step), so it always looks. Its notice for batches where nothing was unused is noise.
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")
    return Accelerator(
        mixed_precision=train.mixed_precision,
        # Our own flag, passed here (accelerate launch's --gradient_accumulation_steps is DeepSpeed-only).
        gradient_accumulation_steps=train.grad_accum,
        cpu=train.cpu,
        # The scheduler is stepped once per optimizer step by us (the wrapped one would step once per
        # process and step).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=inputs.log_with or None,
        project_config=ProjectConfiguration(
            project_dir=str(inputs.out),
            logging_dir=str(inputs.out / TRACKER_DIR),
            automatic_checkpoint_naming=False,
        ),
    )


# ----------------------------------------------------------------------------------------------------
# Phase 3: the trainer


class _Trainer:
    def __init__(self, config: TrainDiTConfig, inputs: _Inputs, accelerator, callback):
        self.config = config
        self.inputs = inputs
        self.accelerator = accelerator
        self.callback = callback
        self.shards = inputs.shards
        self.split = inputs.split
        self.model_config = inputs.model_config
        self.out = inputs.out
        self.main = accelerator.is_main_process
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.micro_batches = 0
        self.total_steps = config.train.steps
        self.resumed_from: int | None = None
        self.last_eval: dict[str, Any] = {}
        self.last_eval_step: int | None = None
        self.last_checkpoint_step: int | None = None
        self.final_loss: float | None = None
        self.train_time = 0.0
        self.train_samples = 0
        self.trackers = bool(inputs.log_with)
        self.eval_set = None

    # -- phases

    def run(self) -> TrainDiTResult:
        from blip_toolkit.training.common import CheckpointManager, MetricsWriter, seed_everything

        start = time.perf_counter()
        acc = self.accelerator
        seed_everything(self.config.train.seed)
        CheckpointManager.check_supported(acc)
        self._prepare_output()
        self.metrics = MetricsWriter(self.out / METRICS_FILE, enabled=self.main)
        self.checkpoints = CheckpointManager(
            self.out / CHECKPOINT_DIR, keep=self.config.train.keep_checkpoints
        )
        try:
            resume_from = self._find_checkpoint()
            self._fit_normalizer(resume_from)
            self._build_model()
            self._build_optimizer()
            if resume_from is not None:
                self._resume(resume_from)
            self._build_data()
            self._start_trackers()
            self._log_start()
            self._loop()
            self._finish()
        except BaseException as exc:
            self._mark_failed(exc)
            raise
        finally:
            if self.trackers:
                with contextlib.suppress(Exception):
                    acc.end_training()
        acc.wait_for_everyone()
        return self._result(time.perf_counter() - start)

    def resolved_config(self) -> dict[str, Any]:
        data = asdict(self.config)
        data["model"] = self.model_config.to_dict()
        data["data"]["dir"] = str(Path(data["data"]["dir"]).resolve())
        data["out"] = str(Path(data["out"]).resolve())
        return data

    def data_record(self) -> dict[str, Any]:
        """The embeddings the run trains on (blip_run.json and every export's config.json)."""
        shards, config = self.shards, self.config.data
        return {
            "dir": str(Path(self.shards.root).resolve()),
            "index_sha256": shards.index_sha256,
            "dims": shards.dims,
            "dtype": shards.index.get("dtype"),
            "encoders": {
                side: {
                    k: v
                    for k, v in shards.encoders.get(side, {}).items()
                    if isinstance(v, (str, int, float, bool)) or v is None
                }
                for side in ("cond", "target")
            },
            "num_samples": len(shards),
            "train_samples": len(self.split.train),
            "eval_samples": len(self.split.eval),
            "eval_kind": self.split.kind,
            "split": {
                "eval_shards": config.eval_shards,
                "eval_fraction": config.eval_fraction,
                "split_seed": config.split_seed,
                "overfit": config.overfit,
            },
        }

    def _prepare_output(self) -> None:
        from blip_toolkit import __version__
        from blip_toolkit.fsutil import prepare_output_dir, write_json

        config, acc = self.config, self.accelerator
        run_file = self.out / RUN_FILE
        previous = None
        if config.resume and run_file.is_file():
            previous = json.loads(run_file.read_text(encoding="utf-8"))
            _check_resume(previous, self.resolved_config(), self.data_record(), self.out)
        if self.main:
            prepare_output_dir(self.out, overwrite=config.overwrite, resume=config.resume)
            record = {
                "kind": RUN_KIND,
                "status": "running",
                "toolkit_version": __version__,
                "config": self.resolved_config(),
                "data": self.data_record(),
                "num_processes": acc.num_processes,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if previous:
                record["started"] = previous.get("started", record["started"])
            write_json(
                run_file, record
            )  # first: it marks the directory as a train-dit run (--overwrite, --resume)
            if not config.resume:
                (self.out / METRICS_FILE).unlink(missing_ok=True)
        acc.wait_for_everyone()

    def _find_checkpoint(self) -> Path | None:
        if not self.config.resume:
            return None
        if self.main:
            for path in self.checkpoints.clean_incomplete():
                logger.info("removed an incomplete checkpoint left by an interrupted save: %s", path)
        self.accelerator.wait_for_everyone()
        latest = self.checkpoints.latest()
        if latest is None:
            logger.info("%s: no complete checkpoint; starting from step 0", self.out)
            self.history = self.metrics.truncate_after(0) if self.main else []
        return latest

    def _fit_normalizer(self, checkpoint: Path | None) -> None:
        """The target normaliser: from the checkpoint when resuming (not refitted: the run goes on with
        the statistics its weights were trained with), else fitted in one streaming pass over the
        training targets, each process reading its share; the partial statistics are gathered and
        merged in rank order, so every process gets the same normaliser."""
        from blip_toolkit.dit.data import (
            ShardArrays,
            merge_statistics,
            normalizer_from_statistics,
            pack_statistics,
            token_statistics,
        )
        from blip_toolkit.dit.normalize import TokenNormalizer

        method = self.config.flow.target_norm
        self.arrays = ShardArrays(self.shards, max_open=self.config.data.max_open_shards)
        if checkpoint is not None:
            from safetensors.torch import load_file

            from blip_toolkit.dit.checkpoint import NORMALIZER_FILE, read_record
            from blip_toolkit.dit.normalize import TENSOR_PREFIX

            record = read_record(checkpoint)
            tensors = {TENSOR_PREFIX + k: v for k, v in load_file(str(checkpoint / NORMALIZER_FILE)).items()}
            self.normalizer = TokenNormalizer.from_export(tensors, record["normalizer"])
            return
        if method == "none":
            self.normalizer = TokenNormalizer("none")
            return
        acc = self.accelerator
        start = time.perf_counter()
        stats = token_statistics(
            self.arrays,
            self.split.train,
            max_samples=self.config.data.stats_samples,
            part=acc.process_index,
            parts=acc.num_processes,
        )
        packed = pack_statistics(stats)[None]  # [1, 2 + 2D]
        if acc.num_processes > 1:
            packed = acc.gather(packed.to(acc.device)).cpu()  # [P, 2 + 2D], rank order
        self.normalizer = normalizer_from_statistics(
            method, merge_statistics(packed), where=str(self.shards.root)
        )
        logger.info(
            "%s target normalisation fitted on %d tokens in %.1f s",
            method,
            self.normalizer.count,
            time.perf_counter() - start,
        )

    def _build_model(self) -> None:
        import copy

        import torch

        from blip_toolkit.dit.checkpoint import normalizer_bundle
        from blip_toolkit.dit.model import DiT

        acc = self.accelerator
        torch.manual_seed(self.config.train.seed)  # the same initial weights on every process
        model = DiT(self.model_config)
        model.train()
        self.num_parameters = model.num_parameters
        self.ema = None
        if self.config.train.ema_decay > 0:
            self.ema = copy.deepcopy(model).float().requires_grad_(False).eval().to(acc.device)
        self.model = model
        self.head = self.shards.head(device=acc.device)
        self.norm_bundle = normalizer_bundle(self.normalizer)

    def _build_optimizer(self) -> None:
        from blip_toolkit.training.common import build_optimizer, warmup_cosine_schedule

        train, acc = self.config.train, self.accelerator
        optimizer = build_optimizer(
            self.model,
            learning_rate=train.lr,
            weight_decay=train.weight_decay,
            betas=(train.beta1, train.beta2),
        )
        scheduler = warmup_cosine_schedule(
            optimizer, warmup_steps=train.warmup_steps, total_steps=train.steps, min_ratio=train.min_lr_ratio
        )
        self.model, self.optimizer, self.scheduler = acc.prepare(self.model, optimizer, scheduler)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ema is not None:
            # Pairs in the same order (deepcopy keeps the parameter order).
            self.ema_params = list(self.ema.parameters())
            # Detached views share the parameters' storage: they see every optimizer update.
            self.model_params = [p.detach() for p in acc.unwrap_model(self.model).parameters()]

    def _modules(self) -> dict[str, Any]:
        modules = {"normalizer": self.norm_bundle, "target_head": self.head}
        if self.ema is not None:
            modules["ema"] = self.ema
        return modules

    def _resume(self, path: Path) -> None:
        state = self.checkpoints.load(
            self.accelerator,
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            modules={"ema": self.ema} if self.ema is not None else None,
        )
        if state.get("index_sha256") != self.shards.index_sha256:
            raise TrainingError(
                f"{self.config.data.dir} is not the embeddings {path} was trained on (index.json differs)",
                hint="resume with the same embeddings, or start a new run",
            )
        if state.get("train_samples") != len(self.split.train):
            raise TrainingError(
                f"{path} was written for {state.get('train_samples')} training images; the split "
                f"now gives {len(self.split.train)}"
            )
        self.step = int(state["step"])
        self.micro_batches = int(state["micro_batches"])
        self.last_eval = state.get("last_eval") or {}
        self.last_eval_step = state.get("last_eval_step")
        self.last_checkpoint_step = self.step
        self.resumed_from = self.step
        self.history = self.metrics.truncate_after(self.step) if self.main else []
        logger.info("resumed from %s (step %d)", path, self.step)

    def _build_data(self) -> None:
        import numpy as np

        from blip_toolkit.dit.data import IndexStream, ShardArrays, TrainStream, batch_iterator, load_eval_set

        config, acc = self.config, self.accelerator
        train = self.split.train
        # The training indices of each shard (train is sorted, shards are contiguous ranges).
        bounds = np.searchsorted(train, self.arrays.offsets[1:-1])
        order = IndexStream(
            np.split(train, bounds), seed=config.train.seed, buffer=config.data.shuffle_buffer
        )
        stream = TrainStream(
            self.arrays,
            order,
            flow=config.flow,
            normalizer=self.normalizer,
            global_batch=config.train.batch_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
            seed=config.train.seed,
            start=self.micro_batches,
            with_global=config.flow.contrastive_weight > 0,
        )
        self.batches = batch_iterator(stream, num_workers=config.data.num_workers)
        if self.main and config.eval.every > 0:
            # Its own maps: reading the eval set must not evict the training stream's.
            arrays = ShardArrays(self.shards, max_open=config.data.max_open_shards)
            self.eval_set = load_eval_set(arrays, self.split.eval, max_samples=config.eval.max_samples)
            arrays.close()
            if self.split.kind == "train":
                logger.info(
                    "no held-out data (data.eval_shards / data.eval_fraction): evaluating on %d training "
                    "image(s)",
                    len(self.eval_set),
                )

    def _start_trackers(self) -> None:
        if not self.trackers:
            return
        values = {}
        for key, value in _flatten(self.resolved_config()).items():
            if isinstance(value, (int, float, str, bool)):
                values[key] = value
            elif isinstance(value, list):
                values[key] = ",".join(map(str, value))
        self.accelerator.init_trackers(TRACKER_PROJECT, config=values)

    def _log_start(self) -> None:
        config, acc, mc = self.config, self.accelerator, self.model_config
        split = self.split
        held = {
            "held-out": f"{len(split.eval)} held out",
            "train": "no held-out images",
            "overfit": "overfit: evaluated on the training images",
        }[split.kind]
        logger.info(
            "training a DiT of %s parameters (hidden %d, %d layers, %d heads) on %d of %d image(s) of %s (%s); "
            "tokens [%d, %d] <- cond [%d, %d]",
            _count(self.num_parameters),
            mc.hidden_size,
            mc.num_layers,
            mc.num_heads,
            len(split.train),
            len(self.shards),
            self.shards.root,
            held,
            mc.num_tokens,
            mc.target_dim,
            mc.num_cond_tokens,
            mc.cond_dim,
        )
        train = config.train
        logger.info(
            "%d step(s) of %d sample(s) (global batch %d = %d per process x %d process(es), x %d accumulation) "
            "on %s, mixed precision %s, target norm %s",
            self.total_steps,
            train.batch_size * train.grad_accum,
            train.batch_size,
            train.batch_size // acc.num_processes,
            acc.num_processes,
            train.grad_accum,
            acc.device,
            train.mixed_precision,
            config.flow.target_norm,
        )

    # -- the loop

    def _loop(self) -> None:
        import torch

        config, acc = self.config, self.accelerator
        train, every = config.train, config.eval.every
        device = acc.device
        window: list[Any] = []
        grad_norm = None
        window_start = time.perf_counter()
        samples_per_step = train.batch_size * train.grad_accum
        while self.step < self.total_steps:
            losses = []
            for _ in range(train.grad_accum):
                batch = next(self.batches)
                self.micro_batches += 1
                with acc.accumulate(self.model):
                    loss = self._loss(batch, device)
                    acc.backward(loss)
                    if acc.sync_gradients and train.grad_clip > 0:
                        grad_norm = acc.clip_grad_norm_(self.params, train.grad_clip)
                    self.optimizer.step()
                    if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                # A copy: the 0-d loss can be a view on a buffer of the whole batch's squared errors
                # (measured: 2 MB per step), which a window of detached losses would keep alive.
                losses.append(loss.detach().clone())
            if not acc.sync_gradients:  # pragma: no cover - accelerate's cycle out of step with ours
                raise TrainingError(f"gradient accumulation out of step at micro-batch {self.micro_batches}")
            self.step += 1
            self._update_ema()
            step_loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            # Reduced on the device every step (no host sync): the check and the record come at flush.
            window.append(acc.reduce(step_loss, "mean") if acc.num_processes > 1 else step_loss)
            evaluate = every > 0 and (self.step % every == 0 or self.step == self.total_steps)
            save = train.save_every > 0 and self.step % train.save_every == 0
            if evaluate or save or self.step % train.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                self._flush(window, grad_norm, len(window) * samples_per_step, elapsed)
                window = []
                if evaluate:
                    self._evaluate()
                if save:
                    self._checkpoint()
                window_start = time.perf_counter()  # evaluation and saving are not training time

    def _loss(self, batch: dict[str, Any], device):
        import torch
        import torch.nn.functional as F

        from blip_toolkit.dit.flow import info_nce, interpolate, predicted_clean, target_velocity

        flow = self.config.flow
        cond = batch["cond"].to(device, non_blocking=True)  # [b, M, Dc]
        x_1 = batch["x_1"].to(device, non_blocking=True)  # [b, N, Dt]
        x_0 = batch["x_0"].to(device, non_blocking=True)
        t = batch["t"].to(device, non_blocking=True)  # [b]
        drop = batch["drop"].to(device) if batch["drop"] is not None else None  # [b]
        x_t = interpolate(x_0, x_1, t)
        v_pred = self.model(x_t, t, cond, None, drop=drop).float()  # [b, N, Dt]
        loss = F.mse_loss(v_pred, target_velocity(x_0, x_1))
        if flow.contrastive_weight > 0:
            # As flow_loss: InfoNCE of the pooled predicted clean tokens against the batch's global
            # embeddings, dropped-condition samples left out (they cannot know their image).
            keep = ~drop if drop is not None else torch.ones(t.shape[0], dtype=torch.bool, device=device)
            if int(keep.sum()) >= 2:
                x_1_hat = self.normalizer.decode(predicted_clean(x_t[keep], t[keep], v_pred[keep]))
                target_global = batch["target_global"].to(device)[keep]
                loss = loss + flow.contrastive_weight * info_nce(
                    self.head(x_1_hat), target_global, flow.contrastive_temperature
                )
        return loss

    def _update_ema(self) -> None:
        import torch

        if self.ema is None:
            return
        decay = min(self.config.train.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - decay)

    def _flush(self, window: list[Any], grad_norm, samples: int, elapsed: float) -> None:
        """Check the window's losses (NaN / Inf stop the run, naming the first bad step) and write one
        train record with their mean."""
        import torch

        from blip_toolkit.training.common import check_finite

        if not window:
            return
        values = torch.stack(window).float().cpu().tolist()
        first = self.step - len(values) + 1
        for offset, value in enumerate(values):
            check_finite(
                value,
                step=first + offset,
                hint="lower --lr, keep train.grad_clip on, check the embeddings for NaN, or use bf16 "
                "instead of fp16",
            )
        self.train_time += elapsed
        self.train_samples += samples
        loss = sum(values) / len(values)
        self.final_loss = loss
        consumed = self.micro_batches * self.config.train.batch_size
        record = {
            "type": "train",
            "step": self.step,
            "epoch": round(consumed / len(self.split.train), 3),
            "loss": loss,
            "lr": float(self.scheduler.get_last_lr()[0]),
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record["samples_per_second"] = samples / elapsed if elapsed > 0 else None
        self._record(record)

    def _record(self, record: dict[str, Any], *, console: bool = True) -> None:
        from blip_toolkit.training.common import emit, metric_line

        record = {**record, "time": round(time.time(), 3)}
        self.history.append(record)
        if not self.main:
            return
        self.metrics.write(record)
        if console:
            logger.info(metric_line(record, total_steps=self.total_steps))
        if self.trackers and record["type"] in ("train", "eval"):
            values = {
                f"{record['type']}/{k}": v
                for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")
            }
            self.accelerator.log(values, step=self.step)
        emit(self.callback, record)

    # -- evaluation

    def _evaluate(self) -> None:
        if self.last_eval_step == self.step or self.config.eval.every <= 0:
            return
        acc, config = self.accelerator, self.config
        if self.main and self.eval_set is not None:
            use_ema = config.eval.ema and self.ema is not None
            model = self.ema if use_ema else acc.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            start = time.perf_counter()
            cfg = config.eval.cfg_scale if config.eval.cfg_scale is not None else config.sample.cfg_scale
            metrics = evaluate_dit(
                model,
                self.eval_set,
                normalizer=self.normalizer,
                head=self.head,
                steps=config.eval.steps,
                cfg_scale=cfg,
                solver=config.eval.solver,
                shift=config.sample.shift,
                seed=config.eval.seed,
                batch_size=config.eval.batch_size,
                recall=config.eval.recall,
                device=acc.device,
            )
            model.train(was_training)
            self.last_eval = {"step": self.step, **metrics}
            self._record(
                {"type": "eval", "step": self.step, **metrics, "eval_seconds": time.perf_counter() - start}
            )
        acc.wait_for_everyone()
        self.last_eval_step = self.step

    # -- saving

    def export_record(self) -> dict[str, Any]:
        """config.json of a DiT export (dit/checkpoint.py)."""
        from blip_toolkit import __version__
        from blip_toolkit.dit.checkpoint import EXPORT_FORMAT, EXPORT_VERSION

        _, normalizer_meta = self.normalizer.export()
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "toolkit_version": __version__,
            "step": self.step,
            "dit": self.model_config.to_dict(),
            "flow": asdict(self.config.flow),
            "normalizer": normalizer_meta,
            "data": self.data_record(),
            "head": {"config": self.head.config(), "source": self.shards.index.get("head", {})},
            "ema": {"decay": self.config.train.ema_decay, "present": self.ema is not None},
            "sample": asdict(self.config.sample),
            "eval": self.last_eval,
        }

    def _checkpoint(self) -> None:
        from blip_toolkit.dit.checkpoint import CONFIG_FILE, EXPORT_KEY
        from blip_toolkit.fsutil import write_json

        if self.last_checkpoint_step == self.step:
            return
        export = self.export_record()
        state = {
            "micro_batches": self.micro_batches,
            "index_sha256": self.shards.index_sha256,
            "train_samples": len(self.split.train),
            "total_steps": self.total_steps,
            "last_eval": self.last_eval,
            "last_eval_step": self.last_eval_step,
            EXPORT_KEY: export,
        }
        path = self.checkpoints.save(
            self.accelerator,
            self.step,
            state,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            modules=self._modules(),
        )
        if self.main:
            # The record is already inside the atomic checkpoint (trainer_state.json); config.json is the
            # copy that makes the directory a plain DiT export too.
            write_json(path / CONFIG_FILE, export)
        self.last_checkpoint_step = self.step
        self._record({"type": "checkpoint", "step": self.step, "path": str(path)}, console=False)

    def _finish(self) -> None:
        """Final checkpoint, then the export at the top of the run directory (file by file, config.json
        last: a directory whose config.json is there is complete) and the summary in blip_run.json."""
        import os

        from blip_toolkit.dit.checkpoint import CONFIG_FILE, write_export
        from blip_toolkit.fsutil import write_json

        self._checkpoint()
        acc = self.accelerator
        acc.wait_for_everyone()
        if not self.main:
            return
        tmp = self.out / ".export.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        write_export(
            tmp,
            self.export_record(),
            model=acc.unwrap_model(self.model),
            ema=self.ema,
            normalizer=self.normalizer,
            head=self.head,
        )
        (self.out / CONFIG_FILE).unlink(missing_ok=True)
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == CONFIG_FILE):
            os.replace(tmp / name, self.out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        run_file = self.out / RUN_FILE
        record = json.loads(run_file.read_text(encoding="utf-8"))
        record.update(
            status="finished",
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            steps=self.step,
            final_loss=self.final_loss,
            eval=self.last_eval,
        )
        write_json(run_file, record)

    def _mark_failed(self, exc: BaseException) -> None:
        from blip_toolkit.fsutil import write_json

        run_file = self.out / RUN_FILE
        if not self.main or not run_file.is_file():
            return
        with contextlib.suppress(Exception):
            record = json.loads(run_file.read_text(encoding="utf-8"))
            record.update(
                status="failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
                error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                failed_at_step=self.step,
                last_checkpoint_step=self.last_checkpoint_step,
            )
            write_json(run_file, record)

    def _result(self, elapsed: float) -> TrainDiTResult:
        return TrainDiTResult(
            run_dir=str(self.out),
            steps=self.step,
            total_steps=self.total_steps,
            resumed_from_step=self.resumed_from,
            num_parameters=self.num_parameters,
            train_samples=len(self.split.train),
            eval_samples=len(self.eval_set) if self.eval_set is not None else 0,
            eval_kind=self.split.kind,
            final_loss=self.final_loss,
            eval={k: v for k, v in self.last_eval.items() if k != "step"},
            train_samples_per_second=self.train_samples / self.train_time if self.train_time > 0 else None,
            elapsed_seconds=elapsed,
            is_main_process=self.main,
            history=list(self.history),
        )


def _check_resume(previous: dict[str, Any], current: dict[str, Any], data: dict[str, Any], out: Path) -> None:
    """Refuse a --resume whose settings change what was being trained; warn about the free ones."""
    if previous.get("data", {}).get("index_sha256") not in (None, data["index_sha256"]):
        raise UsageError(
            f"--resume: {out} was trained on other embeddings ({previous['data'].get('dir')}; "
            "index.json differs)",
            hint="resume with the same --data, or start a new --out",
        )
    before, now = _flatten(previous.get("config", {})), _flatten(current)
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    locked = [
        k for k in changed if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FREE)
    ]
    if locked:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in locked)
        raise UsageError(
            f"--resume: {out} was started with other settings ({details})",
            hint="resume with the same settings, or start a new --out",
        )
    free = [k for k in changed if k not in ("resume", "overwrite", "out", "data.dir")]
    if free:
        logger.warning(
            "--resume with changed settings: %s",
            ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in free),
        )
    if "train.steps" in free:
        logger.warning("train.steps changed: the cosine schedule continues towards the new total from here")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
