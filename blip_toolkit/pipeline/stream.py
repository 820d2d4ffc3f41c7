"""One process's share of a source as a stream of results in input order:

    units -> raw items (pipeline/sources.py) -> chunks of prepared items (DataLoader workers: decode,
        the task's preprocessing) -> windows -> batches of equal key -> the task's model
        -> ("record", item, result) in input order, ("end", unit, count), ("failed", unit, message)

Chunks of `chunk_size` positions still to do are dealt to workers in turn (chunk k to worker k % W),
and the DataLoader collects from its workers in the same turn, so items arrive in input order
whatever the number of workers. Every worker walks every unit of its process to count positions (a
file list or a table is counted without reading; a tar is read, decoding only the worker's own
chunks); remote tars and tables are walked from a local copy (pipeline/staging.py).

A task supplies:
- `encoder(image, text) -> dict of tensors` (runs in the workers; picklable),
- `group(item)` (batches hold items of equal group only), `varying_lengths` (whether groups vary,
  so batches are formed within windows of several batches), `run(runner, items) -> [result]` (the
  model, in the main process), `error_fields(item)`, and `start()` (once before the first batch).

Results do not depend on the batch size or the number of workers: items arrive in input order and
batches hold items of one group (one prompt length: no padding enters a prompt).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.live import Live

from blip_toolkit.data.batching import equal_key_batches, read_ahead
from blip_toolkit.data.images import ImageLoadError, open_image
from blip_toolkit.errors import BlipError, UsageError
from blip_toolkit.log import progress_enabled, stderr_console
from blip_toolkit.pipeline import remote
from blip_toolkit.pipeline.items import Chunk, Prepared, RawItem, pack
from blip_toolkit.pipeline.resume import Offsets, ResumeState
from blip_toolkit.pipeline.sources import Source, Unit
from blip_toolkit.pipeline.staging import StagingFailed, mark_passed, wait_staged
from blip_toolkit.pipeline.tars import SampleError

logger = logging.getLogger("blip")

WINDOW_BATCHES = 8  # a task whose groups vary forms batches within windows of 8 batches

Encoder = Callable[[Any, str | None], dict[str, torch.Tensor]]


@dataclass
class RunSettings:
    """How to run (none of these changes the results)."""

    batch_size: int = 8
    num_workers: int | None = None  # None: default_workers()
    max_pixels: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise UsageError("--num-workers must be 0 or more")


# ----------------------------------------------------------------------------- decoding (workers)


def prepare_item(raw: RawItem, unit: int, encoder: Encoder, max_pixels: int) -> Prepared:
    """Decode one item (encoded bytes, a local path or a URL) and run the task's encoder on it; any
    failure becomes the item's error (one bad image never stops the run)."""
    item = Prepared((unit, raw.offset), raw.fields, raw.key, raw.label, raw.text, raw.captions)
    if raw.error is not None:
        item.error = raw.error
        return item
    try:
        data = raw.data
        if isinstance(data, str) and remote.is_url(data):
            data = remote.read_bytes(data)
        image = open_image(data, max_pixels=max_pixels, name=raw.label)
        item.inputs = encoder(image, raw.text)
    except (ImageLoadError, SampleError) as exc:
        item.error = str(exc)
    except remote.TransportError as exc:
        item.error = str(exc)
    except BlipError as exc:  # e.g. a question holding a token the model reserves
        item.error = f"{raw.label}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a processor failing on one odd image must not stop the run
        item.error = f"{raw.label}: {type(exc).__name__}: {exc}"
    return item


