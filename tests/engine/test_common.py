"""The shared training helpers: schedule, parameter groups, atomic checkpoints (a killed save never
looks complete), restoring the training state and the iteration counter, metrics, the NaN guard.
The checkpoint format itself (every piece of state, no pickles) is tested in test_checkpoint_state.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blip_toolkit.engine import checkpoint as engine_checkpoint
from blip_toolkit.engine import optim
from blip_toolkit.engine.checkpoint import COMPLETE_MARKER, CheckpointManager
from blip_toolkit.engine.metrics import MetricsWriter, check_finite, metric_line
from blip_toolkit.engine.optim import parameter_groups, warmup_cosine_factor
from blip_toolkit.errors import TrainingError


def test_warmup_then_cosine():
    factors = [warmup_cosine_factor(s, warmup_steps=4, total_steps=20) for s in range(24)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, the first step already moves
    assert factors[4] == 1.0
    decay = factors[4:21]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotone cosine decay
    assert factors[12] == pytest.approx(0.5)  # half way through the decay: cos(pi/2)
    assert factors[20] == pytest.approx(0.0, abs=1e-12) and factors[23] == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_factor(20, 0, 20, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(0, 0, 10) == 1.0  # no warmup: full rate at once


def test_scheduler_follows_the_factor():
    model = torch.nn.Linear(2, 2)
    optimizer = optim.build_optimizer(model, learning_rate=1.0, weight_decay=0.1)
    scheduler = optim.warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([warmup_cosine_factor(s, 2, 6) for s in range(6)])


def test_parameter_groups_skip_decay_on_biases_and_norms_and_leave_frozen_out():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model.named_parameters(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert sorted(p.numel() for p in no_decay["params"]) == [2, 4, 4, 4]  # biases and the LayerNorm


def test_nan_guard():
    check_finite(1.5, step=3)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(TrainingError, match="at step 7"):
            check_finite(bad, step=7)


def test_metric_line():
    line = metric_line(
        {
            "type": "train",
            "step": 40,
            "epoch": 2,
            "loss": 2.31414,
            "lr": 1e-5,
            "samples_per_second": 35.12,
            "grad_norm": 0.5,
        },
        total_steps=200,
    )
    assert line == "step 40/200 | epoch 2 | loss 2.3141 | lr 1.00e-05 | 35.1 samples/s | grad_norm 0.5000"
    assert metric_line({"type": "eval", "step": 3, "val_loss": 1.0}).startswith(
        "eval step 3 | val_loss 1.0000"
    )
    assert metric_line({"step": 1, "grad_norm": 5.07e13}) == "step 1 | grad_norm 5.070e+13"


def test_metrics_writer_truncates_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        writer.write({"type": "train", "step": step, "loss": float("nan") if step == 2 else 1.0})
    with open(writer.path, "a") as handle:
        handle.write('{"type": "train", "st')  # a kill in the middle of a line
    kept = writer.truncate_after(3)
    assert [r["step"] for r in kept] == [1, 2, 3]
    assert kept[1]["loss"] is None  # NaN is written as null (strict JSON)
    assert [json.loads(line)["step"] for line in writer.path.read_text().splitlines()] == [1, 2, 3]
    MetricsWriter(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def _setup(acc):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = optim.build_optimizer(model, learning_rate=0.1, weight_decay=0.0)
    scheduler = optim.warmup_cosine_schedule(optimizer, warmup_steps=1, total_steps=10)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler, {"model": model, "optimizer": optimizer, "scheduler": scheduler}


def _train_step(model, optimizer, scheduler):
    loss = model(torch.randn(5, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_checkpoint_save_load_restores_weights_optimizer_rng_and_iteration(tmp_path, accelerator):
    model, optimizer, scheduler, objects = _setup(accelerator)
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)
    _train_step(model, optimizer, scheduler)
    accelerator.project_configuration.iteration = 5
    path = manager.save(accelerator, 1, {"epoch": 0, "batch_in_epoch": 1}, **objects)
    assert path.name == "step-1" and (path / COMPLETE_MARKER).is_file()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    expected_next = torch.rand(3)  # what the RNG gives right after the save
    _train_step(model, optimizer, scheduler)

    accelerator.project_configuration.iteration = 0  # what a fresh process has after load_state
    state = manager.load(accelerator, path, **objects)
    assert state["step"] == 1 and state["batch_in_epoch"] == 1
    assert accelerator.project_configuration.iteration == 6  # restored (a save counts one, as save_state did)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert scheduler.scheduler.last_epoch == 1
    assert torch.equal(torch.rand(3), expected_next)


def test_checkpoints_are_pruned_and_incomplete_ones_ignored(tmp_path, accelerator):
    *_, objects = _setup(accelerator)
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep=2)
    for step in (1, 2, 3):
        manager.save(accelerator, step, {}, **objects)
    assert [s for s, _ in manager.complete()] == [2, 3]
    # Leftovers of a killed save: a temp directory, and a step directory without the marker.
    (root / ".step-4.tmp").mkdir()
    (root / ".step-4.tmp" / "model.safetensors").write_bytes(b"partial")
    (root / "step-5").mkdir()
    assert manager.latest() == root / "step-3"
    with pytest.raises(TrainingError, match="incomplete"):
        manager.load(accelerator, root / "step-5", **objects)
    removed = manager.clean_incomplete()
    assert sorted(p.name for p in removed) == [".step-4.tmp", "step-5"]
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


def test_a_save_killed_before_the_marker_leaves_no_complete_checkpoint(tmp_path, accelerator, monkeypatch):
    *_, objects = _setup(accelerator)
    manager = CheckpointManager(tmp_path / "checkpoints")
    manager.save(accelerator, 1, {}, **objects)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_checkpoint, "atomic_write", killed)  # dies just before writing the marker
    with pytest.raises(KeyboardInterrupt):
        manager.save(accelerator, 2, {}, **objects)
    assert manager.latest() == tmp_path / "checkpoints" / "step-1"
    assert not (tmp_path / "checkpoints" / "step-2").exists()
