"""Dataset inference: `blip caption`, `blip vqa` and `blip retrieval` from a list of images in memory
to millions of webdataset samples or Parquet rows on several processes, on the one dataset pipeline
(blip_toolkit/pipeline/):

    source -> units -> decoded chunks (DataLoader workers) -> the task's model -> records in input order
        -> stdout (`stream_records`), or the journal and the final file (`run_to_file`)

A run to `--output FILE` is resumable and multi-process: every process computes its share into a
journal of its own (pipeline/journal.py), and process 0 waits for all shares, merges them by position
and writes the file once. `--retry-failed` reruns only the records of a finished output that hold an
error and replaces them in place. A task (GenerationTask for caption / vqa, RetrievalTask) supplies
what pipeline/stream.py lists, and `ranked_fields` (retrieval).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from blip_toolkit.engine.accelerate import process_state
from blip_toolkit.engine.outputs import RunRecord, check_resume_settings
from blip_toolkit.errors import BlipError, InputError, OutputExistsError, UsageError
from blip_toolkit.models.loading import (
    LoadedModel,
    inspect_source,
    load_processor,
    open_spec,
    require_task,
    resolve_source,
)
from blip_toolkit.models.spec import LoadSpec
from blip_toolkit.pipeline import remote
from blip_toolkit.pipeline.items import Prepared
from blip_toolkit.pipeline.journal import (
    JournalSink,
    clear_journal,
    journal_records,
    last_attempt,
    read_failed,
    read_journal,
    write_failed,
)
from blip_toolkit.pipeline.outputs import (
    check_writable,
    columns_for,
    output_format,
    rewrite_output,
    run_directory,
    write_output,
)
from blip_toolkit.pipeline.ray_engine import RayOptions, actor_device
from blip_toolkit.pipeline.resume import ResumeState
from blip_toolkit.pipeline.run import Job, job_events, next_attempt, run_job
from blip_toolkit.pipeline.sources import FILE_UNIT, Source
from blip_toolkit.pipeline.stream import Progress, RunSettings

logger = logging.getLogger("blip")


@dataclass
class OutputJob:
    """`--output FILE` with its policy flags."""

    output: str
    resume: bool = False
    overwrite: bool = False
    retry_failed: bool = False
    device: str = "auto"  # where the model runs (run_to_file: the LoadSpec's)

    def __post_init__(self) -> None:
        self.output = str(self.output)
        if sum((self.resume, self.overwrite, self.retry_failed)) > 1:
            raise UsageError("--resume, --overwrite and --retry-failed exclude each other")


@dataclass
class Summary:
    """What a run wrote. `failed` records hold an error; `retried` were rerun by --retry-failed."""

    output: str
    records: int
    failed: int
    seconds: float = 0.0
    already_done: int = 0  # written by earlier attempts (--resume)
    retried: int = 0
    is_main: bool = True

    def to_dict(self) -> dict:
        out = {
            "output": self.output,
            "records": self.records,
            "failed": self.failed,
            "already_done": self.already_done,
            "seconds": round(self.seconds, 3),
        }
        if self.retried:
            out["retried"] = self.retried
        return out


def model_fingerprint(source: str) -> dict:
    """The model part of the fingerprint: its source and the hash of its config.json."""
    resolved = resolve_source(source)
    config = json.dumps(resolved.config, sort_keys=True).encode("utf-8")
    where = str(Path(resolved.path).resolve()) if Path(resolved.path).is_dir() else resolved.path
    return {"model": where, "model_config_sha256": hashlib.sha256(config).hexdigest()}


def _kind(task_name: str) -> str:
    return f"blip-{task_name}"


def make_record(task) -> Callable[[Prepared, Any], dict]:
    """The output record of a stream result: the item's naming fields and the task's result, or its
    error."""

    def record(item: Prepared, result: Any) -> dict:
        if result is None:
            return {**item.fields, **task.error_fields(item), "error": item.error}
        return {**item.fields, **result}

    return record


# ----------------------------------------------------------------------------- the output policy


def _exists(output: str) -> bool:
    return remote.exists(output) if remote.is_url(output) else Path(output).exists()


def check_output(job: OutputJob, fingerprint: dict, task_name: str) -> tuple[Path, dict | None]:
    """The output policy, read-only: an existing output or run state is refused without --resume,
    --overwrite or --retry-failed; those need the run state of the same kind and fingerprint.
    Returns the run directory and the previous run record (with --resume / --retry-failed)."""
    output = job.output
    shown = remote.redact_url(output)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (
        remote.is_url(output)
        and world > int(os.environ.get("LOCAL_WORLD_SIZE", world))
        and not os.environ.get("BLIP_RUN_DIR")
    ):
        raise UsageError(
            f"--output {shown} from several nodes: the run state of a remote output lives in a local folder; "
            "set BLIP_RUN_DIR to a folder every node shares"
        )
    run_dir = run_directory(output)
    output_format(output)
    kind = _kind(task_name)
    if not remote.is_url(output) and Path(output).is_dir():
        raise OutputExistsError(f"{output} is a directory; expected a file name")
    if job.overwrite:
        if run_dir.exists() and not (run_dir / "blip_run.json").is_file():
            raise OutputExistsError(f"{run_dir} exists and was not written by blip; refusing to clear it")
        _check_destination(output, run_dir)
        return run_dir, None
    if not job.resume and not job.retry_failed:
        if _exists(output):
            raise OutputExistsError(
                f"{shown} already exists",
                hint="pass --overwrite to replace it, or --retry-failed to rerun its failed items",
            )
        if run_dir.exists():
            raise OutputExistsError(
                f"{shown}: an unfinished run is in {run_dir}",
                hint="pass --resume to continue it or --overwrite to start over",
            )
        _check_destination(output, run_dir)
        return run_dir, None
    record = RunRecord(run_dir, kind).read() if run_dir.is_dir() else None
    flag = "--retry-failed" if job.retry_failed else "--resume"
    if record is None:
        what = "exists but has" if _exists(output) else "has"
        raise OutputExistsError(
            f"{shown} {what} no run state of blip {task_name} ({run_dir}/blip_run.json); nothing to "
            f"{'retry' if job.retry_failed else 'resume'}",
            hint=f"start a new run without {flag}, or pass --overwrite",
        )
    if record.get("kind") != kind:
        raise OutputExistsError(
            f"{run_dir} is a run of {str(record.get('kind')).removeprefix('blip-')}, not of {task_name}; "
            f"cannot {'retry' if job.retry_failed else 'resume'} it"
        )
    check_resume_settings(record.get("config", {}), fingerprint, free=(), where=shown, flag="--output")
    finished = record.get("status") == "finished"
    if finished and not _exists(output):
        raise InputError(f"{shown}: the run finished but the file is gone; start again with --overwrite")
    if job.retry_failed and not finished:
        raise OutputExistsError(f"{shown}: the run has not finished", hint="continue it with --resume first")
    check_writable(run_dir)
    return run_dir, record


def _check_destination(output: str, run_dir: Path) -> None:
    """The output's place can be written (local: its folder; remote: the run directory here, and the
    bucket or host answers)."""
    if remote.is_url(output):
        # The bucket must answer (a missing bucket is one line now, not after hours of work); the
        # object itself appears at the end, in one put.
        scheme, rest = output.split("://", 1)
        remote.check_readable(f"{scheme}://{rest.split('/', 1)[0]}/")
        check_writable(run_dir.parent)
        return
    parent = Path(output).parent
    check_writable(parent if str(parent) else Path("."))


def retry_state(source: Source, run_dir: Path) -> tuple[ResumeState, dict, dict[int, int]]:
    """What --retry-failed treats as done: every position except the failed ones (units without a
    failure are complete). Returns it, position -> output row of each failed record, and the ends of
    their units as the finished run knew them."""
    rows, ends = read_failed(run_dir)
    state = ResumeState()
    failed_units = {pos[0] for pos in rows}
    for unit in source.units:
        if unit.number not in failed_units:
            state.end(unit.number, 0)
            continue
        count = ends.get(unit.number, unit.size)
        if count is None:
            raise InputError(f"{run_dir}: no end recorded for unit {unit.number}; rerun with --overwrite")
        for offset in range(count):
            if (unit.number, offset) not in rows:
                state.add((unit.number, offset))
        state.end(unit.number, count)
    return read_journal(run_dir, state), rows, ends


# ----------------------------------------------------------------------------- to a file


def infer_to_file(
    open_runner: Callable[[Any], Any],
    make_task,
    source: Source,
    job: OutputJob,
    settings: RunSettings,
    fingerprint: dict,
    *,
    ray: RayOptions | None = None,
    open_preprocessing: Callable[[], Any] | None = None,
) -> Summary:
    """The resumable, multi-process run behind `--output FILE`. `open_runner(device)` loads the
    model; `make_task(runner)` builds the task. Every process computes its share and journals it;
    process 0 waits for all shares and writes the final file in input order. With `ray` the model
    runs in Ray actors and this process (the driver) loads only the preprocessing
    (`open_preprocessing()`, a runner without a model)."""
    started = time.perf_counter()
    state = process_state(cpu=job.device == "cpu")
    output, shown = job.output, remote.redact_url(job.output)
    fmt = output_format(output)
    task_name = fingerprint["task"]
    # Every process reads the run state here, before the barriers: nobody writes it until all have.
    run_dir, previous = check_output(job, fingerprint, task_name)
    record = RunRecord(run_dir, _kind(task_name), enabled=state.is_main_process)
    retry = None
    if job.retry_failed:
        resume, rows, ends = retry_state(source, run_dir)
        retry = (rows, ends)
        if not rows:
            logger.info("%s has no failed records; nothing to retry", shown)
            counts = previous.get("counts", {})
            return Summary(shown, counts.get("records", 0), 0, is_main=state.is_main_process)
    elif previous is not None and previous.get("status") == "finished":
        counts = previous.get("counts", {})
        logger.info("%s is complete (%d records); nothing to do", shown, counts.get("records", 0))
        return Summary(
            shown,
            counts.get("records", 0),
            counts.get("failed", 0),
            already_done=counts.get("records", 0),
            is_main=state.is_main_process,
        )
    else:
        resume = read_journal(run_dir) if job.resume else ResumeState()
    earlier = resume.records
    # Every process numbers the attempt before the barriers, while nobody writes the run directory.
    attempt = next_attempt(run_dir, last_attempt(run_dir))

    device = job.device
    if device == "auto" and state.num_processes > 1 and state.device is not None:
        device = str(state.device)
    factory = None
    if ray is not None:
        runner, factory = None, partial(actor_task, open_runner, make_task, actor_device(ray, device))
        task = make_task(open_preprocessing())
    else:
        runner = open_runner(device)
        task = make_task(runner)

    state.wait_for_everyone()  # everyone has checked the output before process 0 changes anything
    if state.is_main_process:
        if job.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if retry is None:
            record.start({"config": fingerprint, "output": shown, "format": fmt}, previous=previous)
    state.wait_for_everyone()

    sink = JournalSink(run_dir, attempt, state.process_index, resume, make_record(task))
    # A failed --retry-failed leaves the finished output as it was: its run stays finished.
    mark_failed = record.fail if retry is None else (lambda exc: None)
    try:
        shares = run_job(
            Job(source, task, resume, settings, run_dir, attempt, ray=ray, factory=factory),
            sink,
            state,
            runner,
        )
    except BaseException as exc:
        mark_failed(exc)
        raise
    if shares is None:
        return Summary(shown, sink.written, 0, time.perf_counter() - started, is_main=False)

    try:
        columns = columns_for(task_name, source.kind, getattr(task, "ranked_fields", ()))
        if retry is None:
            final = read_journal(run_dir)
            _check_complete(source, final, shares.unread, shown)
            written, failed = _write_final(output, fmt, run_dir, columns)
        else:
            written, failed = _rewrite_retried(output, fmt, run_dir, columns, source, shares.unread, *retry)
        record.finish(counts={"records": written, "failed": failed})
    except OSError as exc:  # a full disk while finishing: the journal is kept, --resume finishes it
        error = BlipError(
            f"{shown}: cannot finish the output ({exc.strerror or exc}); the journal is kept: free space and "
            "rerun with --resume"
        )
        mark_failed(error)
        raise error from exc
    except BaseException as exc:
        mark_failed(exc)
        raise
    clear_journal(run_dir)
    seconds = time.perf_counter() - started
    done_now = shares.records
    if retry is None:
        logger.info(
            "wrote %d record(s) to %s in %.1f s, %.2f items/s (%d failed%s)",
            written,
            shown,
            seconds,
            done_now / max(seconds, 1e-9),
            failed,
            f"; {earlier} from earlier runs" if earlier else "",
        )
        return Summary(shown, written, failed, seconds, already_done=earlier)
    logger.info(
        "retried %d failed record(s) of %s in %.1f s: %d still failed", len(retry[0]), shown, seconds, failed
    )
    return Summary(shown, written, failed, seconds, retried=len(retry[0]))


def _check_complete(source: Source, journal: ResumeState, unread: list[tuple[int, str]], shown: str) -> None:
    """Every unit must be complete before the file is written; else one line and exit 1, the journal
    kept for --resume."""
    missing = [unit for unit in source.units if not journal.complete(unit.number)]
    if not missing:
        return
    reasons = dict(unread)
    first = missing[0]
    why = reasons.get(first.number) or f"{_unit_label(first)} did not finish"
    raise InputError(
        f"{shown}: {len(missing)} unit(s) of the input did not finish (first: {why}); the rest is kept: "
        "rerun with --resume"
    )


def _unit_label(unit) -> str:
    if unit.kind == "files":
        return f"items {unit.start}-{unit.start + (unit.size or 0) - 1}"
    return remote.redact_url(unit.url)


def _write_final(output: str, fmt: str, run_dir: Path, columns) -> tuple[int, int]:
    """The output from the journal in input order, and failed.jsonl (row and position of each failed
    record, for --retry-failed); returns (records, failed)."""
    failed_rows: list = []
    ends = read_journal(run_dir).ends

    def records() -> Iterator[dict]:
        for row, (pos, record) in enumerate(journal_records(run_dir)):
            if "error" in record:
                failed_rows.append((row, pos))
            yield record

    written = write_output(output, fmt, records(), columns)
    try:
        write_failed(run_dir, failed_rows, ends)
    except OSError as exc:
        raise BlipError(
            f"{run_dir}: cannot write the run state ({exc.strerror or exc}); free space and rerun with --resume"
        ) from exc
    return written, len(failed_rows)


def _rewrite_retried(output, fmt, run_dir, columns, source, unread, rows, ends) -> tuple[int, int]:
    """--retry-failed: the rerun records replace the failed ones in place; failed.jsonl then lists the
    ones still failing."""
    journal = read_journal(run_dir)
    for unit, count in journal.ends.items():
        if unit in ends and ends[unit] != count:
            raise InputError(
                f"{_unit_label(source.units[unit])} changed since the run ({ends[unit]} positions, now "
                f"{count}); its records cannot be replaced in place: rerun it with --overwrite"
            )
    replacements: dict[int, dict] = {}
    still: list = []
    for pos, record in journal_records(run_dir):
        if pos in rows:
            replacements[rows[pos]] = record
            if "error" in record:
                still.append((rows[pos], pos))
    missing = [pos for pos in rows if rows[pos] not in replacements]
    if missing:
        reasons = dict(unread)
        why = reasons.get(missing[0][0]) or f"position {missing[0]} was not redone"
        raise InputError(
            f"{remote.redact_url(output)}: {len(missing)} failed item(s) were not redone (first: {why}); rerun with --retry-failed"
        )
    written = rewrite_output(output, fmt, replacements, columns)
    write_failed(run_dir, sorted(still), ends)
    return written, len(still)


# ----------------------------------------------------------------------------- a command's run


def actor_task(open_runner, make_task, device: str):
    """(runner, task) in a Ray actor: the model loaded where it runs (module-level, so Ray can ship it)."""
    runner = open_runner(device)
    return runner, make_task(runner)


def preprocessing_runner(
    source: str, task: str, *, trust_remote_code: bool = False, quantize: str | None = None
):
    """A runner with the checkpoint's processor and family but no model: what a task needs to build
    its encoder (the decoding half) in a process that never runs the model (the Ray driver)."""
    resolved, family = inspect_source(source)
    require_task(family, task, source)
    processor = load_processor(resolved, trust_remote_code=trust_remote_code)
    loaded = LoadedModel(source, family, None, processor, torch.device("cpu"), torch.float32, quantize)
    return SimpleNamespace(loaded=loaded)


def loader(task: str, spec: LoadSpec):
    """(model source, `load(device)`, `preprocessing()`) for `task` as `spec` says (the task's default
    checkpoint without --model)."""
    source = spec.source(task)
    preprocessing = partial(
        preprocessing_runner, source, task, trust_remote_code=spec.trust_remote_code, quantize=spec.quantize
    )
    return source, partial(_load_on, spec, task), preprocessing


def _load_on(spec: LoadSpec, task: str, device: str):
    return open_spec(spec, task, device=device)


def infer_records(
    runner,
    task,
    source: Source,
    settings: RunSettings,
    *,
    progress: bool = False,
    ray: RayOptions | None = None,
    factory=None,
) -> Iterator[dict]:
    """Every record of `source` in input order, computed here or on Ray (stdout and the Python API).
    A unit that could not be read (a remote file) is one error record."""
    record = make_record(task)
    meter = Progress(source.total, enabled=progress, every=float("inf"))
    spool = Path(tempfile.mkdtemp(prefix="blip-spool-"))
    job = Job(source, task, ResumeState(), settings, spool, 0, ray=ray, factory=factory)
    try:
        for kind, a, b in job_events(job, source.units, runner, spool):
            if kind == "record":
                out = record(a, b)
                meter.update("error" in out)
                yield out
            elif kind == "failed":
                unit = source.units[a]
                meter.update(True)
                yield {"shard": unit.name, "key": None, "error": b}
    finally:
        meter.close()
        shutil.rmtree(spool, ignore_errors=True)
    if progress:
        logger.info("%s", meter.summary())


def stream_records(
    prediction, source: Source, load: LoadSpec, ray: RayOptions | None = None
) -> Iterator[dict]:
    """The records of `source` in input order, without an output file (`blip caption ...` to stdout).
    `prediction`: the task, its options and how to make its batch task (jobs/predict.py)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("several processes need --output FILE (process 0 merges their results there)")
    _, open_on, preprocessing = loader(prediction.task, load)
    settings = prediction.options.settings()
    if ray is not None:
        factory = partial(actor_task, open_on, prediction.make_task, actor_device(ray, load.device))
        task = prediction.make_task(preprocessing())
        return infer_records(None, task, source, settings, progress=True, ray=ray, factory=factory)
    runner = open_on(load.device)
    return infer_records(runner, prediction.make_task(runner), source, settings, progress=True)


def run_to_file(
    prediction, source: Source, load: LoadSpec, job: OutputJob, ray: RayOptions | None = None
) -> Summary:
    """`--output FILE`: the resumable, multi-process run, with the fingerprint of everything that
    defines its records (the task's options, the model and its config, the inputs). `ray`: run the
    model in Ray actors (pipeline/ray_engine.py)."""
    name, open_on, preprocessing = loader(prediction.task, load)
    fingerprint = {
        **prediction.fingerprint,
        **({"quantize": load.quantize} if load.quantize else {}),
        **model_fingerprint(name),
        "max_pixels": prediction.options.max_pixels,
        "inputs": source.describe(),
        "unit_size": FILE_UNIT if source.kind == "files" else None,
    }
    return infer_to_file(
        open_on,
        prediction.make_task,
        source,
        dataclasses.replace(job, device=load.device),
        prediction.options.settings(),
        fingerprint,
        ray=ray,
        open_preprocessing=preprocessing,
    )
