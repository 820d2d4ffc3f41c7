"""kill -9 in the middle of a run over a Parquet file and over the same file on a local S3 server,
then --resume: the output equals an uninterrupted run, record for record (three trials each, killed
at different points). End-to-end tier (`make test-e2e`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from blip_toolkit.pipeline.journal import journal_files
from blip_toolkit.pipeline.outputs import read_output, run_directory

from ..launch import cpu_env

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# Long beam-searched captions, one image a batch: slow enough to be killed in the middle.
SLOW = ["--max-new-tokens", "24", "--min-new-tokens", "24", "--num-beams", "2", "--batch-size", "1"]


@pytest.fixture
def table(tmp_path, sample_images):
    """24 rows (the samples three times), row groups of 4, a key column."""
    images = [p.read_bytes() for p in sample_images] * 3
    keys = [f"k{i:02d}" for i in range(len(images))]
    path = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"key": keys, "image": pa.array(images, pa.binary())}), path, row_group_size=4)
    return path


def _records(run_dir) -> int:
    """Complete record lines in the journal (a torn last line is not one)."""
    return sum(
        line.startswith(b'{"pos"')
        for f in journal_files(run_dir)
        for line in f.read_bytes().split(b"\n")[:-1]
    )


def _kill_after(command: list[str], run_dir, lines: int) -> int:
    """Start `command`, SIGKILL it once its journal holds `lines` records; the records it had."""
    process = subprocess.Popen(command, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            files = journal_files(run_dir)
            if files and _records(run_dir) >= lines:
                break
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    return _records(run_dir)


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["parquet", "s3"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(
    cli, tiny_models, table, s3, tmp_path, where, one_thread
):
    source = str(table)
    if where == "s3":
        bucket = s3.create_bucket()
        s3.upload(bucket, "data/photos.parquet", table)
        source = f"s3://{bucket}/data/photos.parquet"
    args = [
        "caption",
        source,
        "-m",
        str(tiny_models["blip-caption"]),
        *SLOW,
        "--key-column",
        "key",
        "--num-workers",
        "0",
    ]
    reference = tmp_path / "reference.jsonl"
    assert cli(*args, "--output", reference).code == 0
    expected = read_output(reference)
    assert len(expected) == 24 and all("caption" in r for r in expected)
    for trial, kill_at in enumerate((2, 9, 17)):
        out = tmp_path / f"killed-{trial}.jsonl"
        command = [sys.executable, "-m", "blip_toolkit", *args, "--output", str(out)]
        done = _kill_after(command, run_directory(out), kill_at)
        assert kill_at <= done < 24 and not out.exists(), (trial, done)
        resumed = cli(*args, "--output", out, "--resume")
        assert resumed.code == 0, resumed.stderr
        assert f"{done} from earlier runs" in resumed.stderr
        assert read_output(out) == expected, trial
