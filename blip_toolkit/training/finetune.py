"""`blip finetune`: caption, VQA and retrieval fine-tuning of BLIP / BLIP-2 checkpoints from TSV
manifests, on Accelerate (one CPU, one GPU, or many processes under `accelerate launch`).

    from blip_toolkit.training.finetune import FinetuneConfig, run_finetune
    result = run_finetune(FinetuneConfig(manifest="train.tsv", task="caption",
                                         model="Salesforce/blip-image-captioning-base", output_dir="runs/cap"))

One function in phases (inputs, output directory, model, data, optimizer, resume, loop, finish).
The output directory is usable as `--model` by every other command:

    DIR/config.json, model.safetensors, processor files   the final model (save_pretrained)
    DIR/best/                                             the best model by validation loss
    DIR/blip_run.json                                     resolved config, status, summary
    DIR/metrics.jsonl                                     one JSON record per step / evaluation
    DIR/checkpoints/step-N/                               training state (safetensors + JSON) + COMPLETE

Only the main process writes files and logs. Module level imports stay light (the CLI imports
FinetuneConfig for its help text); torch, transformers and accelerate load in `run_finetune`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS
from blip_toolkit.errors import InputError, OutputExistsError, TrainingError, UsageError
from blip_toolkit.training.common import RunSummary

logger = logging.getLogger("blip")

RUN_FILE = "blip_run.json"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
CHECKPOINT_DIR = "checkpoints"
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
)


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs. Field names are the config-file keys; `--flag-name` is the
    field name with dashes. Invalid values raise UsageError (exit 2)."""

    manifest: str = ""
    task: Literal["caption", "vqa", "retrieval"] = "caption"
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
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = 0
    seed: int = 0
    freeze: list[str] | None = None  # None: the family's default; ["none"]: train everything
    prompt: str | None = None  # caption: the text the caption continues (same as `blip caption --prompt`)
    template: str = DEFAULT_TEMPLATE  # BLIP-2 VQA: the prompt around the question
    temperature: float = 0.07  # retrieval: ITC softmax temperature (HF's ITM models have no learnable one)
    label_smoothing: float = 0.0  # caption / VQA token loss (BLIP's original recipe uses 0.1)
    max_new_tokens: int | None = None  # validation generation; default: max_length
    rerank: int = 16  # retrieval validation: ITM re-ranks this many ITC candidates per image
    save_every: int | None = None  # checkpoint + validate every N steps (default: each epoch)
    keep_checkpoints: int = 2
    log_every: int = 10  # console line every N steps (metrics.jsonl gets every step)
    skip_missing: bool = False
    resume: bool = False
    overwrite: bool = False
    cpu: bool = False  # force CPU even when a GPU is present
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, flag: str, text: str, value: Any) -> None:
            if not ok:
                problems.append(f"{flag} {text} (got {value!r})")

        if not self.manifest:
            problems.append("a training MANIFEST is required")
        if not self.model:
            problems.append("--model is required")
        if not self.output_dir:
            problems.append("--output-dir is required")
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
        need(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "max_new_tokens",
            "must be at least 1",
            self.max_new_tokens,
        )
        need(self.rerank >= 1, "rerank", "must be at least 1", self.rerank)
        need(self.max_pixels >= 1, "max_pixels", "must be at least 1", self.max_pixels)
        need(
            self.template.count("{}") == 1,
            "--template",
            "must contain exactly one {} for the question",
            self.template,
        )
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite cannot be combined")
        if self.prompt is not None and self.task != "caption":
            problems.append(f"--prompt is for --task caption (got --task {self.task}; VQA uses --template)")
        if self.prompt is not None and not self.prompt.strip():
            problems.append("--prompt is empty")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class FinetuneResult(RunSummary):
    """What a run did. `history` holds every metrics.jsonl record (train steps and evaluations)."""

    output_dir: str
    task: str
    family: str
    model: str
    steps: int
    total_steps: int
    epochs: int
    train_examples: int
    val_examples: int
    skipped_missing: int
    trainable_parameters: int
    frozen_parameters: int
    frozen_parts: list[str]
    resumed_from_step: int | None
    final_train_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    val_metrics: dict[str, Any]
    train_samples_per_second: float | None
    elapsed_seconds: float
    is_main_process: bool = True
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- entry point


