"""A full disk for real: the output and its run directory on a small tmpfs (mounted by the test; it
needs root, as CI has, and is skipped with the reason otherwise; tests/cli/test_infer_dataset.py
injects ENOSPC where mounting is impossible). ENOSPC in the journal or in the final write stops the run
with one line and exit 1, leaves no half-written output, and --resume after freeing space gives
exactly one record per item, equal to an uninterrupted run."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blip_toolkit.jobs import inference as inference_module
from blip_toolkit.pipeline.journal import journal_files
from blip_toolkit.pipeline.outputs import read_output, run_directory

GEN = ["--max-new-tokens", "5", "--batch-size", "2", "--num-workers", "0"]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a ballast file until the disk is full; returns it (delete it to free the space)."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush on close
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return ballast


@pytest.fixture
def photos(tmp_path, sample_images):
    """40 images (the samples, five times over), so the journal spans several tmpfs pages."""
    root = tmp_path / "photos"
    root.mkdir()
    for copy in range(5):
        for image in sample_images:
            shutil.copy(image, root / f"{copy}-{image.name}")
    return root


def _one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_full_disk_in_the_journal_then_resume(cli, tiny_models, photos, small_disk, one_thread):
    args = ["caption", photos, "-m", tiny_models["blip-caption"], *GEN]
    expected = read_output_of(cli, args, small_disk.parent / "reference.jsonl")
    out = small_disk / "captions.jsonl"
    run_dir = run_directory(out)
    filled: list[Path] = []

    def fill_after_three_records():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            files = journal_files(run_dir)
            if files and files[0].read_bytes().count(b"\n") >= 3:
                filled.append(fill(small_disk))
                return
            time.sleep(0.005)

    thread = threading.Thread(target=fill_after_three_records)
    thread.start()
    stopped = cli(*args, "--output", out)
    thread.join()
    assert filled, "the run ended before the disk was filled"
    assert stopped.code == 1
    line = _one_error_line(stopped)
    assert "No space left on device" in line and "--resume" in line
    assert not out.exists()
    kept = sum(f.read_bytes().count(b"\n") for f in journal_files(run_dir))
    assert 3 <= kept < len(expected)

    filled[0].unlink()
    resumed = cli(*args, "--output", out, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert read_output(out) == expected  # exactly one record per item, in input order
    assert sorted(p.name for p in small_disk.iterdir()) == ["captions.jsonl", "captions.jsonl.blip-run"]


def test_full_disk_in_the_final_write_then_resume(
    cli, tiny_models, photos, small_disk, one_thread, monkeypatch
):
    args = ["caption", photos, "-m", tiny_models["blip-caption"], *GEN]
    expected = read_output_of(cli, args, small_disk.parent / "reference.parquet")
    out = small_disk / "captions.parquet"
    filled: list[Path] = []
    write = inference_module.write_output

    def full_before_the_output(*a, **k):
        filled.append(fill(small_disk))
        return write(*a, **k)

    monkeypatch.setattr(inference_module, "write_output", full_before_the_output)
    stopped = cli(*args, "--output", out)
    monkeypatch.undo()
    assert stopped.code == 1
    line = _one_error_line(stopped)
    assert "cannot write the output" in line and "--resume" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast", "captions.parquet.blip-run"]

    filled[0].unlink()
    resumed = cli(*args, "--output", out, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert read_output(out) == expected


def read_output_of(cli, args, out) -> list[dict]:
    result = cli(*args, "--output", out)
    assert result.code == 0, result.stderr
    records = read_output(out)
    os.unlink(out)
    shutil.rmtree(run_directory(out))
    return records
