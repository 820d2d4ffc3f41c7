"""`blip caption | vqa | retrieval --output FILE` over folders and webdataset shards: the formats, the
output policy, resume (after a full disk, a torn journal line, kill -9), the refusals, and several
processes merged in input order."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blip_toolkit.jobs import inference as inference_module
from blip_toolkit.pipeline import run as run_module
from blip_toolkit.pipeline.journal import JournalSink, journal_files
from blip_toolkit.pipeline.outputs import read_output
from blip_toolkit.pipeline.outputs import run_directory as sidecar
from tests.builders.wds import photo_tars, write_tar

from ..launch import cpu_env, run_blip

GEN = ["--max-new-tokens", "5"]


@pytest.fixture
def tars(tmp_path, sample_images):
    return photo_tars(tmp_path / "wds", sample_images)


@pytest.fixture
def folder(tmp_path, sample_images):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, image in enumerate(sample_images):
        shutil.copy(image, root / ("sub" if i % 3 == 0 else "") / image.name)
    return root


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_formats_equal_stdout(cli, tiny_models, tars, tmp_path, one_thread):
    model = tiny_models["blip-caption"]
    pattern = str(tars[0].parent / "part-{000..002}.tar")
    stdout = cli("caption", pattern, "-m", model, *GEN, "-f", "jsonl")
    assert stdout.code == 0, stdout.stderr
    expected = _jsonl(stdout.stdout)
    assert [(r["shard"], r["key"]) for r in expected][2:4] == [("part-000", "0002"), ("part-001", "0003")]
    for ext in ("jsonl", "parquet", "tsv"):
        out = tmp_path / f"captions.{ext}"
        result = cli(
            "caption", pattern, "-m", model, *GEN, "--output", out, "-f", "json", "--num-workers", "2"
        )
        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["records"] == 8
        got = read_output(out)
        if ext == "tsv":
            assert out.read_text().splitlines()[0] == "shard\tkey\tcaption\terror"
            got = [{k: v for k, v in row.items() if v != ""} for row in got]
        assert got == expected, ext
        assert not journal_files(sidecar(out))  # the journal is gone, the run record stays
        assert json.loads((sidecar(out) / "blip_run.json").read_text())["status"] == "finished"


def test_vqa_question_and_retrieval_top_over_shards(cli, tiny_models, tars, tmp_path, one_thread):
    pattern = str(tars[0].parent / "part-{000..002}.tar")
    vqa_args = ["vqa", pattern, "--question", "what is this?", "-m", tiny_models["blip2-opt"], *GEN]
    expected = _jsonl(cli(*vqa_args, "-f", "jsonl").stdout)
    assert len(expected) == 8 and all(r["question"] == "what is this?" for r in expected)
    assert cli(*vqa_args, "--output", tmp_path / "a.tsv").code == 0
    rows = read_output(tmp_path / "a.tsv")
    assert [(r["shard"], r["key"], r["answer"]) for r in rows] == [
        (r["shard"], r["key"], r["answer"]) for r in expected
    ]

    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a cat\na photo of a dog\na red car\n")
    ret_args = ["retrieval", pattern, "--texts-file", texts, "--top", "2", "-m", tiny_models["blip-itm"]]
    expected = _jsonl(cli(*ret_args, "-f", "jsonl").stdout)
    assert cli(*ret_args, "--output", tmp_path / "r.parquet").code == 0
    got = read_output(tmp_path / "r.parquet")
    assert [len(r["results"]) for r in got] == [2] * 8
    assert got == expected
    tsv = cli(*ret_args, "--output", tmp_path / "r.tsv")
    assert tsv.code == 0
    rows = read_output(tmp_path / "r.tsv")
    assert [(r["key"], r["rank"], r["text"]) for r in rows] == [
        (r["key"], str(e["rank"]), e["text"]) for r in expected for e in r["results"]
    ]


def test_existing_output_is_refused_untouched(cli, tiny_models, folder, tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text("mine\n")
    result = cli("caption", folder, "-m", tiny_models["blip-caption"], "--output", out)
    assert result.code == 1 and "already exists" in result.stderr and out.read_text() == "mine\n"
    # An output of another format (no run state beside it) cannot be resumed either.
    resumed = cli("caption", folder, "-m", tiny_models["blip-caption"], "--output", out, "--resume")
    assert resumed.code == 1 and "no run state" in resumed.stderr and out.read_text() == "mine\n"
    assert cli("caption", folder, "-m", tiny_models["blip-caption"], "--output", tmp_path / "c.csv").code == 2


def test_full_disk_then_torn_line_then_resume(cli, tiny_models, folder, tmp_path, monkeypatch, one_thread):
    """ENOSPC after 3 records: the run stops with one line and keeps them; a torn last line (as a
    kill leaves) is dropped and redone; changed options are refused by name; --resume completes the
    run with exactly the records of an uninterrupted run."""
    model = tiny_models["blip-caption"]
    args = ["caption", folder, "-m", model, *GEN, "--batch-size", "2", "--num-workers", "0"]
    expected = _jsonl(cli(*args, "-f", "jsonl").stdout)
    out = tmp_path / "c.jsonl"
    original = JournalSink._write
    calls = {"n": 0}

    def full_disk(self, entry):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, entry)

    monkeypatch.setattr(JournalSink, "_write", full_disk)
    stopped = cli(*args, "--output", out)
    monkeypatch.setattr(JournalSink, "_write", original)
    assert stopped.code == 1 and not out.exists()
    error_lines = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(error_lines) == 1 and "No space left on device" in error_lines[0] and "--resume" in error_lines[0]
    )
    [journal] = journal_files(sidecar(out))
    lines = journal.read_text().splitlines()
    assert len(lines) == 3 and [json.loads(line)["record"] for line in lines] == expected[:3]
    with open(journal, "a") as handle:
        handle.write(json.dumps({"pos": [0, 3], "record": expected[3]})[:25])  # torn by a kill

    changed = cli(*args, "--output", out, "--resume", "--max-new-tokens", "6")
    assert changed.code == 2 and "max_new_tokens: 5 -> 6" in changed.stderr
    assert cli(*args, "--output", out).code == 1  # an unfinished run is there: --resume or --overwrite
    resumed = cli(*args, "--output", out, "--resume", "--batch-size", "3")  # the batch size is free
    assert resumed.code == 0, resumed.stderr
    assert "3 from earlier runs" in resumed.stderr
    assert read_output(out) == expected
    again = cli(*args, "--output", out, "--resume")
    assert again.code == 0 and "nothing to do" in again.stderr


def test_garbage_in_the_journal_is_refused(cli, tiny_models, folder, tmp_path, monkeypatch):
    out = tmp_path / "c.parquet"
    args = ["caption", folder, "-m", tiny_models["blip-caption"], *GEN, "--output", out]
    monkeypatch.setattr(run_module, "wait_for_shares", _interrupt)
    assert cli(*args).code == 1  # stopped after the journal was written, before the merge
    monkeypatch.undo()
    [journal] = journal_files(sidecar(out))
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], "not json at all", *lines[1:]]) + "\n")
    result = cli(*args, "--resume")
    assert result.code == 1 and f"{journal}:2: not a journal record" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def _interrupt(*args, **kwargs):
    from blip_toolkit.errors import BlipError

    raise BlipError("interrupted for the test")


def test_bad_sources(cli, tiny_models, tars, tmp_path, sample_images):
    model = tiny_models["blip-caption"]
    pipe = cli("caption", "pipe:cat x.tar", "-m", model)
    assert pipe.code == 2 and "--allow-pipe" in pipe.stderr
    missing = cli(
        "caption", str(tars[0].parent / "part-{000..003}.tar"), "-m", model, "--output", tmp_path / "m.jsonl"
    )
    assert missing.code == 1 and "part-003.tar: no such tar file" in missing.stderr
    assert not (tmp_path / "m.jsonl").exists() and not sidecar(tmp_path / "m.jsonl").exists()
    locked = cli("caption", tars[0], "-m", model, "--output", "/sys/blip-infer-test/out.jsonl")
    assert locked.code == 1 and "cannot write the output here" in locked.stderr
    assert len(locked.stderr.strip().splitlines()) == 1

    bad = write_tar(
        tmp_path / "bad.tar",
        [
            {"__key__": "ok", "jpg": sample_images[0].read_bytes()},
            {"__key__": "broken", "jpg": b"\xff\xd8 nope"},
        ],
    )
    result = cli("caption", bad, "-m", model, *GEN, "--output", tmp_path / "bad.jsonl")
    assert result.code == 3 and "1 of 2 image(s) failed" in result.stderr
    records = read_output(tmp_path / "bad.jsonl")
    assert "caption" in records[0] and "bad.tar#broken.jpg" in records[1]["error"]


class _Rank:
    """Accelerate's PartialState interface for one of two in-process ranks (threads)."""

    def __init__(self, rank: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0
        self.device, self._barrier = None, barrier

    def wait_for_everyone(self) -> None:
        self._barrier.wait(timeout=120)


def test_two_ranks_split_by_shard_merge_in_input_order(tiny_models, tars, tmp_path, monkeypatch, one_thread):
    """Two ranks (threads with a barrier) over 3 tars: rank 0 does tars 0 and 2, rank 1 tar 1; process
    0 merges them into what one process writes."""
    from blip_toolkit.jobs.inference import OutputJob, infer_to_file
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.pipeline.sources import open_inputs
    from blip_toolkit.predictors.caption import caption_task
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    options = CaptionOptions(batch_size=2, generation=GenerationOptions(max_new_tokens=5), num_workers=0)
    source = open_inputs([str(t) for t in tars])
    runner = open_runner(str(tiny_models["blip-caption"]), "caption", device="cpu")  # one load, shared

    def run(out: Path):
        return infer_to_file(
            lambda device: runner,
            lambda runner: caption_task(runner, options),
            source,
            OutputJob(str(out)),
            options.settings(),
            {"task": "caption"},
        )

    run(tmp_path / "one.jsonl")
    barrier, local = threading.Barrier(2), threading.local()
    monkeypatch.setattr(inference_module, "process_state", lambda cpu=False: local.state)
    shares, errors = {}, []

    def rank(r: int):
        local.state = _Rank(r, barrier)
        try:
            shares[r] = run(tmp_path / "two.jsonl")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert (shares[0].is_main, shares[1].is_main) == (True, False) and shares[1].records == 3
    assert read_output(tmp_path / "two.jsonl") == read_output(tmp_path / "one.jsonl")


def test_resume_after_kill_9(cli, tiny_models, tmp_path, folder, one_thread):
    """A real SIGKILL in the middle of a run; --resume gives exactly the uninterrupted records."""
    root = folder
    # Long beam-searched captions, one image a batch: slow enough to be killed in the middle.
    args = [
        "caption",
        root,
        "-m",
        tiny_models["blip-caption"],
        "--max-new-tokens",
        "24",
        "--min-new-tokens",
        "24",
        "--num-beams",
        "2",
        "--batch-size",
        "1",
        "--num-workers",
        "0",
    ]
    out = tmp_path / "k.jsonl"
    command = [sys.executable, "-m", "blip_toolkit", *map(str, args), "--output", str(out)]
    process = subprocess.Popen(command, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            files = journal_files(sidecar(out))
            if files and files[0].read_bytes().count(b"\n") >= 2:
                break
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL and not out.exists()
    done_before = files[0].read_bytes().count(b"\n")
    assert done_before < 8, "the run finished before the kill; the test needs a slower run"
    resumed = cli(*args, "--output", out, "--resume")
    assert resumed.code == 0, resumed.stderr
    expected = _jsonl(cli(*args, "-f", "jsonl").stdout)
    assert read_output(out) == expected


@pytest.mark.distributed
def test_two_processes_equal_one(cli, tiny_models, folder, tmp_path, one_thread):
    """`accelerate launch` with 2 gloo CPU processes over a folder (item i -> rank i % 2): process 0
    merges the shares into what one process writes."""
    args = [
        "caption",
        folder,
        "-m",
        tiny_models["blip-caption"],
        *GEN,
        "--batch-size",
        "2",
        "--num-workers",
        "0",
    ]
    two = tmp_path / "two.jsonl"
    result = run_blip(*args, "--output", two, "-f", "json", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["records"] == 8  # one summary, from process 0
    one = tmp_path / "one.jsonl"
    assert cli(*args, "--output", one).code == 0
    assert two.read_bytes() == one.read_bytes()


@pytest.mark.distributed
def test_partial_failure_under_accelerate_launch_is_in_the_run_state(
    tiny_models, folder, tmp_path, one_thread
):
    """torch's launcher turns process 0's exit 3 (some items failed) into 1; the run state says which:
    status "finished" with the failed count (docs/cli.md shows the check a pipeline uses)."""
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "two.jsonl"
    args = ["caption", folder, "-m", tiny_models["blip-caption"], *GEN, "--num-workers", "0", "-f", "json"]
    result = run_blip(*args, "--output", out, processes=2)
    assert result.returncode != 0  # 1 from the launcher, not 3
    state = json.loads((sidecar(out) / "blip_run.json").read_text())
    assert state["status"] == "finished" and state["counts"] == {"records": 9, "failed": 1}
    assert json.loads(result.stdout)["failed"] == 1  # the summary line says it too
    assert sum("error" in r for r in read_output(out)) == 1
