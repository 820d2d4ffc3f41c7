"""The one implementation of `blip caption`, `blip vqa` and `blip retrieval`, from a list of images in
memory to millions of webdataset samples on several processes.

    source -> records in input order (runtime/stream.py: workers, windows, equal-length batches)
        -> stdout, or the journal and the final file (runtime/records.py)

A run to stdout streams one process's records (`stream_records`). A run to `--output FILE`
(`run_to_file`, `infer_to_file`) is resumable and multi-process: every process computes its share
into a journal of its own, and process 0 waits for all shares, merges them by position and writes
the file once. A task supplies what runtime/stream.py lists, and for file outputs `ranked_fields`
(retrieval) and `fingerprint()`.

Results do not depend on the number of processes: a process's share is fixed by position (file item
i -> rank i % N, tar t -> rank t % N) and process 0 merges the shares by position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_toolkit.engine.accelerate import process_state
from blip_toolkit.engine.outputs import RunRecord, check_output_file, check_resume_settings
from blip_toolkit.errors import BlipError, InputError, OutputExistsError, UsageError
from blip_toolkit.runtime.datasets import FileSource, Source, file_position
from blip_toolkit.runtime.loading import DEFAULT_MODELS, open_runner, resolve_source
from blip_toolkit.runtime.records import (
    JournalState,
    JournalWriter,
    check_writable,
    clear_journal,
    columns_for,
    journal_files,
    merged_records,
    output_format,
    read_journal,
    sidecar,
    write_output,
)
from blip_toolkit.runtime.stream import Progress, RunSettings, infer_records, process_chunks, share_chunks

logger = logging.getLogger("blip")


# ----------------------------------------------------------------------------- to a file


@dataclass
class OutputJob:
    """`--output FILE` with its policy flags."""

    output: str
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")


@dataclass
class Summary:
    """What a run wrote. `failed` records hold an error."""

    output: str
    records: int
    failed: int
    seconds: float = 0.0
    already_done: int = 0  # written by earlier attempts (--resume)
    is_main: bool = True

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "records": self.records,
            "failed": self.failed,
            "already_done": self.already_done,
            "seconds": round(self.seconds, 3),
        }


def model_fingerprint(source: str) -> dict:
    """The model part of the fingerprint: its source and the hash of its config.json."""
    resolved = resolve_source(source)
    config = json.dumps(resolved.config, sort_keys=True).encode("utf-8")
    where = str(Path(resolved.path).resolve()) if Path(resolved.path).is_dir() else resolved.path
    return {"model": where, "model_config_sha256": hashlib.sha256(config).hexdigest()}


def _kind(task_name: str) -> str:
    return f"blip-{task_name}"


def check_output(job: OutputJob, fingerprint: dict, task_name: str) -> tuple[Path, dict | None, JournalState]:
    """The output policy, read-only: an existing output or run state is refused without --resume or
    --overwrite; --resume needs the run state of the same kind, the same fingerprint and an intact
    journal. Returns the run directory, the previous run record and the journal (with --resume)."""
    output = Path(job.output)
    run_dir = sidecar(output)
    output_format(output)
    kind = _kind(task_name)
    if job.overwrite:
        check_output_file(output, overwrite=True)
        if run_dir.exists() and not (run_dir / "blip_run.json").is_file():
            raise OutputExistsError(f"{run_dir} exists and was not written by blip; refusing to clear it")
        check_writable(output.parent if str(output.parent) else Path("."))
        return run_dir, None, JournalState()
    if not job.resume:
        check_output_file(output, overwrite=False)
        if run_dir.exists():
            raise OutputExistsError(
                f"{output}: an unfinished run is in {run_dir}",
                hint="pass --resume to continue it or --overwrite to start over",
            )
        check_writable(output.parent if str(output.parent) else Path("."))
        return run_dir, None, JournalState()
    record = RunRecord(run_dir, kind).read() if run_dir.is_dir() else None
    if record is None:
        what = "exists but has" if output.exists() else "has"
        raise OutputExistsError(
            f"{output} {what} no run state of blip {task_name} beside it ({run_dir}/blip_run.json); "
            "nothing to resume",
            hint="start a new run without --resume, or pass --overwrite",
        )
    if record.get("kind") != kind:
        raise OutputExistsError(
            f"{run_dir} is a run of {str(record.get('kind')).removeprefix('blip-')}, not of {task_name}; "
            "cannot resume it"
        )
    check_resume_settings(record.get("config", {}), fingerprint, free=(), where=str(output), flag="--output")
    if record.get("status") == "finished" and not output.is_file():
        raise InputError(f"{output}: the run finished but the file is gone; start again with --overwrite")
    check_writable(run_dir)
    return run_dir, record, read_journal(run_dir)


def infer_to_file(
    open_runner: Callable[[Any], Any],
    make_task,
    source: Source,
    job: OutputJob,
    settings: RunSettings,
    fingerprint: dict,
) -> Summary:
    """The resumable, multi-process run behind `--output FILE`. `open_runner(device)` loads the
    model; `make_task(runner)` builds the task. Every process computes its share and journals it;
    process 0 waits for all shares and writes the final file in input order."""
    started = time.perf_counter()
    state = process_state(cpu=job.device == "cpu")
    output = Path(job.output)
    fmt = output_format(output)
    task_name = fingerprint["task"]
    # Every process reads the journal here, before the barriers: nobody appends to it until all have.
    run_dir, previous, journal = check_output(job, fingerprint, task_name)
    record = RunRecord(run_dir, _kind(task_name), enabled=state.is_main_process)
    if previous is not None and previous.get("status") == "finished":
        counts = previous.get("counts", {})
        logger.info("%s is complete (%d records); nothing to do", output, counts.get("records", 0))
        return Summary(
            str(output),
            counts.get("records", 0),
            counts.get("failed", 0),
            already_done=counts.get("records", 0),
            is_main=state.is_main_process,
        )

    device = job.device
    if device == "auto" and state.num_processes > 1 and state.device is not None:
        device = str(state.device)
    runner = open_runner(device)
    task = make_task(runner)

    state.wait_for_everyone()  # everyone has checked the output before process 0 changes anything
    if state.is_main_process:
        if job.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record.start({"config": fingerprint, "output": str(output), "format": fmt}, previous=previous)
    state.wait_for_everyone()
    attempt = journal.last_attempt + 1

    try:
        counts = _run_share(runner, task, source, settings, journal, run_dir, attempt, state)
    except BaseException as exc:
        record.fail(exc)
        raise
    if not state.is_main_process:
        return Summary(str(output), counts[0], counts[1], time.perf_counter() - started, is_main=False)

    try:
        _wait_for_shares(run_dir, attempt, state.num_processes)
        final = read_journal(run_dir)
        _check_complete(source, final, output)
        columns = columns_for(task_name, source.kind, getattr(task, "ranked_fields", ()))
        written = write_output(output, fmt, merged_records(journal_files(run_dir)), columns)
    except BaseException as exc:
        record.fail(exc)
        raise
    summary = {"records": written, "failed": final.failed}
    record.finish(counts=summary)
    clear_journal(run_dir)
    seconds = time.perf_counter() - started
    logger.info(
        "wrote %d record(s) to %s in %.1f s, %.2f items/s (%d failed%s)",
        written,
        output,
        seconds,
        (written - journal.records) / max(seconds, 1e-9),
        final.failed,
        f"; {journal.records} from earlier runs" if journal.records else "",
    )
    return Summary(str(output), written, final.failed, seconds, already_done=journal.records)


def _run_share(
    runner, task, source, settings, journal: JournalState, run_dir, attempt, state
) -> tuple[int, int]:
    """Compute this process's share into its journal file; returns (records, failed) written now."""
    chunks, total = share_chunks(
        source, task, settings, rank=state.process_index, world=state.num_processes, journal=journal
    )
    writer = JournalWriter(run_dir, attempt, state.process_index)
    progress = Progress(total, enabled=state.is_main_process)
    failed = 0
    try:
        for kind, a, b in process_chunks(runner, task, chunks, settings.batch_size):
            if kind == "end":
                writer.end(a, b)
                continue
            is_error = "error" in b
            if is_error:
                logger.warning("%s", b["error"])
            writer.record(a, b)
            failed += is_error
            progress.update(is_error)
            if progress.done % settings.batch_size == 0:
                writer.flush()
        writer.finish()
    except OSError as exc:
        writer.close()
        raise BlipError(
            f"{writer.path}: cannot write ({exc.strerror or exc}); stopped after {writer.written} record(s) "
            "of this run, which are kept: free space and rerun with --resume"
        ) from exc
    finally:
        writer.close()
        progress.close()
    return writer.written, failed


