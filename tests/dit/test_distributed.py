"""Two CPU processes (gloo) under `accelerate launch` train what one process trains with the same global
batch: the same losses step by step (the contrastive term's negatives gathered from every process),
the same eval metrics (main process), the same final weights; one summary, metrics written once. Condition dropout is on with 2 samples per process, so a process
sometimes has no conditioned sample at all, and sometimes no dropped one: the set of parameters that
get a gradient changes from step to step (DDP must look for unused ones); without dropout the null
condition never gets one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ..launch import run_blip
from .conftest import cli_args

pytestmark = pytest.mark.distributed


def _args(emb, out):
    return cli_args(
        emb,
        out,
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--set",
        "train.log_every=1",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "flow.cond_dropout=0.4",
        "--set",
        "data.eval_shards=1",
        "--set",
        "eval.max_samples=4",
        "--set",
        "eval.steps=3",
        "--set",
        "flow.target_norm=standardize",
        "--format",
        "json",
    )[1:]


def _history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(emb, tmp_path):
    from blip_toolkit.dit.config import FlowConfig
    from blip_toolkit.dit.data import global_noise

    # The run below does meet a process whose 2 samples both lost their condition.
    drops = [global_noise(k, 4, (16, 16), FlowConfig(cond_dropout=0.4), seed=0)[1] for k in range(6)]
    assert any(bool(d[:2].all() or d[2:].all()) for d in drops)
    single = run_blip("train-dit", *_args(emb, tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    double = run_blip("train-dit", *_args(emb, tmp_path / "two"), processes=2)
    assert double.returncode == 0, double.stderr

    summary = json.loads(double.stdout)  # one summary: only the main process prints
    assert summary["steps"] == 6
    assert "2 per process x 2 process(es)" in double.stderr and double.stderr.count("training a DiT") == 1

    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [r["type"] for r in one] == [r["type"] for r in two]  # each record once
    loss_one = [r["loss"] for r in one if r["type"] == "train"]
    loss_two = [r["loss"] for r in two if r["type"] == "train"]
    assert len(loss_one) == 6 and len(set(loss_one)) > 1
    assert loss_two == pytest.approx(loss_one, rel=1e-4, abs=1e-5)
    for key in ("val_loss", "vel_cos", "patch_cos", "global_cos"):
        got = [r[key] for r in two if r["type"] == "eval"]
        assert got == pytest.approx([r[key] for r in one if r["type"] == "eval"], rel=1e-3, abs=1e-4), key

    # The default objective's contrastive term (towards each image's caption) was on, its negatives
    # gathered from both processes: per-process negatives gave other losses (1.89 vs 4.31 at step 2).
    flow = json.loads((tmp_path / "two" / "config.json").read_text())["flow"]
    assert flow["contrastive_positive"] == "text" and flow["contrastive_weight"] == 0.5

    checkpoint = tmp_path / "two" / "checkpoints" / "step-6"
    assert {"rng-0.json", "rng-1.json", "ema.safetensors", "config.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    # Gradients agree to float rounding (the batch is split differently across matmuls); AdamW divides
    # by sqrt(v), so on elements whose gradient is nearly zero (zero-initialised modulation rows) that
    # rounding becomes a visible part of the update: a few elements differ by ~1e-5 after 6 steps.
    for name in ("model.safetensors", "ema.safetensors"):
        w1, w2 = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        for key in w1:
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-4, msg=key)


def test_two_processes_without_condition_dropout(emb, tmp_path):
    """cond_dropout = 0: the null condition never gets a gradient; DDP must not wait for it."""
    args = cli_args(
        emb,
        tmp_path / "run",
        "--steps",
        "3",
        "--batch-size",
        "16",
        "--eval-every",
        "0",
        "--set",
        "flow.cond_dropout=0",
        "--format",
        "json",
    )[1:]
    done = run_blip("train-dit", *args, processes=2)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 3
    assert "find_unused_parameters" not in done.stderr


def test_two_processes_train_a_learned_head_as_one_does(emb, tmp_path):
    """flow.contrastive_head = learned: the head is used outside the DiT's forward, yet its gradients
    are averaged over the processes like every other weight's; two processes end where one does."""
    learned = ("--set", "flow.contrastive_head=learned")
    single = run_blip("train-dit", *_args(emb, tmp_path / "one"), *learned)
    assert single.returncode == 0, single.stderr
    double = run_blip("train-dit", *_args(emb, tmp_path / "two"), *learned, processes=2)
    assert double.returncode == 0, double.stderr
    loss_one = [r["loss"] for r in _history(tmp_path / "one") if r["type"] == "train"]
    loss_two = [r["loss"] for r in _history(tmp_path / "two") if r["type"] == "train"]
    assert loss_two == pytest.approx(loss_one, rel=1e-4, abs=1e-5)
    w1, w2 = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    heads = [key for key in w1 if key.startswith("text_head.")]
    assert heads
    for key in heads:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-4, msg=key)
