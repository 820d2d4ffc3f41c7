"""The in-order record stream under `blip caption`, `blip vqa` and `blip retrieval`, and under the
Python API (`caption_images`, ...): one process's items from a source to records in input order.

    source (runtime/datasets.py) -> chunks of prepared items (DataLoader workers: decode, preprocess)
        -> windows of items -> batches of equal key (the task's prompt length) -> the model
        -> records in input order

runtime/inference.py sends these records to stdout or, with `--output`, journals them per process
and merges the processes' shares into the final file.

A task (GenerationTask for caption / vqa, RetrievalTask) supplies:
- `name`, `encoder(image, text) -> dict of tensors` (runs in the workers; picklable),
- `group(item)` (batches hold items of equal group only), `run(runner, items) -> [result fields]`
  (the model, in the main process), `error_fields(item)`, `start()` (called once before the first
  batch), and for file outputs `ranked_fields` (retrieval) and `fingerprint()`.

Results do not depend on the batch size or the number of workers: items arrive in input order
whatever the workers, and batches hold items of one prompt length (no padding enters a prompt).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.live import Live

from blip_toolkit.errors import UsageError
from blip_toolkit.log import progress_enabled, stderr_console
from blip_toolkit.runtime.batching import equal_key_batches
from blip_toolkit.runtime.datasets import (
    Chunk,
    FileChunks,
    FileSource,
    Prepared,
    Source,
    TarChunks,
    chunk_loader,
    default_workers,
    file_work,
    tar_units,
)
from blip_toolkit.runtime.records import JournalState

logger = logging.getLogger("blip")

WINDOW_BATCHES = 8  # a task whose prompts differ in length groups them within windows of 8 batches


@dataclass
class RunSettings:
    """How to run (none of these changes the results)."""

    batch_size: int = 8
    num_workers: int | None = None  # None: default_workers()
    max_pixels: int = 0  # set by the task options

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise UsageError("--num-workers must be 0 or more")


# ----------------------------------------------------------------------------- the stream


def _record(item: Prepared, fields: dict) -> dict:
    return {**item.fields, **fields}


def process_chunks(runner, task, chunks: Iterator[Chunk], batch_size: int) -> Iterator[tuple[str, Any, Any]]:
    """Run the model over the chunks; yield ("record", pos, record) in input order, and ("end", unit,
    count) after the records of a tar whose end came with them."""
    task.start()
    window: list[Prepared] = []
    ends: list[tuple[int, int]] = []
    # Only varying prompt lengths need a window; others keep one batch of preprocessed images in hand.
    size = batch_size * (WINDOW_BATCHES if getattr(task, "varying_lengths", False) else 1)

    def flush():
        """Run the window's batches; after each, yield the records now complete at the window's
        front (records stream batch by batch, in input order)."""
        results: dict[int, dict] = {
            id(item): _record(item, {**task.error_fields(item), "error": item.error})
            for item in window
            if item.error is not None
        }
        emitted = 0

        def ready():
            nonlocal emitted
            while emitted < len(window) and id(window[emitted]) in results:
                item = window[emitted]
                yield "record", item.pos, results.pop(id(item))
                emitted += 1

        yield from ready()
        good = [item for item in window if item.error is None]
        for batch in equal_key_batches(good, task.group, batch_size):
            for item, fields in zip(batch, task.run(runner, batch)):
                results[id(item)] = _record(item, fields)
            yield from ready()
        for unit, count in ends:
            yield "end", unit, count
        window.clear()
        ends.clear()

    for chunk in chunks:
        for item in chunk.items:
            window.append(item)
            if len(window) >= size:
                yield from flush()
        ends.extend(chunk.ends)
        if ends and not window:
            yield from flush()
    yield from flush()


def share_chunks(source: Source, task, settings: RunSettings, *, rank=0, world=1, journal=None):
    """(the chunks of process `rank` of `world` in input order, without what `journal` holds, the
    number of its items still to do or None)."""
    journal = journal or JournalState()
    chunk_size = settings.batch_size
    if isinstance(source, FileSource):
        work = file_work(source, rank, world, journal)
        dataset = FileChunks(work, chunk_size, task.encoder, settings.max_pixels)
        total = len(work)
    else:
        units = [u for u in tar_units(source)[rank::world] if not journal.complete(u.number)]
        done = {u.number: journal.offsets(u.number) for u in units}
        dataset = TarChunks(units, chunk_size, task.encoder, settings.max_pixels, text=source.text, done=done)
        total = None
    workers = settings.num_workers
    if workers is None:
        workers = default_workers(total, chunk_size)
    if isinstance(dataset, FileChunks):
        workers = min(workers, len(dataset))
    elif not dataset.units:
        workers = 0
    elif any(u.url.startswith("pipe:") for u in dataset.units) and workers > 1:
        # Every worker reads every tar of this process: a pipe: command (a download) would run once
        # per worker. One worker still decodes while the model runs.
        logger.info(
            "pipe: sources are read by one DataLoader worker (--num-workers %d lowered to 1)", workers
        )
        workers = 1
    return chunk_loader(dataset, workers), total


def infer_records(
    runner, task, source: Source, settings: RunSettings, *, progress: bool = False
) -> Iterator[dict]:
    """Every record of `source` in input order, in this process (stdout and the Python API)."""
    chunks, total = share_chunks(source, task, settings)
    # A live line when stderr is a terminal; plain stderr gets the per-item errors only.
    meter = Progress(total, enabled=progress, every=float("inf"))
    try:
        for kind, _pos, record in process_chunks(runner, task, chunks, settings.batch_size):
            if kind == "record":
                meter.update("error" in record)
                yield record
    finally:
        meter.close()
    if progress:
        logger.info("%s", meter.summary())


# ----------------------------------------------------------------------------- progress


class Progress:
    """Items/s, done / failed and the ETA (when the total is known) on stderr: a Rich line when
    stderr is a terminal, else a plain log line every `every` seconds."""

    def __init__(self, total: int | None, *, enabled: bool = True, every: float = 30.0):
        self.total, self.done, self.failed = total, 0, 0
        self.started = time.monotonic()
        self.every, self._last = every, self.started
        self._live = None
        if enabled and progress_enabled():
            self._live = Live("", console=stderr_console(), transient=True, refresh_per_second=4)
            self._live.start()
        self.enabled = enabled

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.done}" + (f"/{self.total}" if self.total is not None else "") + " done"
        text += f", {self.failed} failed, {rate:.1f} items/s"
        if self.total is not None and rate > 0:
            left = (self.total - self.done) / rate
            text += f", ETA {time.strftime('%H:%M:%S', time.gmtime(left))}"
        return text

    def summary(self) -> str:
        """The one line at the end of a run."""
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return f"{self.done} item(s) in {elapsed:.1f} s ({rate:.2f} items/s), {self.failed} failed"

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if not self.enabled:
            return
        if self._live is not None:
            self._live.update(self.line())
        elif time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            logger.info("%s", self.line())

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
