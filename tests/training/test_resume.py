"""--resume: a run killed after its step-3 checkpoint and resumed ends with exactly the weights of an
uninterrupted 6-step run (optimizer, scheduler, RNG, step counter and data position restored), the
leftovers of the kill are ignored, and the metrics hold each step once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blip_toolkit.errors import UsageError
from blip_toolkit.training.config import FinetuneConfig
from blip_toolkit.training.finetune import run_finetune

from .helpers import SAMPLES


class Killed(Exception):
    pass


def config(source, out, **changes):
    # BLIP-2 ITM: its Q-Former has dropout and the ITM negatives are sampled, so the global RNG
    # matters; 8 examples in micro-batches of 2 with 2-step accumulation = 2 steps per epoch, so the
    # step-3 checkpoint is in the middle of the second epoch.
    values = dict(
        manifest=str(SAMPLES / "captions.tsv"),
        task="retrieval",
        model=str(source),
        output_dir=str(out),
        val_manifest=str(SAMPLES / "captions.tsv"),
        max_steps=6,
        batch_size=2,
        grad_accum=2,
        learning_rate=5e-3,
        warmup_steps=2,
        save_every=3,
        seed=3,
    )
    values.update(changes)
    return FinetuneConfig(**values)


def weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(checkpoint, tmp_path_factory):
    torch.set_num_threads(1)
    source = checkpoint("blip2-itm")
    out = tmp_path_factory.mktemp("straight") / "run"
    return source, out, run_finetune(config(source, out))


def test_resumed_run_equals_uninterrupted_run(straight, tmp_path):
    source, straight_out, straight_result = straight
    out = tmp_path / "run"

    def kill_after_step_3_checkpoint(record):
        if record["type"] == "checkpoint" and record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_finetune(config(source, out), callback=kill_after_step_3_checkpoint)
    assert (out / "checkpoints" / "step-3" / "COMPLETE").is_file()
    assert not (out / "config.json").exists()  # no final model: the run did not finish
    # What a kill during later work leaves behind: a half-written checkpoint and metrics past step 3.
    (out / "checkpoints" / ".step-4.tmp").mkdir()
    (out / "checkpoints" / ".step-4.tmp" / "model.safetensors").write_bytes(b"partial")
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"type": "train", "step": 4, "loss": 9.9}) + "\n")

    resumed = run_finetune(config(source, out, resume=True))
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    assert not (out / "checkpoints" / ".step-4.tmp").exists()

    expected, got = weights(straight_out), weights(out)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    steps = [r["step"] for r in resumed.history if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    straight_losses = [r["loss"] for r in straight_result.history if r["type"] == "train"]
    assert [r["loss"] for r in resumed.history if r["type"] == "train"] == pytest.approx(
        straight_losses, abs=1e-6
    )
    assert resumed.best_val_loss == pytest.approx(straight_result.best_val_loss, abs=1e-6)
    # The checkpoint counter continued from the checkpoint (not 0), so pruning kept the newest.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-6"]
    run = json.loads((out / "blip_run.json").read_text())
    assert run["status"] == "finished" and run["steps"] == 6


def test_finetune_checkpoints_hold_only_safetensors_and_json(straight):
    """No pickles (our security standard): each file is JSON or safetensors, and both parse."""
    from safetensors import safe_open

    _, out, _ = straight
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-3", "step-6"]
    for checkpoint in checkpoints:
        names = sorted(p.name for p in checkpoint.iterdir())
        assert names == [
            "COMPLETE",
            "model.safetensors",
            "optimizer.json",
            "optimizer.safetensors",
            "rng-0.json",
            "rng-0.safetensors",
            "scheduler.json",
            "trainer_state.json",
        ], checkpoint.name
        for file in checkpoint.iterdir():
            if file.suffix == ".json":
                json.loads(file.read_text(), parse_constant=_not_json)  # strict JSON: no NaN / Infinity
            elif file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as handle:
                    assert handle.keys()
        record = json.loads((checkpoint / "trainer_state.json").read_text())
        assert record["step"] == int(checkpoint.name.split("-")[1]) and record["num_processes"] == 1
        # Accelerate's micro-batch counter restarts with each epoch (step 3: 2 batches into epoch 2).
        assert record["accelerator_step"] == record["batch_in_epoch"]


def _not_json(name):
    raise AssertionError(f"{name} is not JSON")


def test_resume_of_a_finished_run_does_nothing_more(straight):
    source, out, result = straight
    again = run_finetune(config(source, out, resume=True))
    assert again.steps == 6 and again.resumed_from_step == 6
    assert len([r for r in again.history if r["type"] == "train"]) == 6


def test_resume_with_other_settings_is_refused(straight):
    source, out, _ = straight
    with pytest.raises(UsageError, match="batch_size: 2 -> 4"):
        run_finetune(config(source, out, resume=True, batch_size=4))


def test_resume_without_a_checkpoint_starts_over(checkpoint, tmp_path):
    out = tmp_path / "run"
    result = run_finetune(config(checkpoint("blip2-itm"), out, resume=True, max_steps=1, val_manifest=None))
    assert result.resumed_from_step is None and result.steps == 1
