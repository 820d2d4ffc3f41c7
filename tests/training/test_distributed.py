"""Two CPU processes (gloo) under `accelerate launch` train exactly what one process trains with the
same global batch: the same losses step by step, the same validation loss (gathered), the same
weights. Only the main process writes metrics and prints the summary. Checkpoints under DDP: one RNG
state per process, the rest written once, and a load that fails on one process fails on all."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ..launch import run_blip, run_script
from .helpers import SAMPLES

pytestmark = pytest.mark.distributed


def _args(source, out, batch_size):
    return [
        "finetune",
        str(SAMPLES / "captions.tsv"),
        "--task",
        "caption",
        "--model",
        str(source),
        "--output-dir",
        str(out),
        "--val-manifest",
        str(SAMPLES / "captions.tsv"),
        "--batch-size",
        str(batch_size),
        "--max-steps",
        "4",
        "--lr",
        "5e-3",
        "--warmup-steps",
        "1",
        "--format",
        "json",
    ]


def _history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(checkpoint, tmp_path):
    source = checkpoint("blip-caption")
    single = run_blip(*_args(source, tmp_path / "one", 4))
    assert single.returncode == 0, single.stderr
    double = run_blip(*_args(source, tmp_path / "two", 2), processes=2)
    assert double.returncode == 0, double.stderr

    summary = json.loads(double.stdout)  # one summary: only the main process prints
    assert summary["steps"] == 4
    assert "2 process(es)" in double.stderr and double.stderr.count("fine-tuning ") == 1

    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [r["type"] for r in one] == [r["type"] for r in two]  # the main process wrote each record once
    train_one = [r["loss"] for r in one if r["type"] == "train"]
    train_two = [r["loss"] for r in two if r["type"] == "train"]
    assert len(train_one) == 4
    assert train_two == pytest.approx(train_one, rel=1e-4, abs=1e-5)
    val_one = [r["val_loss"] for r in one if r["type"] == "eval"]
    val_two = [r["val_loss"] for r in two if r["type"] == "eval"]
    assert val_two == pytest.approx(val_one, rel=1e-4, abs=1e-5)

    # Each process wrote its own RNG state; everything else once, by the main process. No pickles.
    checkpoint = tmp_path / "two" / "checkpoints" / "step-4"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "COMPLETE",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng-0.json",
        "rng-0.safetensors",
        "rng-1.json",
        "rng-1.safetensors",
        "scheduler.json",
        "trainer_state.json",
    ]

    w1, w2 = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "two" / "model.safetensors")),
    )
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)


CHECKPOINT_SCRIPT = """
import json, random, sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from blip_toolkit.errors import TrainingError
from blip_toolkit.engine.checkpoint import CheckpointManager


def draws(generator):
    return [random.random(), float(np.random.rand()), torch.rand(2).tolist(),
            torch.rand(2, generator=generator).tolist()]


root = Path(sys.argv[1])
acc = Accelerator(cpu=True)
rank = acc.process_index
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
# Different streams per process, as dropout and sampling have after a per-rank seed.
random.seed(rank)
np.random.seed(rank)
torch.manual_seed(100 + rank)
generator = torch.Generator().manual_seed(rank)
acc.backward(model(torch.randn(2, 4)).sum())
optimizer.step()
manager = CheckpointManager(root)
objects = dict(model=model, optimizer=optimizer, generators={"timesteps": generator})
path = manager.save(acc, 1, {"written_by": rank}, **objects)
files = sorted(p.name for p in path.iterdir())
unwrapped = acc.unwrap_model(model)
weights = {k: v.clone() for k, v in unwrapped.state_dict().items()}
expected = draws(generator)
with torch.no_grad():
    for param in model.parameters():
        param.add_(1.0)
state = manager.load(acc, path, **objects)
result = {"ddp": type(model).__name__, "files": files, "expected": expected, "got": draws(generator),
          "same_weights": all(torch.equal(weights[k], v) for k, v in unwrapped.state_dict().items()),
          "written_by": state["written_by"]}
acc.wait_for_everyone()
if rank == 1:
    (path / "rng-1.json").unlink()
acc.wait_for_everyone()
try:
    manager.load(acc, path, **objects)
except TrainingError as exc:
    result["failure"] = str(exc)
(root / f"result-{rank}.json").write_text(json.dumps(result))
# Leave together, with the process group torn down: a rank exiting while gloo is still up can abort
# ("terminate called without an active exception").
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def test_checkpoints_under_ddp_keep_one_rng_state_per_process(tmp_path):
    script = tmp_path / "checkpoint_ddp.py"
    script.write_text(CHECKPOINT_SCRIPT)
    done = run_script(script, tmp_path / "checkpoints")
    assert done.returncode == 0, done.stderr
    results = [json.loads((tmp_path / "checkpoints" / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["ddp"] == "DistributedDataParallel"
        assert result["files"] == [
            "COMPLETE",
            "model.safetensors",
            "optimizer.json",
            "optimizer.safetensors",
            "rng-0.json",
            "rng-0.safetensors",
            "rng-1.json",
            "rng-1.safetensors",
            "trainer_state.json",
        ]
        assert result["same_weights"] and result["written_by"] == 0  # the main process wrote the shared files
        assert result["got"] == result["expected"], f"rank {rank}: its own RNG streams continue"
    assert results[0]["expected"] != results[1]["expected"]  # each process got its own state back
    # A load that fails on one process fails on all (none is left waiting at the next collective).
    assert "rng-1.json is missing" in results[1]["failure"]
    assert "another process failed to load" in results[0]["failure"]