def run_finetune(
    config: FinetuneConfig, *, callback: Callable[[dict[str, Any]], None] | None = None
) -> FinetuneResult:
    """Fine-tune `config.model` on `config.manifest` and write the output directory.

    `callback(record)` is called on the main process with every metrics record: `{"type": "train",
    "step", "epoch", "loss", "lr", "grad_norm", "samples_per_second"}`, `{"type": "eval", "step",
    "val_loss", "val_accuracy" | "val_recall@1"}`, `{"type": "checkpoint", "step", "path"}`. An
    exception raised by the callback stops the run (the last complete checkpoint stays usable).

    Deterministic for a seed on CPU: the same config gives the same weights, and an interrupted run
    continued with `resume=True` ends with the weights an uninterrupted run ends with."""
    from blip_toolkit.training.common import deterministic_on_cpu, quiet_unless_main, release_accelerator

    inputs = _check_inputs(config)
    accelerator = _make_accelerator(config, inputs.family)
    try:
        with quiet_unless_main(accelerator), deterministic_on_cpu(accelerator):
            return _Trainer(config, inputs, accelerator, callback).run()
    finally:
        release_accelerator(accelerator)


# ----------------------------------------------------------------------------- phase 1: inputs


@dataclass
class _Inputs:
    config: FinetuneConfig
    train: Any  # data.manifests.Manifest
    val: Any | None
    resolved: Any
    family: Any
    processor: Any
    frozen: list[str]
    output_dir: Path


def _check_inputs(config: FinetuneConfig) -> _Inputs:
    """Everything that can be checked before a model is loaded or a file is written: the manifests
    (file:line problems), the checkpoint family and task, --freeze, --mixed-precision, the output
    directory policy."""
    from blip_toolkit.data.manifests import read_manifest
    from blip_toolkit.runtime.loading import inspect_source, load_processor
    from blip_toolkit.training.tasks import check_trainable, resolve_frozen

    train = read_manifest(config.manifest, config.task, skip_missing=config.skip_missing, verify_images=True)
    val = None
    if config.val_manifest:
        val = _read_val_manifest(config)
    for manifest in (train, val):
        if manifest is not None and manifest.skipped_missing:
            logger.warning(
                "%s: skipped %d example(s) whose image is missing or unreadable (first: %s)",
                manifest.path,
                len(manifest.skipped_missing),
                manifest.skipped_missing[0],
            )
    if config.mixed_precision == "fp16" and _cpu_only(config):
        raise UsageError(
            "--mixed-precision fp16 needs a GPU; on CPU use bf16 (slow where it is emulated) or no"
        )
    resolved, family = inspect_source(config.model)
    check_trainable(family, config.task, config.model)
    frozen = resolve_frozen(family, config.freeze)
    processor = load_processor(resolved)
    _check_reserved_tokens(config, family, processor, [m for m in (train, val) if m is not None])
    output_dir = Path(config.output_dir)
    _check_output_dir(output_dir, overwrite=config.overwrite, resume=config.resume)
    return _Inputs(config, train, val, resolved, family, processor, frozen, output_dir)


