"""The extraction job behind `blip extract-embeddings`: images (+ captions) -> embedding shards, on the
one dataset pipeline (blip_toolkit/pipeline/: sources -> units -> decoded chunks -> task -> sink).

Per image: the conditioning encoder's tokens, the target encoder's tokens and its own global image
embedding; per caption: the target encoder's text embedding. Both encoders see the same decoded
image, each through its own processor; with `crop = "center"` (the default) the image is first cut to
its centred square, so both token grids cover the same pixels (jobs/extract_preprocess.py).

Sources: a folder, a TSV manifest, webdataset tars, Parquet files or save_to_disk directories, local
or remote (pipeline/sources.py). Bad images are skipped (a shard may hold fewer than `shard_size`
images) and reported in errors.jsonl. Each shard is written atomically with a done record last;
`resume` skips finished shards. Under `accelerate launch` unit u belongs to process u % N; process 0
waits for every process's share marker and writes index.json. Memory is bounded by one shard's
outputs (`shard_size` x tokens) plus the DataLoader's prefetch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from blip_toolkit import __version__
from blip_toolkit.embeddings.format import ERRORS_FILE, HEAD_FILE, INDEX_FILE, RUN_KIND
from blip_toolkit.embeddings.layout import TokenLayout
from blip_toolkit.embeddings.shards import build_index
from blip_toolkit.engine.accelerate import process_state
from blip_toolkit.engine.outputs import RunRecord, check_output_dir, check_resume_settings, prepare_output_dir
from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import atomic_write, sha256_file, write_json
from blip_toolkit.jobs.extract_config import DATA_KEYS, ExtractConfig, ExtractSummary
from blip_toolkit.jobs.extract_preprocess import square_coverage
from blip_toolkit.jobs.extract_task import (
    Encoders,
    ExtractionTask,
    ShardSink,
    load_encoders,
    shards_state,
    unit_records,
)
from blip_toolkit.models.adapters import check_role, inspect_encoder
from blip_toolkit.pipeline import remote, tables
from blip_toolkit.pipeline.ray_engine import RayOptions, actor_device
from blip_toolkit.pipeline.resume import ResumeState
from blip_toolkit.pipeline.run import Job, next_attempt, run_job, share_units
from blip_toolkit.pipeline.sources import Source, Unit, open_dataset
from blip_toolkit.pipeline.stream import RunSettings

logger = logging.getLogger("blip")


# ----------------------------------------------------------------------------- the job


def extract_embeddings(
    config: ExtractConfig,
    *,
    after_shard: Callable[[dict], None] | None = None,
    ray: RayOptions | None = None,
) -> ExtractSummary:
    """Run the extraction described by `config`; return the summary (on every rank; `is_main` tells
    which one wrote index.json). `after_shard(record)` is called after each shard this process
    writes (tests use it to simulate a kill). `ray`: encode in Ray actors (pipeline/ray_engine.py);
    this process (the driver) reads the results and writes the shards."""
    started = time.perf_counter()
    columns = tables.TableColumns(config.image_column, config.key_column, config.text_column)
    source = open_dataset(
        config.source, allow_pipe=config.allow_pipe, columns=columns, unit_size=config.shard_size
    )
    # Refuse an impossible target before anything heavy happens.
    check_role(inspect_encoder(config.target_encoder)[1], "target", config.target_encoder)
    check_role(inspect_encoder(config.cond_encoder)[1], "cond", config.cond_encoder)
    state = process_state(cpu=config.device == "cpu")
    out = Path(config.out)
    spec = _data_spec(config, source)
    _check_output(out, config, spec)
    # Every process numbers the attempt and reads what is done before the barriers, while nobody writes.
    attempt = next_attempt(out)
    resume = ResumeState() if config.overwrite else shards_state(out, source.units, config.shard_size)
    encoders = load_encoders(config, state)
    # Nothing is written before every check has passed (encoders, layouts, head).
    state.wait_for_everyone()  # everyone has checked the directory before rank 0 changes it
    if state.is_main_process:
        _prepare_output(out, config, spec, encoders)
    state.wait_for_everyone()

    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        _log_plan(config, source, out, share_units(source, resume, rank, world), encoders, world)
    sink = ShardSink(out, source.units, config, _dims(encoders), resume, after_shard)
    settings = RunSettings(config.batch_size, config.num_workers, config.max_pixels)
    job = Job(
        source,
        ExtractionTask(encoders, config),
        resume,
        settings,
        out,
        attempt,
        part_size=config.shard_size,
        ray=ray,
        factory=(
            partial(extraction_actor_task, replace(config, device=actor_device(ray, config.device)))
            if ray is not None
            else None
        ),
    )
    shares = run_job(job, sink, state)
    skipped = sum(len(unit_records(out, u)) for u in source.units[rank::world]) - len(sink.records)
    if shares is None:
        logger.debug("rank %d finished its shards", rank)
        seconds = time.perf_counter() - started
        return ExtractSummary(str(out), 0, 0, 0, 0, skipped_shards=skipped, seconds=seconds, is_main=False)
    records = _collect(out, source, shares.unread)
    counts = _write_index(out, config, source, encoders, records)
    seconds = time.perf_counter() - started
    logger.info(
        "wrote %d images, %d captions in %d shard(s) to %s in %.1f s%s",
        counts["samples"],
        counts["captions"],
        counts["shards"],
        out,
        seconds,
        f"; {counts['errors']} error(s) in {out / ERRORS_FILE}" if counts["errors"] else "",
    )
    return ExtractSummary(
        str(out),
        counts["samples"],
        counts["captions"],
        counts["shards"],
        counts["errors"],
        skipped_shards=skipped,
        seconds=seconds,
        errors_file=str(out / ERRORS_FILE),
    )


def extraction_actor_task(config: ExtractConfig):
    """(runner, task) in a Ray actor: both encoders loaded where they run."""
    return None, ExtractionTask(load_encoders(config, process_state(cpu=config.device == "cpu")), config)


def _dims(encoders: Encoders) -> dict:
    return {
        "cond_tokens": encoders.cond_layout.num_tokens,
        "cond_dim": encoders.cond.hidden_size,
        "target_tokens": encoders.target_layout.num_tokens,
        "target_dim": encoders.target.hidden_size,
        "embed_dim": encoders.target.embed_dim,
    }


def _collect(out: Path, source: Source, unread: list[tuple[int, str]]) -> list[dict]:
    """Every shard's done record in dataset order, or one line naming what did not finish."""
    records, missing = [], []
    for unit in source.units:
        found = unit_records(out, unit)
        if not found or not (found[-1].get("last") or unit.kind == "files"):
            missing.append(unit)
        records.extend(found)
    if missing:
        reasons = dict(unread)
        first = missing[0]
        why = reasons.get(first.number) or (remote.redact_url(first.url) if first.url else first.name)
        raise InputError(
            f"{out}: {len(missing)} unit(s) of the input did not finish (first: {why}); rerun with --resume"
        )
    return records


