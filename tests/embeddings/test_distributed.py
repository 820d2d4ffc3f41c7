"""Two CPU processes under `accelerate launch` write the same shards as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..launch import run_blip


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
    two = tmp_path / "two"
    result = run_blip("extract-embeddings", source, "--out", two, *options, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "by this process (rank 0 of 2)" in result.stderr  # really two ranks
    assert result.stdout.count("images") == 1  # only rank 0 reports

    # The single process runs with the thread count torchrun gives each rank (OMP_NUM_THREADS=1): CPU
    # matmuls round differently with another thread count, and bitwise equality is the claim here.
    one = tmp_path / "one"
    single = run_blip("extract-embeddings", source, "--out", one, *options)
    assert single.returncode == 0, single.stderr[-3000:]
    files_one, files_two = _files(one), _files(two)
    assert files_one.keys() == files_two.keys()
    # The run record holds start / finish times; what defines the data in it must be equal.
    run_one, run_two = (json.loads(files.pop("blip_run.json")) for files in (files_one, files_two))
    assert run_one["config"] == run_two["config"] and run_one["status"] == run_two["status"] == "finished"
    for name in files_one:  # byte-identical: shards, metadata, head, index.json, errors.jsonl
        assert files_one[name] == files_two[name], name