class ChunkCounter:
    """The chunk of each position of a unit, asked in offset order: None for a position done by an
    earlier attempt, else the number of the chunk it falls in, numbered on from `first`. A chunk
    holds at most `chunk_size` pending positions and, with `part_size`, never crosses a multiple of
    it (extract-embeddings: every output shard then sees the same batches whichever process makes
    it, so shards are byte-identical for any number of processes)."""

    def __init__(self, done: Offsets, chunk_size: int, first: int, part_size: int | None = None):
        self.done, self.chunk_size, self.part_size = done, chunk_size, part_size
        self.number, self.part, self.filled = first - 1, None, 0

    def chunk_of(self, offset: int) -> int | None:
        if offset in self.done:
            return None
        part = offset // self.part_size if self.part_size else 0
        if self.part is None or part != self.part or self.filled == self.chunk_size:
            self.number, self.part, self.filled = self.number + 1, part, 0
        self.filled += 1
        return self.number


def unit_chunks(
    source: Source,
    unit: Unit,
    path: str | None,
    done: Offsets,
    chunk_size: int,
    part_size: int | None,
    first: int,
    worker: int = 0,
    workers: int = 1,
):
    """The chunks of `unit` that are worker `worker`'s (of `workers`), as (raw items, end): chunk
    numbers go on from `first`; the last chunk carries the unit's end (its number of positions) and
    may hold no item. Returns the chunk number after the unit. Two counters of the same sequence:
    one tells the reader which positions to materialise, one cuts the chunks."""
    owner = ChunkCounter(done, chunk_size, first, part_size)
    counter = ChunkCounter(done, chunk_size, first, part_size)

    def want(offset: int) -> bool:
        chunk = owner.chunk_of(offset)
        return chunk is not None and chunk % workers == worker

    mine: list[RawItem] = []
    current, count = None, 0
    for offset, raw in enumerate(source.read_unit(unit, path, want)):
        count = offset + 1
        chunk = counter.chunk_of(offset)
        if chunk is None:
            continue
        if current is not None and chunk != current:
            if current % workers == worker:
                yield mine, None
            mine = []
        current = chunk
        if raw is not None:
            mine.append(raw)
    if current is None:  # nothing to do in this unit: an empty chunk carries its end
        current = first
    if current % workers == worker:
        yield mine, count
    return current + 1


class UnitStream(torch.utils.data.IterableDataset):
    """This process's units as chunks of prepared items, chunk k made by worker k % workers. A unit's
    last chunk carries its end (it may hold no item); a unit whose file could not be staged is one
    chunk carrying the failure."""

    def __init__(
        self,
        source: Source,
        units: list[Unit],
        encoder: Encoder,
        resume: ResumeState,
        chunk_size: int,
        max_pixels: int,
        spool: Path | None = None,
        part_size: int | None = None,
    ):
        super().__init__()
        self.source, self.units, self.encoder = source, units, encoder
        self.done = {u.number: resume.offsets(u.number) for u in units}
        self.chunk_size, self.max_pixels, self.spool = chunk_size, max_pixels, spool
        self.part_size = part_size

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        number = 0  # chunk counter over this process's stream
        last_unit_of = {u.url: u.number for u in self.units if u.staged}
        for unit in self.units:
            path = None
            if unit.staged:
                try:
                    path = str(wait_staged(self.spool, unit.url))
                except StagingFailed as exc:
                    if number % workers == worker:
                        yield Chunk(failed=[(unit.number, str(exc))])
                    number += 1
                    if last_unit_of[unit.url] == unit.number:
                        mark_passed(self.spool, unit.url, worker)
                    continue
            number = yield from self._unit(unit, path, worker, workers, number)
            if unit.staged and last_unit_of[unit.url] == unit.number:
                mark_passed(self.spool, unit.url, worker)

    def _unit(self, unit: Unit, path: str | None, worker: int, workers: int, number: int):
        """Yield this worker's chunks of `unit`; return the chunk counter after the unit."""
        chunks = unit_chunks(
            self.source,
            unit,
            path,
            self.done[unit.number],
            self.chunk_size,
            self.part_size,
            number,
            worker,
            workers,
        )
        while True:
            try:
                raws, end = next(chunks)
            except StopIteration as stop:
                return stop.value
            yield self._chunk(unit, raws, end)

    def _chunk(self, unit: Unit, raws: list[RawItem], end: int | None = None) -> Chunk:
        chunk = Chunk(ends=[(unit.number, end)] if end is not None else [])
        chunk.items = [prepare_item(raw, unit.number, self.encoder, self.max_pixels) for raw in raws]
        return pack(chunk)