def _wait_for_shares(run_dir: Path, attempt: int, world: int, poll: float = 0.5) -> None:
    """Wait for every process's done marker of this attempt by polling the file system (a barrier
    would time out when one process has hours more work than another)."""
    last_log = time.monotonic()
    while True:
        missing = [
            rank
            for rank in range(world)
            if not (run_dir / "journal" / f"a{attempt:04d}-r{rank:05d}.done").is_file()
        ]
        if not missing:
            return
        if time.monotonic() - last_log > 60:
            logger.info("waiting for %d process(es) to finish their share", len(missing))
            last_log = time.monotonic()
        time.sleep(poll)


def _check_complete(source: Source, journal: JournalState, output: Path) -> None:
    if isinstance(source, FileSource):
        missing = [i for i in range(source.total) if not journal.has(file_position(i))]
        if missing:
            raise InputError(
                f"{output}: {len(missing)} item(s) have no record (first: {source.entries[missing[0]].image}); "
                "rerun with --resume"
            )
        return
    for unit, url in enumerate(source.urls):
        if not journal.complete(unit):
            raise InputError(f"{output}: {url} did not finish; rerun with --resume")


# ----------------------------------------------------------------------------- a command's run


def loader(
    task: str,
    model: str | None,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantize: str | None = None,
):
    """(model source, `load(device)`): the task's default checkpoint when `model` is None."""
    source = model or DEFAULT_MODELS[task]

    def load(device: str):
        return open_runner(
            source, task, device=device, dtype=dtype, trust_remote_code=trust_remote_code, quantize=quantize
        )

    return source, load


