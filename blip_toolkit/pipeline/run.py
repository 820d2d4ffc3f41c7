"""One process's share of a dataset job, and how the processes of a job meet.

Unit u belongs to process u % N, so 1 or N processes compute the same records; each process runs
its share (`run_share`) into its own sink and then leaves a share marker for this attempt
(`shares/a0001-r00000.done` in the run directory). Process 0 waits for every marker by polling the
file system (a barrier would time out when one process has hours more work than another) and then
finishes the job (merges the records, writes the index).

A sink receives the stream's events and persists them; it also says what earlier attempts finished
(`resume`, a ResumeState), which the share skips:
- `record(item, result) -> bool` (True when the item failed), `end(unit, count)`, `failed(unit, message)`
  (a unit that could not be read: left for --resume), `flush()` (after every batch of records),
  `close(ok)` (the share ended; `ok` False on an exception).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from blip_toolkit.errors import UsageError
from blip_toolkit.fsutil import atomic_write, fsync_path
from blip_toolkit.pipeline.items import Prepared
from blip_toolkit.pipeline.ray_engine import RayOptions, ray_events
from blip_toolkit.pipeline.resume import ResumeState
from blip_toolkit.pipeline.sources import Source, Unit
from blip_toolkit.pipeline.staging import Stager
from blip_toolkit.pipeline.stream import (
    Progress,
    RunSettings,
    UnitStream,
    chunk_loader,
    process_chunks,
    worker_count,
)

logger = logging.getLogger("blip")

SHARES_DIR = "shares"
_SHARE_NAME = re.compile(r"^a(\d{4,})-r(\d{5,})\.done$")


class Sink(Protocol):
    resume: ResumeState

    def record(self, item: Prepared, result: Any) -> bool: ...

    def end(self, unit: int, count: int) -> None: ...

    def failed(self, unit: int, message: str) -> None: ...

    def flush(self) -> None: ...

    def close(self, ok: bool) -> None: ...


@dataclass
class ShareResult:
    """What this process did in this attempt: records written, of which failed, and the units that
    could not be read ((unit, message))."""

    records: int = 0
    failed: int = 0
    unread: list[tuple[int, str]] = field(default_factory=list)


def share_units(source: Source, resume: ResumeState, rank: int, world: int) -> list[Unit]:
    """The units of process `rank` of `world` that earlier attempts did not complete."""
    return [u for u in source.units[rank::world] if not resume.complete(u.number)]


def pending_items(units: list[Unit], resume: ResumeState) -> int | None:
    """How many items of `units` are still to do, when every unit's size is known."""
    if any(u.size is None for u in units):
        return None
    return sum(u.size - resume.offsets(u.number).count for u in units)


def local_events(
    runner,
    task,
    source: Source,
    units: list[Unit],
    resume: ResumeState,
    settings: RunSettings,
    spool,
    *,
    part_size: int | None = None,
):
    """The stream's events for `units` computed in this process (DataLoader workers decode, the model
    runs here). `part_size`: chunks never cross a multiple of it (pipeline/stream.py ChunkCounter)."""
    total = pending_items(units, resume)
    workers = worker_count(settings, units, total)
    dataset = UnitStream(
        source, units, task.encoder, resume, settings.batch_size, settings.max_pixels, spool, part_size
    )
    with Stager(spool, [u.url for u in units if u.staged], max(workers, 1)):
        yield from process_chunks(runner, task, chunk_loader(dataset, workers), settings.batch_size)


def run_share(
    events: Iterator[tuple[str, Any, Any]], sink: Sink, *, total: int | None, progress: bool, every: int
) -> ShareResult:
    """Route the stream's `events` into `sink`, with progress on stderr; `every` records a flush."""
    result = ShareResult()
    meter = Progress(total, enabled=progress)
    ok = False
    try:
        for kind, a, b in events:
            if kind == "record":
                failed = sink.record(a, b)
                result.records += 1
                result.failed += failed
                meter.update(failed)
                if result.records % every == 0:
                    sink.flush()
            elif kind == "end":
                sink.end(a, b)
            else:
                logger.warning("%s (left for --resume)", b)
                sink.failed(a, b)
                result.unread.append((a, b))
        ok = True
    finally:
        meter.close()
        sink.close(ok)
    return result


# ----------------------------------------------------------------------------- processes of a job


