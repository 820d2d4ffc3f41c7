"""Two CPU processes (gloo) under `accelerate launch` train exactly what one process trains with the
same global batch: the same losses step by step, the same validation loss (gathered), the same
weights. Only the main process writes metrics and prints the summary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import SAMPLES

pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # ACCELERATE_USE_CPU with --multi_gpu starts N gloo processes (`--cpu --num_processes 2` starts one).
    env.update(ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _args(source, out, batch_size):
    return ["finetune", str(SAMPLES / "captions.tsv"), "--task", "caption", "--model", str(source),
            "--output-dir", str(out), "--val-manifest", str(SAMPLES / "captions.tsv"), "--batch-size",
            str(batch_size), "--max-steps", "4", "--lr", "5e-3", "--warmup-steps", "1", "--format", "json"]


def _history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(checkpoint, tmp_path):
    source = checkpoint("blip-caption")
    single = subprocess.run([sys.executable, "-m", "blip_toolkit", *_args(source, tmp_path / "one", 4)],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert single.returncode == 0, single.stderr
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "blip_toolkit", *_args(source, tmp_path / "two", 2)]
    double = subprocess.run(launch, capture_output=True, text=True, env=_env(), timeout=300)
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

    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