def stream_records(
    task: str,
    source: Source,
    options,
    make_task,
    *,
    model=None,
    device="auto",
    dtype="auto",
    trust_remote_code=False,
    quantize: str | None = None,
) -> Iterator[dict]:
    """The records of `source` in input order, without an output file (`blip caption ...` to stdout)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("several processes need --output FILE (process 0 merges their results there)")
    _, load = loader(task, model, dtype=dtype, trust_remote_code=trust_remote_code, quantize=quantize)
    runner = load(device)
    return infer_records(runner, make_task(runner), source, options.settings(), progress=True)


def run_to_file(
    task: str,
    source: Source,
    options,
    make_task,
    fingerprint: dict,
    job: OutputJob,
    *,
    model: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> Summary:
    """`--output FILE`: the resumable, multi-process run, with the fingerprint of everything that
    defines its records (the task's options, the model and its config, the inputs)."""
    name, load = loader(task, model, dtype=dtype, trust_remote_code=trust_remote_code, quantize=quantize)
    fingerprint = {
        **fingerprint,
        **({"quantize": quantize} if quantize else {}),
        **model_fingerprint(name),
        "max_pixels": options.max_pixels,
        "inputs": source.describe(),
    }
    return infer_to_file(load, make_task, source, job, options.settings(), fingerprint)
