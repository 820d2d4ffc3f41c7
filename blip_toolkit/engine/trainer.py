"""The training loop that BLIP fine-tuning and DiT training share.

`Trainer.run` reads top to bottom: seed, output directory and run record, resume point, the task's
model, optimizer / schedule / EMA, resume, trackers, the loop, the export. A task subclasses
`Trainer` and supplies only what is its own, the hooks of `TrainingTask` (engine/hooks.py): the model
(`build`), the micro-batches from a position (`micro_batches`), the loss (`loss`), the evaluation
(`evaluate`), what else a checkpoint holds, and the export (`export`). Everything else is here, once: gradient accumulation and clipping on
Accelerate, the learning-rate schedule, the EMA, metrics.jsonl and trackers, the NaN guard,
evaluation and checkpoint schedules, the best model, exact resume, failure marking, the final export.

Run directory:

    DIR/blip_run.json        kind, status (running / finished / failed / interrupted), resolved config
    DIR/metrics.jsonl        one record per optimizer step ({"type": "train"}), per evaluation
                             ({"type": "eval"}) and per checkpoint ({"type": "checkpoint"})
    DIR/checkpoints/step-N/  the training state for --resume (engine/checkpoint.py)
    DIR/best/                the export of the best evaluation (tasks with a `best_metric`)
    DIR/<export files>       the final export, written file by file with config.json last
    DIR/trackers/            tensorboard / wandb files when `log_with` asks for them

Exact resume: the data position is the number of micro-batches consumed (engine/hooks.py says what
that asks of a task).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from blip_toolkit.engine.checkpoint import CheckpointManager
from blip_toolkit.engine.hooks import TrainingTask
from blip_toolkit.engine.metrics import (
    METRICS_FILE,
    MetricsWriter,
    check_finite,
    metric_line,
    tracker_config,
    tracker_values,
)
from blip_toolkit.engine.optim import Ema, build_optimizer, warmup_cosine_schedule
from blip_toolkit.engine.outputs import (
    RunRecord,
    check_output_dir,
    check_resume_settings,
    flatten,
    prepare_output_dir,
    publish_files,
)
from blip_toolkit.engine.seeding import seed_everything
from blip_toolkit.engine.settings import LoopSettings, RunPlace
from blip_toolkit.fsutil import replace_dir, write_json

logger = logging.getLogger("blip")

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
BEST_FILE = "blip_best.json"
EXPORT_LAST = "config.json"  # written last: a directory whose config.json is there is complete


@dataclass
class _Step:
    """One optimizer step waiting to be recorded (tensors stay on the device until the flush)."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    lr: float
    samples: int
    epoch: float | int