def _check_reserved_tokens(config: FinetuneConfig, family, processor, manifests) -> None:
    """Reserved tokens (BLIP-2's <image>, [SEP], </s>, ...) in user text would break the image
    placeholders or the labels: report them as file:line before anything is loaded or written."""
    from blip_toolkit.data.manifests import MAX_REPORTED
    from blip_toolkit.runtime.batching import check_text
    from blip_toolkit.runtime.generation import forbidden_tokens
    from blip_toolkit.runtime.loading import LoadedModel

    forbidden = forbidden_tokens(LoadedModel(config.model, family, None, processor, None, None))
    if config.prompt:
        check_text(config.prompt, forbidden, what="--prompt")
    check_text(config.template, forbidden, what="--template")
    for manifest in manifests:
        problems = []
        for row in manifest.records():
            for key, value in row.items():
                if key in ("image", "line") or not isinstance(value, str):
                    continue
                bad = [t for t in forbidden if t and t in value]
                if bad:
                    problems.append(
                        f"{manifest.path}:{row['line']}: {key} contains reserved token {bad[0]!r}"
                    )
        if problems:
            more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
            raise InputError(
                f"{manifest.path}: {len(problems)} problem(s) in the {manifest.task} manifest:\n  "
                + "\n  ".join(problems[:MAX_REPORTED])
                + more
            )


def _read_val_manifest(config: FinetuneConfig):
    from blip_toolkit.data.manifests import SCHEMAS, ManifestError, read_manifest

    try:
        return read_manifest(
            config.val_manifest, config.task, skip_missing=config.skip_missing, verify_images=True
        )
    except ManifestError as exc:
        # A manifest of another task is the likely mistake: say so.
        width = _column_count(Path(config.val_manifest))
        expected = len(SCHEMAS[config.task][0])
        others = [
            t for t in ("caption", "vqa", "retrieval") if len(SCHEMAS[t][0]) == width and t != config.task
        ]
        if width and width != expected and others:
            raise ManifestError(
                f"--val-manifest {config.val_manifest} has {width} columns: it looks like a {' / '.join(others)} "
                f"manifest, but --task {config.task} needs {expected} ({'<TAB>'.join(SCHEMAS[config.task][0])})"
            ) from exc
        raise


