"""`--engine ray`: the pipeline's stream computed on a Ray cluster with Ray Data, for jobs that outgrow
one machine. Everything but the scheduling is the local engine's code:

    units (one Ray task each: read, cut into chunks, decode with the task's encoder; CPU)
        -> chunks (bytes: JSON + safetensors) -> an actor pool, one model per actor (`map_batches`,
           one chunk a call, run by `process_chunks` as locally; fixed `--num-actors N` or autoscaling)
        -> events in input order (`preserve_order`) -> the driver's sink (the journal of `--output`,
           or extract-embeddings' shards)

so the records, the files, the resume state and the exit code are the local engine's: a job killed on
Ray resumes on Ray or locally, and the reverse. A unit's chunks are cut as the local engine cuts them
(pipeline/stream.py `unit_chunks`), so extract-embeddings batches, and its shards, are the same. A bad
image is an item's error, a unit that cannot be read is reported and left for --resume, an actor that
dies is restarted by Ray and its chunk retried (Ray Data's actor pools restart actors and retry their
tasks), so none of them fails the job. Ray's own progress bars and logs stay off stdout; our progress
line is on stderr as for the local engine.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from blip_toolkit.errors import UsageError
from blip_toolkit.pipeline import remote
from blip_toolkit.pipeline.items import (
    Chunk,
    chunk_from_bytes,
    chunk_to_bytes,
    events_from_bytes,
    events_to_bytes,
    pack,
)
from blip_toolkit.pipeline.resume import Offsets
from blip_toolkit.pipeline.sources import Source, Unit
from blip_toolkit.pipeline.stream import prepare_item, process_chunks, unit_chunks

logger = logging.getLogger("blip")

RAY_HINT = "pip install 'blip-toolkit[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: `address` of an existing cluster ("auto", "HOST:PORT", or None to
    start one on this machine), actors (None: autoscale from 1 to what the cluster holds), and the
    GPUs / CPUs each actor asks for."""

    address: str | None = None
    num_actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise UsageError("--num-actors must be at least 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise UsageError("--gpus-per-actor must be 0 or more and --cpus-per-actor more than 0")


def ray_module():
    """ray (the optional `ray` extra), or one line saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise UsageError("--engine ray needs Ray Data, which is not installed", hint=RAY_HINT) from exc


def connect(options: RayOptions):
    """ray.init on `options.address`, quietly: the driver's stdout stays for results."""
    ray = ray_module()
    # Ray's C++ core logs, on the driver's stderr, a notice about its own actor-pool internals at every
    # job (ray-project/ray#53727); our one-line errors and progress say what matters. Overridable.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "include_dashboard": False,
        }
        if options.address is None:
            kwargs["num_cpus"] = (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            )
        else:
            kwargs.pop("include_dashboard")
        ray.init(address=options.address, **kwargs)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the output is in input order
    # One chunk a block: a unit's chunks then spread over the actors and stream back one by one
    # (Ray would otherwise pack a unit's small chunks into one block, done by one actor, returned at once).
    context.target_max_block_size = 1
    context.enable_progress_bars = False  # ours is on stderr
    context.print_on_execution_start = False
    context.verbose_stats_logs = False
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Ray Data warns when a small job cannot use every actor; not the user's concern here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\..*")
    return ray


# ----------------------------------------------------------------------------- read tasks (CPU)