class Trainer(TrainingTask):
    """The skeleton; subclasses fill in the hooks of `TrainingTask`."""

    def __init__(
        self,
        settings: LoopSettings,
        place: RunPlace,
        accelerator: Accelerator,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.settings = settings
        self.place = place
        self.accelerator = accelerator
        self.callback = callback
        self.out = Path(place.output_dir)
        self.main = accelerator.is_main_process
        self.record = RunRecord(self.out, self.kind, enabled=self.main)
        self.metrics = MetricsWriter(self.out / METRICS_FILE, enabled=self.main)
        self.checkpoints = CheckpointManager(self.out / CHECKPOINT_DIR, keep=settings.keep_checkpoints)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.micro_batches_done = 0
        self.total_steps = 0
        self.ema: Ema | None = None
        self.resumed_from: int | None = None
        self.last_eval: dict[str, Any] = {}
        self.last_eval_step: int | None = None
        self.last_checkpoint_step: int | None = None
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.final_loss: float | None = None
        self.train_time = 0.0
        self.train_samples = 0

    # ------------------------------------------------------------------------------------ the run

    def run(self) -> Any:
        started = time.perf_counter()
        seed_everything(self.settings.seed)
        CheckpointManager.check_supported(self.accelerator)  # refused before anything is written
        self._prepare_output()
        try:
            latest = self._find_checkpoint()
            model = self.build(latest)
            self.total_steps = self.resolve_total_steps()
            self._build_optimizer(model)
            if latest is not None:
                self._resume(latest)
            self._start_trackers()
            self.describe_start()
            self._loop()
            self._finish()
        except BaseException as exc:
            self.record.fail(exc, failed_at_step=self.step, last_checkpoint_step=self.last_checkpoint_step)
            raise
        finally:
            if self.place.trackers:
                try:
                    self.accelerator.end_training()
                except Exception:  # noqa: BLE001 - a tracker failing to close must not hide the run's error
                    pass
        self.accelerator.wait_for_everyone()
        return self.result(time.perf_counter() - started)

    def _prepare_output(self) -> None:
        check_output_dir(
            self.out,
            overwrite=self.place.overwrite,
            resume=self.place.resume,
            kind=self.kind,
            flag=self.output_flag,
        )
        previous = self.record.read() if self.place.resume else None
        if previous is not None:
            self.check_previous_run(previous)
            check_resume_settings(
                previous.get("config", {}),
                self.config_record(),
                free=self.resume_free,
                where=str(self.out),
                flag=self.output_flag,
                quiet=("resume", "overwrite", "output_dir"),
            )
        # Every process checks the directory as the user left it before the main one changes it.
        self.accelerator.wait_for_everyone()
        if self.main:
            prepare_output_dir(
                self.out,
                overwrite=self.place.overwrite,
                resume=self.place.resume,
                kind=self.kind,
                flag=self.output_flag,
            )
            # Written first: it marks the directory as ours (--overwrite) and of this kind (--resume).
            self.record.start(
                {
                    "config": self.config_record(),
                    **self.run_fields(),
                    "num_processes": self.accelerator.num_processes,
                },
                previous=previous,
            )
            if not self.place.resume:
                self.metrics.path.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _find_checkpoint(self) -> Path | None:
        if not self.place.resume:
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

    def _build_optimizer(self, model: nn.Module) -> None:
        settings, acc = self.settings, self.accelerator
        optimizer = build_optimizer(
            model,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
            betas=settings.betas,
        )
        scheduler = warmup_cosine_schedule(
            optimizer,
            warmup_steps=settings.warmup_steps,
            total_steps=self.total_steps,
            min_ratio=settings.min_lr_ratio,
        )
        if settings.ema_decay > 0:
            self.ema = Ema(model, settings.ema_decay, device=acc.device)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ema is not None:
            self.ema.track(acc.unwrap_model(self.model))

    def _checkpoint_modules(self) -> dict[str, nn.Module]:
        modules = dict(self.checkpoint_modules())
        if self.ema is not None:
            modules["ema"] = self.ema.module
        return modules

    def _resume(self, path: Path) -> None:
        state = self.checkpoints.load(
            self.accelerator,
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            modules={"ema": self.ema.module} if self.ema is not None else None,
            generators=self.generators(),
        )
        self.check_resumed_state(state, path)
        self.step = int(state["step"])
        self.micro_batches_done = int(state.get("micro_batches", self.legacy_micro_batches(state)))
        self.last_eval = state.get("last_eval") or {}
        self.last_eval_step = state.get("last_eval_step")
        if self.best_metric:
            self.best_value = state.get(f"best_{self.best_metric}")
            self.best_step = state.get("best_step")
        self.last_checkpoint_step = self.resumed_from = self.step
        self.history = self.metrics.truncate_after(self.step) if self.main else []
        logger.info("resumed from %s (step %d)", path, self.step)

    def _start_trackers(self) -> None:
        if self.place.trackers:
            self.accelerator.init_trackers(self.kind, config=tracker_config(flatten(self.config_record())))

    # ------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        acc, settings = self.accelerator, self.settings
        if self.step >= self.total_steps:  # resumed after the last step: nothing left to train
            return
        pending: list[_Step] = []
        losses: list[torch.Tensor] = []
        samples = 0
        grad_norm = None
        window_start = time.perf_counter()
        for batch, epoch_end in self.micro_batches(self.micro_batches_done):
            self.micro_batches_done += 1
            with acc.accumulate(self.model):
                loss = self.loss(batch)
                acc.backward(loss)
                if acc.sync_gradients and settings.grad_clip > 0:
                    grad_norm = acc.clip_grad_norm_(self.params, settings.grad_clip)
                self.optimizer.step()
                if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            # A copy: the 0-d loss can be a view on a buffer of the whole batch's errors, which a
            # window of detached losses would keep alive.
            losses.append(loss.detach().clone())
            samples += self.batch_samples(batch) * acc.num_processes
            if not acc.sync_gradients:
                continue
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.step)
            step_loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            # Reduced on the device (no host sync per step): checked and recorded at the flush.
            reduced = acc.reduce(step_loss, "mean") if acc.num_processes > 1 else step_loss
            lr = float(self.scheduler.get_last_lr()[0])
            norm = grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else grad_norm
            pending.append(_Step(self.step, reduced, norm, lr, samples, self.epoch_value()))
            losses, samples, grad_norm = [], 0, None
            last = self.step >= self.total_steps
            evaluate = self.eval_enabled() and (
                last or self._every(self.place.eval_every) or (epoch_end and self.eval_at_epoch_end)
            )
            save = (
                last
                or self._every(settings.save_every or 0)
                or (epoch_end and self.checkpoint_at_epoch_end and not settings.save_every)
            )
            if evaluate or save or last or self.step == 1 or self.step % settings.log_every == 0:
                self._flush(pending, time.perf_counter() - window_start)
                pending = []
                if evaluate:
                    self._evaluate()
                if save:
                    self._checkpoint()
                window_start = time.perf_counter()  # evaluation and saving are not training time
            if last:
                break

    def _every(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _flush(self, pending: list[_Step], elapsed: float) -> None:
        """Check the pending steps' losses (NaN / Inf stop the run, naming the first bad step) and
        record one train record per step; the console gets the last one."""
        if not pending:
            return
        values = torch.stack([p.loss for p in pending]).float().cpu().tolist()
        for p, value in zip(pending, values):
            check_finite(value, step=p.step, hint=self.nan_hint)
        norms = [float(p.grad_norm) if p.grad_norm is not None else None for p in pending]
        count = sum(p.samples for p in pending)
        self.train_time += elapsed
        self.train_samples += count
        rate = count / elapsed if elapsed > 0 else None
        self.final_loss = values[-1]
        for i, (p, value, norm) in enumerate(zip(pending, values, norms)):
            record = {"type": "train", "step": p.step, "epoch": p.epoch, "loss": value, "lr": p.lr}
            if norm is not None:
                record["grad_norm"] = norm
            record["samples_per_second"] = rate
            self._record(record, console=i == len(pending) - 1)

    def _record(self, record: dict[str, Any], *, console: bool = True) -> None:
        record = {**record, "time": round(time.time(), 3)}
        self.history.append(record)
        if not self.main:
            return
        self.metrics.write(record)
        if console:
            logger.info(metric_line(record, total_steps=self.total_steps))
        if self.place.trackers and record["type"] in ("train", "eval"):
            self.accelerator.log(tracker_values(record), step=self.step)
        if self.callback is not None:
            self.callback(record)

    # ------------------------------------------------------------------------------------ evaluation

    def eval_model(self) -> nn.Module:
        """What is evaluated and exported: the EMA weights when kept (and `eval_ema`), else the
        trained ones."""
        if self.ema is not None and self.place.eval_ema:
            return self.ema.module
        return self.accelerator.unwrap_model(self.model)

    def _evaluate(self) -> None:
        if self.last_eval_step == self.step or not self.eval_enabled():
            return
        model = self.eval_model()
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        # Evaluation must not move the global RNG: a resumed run would diverge from an uninterrupted one.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            metrics = self.evaluate(model)
        model.train(was_training)
        self.last_eval_step = self.step
        if metrics is not None:  # the main process
            record = {"type": "eval", "step": self.step, "epoch": self.epoch_value(), **metrics}
            improved = self._update_best(metrics)
            if self.best_metric and self.best_value is not None:
                record[f"best_{self.best_metric}"] = self.best_value
            record["eval_seconds"] = time.perf_counter() - started
            self.last_eval = {k: v for k, v in record.items() if k not in ("type", "eval_seconds")}
            self._record(record)
            if improved:
                self._publish(self.out / BEST_DIR, best={"step": self.step, "metrics": self.last_eval})
        self.accelerator.wait_for_everyone()

    def _update_best(self, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.best_metric) if self.best_metric else None
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is not None and value >= self.best_value:
            return False
        self.best_value, self.best_step = float(value), self.step
        return True

    # ------------------------------------------------------------------------------------ saving

    def _checkpoint(self) -> None:
        if self.last_checkpoint_step == self.step:
            return
        state = {
            "micro_batches": self.micro_batches_done,
            "total_steps": self.total_steps,
            "last_eval": self.last_eval,
            "last_eval_step": self.last_eval_step,
            **self.data_state(),
            **self.extra_state(),
        }
        if self.best_metric:
            state[f"best_{self.best_metric}"] = self.best_value
            state["best_step"] = self.best_step
        path = self.checkpoints.save(
            self.accelerator,
            self.step,
            state,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            modules=self._checkpoint_modules(),
            generators=self.generators(),
        )
        if self.main:
            self.after_checkpoint(path)
        self.last_checkpoint_step = self.step
        self._record({"type": "checkpoint", "step": self.step, "path": str(path)}, console=False)

    def _publish(self, target: Path, *, best: dict[str, Any] | None = None) -> None:
        """Write the export into `target` (main process): `best/` is replaced as a whole directory, the
        run directory gets the files one by one with config.json last."""
        if not self.main:
            return
        tmp = target.with_name(f".{target.name}.tmp") if best is not None else self.out / ".export.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.export(tmp, self.eval_model())
        if best is not None:
            write_json(tmp / BEST_FILE, best)
            replace_dir(tmp, target)
        else:
            publish_files(tmp, target, last=EXPORT_LAST)

    def _finish(self) -> None:
        self._evaluate()
        self._checkpoint()
        self.accelerator.wait_for_everyone()
        self._publish(self.out)
        if self.main:
            self.record.finish(
                steps=self.step, final_loss=self.final_loss, eval=self.last_eval, **self.finish_fields()
            )

    # ------------------------------------------------------------------------------------ helpers

    def samples_per_second(self) -> float | None:
        return self.train_samples / self.train_time if self.train_time > 0 else None
