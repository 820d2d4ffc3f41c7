"""Two CPU processes under `accelerate launch` write the same shards as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["tsv", "webdataset"])
def test_two_processes_equal_one(enc, photo_tsv, wds_dir, tmp_path, kind):
    source = str(photo_tsv) if kind == "tsv" else str(wds_dir / "part-{000..002}.tar")
    options = [
        "--cond-encoder",
        str(enc["blip2-opt"]),
        "--target-encoder",
        str(enc["clip"]),
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--tokens",
        "cls+patch",
        "--pool",
        "2",
        "--num-workers",
        "1",
    ]
    launcher = Path(sys.executable).with_name("accelerate")
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    two = tmp_path / "two"
    command = [
        str(launcher),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "blip_toolkit",
        "extract-embeddings",
        source,
        "--out",
        str(two),
        *options,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "by this process (rank 0 of 2)" in result.stderr  # really two ranks
    assert result.stdout.count("images") == 1  # only rank 0 reports

    # The single process runs with the thread count torchrun gives each rank (OMP_NUM_THREADS=1): CPU
    # matmuls round differently with another thread count, and bitwise equality is the claim here.
    one = tmp_path / "one"
    single = subprocess.run(
        [sys.executable, "-m", "blip_toolkit", "extract-embeddings", source, "--out", str(one), *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    files_one, files_two = _files(one), _files(two)
    assert files_one.keys() == files_two.keys()
    for name in files_one:  # byte-identical: shards, metadata, head, index.json, errors.jsonl
        assert files_one[name] == files_two[name], name