def _column_count(path: Path) -> int | None:
    """The column count shared by every data line, or None."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        widths = {
            len(line.split("\t"))
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        }
        if len(widths) == 1:
            return widths.pop()
    return None


def _cpu_only(config: FinetuneConfig) -> bool:
    import torch

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return config.cpu or forced or not torch.cuda.is_available()


def _check_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """The refusals of fsutil.prepare_output_dir, checked without touching anything (on every
    process, so all of them stop together)."""
    from blip_toolkit.fsutil import OWNED_MARKERS

    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    has_content = path.is_dir() and any(path.iterdir())
    if not has_content:
        return
    owned = any((path / marker).exists() for marker in OWNED_MARKERS)
    if resume:
        if not (path / RUN_FILE).is_file():
            raise OutputExistsError(
                f"{path} is not a blip finetune output directory (no {RUN_FILE}); cannot resume",
                hint="choose another --output-dir",
            )
        return
    if not overwrite:
        raise OutputExistsError(
            f"{path} already exists and is not empty",
            hint="pass --resume to continue or --overwrite to replace it",
        )
    if not owned:
        raise OutputExistsError(
            f"{path} is not empty and was not written by blip; refusing to clear it",
            hint="choose another --output-dir",
        )


# ----------------------------------------------------------------------------- accelerator


def _make_accelerator(config: FinetuneConfig, family):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from blip_toolkit.log import verbosity

    if verbosity() <= 0:
        logging.getLogger("accelerate").setLevel(logging.ERROR)
    return Accelerator(
        mixed_precision=config.mixed_precision,
        # Our own flag, passed here (accelerate launch's --gradient_accumulation_steps is DeepSpeed-only).
        gradient_accumulation_steps=config.grad_accum,
        cpu=config.cpu,
        # We step the scheduler once per optimizer step ourselves: the wrapped scheduler would step
        # num_processes times per step (it assumes schedules counted in single-process batches).
        step_scheduler_with_optimizer=False,
        # BLIP-2's generative models never use the Q-Former's text-only layers; DDP must not wait
        # for their gradients. Elsewhere every trainable parameter is used (and the search costs).
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                find_unused_parameters=family.is_blip2 and family.name != "blip2-itm"
            )
        ],
        project_config=ProjectConfiguration(
            project_dir=str(config.output_dir), automatic_checkpoint_naming=False
        ),
    )


# ----------------------------------------------------------------------------- the trainer


class _Trainer:
    def __init__(self, config: FinetuneConfig, inputs: _Inputs, accelerator, callback):
        self.config = config
        self.inputs = inputs
        self.accelerator = accelerator
        self.callback = callback
        self.family = inputs.family
        self.out = inputs.output_dir
        self.main = accelerator.is_main_process
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.last_eval: dict[str, Any] = {}
        self.last_eval_step: int | None = None
        self.last_checkpoint_step: int | None = None
        self.resumed_from: int | None = None
        self.final_train_loss: float | None = None
        self.train_time = 0.0
        self.train_samples = 0

    # -- phases

    def run(self) -> FinetuneResult:
        from blip_toolkit.training.common import CheckpointManager, MetricsWriter, seed_everything

        start = time.perf_counter()
        config, acc = self.config, self.accelerator
        seed_everything(config.seed)
        # DeepSpeed / FSDP are refused before anything is written, not at the first checkpoint.
        CheckpointManager.check_supported(acc)
        self._prepare_output()
        self.metrics = MetricsWriter(self.out / METRICS_FILE, enabled=self.main)
        self.checkpoints = CheckpointManager(self.out / CHECKPOINT_DIR, keep=config.keep_checkpoints)
        self._load_model()
        self._build_data()
        self._build_optimizer()
        self._maybe_resume()
        self._log_start()
        self._loop()
        self._finish()
        acc.wait_for_everyone()
        return self._result(time.perf_counter() - start)

    def _prepare_output(self) -> None:
        from blip_toolkit.fsutil import prepare_output_dir, sha256_file, write_json
        from blip_toolkit.training.common import MetricsWriter

        config = self.config
        run_file = self.out / RUN_FILE
        previous = None
        if config.resume and run_file.is_file():
            previous = json.loads(run_file.read_text(encoding="utf-8"))
            _check_resume_config(previous.get("config", {}), self.resolved_config(), self.out)
        self.manifest_sha256 = sha256_file(config.manifest)
        if self.main:
            prepare_output_dir(self.out, overwrite=config.overwrite, resume=config.resume)
            record = {
                "kind": "blip-finetune",
                "status": "running",
                "config": self.resolved_config(),
                "family": self.family.name,
                "frozen_parts": self.inputs.frozen,
                "train_manifest_sha256": self.manifest_sha256,
                "train_examples": len(self.inputs.train),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if previous:
                record["started"] = previous.get("started", record["started"])
            write_json(run_file, record)  # written first: it marks the directory as ours (--overwrite)
            if not config.resume:
                MetricsWriter(self.out / METRICS_FILE).path.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def resolved_config(self) -> dict[str, Any]:
        data = asdict(self.config)
        for key in ("manifest", "val_manifest", "output_dir"):
            if data[key]:
                data[key] = str(Path(data[key]).resolve())
        if Path(data["model"]).expanduser().is_dir():
            data["model"] = str(Path(data["model"]).expanduser().resolve())
        data["freeze"] = self.inputs.frozen
        return data

    def _load_model(self) -> None:
        import torch

        from blip_toolkit.runtime.loading import load_model
        from blip_toolkit.training.tasks import build_module

        config, inputs = self.config, self.inputs
        self.processor = inputs.processor

        loaded = load_model(
            config.model,
            None,
            device=torch.device("cpu"),
            dtype=torch.float32,
            resolved=inputs.resolved,
            family=self.family,
        )
        self.module = build_module(
            config.task,
            loaded.model,
            self.family,
            frozen_parts=inputs.frozen,
            label_smoothing=config.label_smoothing,
            temperature=config.temperature,
        )
        self.module.train()
        params = list(self.module.parameters())
        self.trainable = sum(p.numel() for p in params if p.requires_grad)
        self.frozen_count = sum(p.numel() for p in params if not p.requires_grad)
        if self.trainable == 0:
            raise UsageError("--freeze leaves nothing to train")

    def _build_data(self) -> None:
        import torch
        from torch.utils.data import DataLoader

        from blip_toolkit.training.tasks import Collator, EpochSampler, ManifestDataset, make_examples

        config, inputs, acc = self.config, self.inputs, self.accelerator
        collator = Collator(config.task, self.family, self.processor, max_length=config.max_length)

        def examples(manifest):
            return make_examples(
                manifest.records(), config.task, self.family, prompt=config.prompt, template=config.template
            )

        self.train_examples = examples(inputs.train)
        self.train_set = ManifestDataset(
            self.train_examples, str(inputs.train.path), max_pixels=config.max_pixels
        )
        self.sampler = EpochSampler(len(self.train_set), config.seed)
        # The loader's own generator (worker seeds), so creating an iterator never draws from the
        # global RNG: a resumed run's dropout / negative sampling continue where the interrupted one was.
        self.loader_generator = torch.Generator()
        self.loader_generator.manual_seed(config.seed)
        train_loader = DataLoader(
            self.train_set,
            batch_size=config.batch_size,
            sampler=self.sampler,
            collate_fn=collator,
            num_workers=config.num_workers,
            generator=self.loader_generator,
            pin_memory=False,
        )
        self.train_loader = acc.prepare(train_loader)
        self.val_examples = examples(inputs.val) if inputs.val is not None else []
        self.val_loader = None
        if self.val_examples:
            self.val_set = ManifestDataset(
                self.val_examples, str(inputs.val.path), max_pixels=config.max_pixels
            )
            val_loader = DataLoader(
                self.val_set,
                batch_size=config.eval_batch_size or config.batch_size,
                shuffle=False,
                collate_fn=collator,
                num_workers=config.num_workers,
            )
            self.val_loader = acc.prepare(val_loader)
        self.batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        if config.max_steps:
            self.total_steps = config.max_steps
            self.num_epochs = math.ceil(config.max_steps / self.steps_per_epoch)
        else:
            self.total_steps = config.epochs * self.steps_per_epoch
            self.num_epochs = config.epochs

    def _build_optimizer(self) -> None:
        from blip_toolkit.training.common import build_optimizer, warmup_cosine_schedule

        config, acc = self.config, self.accelerator
        optimizer = build_optimizer(
            self.module, learning_rate=config.learning_rate, weight_decay=config.weight_decay
        )
        scheduler = warmup_cosine_schedule(
            optimizer,
            warmup_steps=config.warmup_steps,
            total_steps=self.total_steps,
            min_ratio=config.min_lr_ratio,
        )
        self.module, self.optimizer, self.scheduler = acc.prepare(self.module, optimizer, scheduler)
        self.trainable_params = [p for p in self.module.parameters() if p.requires_grad]

    def _maybe_resume(self) -> None:
        acc = self.accelerator
        if not self.config.resume:
            return
        if self.main:
            for path in self.checkpoints.clean_incomplete():
                logger.info("removed an incomplete checkpoint left by an interrupted save: %s", path)
        acc.wait_for_everyone()
        latest = self.checkpoints.latest()
        if latest is None:
            logger.info("%s: no complete checkpoint; starting from step 0", self.out)
            self.history = self.metrics.truncate_after(0) if self.main else []
            return
        state = self.checkpoints.load(
            acc, latest, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler
        )
        if state.get("train_manifest_sha256") not in (None, self.manifest_sha256):
            raise TrainingError(
                f"{self.config.manifest} changed since {latest} was written; the saved data "
                "position would not match",
                hint="restore the manifest or start a new run",
            )
        if state.get("train_examples") != len(self.train_set):
            raise TrainingError(
                f"{latest} was written for {state.get('train_examples')} training examples; the "
                f"manifest now gives {len(self.train_set)}"
            )
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.best_val_loss = state.get("best_val_loss")
        self.best_step = state.get("best_step")
        self.last_eval = state.get("last_eval") or {}
        self.last_eval_step = state.get("last_eval_step")
        self.last_checkpoint_step = self.step
        self.resumed_from = self.step
        self.history = self.metrics.truncate_after(self.step) if self.main else []
        logger.info(
            "resumed from %s (step %d, epoch %d, batch %d of %d)",
            latest,
            self.step,
            self.epoch + 1,
            self.batch_in_epoch,
            self.batches_per_epoch,
        )

    def _log_start(self) -> None:
        config, inputs, acc = self.config, self.inputs, self.accelerator
        skipped = len(inputs.train.skipped_missing)
        logger.info(
            "fine-tuning %s (%s) for %s: %d training example(s)%s%s; %s trainable / %s frozen parameters%s",
            config.model,
            self.family.label,
            config.task,
            len(self.train_set),
            f" ({skipped} skipped)" if skipped else "",
            f", {len(self.val_examples)} validation" if self.val_examples else "",
            _count(self.trainable),
            _count(self.frozen_count),
            f" (frozen: {', '.join(inputs.frozen)})" if inputs.frozen else "",
        )
        logger.info(
            "%d step(s) of %d example(s) (%d per process x %d process(es) x %d accumulation) on %s, "
            "%d epoch(s), mixed precision %s",
            self.total_steps,
            config.batch_size * acc.num_processes * config.grad_accum,
            config.batch_size,
            acc.num_processes,
            config.grad_accum,
            acc.device,
            self.num_epochs,
            config.mixed_precision,
        )

    # -- the loop

    def _loop(self) -> None:
        import torch

        from blip_toolkit.training.common import check_finite

        config, acc = self.config, self.accelerator
        module, optimizer, scheduler = self.module, self.optimizer, self.scheduler
        window_start = time.perf_counter()
        window_samples = 0
        sums: list[Any] = []
        counts: list[float] = []
        while self.step < self.total_steps and self.epoch < self.num_epochs:
            self.sampler.set_epoch(self.epoch)
            self.train_loader.set_epoch(self.epoch)
            self.loader_generator.manual_seed(config.seed * 1_000_003 + self.epoch)
            loader = self.train_loader
            if self.batch_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, self.batch_in_epoch)
            finished_epoch = True
            for batch in loader:
                # One collective per micro-batch: unreadable images anywhere (all processes stop
                # together) and the token (row) count of the global micro-batch. The loss is
                # normalised by that count, so N processes optimise exactly what one process with
                # the global batch optimises.
                global_count = self._global_count(batch)
                with acc.accumulate(module):
                    out = module(batch)
                    local_sum = out["example_loss"].sum()
                    loss = local_sum * acc.num_processes / global_count.clamp(min=1)
                    acc.backward(loss)
                    grad_norm = None
                    if acc.sync_gradients and config.grad_clip > 0:
                        grad_norm = acc.clip_grad_norm_(self.trainable_params, config.grad_clip)
                    optimizer.step()
                    if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                self.batch_in_epoch += 1
                sums.append(local_sum.detach())
                counts.append(float(global_count))
                window_samples += batch["index"].shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                self.step += 1
                totals = acc.reduce(torch.stack(sums).float(), "sum").cpu()
                step_loss = float(sum(float(s) / max(c, 1.0) for s, c in zip(totals, counts)) / len(counts))
                sums, counts = [], []
                check_finite(step_loss, step=self.step)
                elapsed = time.perf_counter() - window_start
                self.train_time += elapsed
                self.train_samples += window_samples
                record = {
                    "type": "train",
                    "step": self.step,
                    "epoch": self.epoch + 1,
                    "loss": step_loss,
                    "lr": float(scheduler.get_last_lr()[0]),
                    "samples_per_second": window_samples / elapsed if elapsed > 0 else None,
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                self.final_train_loss = step_loss
                self._record(
                    record,
                    console=self.step == 1
                    or self.step % config.log_every == 0
                    or self.step == self.total_steps,
                )
                if config.save_every and self.step % config.save_every == 0:
                    self._evaluate()
                    self._checkpoint()
                window_start, window_samples = time.perf_counter(), 0
                if self.step >= self.total_steps:
                    finished_epoch = self.batch_in_epoch >= self.batches_per_epoch
                    break
            if finished_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self._evaluate()
                if not config.save_every:
                    self._checkpoint()
            window_start, window_samples = time.perf_counter(), 0
        self._evaluate()
        self._checkpoint()

    def _global_count(self, batch):
        """Sum over processes of the loss terms in this micro-batch (label tokens, or rows for
        retrieval); raises on every process when any process met an unreadable image."""
        import torch

        acc = self.accelerator
        errors = batch.get("errors") or []
        if errors:
            count = 0.0
        elif self.config.task == "retrieval":
            count = float(batch["input_ids"].shape[0])
        else:
            labels = batch["labels"]
            shifted = self.family.name in ("blip-caption", "blip-vqa") or self.family.decoder_only
            count = float(((labels[:, 1:] if shifted else labels) != -100).sum())
        totals = acc.reduce(torch.tensor([float(len(errors)), count], device=acc.device), "sum")
        if float(totals[0]) > 0:
            if errors:
                more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
                raise InputError(errors[0] + more)
            raise InputError("another process met an unreadable image (its message is above)")
        return totals[1]

    def _record(self, record: dict[str, Any], *, console: bool = True) -> None:
        from blip_toolkit.training.common import emit, metric_line

        record = {**record, "time": round(time.time(), 3)}
        self.history.append(record)
        if self.main:
            self.metrics.write(record)
            if console:
                logger.info(metric_line(record, total_steps=self.total_steps))
            emit(self.callback, record)

    # -- evaluation

    def _evaluate(self) -> None:
        """Validation loss (every process, gathered) and task accuracy (main process)."""
        import torch

        if self.val_loader is None or self.last_eval_step == self.step:
            return
        acc, config = self.accelerator, self.config
        module = self.module
        module.eval()
        sums, counts = [], []
        devices = [acc.device] if acc.device.type == "cuda" else []
        # Evaluation must not move the global RNG (retrieval samples negatives): a resumed run would
        # otherwise diverge from an uninterrupted one. A fixed seed also makes the val loss repeatable.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(config.seed)
            for batch in self.val_loader:
                self._global_count(batch)
                out = module(batch)
                loss, count = acc.gather_for_metrics(
                    (out["example_loss"].float(), out["example_count"].float())
                )
                sums.append(loss.sum().cpu())
                counts.append(count.sum().cpu())
        val_loss = float(sum(sums) / max(float(sum(counts)), 1.0))
        record = {
            "type": "eval",
            "step": self.step,
            "epoch": self.epoch if self.batch_in_epoch == 0 else self.epoch + 1,
            "val_loss": val_loss,
        }
        if self.main:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), acc.autocast():
                record.update(self._task_metric())
        module.train()
        self.last_eval_step = self.step
        self.last_eval = {k: v for k, v in record.items() if k not in ("type",)}
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step = val_loss, self.step
        record["best_val_loss"] = self.best_val_loss
        self._record(record)
        if improved:
            self._save_model(self.out / BEST_DIR, extra={"step": self.step, "metrics": self.last_eval})
        acc.wait_for_everyone()

    def _task_metric(self) -> dict[str, float]:
        from blip_toolkit.data.images import open_image
        from blip_toolkit.training.tasks import exact_match, recall_at_1

        config = self.config
        model = self.accelerator.unwrap_model(self.module).model
        cache: dict[str, Any] = {}

        def image(example):
            if example.image not in cache:
                cache[example.image] = open_image(example.image, max_pixels=config.max_pixels)
            return cache[example.image]

        batch_size = config.eval_batch_size or config.batch_size
        device = self.accelerator.device
        if config.task == "retrieval":
            return {
                "val_recall@1": recall_at_1(
                    model,
                    self.processor,
                    self.family,
                    self.val_examples,
                    image,
                    batch_size=batch_size,
                    device=device,
                    rerank=config.rerank,
                )
            }
        return {
            "val_accuracy": exact_match(
                model,
                self.processor,
                self.family,
                config.task,
                self.val_examples,
                image,
                max_new_tokens=config.max_new_tokens or config.max_length,
                batch_size=batch_size,
                device=device,
            )
        }

    # -- saving

    def _checkpoint(self) -> None:
        if self.last_checkpoint_step == self.step:
            return
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= self.batches_per_epoch:  # saved at the very end of an epoch: resume at the next one
            epoch, batch = epoch + 1, 0
        state = {
            "epoch": epoch,
            "batch_in_epoch": batch,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "last_eval": self.last_eval,
            "last_eval_step": self.last_eval_step,
            "train_examples": len(self.train_set),
            "train_manifest_sha256": self.manifest_sha256,
            "total_steps": self.total_steps,
        }
        path = self.checkpoints.save(
            self.accelerator,
            self.step,
            state,
            model=self.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        self.last_checkpoint_step = self.step
        self._record({"type": "checkpoint", "step": self.step, "path": str(path)}, console=False)

    def _save_model(self, target: Path, *, extra: dict[str, Any] | None = None) -> None:
        """save_pretrained (safetensors) + the processor into `target`, atomically (main process)."""
        from blip_toolkit.fsutil import replace_dir, write_json

        if not self.main:
            return
        model = self.accelerator.unwrap_model(self.module).model
        tmp = target.with_name(f".{target.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        self.processor.save_pretrained(tmp)
        if extra is not None:
            write_json(tmp / "blip_best.json", extra)
        replace_dir(tmp, target)

    def _finish(self) -> None:
        """The final model at the top level of the output directory; blip_run.json gets the summary."""
        from blip_toolkit.fsutil import write_json

        self.accelerator.wait_for_everyone()
        if not self.main:
            return
        tmp = self.out / ".final.tmp"
        self._save_model(tmp)
        # Move file by file; config.json goes last, so a directory killed half-way is not loadable
        # as a model (resolve_source needs config.json).
        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "config.json")
        for name in names:
            destination = self.out / name
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(tmp / name, destination)
        shutil.rmtree(tmp, ignore_errors=True)
        run_file = self.out / RUN_FILE
        record = json.loads(run_file.read_text(encoding="utf-8"))
        record.update(
            status="finished",
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            steps=self.step,
            best_step=self.best_step,
            best_val_loss=self.best_val_loss,
            val_metrics=self.last_eval,
            final_train_loss=self.final_train_loss,
        )
        write_json(run_file, record)

    def _result(self, elapsed: float) -> FinetuneResult:
        config = self.config
        return FinetuneResult(
            output_dir=str(self.out),
            task=config.task,
            family=self.family.name,
            model=config.model,
            steps=self.step,
            total_steps=self.total_steps,
            epochs=self.epoch,
            train_examples=len(self.train_set),
            val_examples=len(self.val_examples),
            skipped_missing=len(self.inputs.train.skipped_missing),
            trainable_parameters=self.trainable,
            frozen_parameters=self.frozen_count,
            frozen_parts=list(self.inputs.frozen),
            resumed_from_step=self.resumed_from,
            final_train_loss=self.final_train_loss,
            best_val_loss=self.best_val_loss,
            best_step=self.best_step,
            val_metrics={k: v for k, v in self.last_eval.items() if k.startswith("val_")},
            train_samples_per_second=(self.train_samples / self.train_time) if self.train_time > 0 else None,
            elapsed_seconds=elapsed,
            is_main_process=self.main,
            history=list(self.history),
        )


def _check_resume_config(previous: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    changed = [k for k in RESUME_LOCKED if k in previous and previous.get(k) != current.get(k)]
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise UsageError(
            f"--resume: {out} was started with other settings ({details})",
            hint="resume with the same settings, or start a new --output-dir",
        )
    other = [
        k
        for k in current
        if k in previous
        and previous[k] != current[k]
        and k not in ("resume", "overwrite")
        and k not in RESUME_LOCKED
    ]
    if other:
        logger.warning("--resume with changed settings: %s", ", ".join(other))


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
