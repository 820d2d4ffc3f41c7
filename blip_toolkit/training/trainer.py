"""The fine-tuning task on the training engine (engine/trainer.py): model and data, the loss
normalised over the global micro-batch, validation (loss and the task metric), checkpoint state and
export, the run's record and result. `training/finetune.py` runs it."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from blip_toolkit.data.images import open_image
from blip_toolkit.data.manifests import Manifest
from blip_toolkit.engine.metrics import count_label
from blip_toolkit.engine.run import RunSummary
from blip_toolkit.engine.seeding import mix_seed
from blip_toolkit.engine.settings import RunPlace
from blip_toolkit.engine.trainer import Trainer
from blip_toolkit.errors import InputError, TrainingError, UsageError
from blip_toolkit.fsutil import sha256_file
from blip_toolkit.models.loading import load_model
from blip_toolkit.training.config import RUN_KIND, FinetuneConfig, resume_free
from blip_toolkit.training.data import Collator, EpochSampler, ManifestDataset, make_examples
from blip_toolkit.training.inputs import FinetuneInputs
from blip_toolkit.training.lora import apply_lora, base_reference, export_lora, store_frozen_language_model
from blip_toolkit.training.modules import build_module
from blip_toolkit.training.validation import exact_match, recall_at_1

logger = logging.getLogger("blip")


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


class FinetuneTrainer(Trainer):
    kind = RUN_KIND
    resume_free = resume_free()
    best_metric = "val_loss"
    eval_at_epoch_end = True
    checkpoint_at_epoch_end = True

    def __init__(
        self, config: FinetuneConfig, inputs: FinetuneInputs, place: RunPlace, accelerator, callback
    ):
        super().__init__(config, place, accelerator, callback)  # the config is the loop's settings
        self.config = config
        self.inputs = inputs
        self.family = inputs.family
        self.processor = inputs.processor
        self.manifest_sha256 = sha256_file(config.manifest)

    # -- what the run is

    def config_record(self) -> dict[str, Any]:
        data = asdict(self.config)
        for key in ("manifest", "val_manifest", "output_dir"):
            if data[key]:
                data[key] = str(Path(data[key]).resolve())
        if Path(data["model"]).expanduser().is_dir():
            data["model"] = str(Path(data["model"]).expanduser().resolve())
        data["freeze"] = self.inputs.frozen
        data["lora_targets"] = self.inputs.lora_targets
        return data

    def run_fields(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "frozen_parts": self.inputs.frozen,
            "lora": self._lora_record(),
            "train_manifest_sha256": self.manifest_sha256,
            "train_examples": len(self.inputs.train),
        }

    # -- model and data

    def build(self, checkpoint: Path | None) -> nn.Module:
        config, inputs = self.config, self.inputs
        loaded = load_model(
            config.model,
            None,
            device=torch.device("cpu"),
            dtype=torch.float32,
            resolved=inputs.resolved,
            family=self.family,
        )
        model = loaded.model
        if config.lora:
            store_frozen_language_model(model, self.family, config.mixed_precision)
            model = apply_lora(
                model,
                self.family,
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                targets=inputs.lora_targets,
            )
        module = build_module(
            config.task,
            model,
            self.family,
            frozen_parts=inputs.frozen,
            label_smoothing=config.label_smoothing,
            temperature=config.temperature,
        )
        module.train()
        params = list(module.parameters())
        self.trainable = sum(p.numel() for p in params if p.requires_grad)
        self.frozen_count = sum(p.numel() for p in params if not p.requires_grad)
        if self.trainable == 0:
            raise UsageError("--freeze leaves nothing to train")
        self._build_data()
        return module

    def _examples(self, manifest: Manifest):
        return make_examples(
            manifest.records(),
            self.config.task,
            self.family,
            prompt=self.config.prompt,
            template=self.config.template,
        )

    def _build_data(self) -> None:
        config, acc = self.config, self.accelerator
        collator = Collator(config.task, self.family, self.processor, max_length=config.max_length)
        self.train_set = ManifestDataset(
            self._examples(self.inputs.train),
            str(self.inputs.train.path),
            max_pixels=config.max_pixels,
            augment_shift=config.augment_shift,
            seed=config.seed,
        )
        self.sampler = EpochSampler(len(self.train_set), config.seed)
        # The loader's own generator (worker seeds), so creating an iterator never draws from the
        # global RNG: a resumed run's dropout / negative sampling continue where the interrupted one was.
        self.loader_generator = torch.Generator()
        loader = DataLoader(
            self.train_set,
            batch_size=config.batch_size,
            sampler=self.sampler,
            collate_fn=collator,
            num_workers=config.num_workers,
            generator=self.loader_generator,
        )
        self.train_loader = acc.prepare(loader)
        self.val_examples = self._examples(self.inputs.val) if self.inputs.val is not None else []
        self.val_loader = None
        if self.val_examples:
            val_set = ManifestDataset(
                self.val_examples, str(self.inputs.val.path), max_pixels=config.max_pixels
            )
            self.val_loader = acc.prepare(
                DataLoader(
                    val_set,
                    batch_size=config.eval_batch_size or config.batch_size,
                    shuffle=False,
                    collate_fn=collator,
                    num_workers=config.num_workers,
                )
            )
        self.batches_per_epoch = len(self.train_loader)

    def resolve_total_steps(self) -> int:
        config = self.config
        steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.num_epochs = math.ceil(config.max_steps / steps_per_epoch) if config.max_steps else config.epochs
        return config.max_steps or config.epochs * steps_per_epoch

    def micro_batches(self, start: int) -> Iterator[tuple[Any, bool]]:
        """The epochs' batches from micro-batch `start`: each epoch's order depends only on (seed,
        epoch), so a resumed run skips into it (`skip_first_batches`) and sees what it would have."""
        first_epoch, skip = divmod(start, self.batches_per_epoch)
        for epoch in range(first_epoch, self.num_epochs):
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            self.train_loader.set_epoch(epoch)
            self.loader_generator.manual_seed(mix_seed(self.config.seed, epoch))
            loader = self.train_loader
            if skip:
                loader = self.accelerator.skip_first_batches(self.train_loader, skip)
            for position, batch in enumerate(loader, start=skip + 1):
                yield batch, position == self.batches_per_epoch
            skip = 0

    def epoch_value(self) -> int:
        """The 1-based epoch of the last micro-batch (epochs completed after an epoch's last one)."""
        done = self.micro_batches_done
        return max(done - 1, 0) // self.batches_per_epoch + 1 if done else 0

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        # One collective per micro-batch: unreadable images anywhere (all processes stop together)
        # and the token (row) count of the global micro-batch. The loss is normalised by that count,
        # so N processes optimise exactly what one process with the global batch optimises.
        global_count = self._global_count(batch)
        out = self.model(batch)
        return out["example_loss"].sum() * self.accelerator.num_processes / global_count.clamp(min=1)

    def batch_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].shape[0])

    def _global_count(self, batch: dict[str, Any]) -> torch.Tensor:
        """Sum over processes of the loss terms in this micro-batch (label tokens, or rows for
        retrieval); raises on every process when any process met an unreadable image."""
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

    # -- evaluation

    def eval_enabled(self) -> bool:
        return self.val_loader is not None

    def evaluate(self, model: nn.Module) -> dict[str, Any] | None:
        """Validation loss (every process, gathered; the training loss on the validation manifest)
        and, on the main process, the task metric."""
        acc = self.accelerator
        torch.manual_seed(self.config.seed)  # repeatable (retrieval samples negatives)
        sums, counts = [], []
        for batch in self.val_loader:
            self._global_count(batch)
            out = model(batch)
            loss, count = acc.gather_for_metrics((out["example_loss"].float(), out["example_count"].float()))
            sums.append(loss.sum().cpu())
            counts.append(count.sum().cpu())
        if not self.main:
            return None
        metrics = {"val_loss": float(sum(sums) / max(float(sum(counts)), 1.0))}
        with acc.autocast():
            metrics.update(self._task_metric(model.model))
        return metrics

    def _task_metric(self, model) -> dict[str, float]:
        config = self.config
        cache: dict[str, Any] = {}

        def image(example):
            if example.image not in cache:
                cache[example.image] = open_image(example.image, max_pixels=config.max_pixels)
            return cache[example.image]

        batch_size = config.eval_batch_size or config.batch_size
        device = self.accelerator.device
        if config.task == "retrieval":
            recall = recall_at_1(
                model,
                self.processor,
                self.family,
                self.val_examples,
                image,
                batch_size=batch_size,
                device=device,
                rerank=config.rerank,
            )
            return {"val_recall@1": recall}
        accuracy = exact_match(
            model,
            self.processor,
            self.family,
            self.val_examples,
            image,
            max_new_tokens=config.max_new_tokens or config.max_length,
            batch_size=batch_size,
            device=device,
        )
        return {"val_accuracy": accuracy}

    # -- checkpoints and export

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def data_state(self) -> dict[str, Any]:
        return {"train_examples": len(self.train_set), "train_manifest_sha256": self.manifest_sha256}

    def extra_state(self) -> dict[str, Any]:
        epoch, batch = divmod(self.micro_batches_done, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch}

    def legacy_micro_batches(self, state: dict[str, Any]) -> int:
        return int(state["epoch"]) * self.batches_per_epoch + int(state["batch_in_epoch"])

    def check_resumed_state(self, state: dict[str, Any], path: Path) -> None:
        if state.get("train_manifest_sha256") not in (None, self.manifest_sha256):
            raise TrainingError(
                f"{self.config.manifest} changed since {path} was written; the saved data position would not match",
                hint="restore the manifest or start a new run",
            )
        if state.get("train_examples") != len(self.train_set):
            raise TrainingError(
                f"{path} was written for {state.get('train_examples')} training examples; the "
                f"manifest now gives {len(self.train_set)}"
            )

    def export(self, directory: Path, model: nn.Module) -> None:
        """save_pretrained (safetensors) + the processor: a checkpoint of the class it came from.
        With --lora the adapter is merged into it; --keep-adapter also writes the adapter alone."""
        if self.config.lora:
            export_lora(
                model.model,
                directory,
                keep_adapter=self.config.keep_adapter,
                base_model=base_reference(self.config.model),
            )
        else:
            model.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def _lora_record(self) -> dict[str, Any] | None:
        config = self.config
        if not config.lora:
            return None
        return {
            "r": config.lora_r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "targets": self.inputs.lora_targets,
            "keep_adapter": config.keep_adapter,
        }

    def finish_fields(self) -> dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_val_loss": self.best_value,
            "val_metrics": self.last_eval,
            "final_train_loss": self.final_loss,
        }

    # -- reporting

    def describe_start(self) -> None:
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
            count_label(self.trainable),
            count_label(self.frozen_count),
            f" (frozen: {', '.join(inputs.frozen)})" if inputs.frozen else "",
        )
        if config.lora:
            logger.info(
                "LoRA r=%d alpha=%g dropout=%g on %s",
                config.lora_r,
                config.lora_alpha,
                config.lora_dropout,
                ", ".join(inputs.lora_targets),
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

    def result(self, elapsed: float) -> FinetuneResult:
        config = self.config
        return FinetuneResult(
            output_dir=str(self.out),
            task=config.task,
            family=self.family.name,
            model=config.model,
            steps=self.step,
            total_steps=self.total_steps,
            epochs=self.micro_batches_done // self.batches_per_epoch,
            train_examples=len(self.train_set),
            val_examples=len(self.val_examples),
            skipped_missing=len(self.inputs.train.skipped_missing),
            trainable_parameters=self.trainable,
            frozen_parameters=self.frozen_count,
            frozen_parts=list(self.inputs.frozen),
            resumed_from_step=self.resumed_from,
            final_train_loss=self.final_loss,
            best_val_loss=self.best_value,
            best_step=self.best_step,
            val_metrics={k: v for k, v in self.last_eval.items() if k.startswith("val_")},
            train_samples_per_second=self.samples_per_second(),
            elapsed_seconds=elapsed,
            is_main_process=self.main,
            history=list(self.history),
        )
