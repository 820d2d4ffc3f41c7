"""Fixtures of the train-dit / sample tests: synthetic embedding directories (built once per session)
and one CPU thread (tiny matrices run slower on two threads, badly so when the machine is shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import TINY, write_embeddings


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def emb(tmp_path_factory) -> Path:
    """24 images in 3 shards of 8 (float16)."""
    return write_embeddings(tmp_path_factory.mktemp("emb") / "emb", samples=24, shard_size=8)


@pytest.fixture(scope="session")
def emb_other_dims(tmp_path_factory) -> Path:
    """Same layout, target tokens of another width."""
    return write_embeddings(
        tmp_path_factory.mktemp("emb-dims") / "emb", samples=8, shard_size=8, dims={"target_dim": 20}
    )


def tiny_config(emb: Path, out: Path, **changes):
    """A TrainDiTConfig for the tiny DiT on `emb` (changes: dotted keys)."""
    from blip_toolkit.dit.train_config import load_train_config

    values = {
        **TINY,
        "data.dir": str(emb),
        "out": str(out),
        "train.steps": 6,
        "train.batch_size": 8,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.save_every": 0,
        "eval.every": 0,
        "eval.max_samples": 8,
        "eval.steps": 4,
        "flow.target_norm": "standardize",
    }
    values.update(changes)
    return load_train_config(None, values)


def cli_args(emb: Path, out: Path, *extra: str) -> list[str]:
    """`blip train-dit` arguments for the tiny DiT."""
    args = ["train-dit", "--data", str(emb), "--out", str(out)]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]
