"""The config of `blip train-dit`: sections [data], [model] (DiTConfig), [flow] (FlowConfig), [train]
(the training engine's settings, named as in `blip finetune`), [eval], [sample]. No torch import (the
CLI reads it for its help text)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip_toolkit.config import build_config, load_config_file, setting
from blip_toolkit.dit.config import DiTConfig, FlowConfig, SolverName
from blip_toolkit.embeddings.format import VerifyMode
from blip_toolkit.engine.settings import LoopSettings, default_of
from blip_toolkit.errors import ConfigError

RUN_KIND = "blip-train-dit"
# The old spellings, still accepted in config files and --set.
ALIASES = {"out": "output_dir", "train.lr": "train.learning_rate", "train.steps": "train.max_steps"}
# Settings that may change between an interrupted run and its --resume (everything else is locked:
# the data, the split, the model, the objective, the optimizer and the batch define what was trained).
RESUME_FREE = (
    "output_dir",
    "resume",
    "overwrite",
    "data.dir",
    "data.num_workers",
    "data.max_open_shards",
    "data.verify",
    "train.max_steps",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_with",
    "train.mixed_precision",
    "train.cpu",
    "eval.",
    "sample.",
)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    """[data]: where the embeddings are and how they are split and streamed.

    dir: the extract-embeddings output directory (--data). eval_shards: hold out the last N shards;
    eval_fraction: or hold out each image with this probability (seeded by split_seed); neither set:
    5% of the images are held out that way (DEFAULT_EVAL_FRACTION), so evaluation never sees a training
    image; eval_fraction = 0: nothing is held out (every image trains, no evaluation). overfit: train
    on the first N training images only and evaluate on those same images (--overfit: the only way to
    evaluate on training images). shuffle_buffer: indices in the shuffle buffer (integers only: cheap). num_workers:
    DataLoader processes reading batches (0 = in the training process). max_open_shards: shards
    memory-mapped at once. stats_samples: images used to fit the target normaliser (0 = every
    training image). verify: shard checksums checked lazily (on first read), on open, or not at all."""

    dir: str = setting(
        "", help="Embeddings directory (extract-embeddings --out).", flag="--data", flags=("-d",)
    )
    eval_shards: int = 0
    eval_fraction: float | None = None  # None: DEFAULT_EVAL_FRACTION unless eval_shards is set
    split_seed: int = 0
    overfit: int = setting(0, help="Train on the first N images only and evaluate on them (a sanity check).")
    shuffle_buffer: int = 10_000
    num_workers: int = 0
    max_open_shards: int = 4
    stats_samples: int = 0
    verify: VerifyMode = "lazy"

    def __post_init__(self) -> None:
        _need(self.eval_shards >= 0, f"data.eval_shards must be >= 0, got {self.eval_shards}")
        _need(
            self.eval_fraction is None or 0.0 <= self.eval_fraction < 1.0,
            f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}",
        )
        _need(
            not (self.eval_shards and self.eval_fraction is not None),
            "set data.eval_shards or data.eval_fraction, not both",
        )
        _need(self.overfit >= 0, f"data.overfit must be >= 0, got {self.overfit}")
        _need(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        _need(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _need(self.max_open_shards >= 1, f"data.max_open_shards must be >= 1, got {self.max_open_shards}")
        _need(self.stats_samples >= 0, f"data.stats_samples must be >= 0, got {self.stats_samples}")


@dataclass
class TrainConfig(LoopSettings):
    """[train]: the training loop's settings (engine/settings.py, shared with `blip finetune`) and the
    run's length and batch: max_steps optimizer steps of a GLOBAL micro-batch of batch_size (split
    evenly across processes; the optimizer sees batch_size x grad_accum samples per step). Defaults
    suited to a DiT: warmup, an EMA, a checkpoint every 1000 steps."""

    max_steps: int = setting(10_000, help="Optimizer steps.", flags=("--steps",))
    batch_size: int = setting(64, help="GLOBAL batch per micro-step, split across processes.", flags=("-b",))
    warmup_steps: int = default_of(LoopSettings, "warmup_steps", 200)
    ema_decay: float = default_of(LoopSettings, "ema_decay", 0.999)
    log_every: int = default_of(LoopSettings, "log_every", 50)
    save_every: int = default_of(LoopSettings, "save_every", 1000)

    def __post_init__(self) -> None:
        _need(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _need(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _need(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _need(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"train.learning_rate must be positive, got {self.learning_rate}",
        )
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

    On at most max_samples held-out images (the overfit images with --overfit; nothing when nothing is
    held out): val_loss (flow MSE at random t), vel_cos (cosine of the predicted and true velocity),
    patch_cos / patch_cos_raw / global_cos (tokens sampled with `steps` `solver` steps at cfg_scale vs
    the ground-truth tokens, standardised by the ground truth's per-dimension statistics and raw, and
    their pooled projections through the target head),
    est_r@1 (image-to-text recall@1 of the sampled globals among the held-out captions). ema: evaluate
    the EMA weights (what `blip sample` uses by default). seed: the noise (same as `sample --seed`)."""

    every: int = setting(
        500, help="Held-out metrics every N steps and at the end (0 = never).", flag="--eval-every"
    )
    max_samples: int = 256
    batch_size: int = 64
    steps: int = 10
    solver: SolverName = "euler"
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
    otherwise): ODE steps, classifier-free guidance scale, solver (euler | heun), timestep shift.

    cfg_scale 2.0: measured on held-out recall of the demo's DiT (docs/architecture.md, "The DiT"):
    guidance beats none by 3 to 16 points of image-to-text R@1, and 2 was the best value of 1, 1.5, 2,
    3, 4 once the DiT trained longer (3, BLIP3-o's text-to-image value, was best for an undertrained
    one). Tune it per run: `blip sample --cfg-scale 1 1.5 2 3 --steps 10 30`, then `eval-recall
    --update-run`."""

    steps: int = 30
    cfg_scale: float = 2.0
    solver: SolverName = "euler"
    shift: float = 1.0

    def __post_init__(self) -> None:
        _need(self.steps >= 1, f"sample.steps must be >= 1, got {self.steps}")
        _need(self.cfg_scale >= 0, f"sample.cfg_scale must be >= 0, got {self.cfg_scale}")
        _need(self.shift > 0, f"sample.shift must be positive, got {self.shift}")


@dataclass
class TrainDiTConfig:
    """Everything a train-dit run needs. Sections: [data], [model] (DiTConfig), [flow] (FlowConfig),
    [train], [eval], [sample]; `output_dir`, `resume` and `overwrite` at the top level."""

    output_dir: str = setting(
        "", help="Run directory (checkpoints, metrics, final model).", flags=("--out", "-o")
    )
    resume: bool = setting(False, help="Continue the run in --out from its last complete checkpoint.")
    overwrite: bool = setting(False, help="Replace an existing run directory written by blip.")
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
    e.g. {"train.learning_rate": 3e-4}; None values are skipped). Unknown keys are a ConfigError listing them."""
    values = load_config_file(path) if path is not None else {}
    return build_config(
        TrainDiTConfig, values, overrides, source=str(path) if path else "options", aliases=ALIASES
    )