def _identity(x):
    return x


def default_workers(total: int | None, chunk_size: int) -> int:
    """Workers when --num-workers is not given: none for a single chunk (starting a worker would cost
    more than it saves), else up to 4, leaving one core to the model."""
    chunks = None if total is None else -(-total // chunk_size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = max(0, min(4, cores - 1))
    return 0 if chunks is not None and chunks <= 1 else max(wanted, 1 if cores > 1 else 0)


def worker_count(settings: RunSettings, units: list[Unit], total: int | None) -> int:
    """DataLoader workers for this share: --num-workers or the default, none when there is nothing
    to do, one for pipe: sources (every worker reads every unit: a pipe: command, a download, would
    run once per worker)."""
    workers = settings.num_workers
    if workers is None:
        workers = default_workers(total, settings.batch_size)
    if not units:
        return 0
    if total is not None:
        workers = min(workers, max(-(-total // settings.batch_size), 1))
    if workers > 1 and any((u.url or "").startswith("pipe:") for u in units):
        logger.info(
            "pipe: sources are read by one DataLoader worker (--num-workers %d lowered to 1)", workers
        )
        workers = 1
    return workers


def chunk_loader(dataset: UnitStream, num_workers: int) -> Iterator[Chunk]:
    """Chunks of `dataset` in order: from `num_workers` DataLoader workers, or (0) prepared in one
    background thread, one chunk ahead of the model (decoding releases the GIL)."""
    if num_workers == 0:
        return read_ahead(iter(dataset))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        prefetch_factor=2,
        persistent_workers=False,
    )
    return iter(loader)


# ----------------------------------------------------------------------------- the model (main process)


def process_chunks(runner, task, chunks: Iterator[Chunk], batch_size: int) -> Iterator[tuple[str, Any, Any]]:
    """Run the task's model over the chunks; yield ("record", item, result) in input order (`result`
    is None for an item that failed before the model), ("end", unit, count) after the records of a
    unit whose end came with them, and ("failed", unit, message) for a unit that could not be read."""
    task.start()
    window: list[Prepared] = []
    ends: list[tuple[int, int]] = []
    failed: list[tuple[int, str]] = []
    # Only varying groups need a window; others keep one batch of preprocessed images in hand. A task
    # with `chunk_batches` gets each chunk as its batch (chunks are cut the same way whatever the
    # number of processes: see ChunkCounter).
    size = batch_size * (WINDOW_BATCHES if getattr(task, "varying_lengths", False) else 1)
    per_chunk = getattr(task, "chunk_batches", False)

    def flush():
        """Run the window's batches; after each, yield the records now complete at the window's
        front (records stream batch by batch, in input order)."""
        results: dict[int, Any] = {id(item): None for item in window if item.error is not None}
        emitted = 0

        def ready():
            nonlocal emitted
            while emitted < len(window) and id(window[emitted]) in results:
                item = window[emitted]
                yield "record", item, results.pop(id(item))
                emitted += 1

        yield from ready()
        good = [item for item in window if item.error is None]
        for batch in equal_key_batches(good, task.group, batch_size):
            for item, result in zip(batch, task.run(runner, batch)):
                results[id(item)] = result
            yield from ready()
        for unit, count in ends:
            yield "end", unit, count
        for unit, message in failed:
            yield "failed", unit, message
        window.clear()
        ends.clear()
        failed.clear()

    for chunk in chunks:
        for item in chunk.items:
            window.append(item)
            if len(window) >= size and not per_chunk:
                yield from flush()
        ends.extend(chunk.ends)
        failed.extend(chunk.failed)
        if per_chunk or ((ends or failed) and not window):
            yield from flush()
    yield from flush()


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
