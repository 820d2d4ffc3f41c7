"""`FinetuneConfig`: everything a `blip finetune` run needs. Field names are the config-file keys
and the option names (`--learning-rate` is `learning_rate`); the training-loop settings have the same
names as in `blip train-dit` (engine.trainer.LoopSettings). This module imports no torch (the CLI
reads it for its help text)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from blip_toolkit.config import MixedPrecision
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.errors import UsageError

RUN_KIND = "blip-finetune"
Task = Literal["caption", "vqa", "retrieval"]
TASKS: tuple[str, ...] = typing.get_args(Task)
DEFAULT_TEMPLATE = "Question: {} Answer:"
# Changing these between an interrupted run and its --resume would make the checkpoint meaningless.
RESUME_LOCKED = (
    "task",
    "model",
    "manifest",
    "batch_size",
    "grad_accum",
    "freeze",
    "prompt",
    "template",
    "max_length",
    "seed",
    "ema_decay",
    "augment_shift",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
)
# The old spellings, still accepted in config files and --set.
ALIASES = {"lr": "learning_rate", "out": "output_dir", "steps": "max_steps"}


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs. Field names are the config-file keys; `--flag-name` is the
    field name with dashes. Invalid values raise UsageError (exit 2)."""

    manifest: str = ""
    task: Task | None = None  # required
    model: str = ""
    output_dir: str = ""
    val_manifest: str | None = None
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; when set it decides the length instead of epochs
    batch_size: int = 8  # per process
    eval_batch_size: int | None = None  # default: batch_size
    learning_rate: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to learning_rate * this
    max_length: int = 40  # text tokens (prompt + caption / answer, with special tokens)
    grad_accum: int = 1
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    mixed_precision: MixedPrecision = "no"
    num_workers: int = 0
    seed: int = 0
    freeze: list[str] | None = None  # None: the family's default; ["none"]: train everything
    prompt: str | None = None  # caption: the text the caption continues (same as `blip caption --prompt`)
    template: str = DEFAULT_TEMPLATE  # BLIP-2 VQA: the prompt around the question
    temperature: float = 0.07  # retrieval: ITC softmax temperature (HF's ITM models have no learnable one)
    label_smoothing: float = 0.0  # caption / VQA token loss (BLIP's original recipe uses 0.1)
    # Training images only: shift each by a random whole number of pixels in [-N, N] along each axis
    # (the uncovered border black), drawn per example and epoch from the seed. 0 = off. A translation
    # keeps left and right (a flip would not) and every object in view for small N.
    augment_shift: int = 0
    max_new_tokens: int | None = None  # validation generation; default: max_length
    rerank: int = 16  # retrieval validation: ITM re-ranks this many ITC candidates per image
    save_every: int | None = None  # checkpoint + validate every N steps (default: each epoch)
    keep_checkpoints: int = 2
    log_every: int = 10  # console line every N steps (metrics.jsonl gets every step)
    log_with: list[str] = field(default_factory=list)  # Accelerate trackers: tensorboard, wandb, ...
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights; it is what is validated and exported
    skip_missing: bool = False
    resume: bool = False
    overwrite: bool = False
    cpu: bool = False  # force CPU even when a GPU is present
    max_pixels: int = DEFAULT_MAX_PIXELS
    # LoRA (peft): adapters of rank lora_r on lora_targets (module-name suffixes; None: the family's
    # attention projections, see training/lora.py), scaled by lora_alpha / lora_r; all else frozen.
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    keep_adapter: bool = False  # also write the adapter alone (DIR/adapter/) beside the merged model

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, flag: str, text: str, value: Any) -> None:
            if not ok:
                problems.append(f"{flag} {text} (got {value!r})")

        need(self.epochs >= 1, "--epochs", "must be at least 1", self.epochs)
        need(
            self.max_steps is None or self.max_steps >= 1, "--max-steps", "must be at least 1", self.max_steps
        )
        need(self.batch_size >= 1, "--batch-size", "must be at least 1", self.batch_size)
        need(
            self.eval_batch_size is None or self.eval_batch_size >= 1,
            "eval_batch_size",
            "must be at least 1",
            self.eval_batch_size,
        )
        need(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "--learning-rate",
            "must be positive",
            self.learning_rate,
        )
        need(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "--weight-decay",
            "must be 0 or more",
            self.weight_decay,
        )
        need(self.warmup_steps >= 0, "--warmup-steps", "must be 0 or more", self.warmup_steps)
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1", self.min_lr_ratio)
        need(self.max_length >= 4, "--max-length", "must be at least 4", self.max_length)
        need(self.grad_accum >= 1, "--grad-accum", "must be at least 1", self.grad_accum)
        need(
            math.isfinite(self.grad_clip) and self.grad_clip >= 0,
            "--grad-clip",
            "must be 0 (off) or positive",
            self.grad_clip,
        )
        need(self.num_workers >= 0, "--num-workers", "must be 0 or more", self.num_workers)
        need(
            self.save_every is None or self.save_every >= 1,
            "--save-every",
            "must be at least 1",
            self.save_every,
        )
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1", self.keep_checkpoints)
        need(self.log_every >= 1, "log_every", "must be at least 1", self.log_every)
        need(
            math.isfinite(self.temperature) and self.temperature > 0,
            "temperature",
            "must be positive",
            self.temperature,
        )
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)", self.label_smoothing)
        need(self.augment_shift >= 0, "augment_shift", "must be 0 (off) or more", self.augment_shift)
        need(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "max_new_tokens",
            "must be at least 1",
            self.max_new_tokens,
        )
        need(self.rerank >= 1, "rerank", "must be at least 1", self.rerank)
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)", self.ema_decay)
        self.log_with = [name.strip() for item in self.log_with for name in item.split(",") if name.strip()]
        need(self.max_pixels >= 1, "max_pixels", "must be at least 1", self.max_pixels)
        need(
            self.template.count("{}") == 1,
            "--template",
            "must contain exactly one {} for the question",
            self.template,
        )
        need(self.lora_r >= 1, "--lora-r", "must be at least 1", self.lora_r)
        need(
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
            "--lora-alpha",
            "must be positive",
            self.lora_alpha,
        )
        need(0 <= self.lora_dropout < 1, "--lora-dropout", "must be in [0, 1)", self.lora_dropout)
        if self.lora_targets is not None:
            self.lora_targets = [
                t.strip() for item in self.lora_targets for t in item.split(",") if t.strip()
            ]
            if not self.lora_targets:
                problems.append("--lora-targets is empty")
        if not self.lora:
            changed = [
                f"--{name.replace('_', '-')}"
                for name in ("lora_targets", "keep_adapter")
                if getattr(self, name) not in (None, False)
            ]
            if changed:
                problems.append(f"{' and '.join(changed)} need --lora")
        elif self.freeze is not None:
            problems.append("--freeze does not apply with --lora (everything but the LoRA weights is frozen)")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite cannot be combined")
        if self.prompt is not None and self.task not in (None, "caption"):
            problems.append(f"--prompt is for --task caption (got --task {self.task}; VQA uses --template)")
        if self.prompt is not None and not self.prompt.strip():
            problems.append("--prompt is empty")
        if problems:
            raise UsageError("; ".join(problems))


def check_required(config: FinetuneConfig) -> None:
    """The settings a run cannot start without (--print-config works without them)."""
    missing = [
        text
        for value, text in (
            (config.manifest, "a training MANIFEST is required"),
            (config.task, "--task is required (caption, vqa or retrieval)"),
            (config.model, "--model is required"),
            (config.output_dir, "--output-dir is required"),
        )
        if not value
    ]
    if missing:
        raise UsageError("; ".join(missing))


def resume_free() -> tuple[str, ...]:
    """The settings a --resume may change."""
    return tuple(f.name for f in fields(FinetuneConfig) if f.name not in RESUME_LOCKED)
