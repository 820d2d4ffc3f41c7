"""The training engine on a toy task (a linear model fitting y = 3x - 1), independent of BLIP and the
DiT: a resumed run ends with an uninterrupted run's weights and records, every step is recorded,
evaluations and checkpoints follow their schedules, the best evaluation is exported, the EMA follows
its closed form, and a failing run is marked failed with its step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blip_toolkit.engine.run import train
from blip_toolkit.engine.settings import LoopSettings, RunPlace
from blip_toolkit.engine.trainer import Trainer
from blip_toolkit.errors import OutputExistsError, TrainingError, UsageError

DATA = torch.linspace(-1, 1, 48)[:, None]  # 48 samples, 6 micro-batches of 8 per epoch


class LineTask(Trainer):
    kind = "blip-test-line"
    resume_free = ("max_steps",)
    best_metric = "val_loss"

    def __init__(self, settings, place, accelerator, *, max_steps=12, fail_at=None, callback=None):
        super().__init__(settings, place, accelerator, callback)
        self.max_steps, self.fail_at = max_steps, fail_at

    def config_record(self):
        return {"lr": self.settings.learning_rate, "max_steps": self.max_steps}

    def build(self, checkpoint):
        torch.manual_seed(0)
        return nn.Linear(1, 1)

    def resolve_total_steps(self):
        return self.max_steps

    def micro_batches(self, start):
        # epoch e's order depends only on e, so any position can be resumed from
        position = start
        while True:
            epoch, offset = divmod(position, 6)
            order = torch.randperm(48, generator=torch.Generator().manual_seed(epoch))
            rows = order[offset * 8 : offset * 8 + 8]
            position += 1
            yield DATA[rows], position % 6 == 0

    def loss(self, batch):
        if self.fail_at is not None and self.step + 1 == self.fail_at:
            return torch.tensor(float("nan"), requires_grad=True)
        return nn.functional.mse_loss(self.model(batch), 3 * batch - 1)

    def batch_samples(self, batch):
        return batch.shape[0]

    def eval_enabled(self):
        return True

    def evaluate(self, model):
        return {"val_loss": float(nn.functional.mse_loss(model(DATA), 3 * DATA - 1))}

    def export(self, directory, model):
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "weights.safetensors")
        )
        (directory / "config.json").write_text("{}")

    def result(self, elapsed):
        return self


def run(out: Path, **changes):
    task = {k: changes.pop(k) for k in ("max_steps", "fail_at", "callback") if k in changes}
    # A constant learning rate (min_lr_ratio 1): runs of different lengths take the same steps.
    place_fields = {f.name for f in dataclasses.fields(RunPlace)}
    values = dict(learning_rate=0.05, min_lr_ratio=1.0, grad_clip=0.0, log_every=4, save_every=4)
    settings = LoopSettings(**{**values, **{k: v for k, v in changes.items() if k not in place_fields}})
    place = RunPlace(
        output_dir=str(out), eval_every=4, **{k: v for k, v in changes.items() if k in place_fields}
    )
    return train(lambda acc: LineTask(settings, place, acc, **task), settings, place)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "weights.safetensors"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_records_every_step_evaluates_and_checkpoints_on_schedule(tmp_path):
    trainer = run(tmp_path / "run")
    history = records(tmp_path / "run")
    train_steps = [r["step"] for r in history if r["type"] == "train"]
    assert train_steps == list(range(1, 13))
    assert [r["step"] for r in history if r["type"] == "eval"] == [4, 8, 12]
    assert [r["step"] for r in history if r["type"] == "checkpoint"] == [4, 8, 12]
    losses = [r["loss"] for r in history if r["type"] == "train"]
    assert losses[-1] < 0.5 * losses[0]  # it learns
    run_record = json.loads((tmp_path / "run" / "blip_run.json").read_text())
    assert (
        run_record["kind"] == "blip-test-line"
        and run_record["status"] == "finished"
        and run_record["steps"] == 12
    )
    # the best evaluation's export sits in best/; the final export at the top
    evals = [r for r in history if r["type"] == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])
    assert json.loads((tmp_path / "run" / "best" / "blip_best.json").read_text())["step"] == best["step"]
    assert torch.equal(weights(tmp_path / "run")["weight"], trainer.model.weight.detach())


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    straight = run(tmp_path / "straight", max_steps=12)

    def killed_at_step_6(record):
        if record["type"] == "train" and record["step"] == 6:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "resumed", max_steps=12, callback=killed_at_step_6)  # last checkpoint: step 4
    assert json.loads((tmp_path / "resumed" / "blip_run.json").read_text())["status"] == "failed"
    resumed = run(tmp_path / "resumed", max_steps=12, resume=True)
    assert resumed.resumed_from == 4
    assert torch.equal(weights(tmp_path / "resumed")["weight"], weights(tmp_path / "straight")["weight"])
    ours = [(r["step"], r["loss"]) for r in records(tmp_path / "resumed") if r["type"] == "train"]
    theirs = [(r["step"], r["loss"]) for r in records(tmp_path / "straight") if r["type"] == "train"]
    assert ours == theirs  # records after the checkpoint were dropped and redone
    assert straight.step == resumed.step == 12


def test_resume_refuses_changed_settings_and_other_kinds(tmp_path):
    run(tmp_path / "run", max_steps=4)
    with pytest.raises(UsageError, match="lr: 0.05 -> 0.1"):
        run(tmp_path / "run", max_steps=8, resume=True, learning_rate=0.1)
    with pytest.raises(OutputExistsError, match="already exists"):
        run(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "blip_run.json").write_text(json.dumps({"kind": "blip-finetune"}))
    with pytest.raises(OutputExistsError, match="not a test-line run"):
        run(tmp_path / "other", resume=True)


def test_ema_follows_its_closed_form(tmp_path):
    seen = []

    def capture(record):
        if record["type"] == "train":
            seen.append(record["step"])

    trainer = run(tmp_path / "run", max_steps=3, ema_decay=0.5, eval_ema=False, callback=capture)
    # EMA_k = lerp(EMA_{k-1}, w_k, 1 - min(0.5, (1 + k) / (10 + k))) from EMA_0 = the initial weights;
    # w_k, the weights after step k, come from runs stopped after k steps (the same steps).
    torch.manual_seed(0)
    expected = nn.Linear(1, 1).weight.detach().clone()
    trained = trainer.model.weight.detach()
    assert seen == [1, 2, 3]
    steps = []
    for k in range(1, 4):
        run(tmp_path / f"w{k}", max_steps=k)
        steps.append(weights(tmp_path / f"w{k}")["weight"])
    for k, w in enumerate(steps, start=1):
        expected = torch.lerp(expected, w, 1 - min(0.5, (1 + k) / (10 + k)))
    assert torch.allclose(trainer.ema.module.weight, expected, atol=1e-6)
    assert torch.equal(steps[-1], trained)


def test_a_nan_loss_stops_the_run_and_marks_it_failed(tmp_path):
    with pytest.raises(TrainingError, match="at step 6"):
        run(tmp_path / "run", max_steps=12, fail_at=6)
    record = json.loads((tmp_path / "run" / "blip_run.json").read_text())
    assert record["status"] == "failed" and "loss became nan" in record["error"]
    assert record["last_checkpoint_step"] == 4  # nothing after the last good checkpoint was saved
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-4"]