@dataclass
class Job:
    """One dataset job as the pipeline runs it: what to read, the task, what earlier attempts did, how
    to run, and where the run state lives (share markers, the spool of remote files)."""

    source: Source
    task: Any
    resume: ResumeState
    settings: RunSettings
    run_dir: Path
    attempt: int
    part_size: int | None = None  # chunks never cross a multiple of it (extract-embeddings' shards)
    ray: RayOptions | None = None  # --engine ray: where, and the actors' factory of (runner, task)
    factory: Callable[[], tuple[Any, Any]] | None = None


def job_events(job: Job, units: list[Unit], runner=None, spool: Path | None = None):
    """The stream's events for `units`: computed here (the local engine) or on Ray (`job.ray`)."""
    if job.ray is not None:
        done = {u.number: job.resume.offsets(u.number) for u in units}
        return ray_events(
            job.ray,
            job.factory,
            job.task.encoder,
            job.source,
            units,
            done,
            batch_size=job.settings.batch_size,
            max_pixels=job.settings.max_pixels,
            part_size=job.part_size,
        )
    return local_events(
        runner, job.task, job.source, units, job.resume, job.settings, spool, part_size=job.part_size
    )


def run_job(job: Job, sink: Sink, state, runner=None) -> ShareResult | None:
    """This process's share of `job` into `sink`, then its share marker; on process 0, once every
    process has marked its share, the shares added up (None on the other processes). `state` is the
    job's process state (rank, world size, main process)."""
    rank, world = state.process_index, state.num_processes
    if job.ray is not None and world > 1:
        raise UsageError("--engine ray runs from one driver; start it without accelerate launch")
    units = share_units(job.source, job.resume, rank, world)
    events = job_events(job, units, runner, job.run_dir / f".spool-r{rank:05d}")
    total = pending_items(units, job.resume)
    share = run_share(
        events, sink, total=total, progress=state.is_main_process, every=job.settings.batch_size
    )
    mark_share_done(job.run_dir, job.attempt, rank, share)
    if not state.is_main_process:
        return None
    wait_for_shares(job.run_dir, job.attempt, world)
    shares = read_shares(job.run_dir, job.attempt, world)
    shutil.rmtree(job.run_dir / SHARES_DIR, ignore_errors=True)  # every process is done with them
    return shares


def next_attempt(run_dir: Path, *others: int) -> int:
    """The number of a new attempt: one more than any attempt recorded in `run_dir` (or in `others`)."""
    directory = run_dir / SHARES_DIR
    seen = (
        [int(m.group(1)) for p in directory.glob("*.done") if (m := _SHARE_NAME.match(p.name))]
        if directory.is_dir()
        else []
    )
    return max([0, *seen, *others]) + 1


def mark_share_done(run_dir: Path, attempt: int, rank: int, result: ShareResult) -> None:
    """Process `rank` finished its share of `attempt` (its counts and unread units, for process 0)."""
    directory = run_dir / SHARES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"a{attempt:04d}-r{rank:05d}.done"
    with atomic_write(path) as handle:
        json.dump({"records": result.records, "failed": result.failed, "unread": result.unread}, handle)
    fsync_path(directory)


def read_shares(run_dir: Path, attempt: int, world: int) -> ShareResult:
    """The processes' shares of `attempt`, added up (process 0, after `wait_for_shares`)."""
    total = ShareResult()
    for rank in range(world):
        share = json.loads(
            (run_dir / SHARES_DIR / f"a{attempt:04d}-r{rank:05d}.done").read_text(encoding="utf-8")
        )
        total.records += share["records"]
        total.failed += share["failed"]
        total.unread.extend((int(unit), str(message)) for unit, message in share["unread"])
    total.unread.sort()
    return total


def wait_for_shares(run_dir: Path, attempt: int, world: int, poll: float = 0.5) -> None:
    """Wait until every process has marked its share of `attempt` done."""
    last_log = time.monotonic()
    while True:
        missing = [
            r for r in range(world) if not (run_dir / SHARES_DIR / f"a{attempt:04d}-r{r:05d}.done").is_file()
        ]
        if not missing:
            return
        if time.monotonic() - last_log > 60:
            logger.info("waiting for %d process(es) to finish their share", len(missing))
            last_log = time.monotonic()
        time.sleep(poll)