@contextlib.contextmanager
def local_copy(unit: Unit) -> Iterator[str | None]:
    """The unit's file as a local path: a remote one is copied to a temporary file for the task."""
    if not unit.staged:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="blip-ray-unit-")
    try:
        path = os.path.join(directory, "unit" + os.path.splitext(unit.url.split("?", 1)[0])[1])
        with remote.open_input(unit.url) as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def read_unit_chunks(
    row: dict,
    *,
    source: Source,
    encoder,
    done: dict[int, Offsets],
    chunk_size: int,
    part_size: int | None,
    max_pixels: int,
) -> Iterator[dict]:
    """One unit, read and decoded as the local engine does, as rows {"chunk": bytes} (Ray flat_map)."""
    unit = source.units[int(row["unit"])]
    try:
        with local_copy(unit) as path:
            for raws, end in unit_chunks(
                source, unit, path, done.get(unit.number, Offsets()), chunk_size, part_size, 0
            ):
                chunk = Chunk(ends=[(unit.number, end)] if end is not None else [])
                chunk.items = [prepare_item(raw, unit.number, encoder, max_pixels) for raw in raws]
                yield {"chunk": chunk_to_bytes(pack(chunk))}
    except remote.TransportError as exc:
        yield {"chunk": chunk_to_bytes(Chunk(failed=[(unit.number, str(exc))]))}
    except OSError as exc:  # the copy: a full temporary disk, a cut connection not seen as one
        yield {"chunk": chunk_to_bytes(Chunk(failed=[(unit.number, remote.describe(exc, unit.url or ""))]))}


# ----------------------------------------------------------------------------- model actors


class ModelActor:
    """One model per actor: `factory()` gives (runner, task) as in the local engine; each call runs
    whole chunks through `process_chunks` and returns their events as bytes. `bind` makes the class
    of one job: its factory and batch size travel with the class definition, not as constructor
    arguments in the object store (which an actor restart could not read back once evicted)."""

    factory: Callable[[], tuple[Any, Any]]
    batch_size: int

    def __init__(self):
        self.runner, self.task = type(self).factory()

    @classmethod
    def bind(cls, factory: Callable[[], tuple[Any, Any]], batch_size: int) -> type:
        return type("ModelActor", (cls,), {"factory": staticmethod(factory), "batch_size": batch_size})

    def __call__(self, batch: dict) -> dict:
        out = []
        for data in batch["chunk"]:
            chunk = chunk_from_bytes(data)
            events = list(process_chunks(self.runner, self.task, iter([chunk]), type(self).batch_size))
            out.append(events_to_bytes(events))
        return {"events": out}


# ----------------------------------------------------------------------------- the driver


def ray_events(
    options: RayOptions,
    factory: Callable[[], tuple[Any, Any]],
    encoder,
    source: Source,
    units: list[Unit],
    done: dict[int, Offsets],
    *,
    batch_size: int,
    max_pixels: int,
    part_size: int | None = None,
) -> Iterator[tuple[str, Any, Any]]:
    """The pipeline's events for `units`, computed on Ray, in input order (see the module docstring)."""
    if not units:
        return
    ray = connect(options)
    total_cpus = float(ray.cluster_resources().get("CPU", 1))
    if options.num_actors is not None:
        actors = options.num_actors
        pool = ray.data.ActorPoolStrategy(size=actors)
    else:  # autoscale, leaving a CPU to the read tasks
        actors = max(1, int((total_cpus - 1) // options.cpus_per_actor))
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=actors)
    # Read tasks take a CPU each where the actors leave one; on a cluster the actors fill, a quarter
    # (they then share the CPUs with the actors rather than wait for a CPU that never frees up).
    read_cpus = 1.0 if total_cpus - actors * options.cpus_per_actor >= 1 else 0.25
    done = {u.number: done[u.number] for u in units if u.number in done}
    dataset = ray.data.from_items([{"unit": u.number} for u in units], override_num_blocks=len(units))
    dataset = dataset.flat_map(
        read_unit_chunks,
        fn_kwargs={
            "source": source,
            "encoder": encoder,
            "done": done,
            "chunk_size": batch_size,
            "part_size": part_size,
            "max_pixels": max_pixels,
        },
        num_cpus=read_cpus,
    )
    dataset = dataset.map_batches(
        ModelActor.bind(factory, batch_size),
        batch_size=1,
        batch_format="numpy",
        compute=pool,
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
        zero_copy_batch=True,
    )
    for row in dataset.iter_rows():
        yield from events_from_bytes(row["events"])