def _data_spec(config: ExtractConfig, source: Source) -> dict:
    """The settings that define the data (blip_run.json "config"; a --resume must match them)."""
    if source.kind == "files":
        digest = hashlib.sha256(
            "\n".join(f"{e.key}\t{e.image}" for e in source.entries).encode("utf-8")
        ).hexdigest()
        spec = source.spec[0]
        path = spec if remote.is_url(spec) else str(Path(spec).resolve())
        source_id = {
            "kind": "folder" if not Path(spec).is_file() else "tsv",
            "path": path,
            "items": len(source.entries),
            "items_sha256": digest,
        }
    else:
        source_id = source.describe()
    return {"source": source_id, **{k: getattr(config, k) for k in DATA_KEYS}}


def _check_output(out: Path, config: ExtractConfig, spec: dict) -> None:
    """The output policy, read-only (every rank runs it before rank 0 changes anything)."""
    check_output_dir(out, overwrite=config.overwrite, resume=config.resume, kind=RUN_KIND, flag="--out")
    previous = RunRecord(out, RUN_KIND).read() if config.resume else None
    if previous is not None:
        before = dict(previous.get("config", {}))
        before.setdefault("crop", "none")  # runs from before --crop fed each processor the whole image
        check_resume_settings(before, spec, free=(), where=str(out), flag="--out")


