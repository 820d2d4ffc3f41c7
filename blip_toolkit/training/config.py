"""`FinetuneConfig`: everything a `blip finetune` run needs. Field names are the config-file keys
and the option names (`--learning-rate` is `learning_rate`); the training-loop settings have the same
names as in `blip train-dit` (engine.trainer.LoopSettings). This module imports no torch (the CLI
reads it for its help text)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal

from blip_toolkit.config import setting
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.engine.settings import LoopSettings, default_of
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
class FinetuneConfig(LoopSettings):
    """Everything a fine-tuning run needs. Field names are the config-file keys; `--flag-name` is the
    field name with dashes. Invalid values raise UsageError (exit 2)."""

    manifest: str = setting(
        "", help="Training manifest (TSV, see docs/formats.md).", cli=False
    )  # the argument
    task: Task | None = setting(None, help="caption, vqa or retrieval (required).", flags=("-t",))
    model: str = setting("", help="Checkpoint to start from: hub id or local directory.", flags=("-m",))
    output_dir: str = setting("", help="Where the model, checkpoints and metrics go.", flags=("--out", "-o"))
    val_manifest: str | None = setting(
        None,
        help="Validation manifest (same format): loss and accuracy / recall@1 each epoch; best model in DIR/best.",
    )
    epochs: int = setting(3, help="Passes over the data.")
    max_steps: int | None = setting(
        None, help="Stop after this many optimizer steps (overrides --epochs).", flags=("--steps",)
    )
    batch_size: int = setting(8, help="Examples per process per micro-batch.", flags=("-b",))
    eval_batch_size: int | None = setting(None, help="Validation batch size (default: --batch-size).")
    learning_rate: float = default_of(LoopSettings, "learning_rate", 1e-5)
    weight_decay: float = default_of(LoopSettings, "weight_decay", 0.05)
    max_length: int = setting(40, help="Maximum text tokens (prompt + caption / answer).")
    num_workers: int = setting(0, help="DataLoader worker processes.")
    freeze: list[str] | None = setting(
        None,
        help="Parts kept frozen (repeat or comma-separate): vision, text, qformer, language-model, "
        "projection, or none. Default: the family's usual choice.",
    )
    prompt: str | None = setting(
        None, help="Caption: the text each caption continues; caption later with the same --prompt."
    )
    template: str = setting(DEFAULT_TEMPLATE, help="BLIP-2 VQA prompt; {} is the question.")
    temperature: float = setting(
        0.07, help="Retrieval: ITC softmax temperature (HF's ITM models have no learnable one)."
    )
    label_smoothing: float = setting(0.0, help="Caption / VQA token loss (BLIP's original recipe uses 0.1).")
    # A translation keeps left and right (a flip would not) and every object in view for small N.
    augment_shift: int = setting(
        0,
        help="Shift each training image by a random whole number of pixels in [-N, N] per axis "
        "(border black), drawn per example and epoch from the seed; 0 = off.",
    )
    max_new_tokens: int | None = setting(None, help="Validation generation length (default: --max-length).")
    rerank: int = setting(16, help="Retrieval validation: ITM re-ranks this many ITC candidates per image.")
    save_every: int | None = default_of(LoopSettings, "save_every", None)
    skip_missing: bool = setting(
        False, help="Skip manifest rows whose image is missing or unreadable (counted) instead of stopping."
    )
    resume: bool = setting(False, help="Continue from the last complete checkpoint in --output-dir.")
    overwrite: bool = setting(False, help="Replace an existing output directory written by blip.")
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, help="Refuse images with more pixels (decompression bombs)."
    )
    # LoRA (peft): adapters of rank lora_r on lora_targets (module-name suffixes; None: the family's
    # attention projections, see training/lora.py), scaled by lora_alpha / lora_r; all else frozen.
    lora: bool = setting(
        False,
        help="LoRA (peft): train low-rank adapters on the attention projections, freeze everything else; "
        "the output is the merged model. Needs the lora extra.",
    )
    lora_r: int = setting(8, help="LoRA rank.")
    lora_alpha: float = setting(16.0, help="LoRA scale numerator (scale = alpha / r).")
    lora_dropout: float = setting(0.05, help="Dropout on the LoRA input.")
    lora_targets: list[str] | None = setting(
        None,
        help="Module-name suffixes that get adapters (repeat or comma-separate), e.g. q_proj,v_proj. "
        "Default: the family's attention projections.",
    )
    keep_adapter: bool = setting(
        False,
        help="With --lora: also write the adapter alone to DIR/adapter (usable as --model on top of the base).",
    )

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
        if self.freeze is not None:  # repeated or comma-separated on the command line
            self.freeze = [p.strip() for item in self.freeze for p in item.split(",") if p.strip()]
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
