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
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from blip_toolkit.errors import InputError, UsageError
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
from blip_toolkit.pipeline.spec import RayOptions
from blip_toolkit.pipeline.stream import prepare_item, process_chunks, unit_chunks

logger = logging.getLogger("blip")

RAY_HINT = "pip install 'blip-toolkit[ray]'"


def ray_module():
    """ray (the optional `ray` extra), or one line saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise UsageError("--engine ray needs Ray Data, which is not installed", hint=RAY_HINT) from exc


def cluster_address(options: RayOptions) -> tuple[str, str]:
    """(address, where it came from): --ray-address, else RAY_ADDRESS (set inside Ray jobs and KubeRay
    pods), else "local": a new Ray on this machine (not one another user started here)."""
    if options.address:
        return options.address, "--ray-address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return "local", ""


def check_reachable(address: str, origin: str, timeout: float = 5.0) -> None:
    """One line now rather than Ray's minutes of retries when HOST:PORT does not answer."""
    if address.startswith(("http://", "https://")):
        raise UsageError(
            f"{origin} {address}: a dashboard / job-submission address; the driver joins a cluster by "
            "its GCS address (HOST:PORT, 6379 by default) or 'auto' on one of its nodes"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(
            f"{origin} {address}: no Ray cluster answers there ({exc.strerror or exc})",
            hint="start one with `ray start --head` or check the address (HOST:PORT of its GCS)",
        ) from exc


_connected = "the cluster this process joined before"


def connect(options: RayOptions):
    """ray.init on the cluster, quietly: the driver's stdout stays for results."""
    ray = ray_module()
    # Ray's C++ core logs, on the driver's stderr, a notice about its own actor-pool internals at every
    # job (ray-project/ray#53727); our one-line errors and progress say what matters. Overridable.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    global _connected
    if not ray.is_initialized():
        address, origin = cluster_address(options)
        _connected = address
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address == "local":
            kwargs.update(include_dashboard=False, num_cpus=len(os.sched_getaffinity(0)))
        else:
            check_reachable(address, origin)
        ray.init(address=address, **kwargs)
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


def check_resources(ray, options: RayOptions) -> float:
    """The cluster's CPUs, after checking that one actor fits (a request it can never place would
    wait forever)."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if options.gpus_per_actor > gpus:
        raise UsageError(
            f"--gpus-per-actor {options.gpus_per_actor:g}: the Ray cluster has {gpus:g} GPU(s); no actor could start"
        )
    if options.cpus_per_actor > cpus:
        raise UsageError(
            f"--cpus-per-actor {options.cpus_per_actor:g}: the Ray cluster has {cpus:g} CPU(s); no actor could start"
        )
    wanted = (options.num_actors or 1) * options.cpus_per_actor
    if wanted > cpus:
        logger.warning(
            "%d actor(s) of %g CPU need %g CPUs; the cluster has %g: the job runs with the actors that fit "
            "(or the ones it adds, if it autoscales)",
            options.num_actors or 1,
            options.cpus_per_actor,
            wanted,
            cpus,
        )
    return max(cpus, 1.0)


def actor_device(options: RayOptions, device: str) -> str:
    """The device an actor's model loads on: "auto" means CPU unless the actor was given GPUs (Ray
    hides no GPU from an actor that asked for none, so "auto" would put every actor on GPU 0)."""
    return "cpu" if device == "auto" and not options.gpus_per_actor else device


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


def in_driver_folder(cwd: str) -> None:
    """Relative paths mean what they mean to the driver: work in its folder where this node has it."""
    if os.path.isdir(cwd):
        os.chdir(cwd)


def read_unit_chunks(
    row: dict,
    *,
    source: Source,
    encoder,
    done: dict[int, Offsets],
    chunk_size: int,
    part_size: int | None,
    max_pixels: int,
    cwd: str,
) -> Iterator[dict]:
    """Units read and decoded as the local engine does, as rows {"chunk": bytes} (Ray flat_map). The
    units of one row share a file (the row groups of a remote Parquet file), copied once."""
    in_driver_folder(cwd)
    units = [source.units[int(number)] for number in row["units"]]
    finished: set[int] = set()
    try:
        with local_copy(units[0]) as path:
            for unit in units:
                offsets = done.get(unit.number, Offsets())
                for raws, end in unit_chunks(source, unit, path, offsets, chunk_size, part_size, 0):
                    chunk = Chunk(ends=[(unit.number, end)] if end is not None else [])
                    chunk.items = [prepare_item(raw, unit.number, encoder, max_pixels) for raw in raws]
                    yield {"chunk": chunk_to_bytes(pack(chunk))}
                finished.add(unit.number)
    except (remote.TransportError, OSError) as exc:  # the copy: a cut connection, a full temporary disk
        message = (
            str(exc) if isinstance(exc, remote.TransportError) else remote.describe(exc, units[0].url or "")
        )
        failed = [(unit.number, message) for unit in units if unit.number not in finished]
        yield {"chunk": chunk_to_bytes(Chunk(failed=failed))}


def file_groups(units: list[Unit]) -> list[list[int]]:
    """Consecutive units of one remote file together (one read task copies it once); others alone."""
    groups: list[list[Unit]] = []
    for unit in units:
        if groups and unit.staged and groups[-1][-1].staged and groups[-1][-1].url == unit.url:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return [[unit.number for unit in group] for group in groups]


# ----------------------------------------------------------------------------- model actors


class ModelActor:
    """One model per actor: `factory()` gives (runner, task) as in the local engine; each call runs
    whole chunks through `process_chunks` and returns their events as bytes. `bind` makes the class
    of one job: its factory and batch size travel with the class definition, not as constructor
    arguments in the object store (which an actor restart could not read back once evicted)."""

    factory: Callable[[], tuple[Any, Any]]
    batch_size: int

    cwd: str

    def __init__(self):
        in_driver_folder(type(self).cwd)
        self.runner, self.task = type(self).factory()

    @classmethod
    def bind(cls, factory: Callable[[], tuple[Any, Any]], batch_size: int, cwd: str) -> type:
        attributes = {"factory": staticmethod(factory), "batch_size": batch_size, "cwd": cwd}
        return type("ModelActor", (cls,), attributes)

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
    total_cpus = check_resources(ray, options)
    cwd = os.getcwd()
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
    groups = file_groups(units)
    dataset = ray.data.from_items([{"units": group} for group in groups], override_num_blocks=len(groups))
    dataset = dataset.flat_map(
        read_unit_chunks,
        fn_kwargs={
            "source": source,
            "encoder": encoder,
            "done": done,
            "chunk_size": batch_size,
            "part_size": part_size,
            "max_pixels": max_pixels,
            "cwd": cwd,
        },
        num_cpus=read_cpus,
    )
    dataset = dataset.map_batches(
        ModelActor.bind(factory, batch_size, cwd),
        batch_size=1,
        batch_format="numpy",
        compute=pool,
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
        zero_copy_batch=True,
    )
    logger.info(
        "on Ray at %s: %s model actor(s) of %g CPU%s, %d unit(s)",
        _connected,
        options.num_actors or f"1-{actors}",
        options.cpus_per_actor,
        f" and {options.gpus_per_actor:g} GPU" if options.gpus_per_actor else "",
        len(units),
    )
    for row in dataset.iter_rows():
        yield from events_from_bytes(row["events"])