def _prepare_output(out: Path, config: ExtractConfig, spec: dict, encoders: Encoders) -> None:
    record = RunRecord(out, RUN_KIND)
    previous = record.read() if config.resume else None
    prepare_output_dir(out, overwrite=config.overwrite, resume=config.resume, kind=RUN_KIND, flag="--out")
    for stale in (INDEX_FILE, ERRORS_FILE):  # rewritten at the end; never describe a half-done run
        (out / stale).unlink(missing_ok=True)
    record.start({"config": spec}, previous=previous)
    encoders.head.save(out / HEAD_FILE)


def _log_plan(config, source: Source, out: Path, todo: list[Unit], encoders: Encoders, world: int) -> None:
    what = {"files": "image(s)", "webdataset": "tar(s)", "table": "table unit(s)"}[source.kind]
    count = len(source.entries) if source.kind == "files" else len(source.units)
    logger.info(
        "extracting %d %s from %s (%s) into %s: %d unit(s), %d to do%s; cond %s %s, target %s %s, head %s, crop %s",
        count,
        what,
        ", ".join(remote.redact_url(s) for s in config.source),
        source.kind,
        out,
        len(source.units),
        len(todo),
        f" by this process (rank 0 of {world})" if world > 1 else "",
        encoders.cond.source,
        [encoders.cond_layout.num_tokens, encoders.cond.hidden_size],
        encoders.target.source,
        [encoders.target_layout.num_tokens, encoders.target.hidden_size],
        encoders.head.pooling,
        config.crop,
    )
    if config.crop == "center":
        kept = {side: square_coverage(getattr(encoders, side).image_processor) for side in ("cond", "target")}
        if kept["cond"] != kept["target"]:
            logger.warning(
                "the encoders' processors keep different parts of a square image (cond %.0f%%, target %.0f%% "
                "of its side, centred): their token grids cover different regions even with --crop center",
                100 * kept["cond"],
                100 * kept["target"],
            )
    else:
        logger.info(
            "--crop none: each processor sees the whole image (on non-square images the grids differ)"
        )


def _write_index(out: Path, config: ExtractConfig, source, encoders: Encoders, records: list[dict]) -> dict:
    """errors.jsonl and index.json from the done records (main process, last); returns the counts."""
    with atomic_write(out / ERRORS_FILE) as handle:
        for record in records:
            for error in record.get("errors", []):
                handle.write(json.dumps({"shard": record["name"], **error}, ensure_ascii=False) + "\n")
    index = build_index(records=records, info=_index_info(config, source, encoders, out / HEAD_FILE))
    write_json(out / INDEX_FILE, index)
    RunRecord(out, RUN_KIND).finish(counts=index["counts"])
    return index["counts"]


def _index_info(config: ExtractConfig, source, encoders: Encoders, head_path: Path) -> dict:
    def encoder(adapter, layout: TokenLayout) -> dict:
        return {
            **adapter.describe(),
            "tokens": layout.name,
            "pool": layout.pool,
            "num_tokens": layout.num_tokens,
            "encoder_dtype": encoders.encoder_dtype,
        }

    cond, target = encoders.cond, encoders.target
    dims = {
        "cond_tokens": encoders.cond_layout.num_tokens,
        "cond_dim": cond.hidden_size,
        "target_tokens": encoders.target_layout.num_tokens,
        "target_dim": target.hidden_size,
        "embed_dim": target.embed_dim,
    }
    tensors = {
        "cond": {"shape": ["n", dims["cond_tokens"], dims["cond_dim"]], "dtype": config.dtype},
        "target": {"shape": ["n", dims["target_tokens"], dims["target_dim"]], "dtype": config.dtype},
        "target_global": {"shape": ["n", dims["embed_dim"]], "dtype": config.dtype},
        "text_emb": {"shape": ["c", dims["embed_dim"]], "dtype": config.dtype},
        "caption_image": {"shape": ["c"], "dtype": "int64"},
    }
    head = encoders.head
    return {
        "toolkit_version": __version__,
        "source": source.describe(),
        "encoders": {
            "cond": encoder(cond, encoders.cond_layout),
            "target": encoder(target, encoders.target_layout),
        },
        "dims": dims,
        "dtype": config.dtype,
        "tensors": tensors,
        "shard_size": config.shard_size,
        "crop": config.crop,
        "head": {
            "file": head_path.name,
            "sha256": sha256_file(head_path),
            "pooling": head.pooling,
            "has_cls": head.has_cls,
        },
    }
