"""`blip train-dit`: train the CLIP-feature DiT on embedding shards with rectified flow,
a task on the training engine (engine/trainer.py: one CPU, one GPU, or many processes under
`accelerate launch`).

    from blip_toolkit.dit.train_config import load_train_config
    from blip_toolkit.dit.train import run_train_dit
    config = load_train_config("configs/dit-blip3o.toml", {"data.dir": "emb/", "output_dir": "runs/dit"})
    result = run_train_dit(config)          # result.history: every metrics record

What the run is given (embeddings, split, model dims, output policy) is checked on every process
before anything is built or written (dit/train_inputs.py). The run directory is the engine's
(blip_run.json, metrics.jsonl, checkpoints/step-N) plus the DiT export at its top level and in every
checkpoint (config.json, model / ema / normalizer / target_head .safetensors: dit/checkpoint.py),
which `blip sample --checkpoint RUN` reads.

Training is deterministic for a seed on CPU, and independent of the number of processes for the same
global batch (`train.batch_size` is the GLOBAL micro-batch; dit/data.py explains how): a resumed run
ends with the weights of an uninterrupted one, and 2 processes give the losses of 1.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from blip_toolkit import __version__
from blip_toolkit.dit.checkpoint import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    EXPORT_KEY,
    EXPORT_VERSION,
    NORMALIZER_FILE,
    normalizer_bundle,
    read_record,
    write_export,
)
from blip_toolkit.dit.data import (
    IndexStream,
    TrainStream,
    batch_iterator,
    fit_normalizer,
    load_eval_set,
)
from blip_toolkit.dit.evaluate import evaluate_dit
from blip_toolkit.dit.flow import flow_loss
from blip_toolkit.dit.model import DiT
from blip_toolkit.dit.normalize import TENSOR_PREFIX, TokenNormalizer
from blip_toolkit.dit.train_config import RESUME_FREE, RUN_KIND, TrainDiTConfig
from blip_toolkit.dit.train_inputs import DiTInputs, check_inputs, describe_split
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.engine.metrics import count_label
from blip_toolkit.engine.run import RunSummary, train
from blip_toolkit.engine.settings import RunPlace
from blip_toolkit.engine.trainer import Trainer
from blip_toolkit.errors import TrainingError, UsageError
from blip_toolkit.fsutil import write_json

logger = logging.getLogger("blip")


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


def run_train_dit(
    config: TrainDiTConfig, *, callback: Callable[[dict[str, Any]], None] | None = None
) -> TrainDiTResult:
    """Train a DiT as `config` says and write the run directory (module docstring).

    `callback(record)` is called on the main process with every metrics record: {"type": "train",
    "step", "epoch", "loss", "lr", "grad_norm", "samples_per_second"}, {"type": "eval", "step",
    "val_loss", "vel_cos", "patch_cos", "global_cos", "est_r@1"}, {"type": "checkpoint", "step",
    "path"}. An exception raised by the callback stops the run (the last complete checkpoint stays
    usable with `resume`). A NaN or Inf loss stops it with a TrainingError naming the step."""
    inputs = check_inputs(config)
    config = replace(config, flow=inputs.flow)  # what the run trains with and records
    place = run_place(config, inputs.log_with)
    # Which parameters get a gradient varies from batch to batch: the learned null condition only when
    # some sample of this process's batch had its condition dropped, the conditioning projections only
    # when some sample kept it. DDP waits forever for a gradient that never comes unless it looks for
    # unused parameters (a walk of the autograd graph per step, small next to a DiT step).
    return train(
        lambda accelerator: DiTTrainer(config, inputs, place, accelerator, callback),
        config.train,
        place,
        find_unused_parameters=True,
    )


def run_place(config: TrainDiTConfig, trackers: list[str]) -> RunPlace:
    return RunPlace(
        output_dir=config.output_dir,
        resume=config.resume,
        overwrite=config.overwrite,
        eval_every=config.eval.every,
        eval_ema=config.eval.ema,
        trackers=trackers,
    )


# ----------------------------------------------------------------------------- the task


class DiTTrainer(Trainer):
    kind = RUN_KIND
    resume_free = RESUME_FREE
    nan_hint = "lower --learning-rate, keep train.grad_clip on, check the embeddings for NaN, or use bf16 instead of fp16"

    def __init__(self, config: TrainDiTConfig, inputs: DiTInputs, place: RunPlace, accelerator, callback):
        super().__init__(config.train, place, accelerator, callback)  # [train] is the loop's settings
        self.config = config
        self.inputs = inputs
        self.shards = inputs.shards
        self.split = inputs.split
        self.model_config = inputs.model_config
        self.eval_set = None

    # -- what the run is

    def config_record(self) -> dict[str, Any]:
        data = asdict(self.config)
        data["model"] = self.model_config.to_dict()
        data["data"]["dir"] = str(Path(data["data"]["dir"]).resolve())
        data["output_dir"] = str(Path(data["output_dir"]).resolve())
        return data

    def run_fields(self) -> dict[str, Any]:
        return {"data": self.inputs.data_record()}

    def check_previous_run(self, previous: dict[str, Any]) -> None:
        if previous.get("data", {}).get("index_sha256") not in (None, self.shards.index_sha256):
            raise UsageError(
                f"--resume: {self.out} was trained on other embeddings ({previous['data'].get('dir')}; "
                "index.json differs)",
                hint="resume with the same --data, or start a new --output-dir",
            )

    # -- model and data

    def build(self, checkpoint: Path | None) -> nn.Module:
        self.normalizer = self._normalizer(checkpoint)
        torch.manual_seed(self.config.train.seed)  # the same initial weights on every process
        model = DiT(self.model_config)
        model.train()
        self.num_parameters = model.num_parameters
        self.head = self.shards.head(device=self.accelerator.device)
        if self.config.flow.learned_head:
            # Starts as the target's own head, then trains with the DiT (flow.contrastive_head).
            model.attach_text_head(copy.deepcopy(self.head).float().train().requires_grad_(True))
        self.norm_bundle = normalizer_bundle(self.normalizer)
        if self.main and self.eval_enabled():
            # Its own reader: reading the eval set must not evict the training stream's maps.
            reader = EmbeddingShards(self.shards.root, verify=self.config.data.verify)
            self.eval_set = load_eval_set(reader, self.split.eval, max_samples=self.config.eval.max_samples)
        return model

    def _normalizer(self, checkpoint: Path | None) -> TokenNormalizer:
        """From the checkpoint when resuming (the run goes on with the statistics its weights were
        trained with), else fitted in one streaming pass over the training targets, each process
        reading its share; the partial statistics are gathered and merged in rank order, so every
        process gets the same normaliser."""
        method = self.config.flow.target_norm
        if checkpoint is not None:
            record = read_record(checkpoint)
            tensors = {TENSOR_PREFIX + k: v for k, v in load_file(str(checkpoint / NORMALIZER_FILE)).items()}
            return TokenNormalizer.from_export(tensors, record["normalizer"])
        acc = self.accelerator
        started = time.perf_counter()
        has_cls = self.model_config.has_cls
        normalizer = fit_normalizer(
            self.shards,
            self.split.train,
            method,
            has_cls=has_cls,
            max_samples=self.config.data.stats_samples,
            part=acc.process_index,
            parts=acc.num_processes,
            gather=lambda packed: (
                acc.gather(packed.to(acc.device)).cpu() if acc.num_processes > 1 else packed
            ),
        )
        if method == "none":
            return normalizer
        logger.info(
            "%s target normalisation fitted on %d tokens%s in %.1f s",
            method,
            normalizer.count,
            f" (and {normalizer.cls_count} CLS tokens, with statistics of their own)" if has_cls else "",
            time.perf_counter() - started,
        )
        return normalizer

    def resolve_total_steps(self) -> int:
        return self.config.train.max_steps

    def micro_batches(self, start: int) -> Iterator[tuple[dict[str, Any], bool]]:
        config, acc = self.config, self.accelerator
        train = self.split.train
        contrastive = config.flow.contrastive_weight > 0
        # The training indices of each shard (train is sorted, shards are contiguous ranges).
        bounds = np.searchsorted(train, self.shards.offsets[1:-1])
        order = IndexStream(
            np.split(train, bounds), seed=config.train.seed, buffer=config.data.shuffle_buffer
        )
        stream = TrainStream(
            self.shards,
            order,
            flow=config.flow,
            normalizer=self.normalizer,
            global_batch=config.train.batch_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
            seed=config.train.seed,
            start=start,
            with_target=contrastive and config.flow.contrastive_positive == "image",
            with_text=contrastive and config.flow.contrastive_positive == "text",
        )
        for batch in batch_iterator(stream, num_workers=config.data.num_workers):
            yield batch, False

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        device = self.accelerator.device
        drop = batch["drop"].to(device) if batch["drop"] is not None else None  # [b]
        target = batch["target"].to(device) if "target" in batch else None  # [b, N, Dt] raw
        text = batch["text"].to(device) if "text" in batch else None  # [b, E]
        has_text = batch["has_text"].to(device) if "has_text" in batch else None  # [b]
        loss, _ = flow_loss(
            self.model,
            batch["x_1"].to(device, non_blocking=True),  # [b, N, Dt]
            batch["cond"].to(device, non_blocking=True),  # [b, M, Dc]
            self.config.flow,
            x_0=batch["x_0"].to(device, non_blocking=True),
            t=batch["t"].to(device, non_blocking=True),
            drop=drop,
            project=self.projecting_head(self.model),
            target_tokens=target,
            normalizer=self.normalizer,
            text=text,
            has_text=has_text,
        )
        return loss

    def projecting_head(self, model: nn.Module) -> nn.Module:
        """The head that pools and projects `model`'s tokens: its learned one, else the target's."""
        learned = self.accelerator.unwrap_model(model).text_head
        return learned if learned is not None else self.head

    def batch_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].shape[0])

    def epoch_value(self) -> float:
        return round(self.micro_batches_done * self.config.train.batch_size / len(self.split.train), 3)

    # -- evaluation

    def eval_enabled(self) -> bool:
        return self.config.eval.every > 0 and self.split.kind != "none"

    def evaluate(self, model: nn.Module) -> dict[str, Any] | None:
        if not self.main or self.eval_set is None:
            return None
        config = self.config
        cfg = config.eval.cfg_scale if config.eval.cfg_scale is not None else config.sample.cfg_scale
        return evaluate_dit(
            model,
            self.eval_set,
            normalizer=self.normalizer,
            head=self.projecting_head(model),
            steps=config.eval.steps,
            cfg_scale=cfg,
            solver=config.eval.solver,
            shift=config.sample.shift,
            seed=config.eval.seed,
            batch_size=config.eval.batch_size,
            recall=config.eval.recall,
            device=self.accelerator.device,
        )

    # -- checkpoints and export

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"normalizer": self.norm_bundle, "target_head": self.head}

    def data_state(self) -> dict[str, Any]:
        return {"index_sha256": self.shards.index_sha256, "train_samples": len(self.split.train)}

    def extra_state(self) -> dict[str, Any]:
        return {EXPORT_KEY: self.export_record()}

    def check_resumed_state(self, state: dict[str, Any], path: Path) -> None:
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

    def export_record(self) -> dict[str, Any]:
        """config.json of a DiT export (dit/checkpoint.py)."""
        _, normalizer_meta = self.normalizer.export()
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "toolkit_version": __version__,
            "step": self.step,
            "dit": self.model_config.to_dict(),
            "flow": asdict(self.config.flow),
            "normalizer": normalizer_meta,
            "data": self.inputs.data_record(),
            "head": {"config": self.head.config(), "source": self.shards.index.get("head", {})},
            "ema": {"decay": self.config.train.ema_decay, "present": self.ema is not None},
            "sample": asdict(self.config.sample),
            "eval": self.last_eval,
        }

    def after_checkpoint(self, path: Path) -> None:
        # The record is already inside the atomic checkpoint (trainer_state.json); config.json is the
        # copy that makes the directory a plain DiT export too.
        write_json(path / CONFIG_FILE, self.export_record())

    def export(self, directory: Path, model: nn.Module) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        ema = self.ema.module if self.ema is not None else None
        write_export(
            directory,
            self.export_record(),
            model=unwrapped,
            ema=ema,
            normalizer=self.normalizer,
            head=self.projecting_head(ema if ema is not None else unwrapped),
        )

    # -- reporting

    def describe_start(self) -> None:
        config, acc, mc, split = self.config, self.accelerator, self.model_config, self.split
        held = {
            "held-out": f"{len(split.eval)} held out",
            "none": "nothing held out",
            "overfit": "overfit: evaluated on the training images",
        }[split.kind]
        logger.info(
            "training a DiT of %s parameters (hidden %d, %d layers, %d heads) on %d of %d image(s) of %s (%s); "
            "tokens [%d, %d] <- cond [%d, %d]",
            count_label(self.num_parameters),
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
        describe_split(self.split, self.config)

    def result(self, elapsed: float) -> TrainDiTResult:
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
            eval={k: v for k, v in self.last_eval.items() if k not in ("step", "epoch")},
            train_samples_per_second=self.samples_per_second(),
            elapsed_seconds=elapsed,
            is_main_process=self.main,
            history=list(self.history),
        )
