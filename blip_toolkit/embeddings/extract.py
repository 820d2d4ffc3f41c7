"""The extraction job behind `blip extract-embeddings`: images (+ captions) -> embedding shards.

Per image: the conditioning encoder's tokens, the target encoder's tokens and its own global image
embedding; per caption: the target encoder's text embedding. Both encoders see the same decoded
image, each through its own processor; with `crop = "center"` (the default) the image is first cut to
its centred square, so both token grids cover the same pixels (embeddings/reading.py). How the work is cut, so that results do not depend on the
number of processes or workers, is in embeddings/reading.py.

Bad images are skipped (a shard may hold fewer than `shard_size` images) and reported in
errors.jsonl. Each shard is written atomically with a done record last; `resume` skips finished
shards. Under `accelerate launch` every process writes its own shards; rank 0 waits for all of them
(by their done records, so a long run cannot hit the process-group timeout) and writes index.json.
Memory is bounded by one shard's outputs (`shard_size` x tokens) plus the DataLoader's prefetch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from blip_toolkit import __version__
from blip_toolkit.data.sources import ItemSource, WdsSource, open_source
from blip_toolkit.embeddings.adapters import check_role, inspect_encoder
from blip_toolkit.embeddings.encode import Encoders, encode_shards, load_encoders
from blip_toolkit.embeddings.extract_config import DATA_KEYS, ExtractConfig, ExtractSummary
from blip_toolkit.embeddings.format import ERRORS_FILE, HEAD_FILE, INDEX_FILE, RUN_KIND
from blip_toolkit.embeddings.layout import TokenLayout
from blip_toolkit.embeddings.reading import Unit, item_units, square_coverage, tar_records, wds_units
from blip_toolkit.embeddings.shards import build_index, read_done
from blip_toolkit.engine.accelerate import process_state
from blip_toolkit.engine.outputs import RunRecord, check_output_dir, check_resume_settings, prepare_output_dir
from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import atomic_write, sha256_file, write_json

logger = logging.getLogger("blip")


# ----------------------------------------------------------------------------- the job


def extract_embeddings(
    config: ExtractConfig, *, after_shard: Callable[[dict], None] | None = None
) -> ExtractSummary:
    """Run the extraction described by `config`; return the summary (on every rank; `is_main` tells
    which one wrote index.json). `after_shard(record)` is called after each shard this process
    writes (tests use it to simulate a kill)."""
    started = time.perf_counter()
    source = open_source(config.source, allow_pipe=config.allow_pipe)
    # Refuse an impossible target before anything heavy happens.
    check_role(inspect_encoder(config.target_encoder)[1], "target", config.target_encoder)
    check_role(inspect_encoder(config.cond_encoder)[1], "cond", config.cond_encoder)
    state = process_state(cpu=config.device == "cpu")
    out = Path(config.out)
    spec = _data_spec(config, source)
    _check_output(out, config, spec)
    encoders = load_encoders(config, state)
    # Nothing is written before every check has passed (encoders, layouts, head).
    state.wait_for_everyone()  # everyone has checked the directory before rank 0 changes it
    if state.is_main_process:
        _prepare_output(out, config, spec, encoders)
    state.wait_for_everyone()

    units = wds_units(source) if source.kind == "webdataset" else item_units(source.items, config.shard_size)
    todo, skipped = _remaining(out, units[state.process_index :: state.num_processes])
    if state.is_main_process:
        _log_plan(config, source, out, units, todo, encoders, state.num_processes)
    for record in encode_shards(config, source, out, units, todo, encoders):
        if after_shard is not None:
            after_shard(record)

    if not state.is_main_process:
        logger.debug("rank %d finished its shards", state.process_index)
        seconds = time.perf_counter() - started
        return ExtractSummary(str(out), 0, 0, 0, 0, skipped_shards=skipped, seconds=seconds, is_main=False)
    records = _wait_for_all(out, units, state.num_processes)
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


def _data_spec(config: ExtractConfig, source: ItemSource | WdsSource) -> dict:
    """The settings that define the data (blip_run.json "config"; a --resume must match them)."""
    if source.kind == "webdataset":
        inputs = [u if u.startswith("pipe:") else str(Path(u).resolve()) for u in source.urls]
        source_id = {"kind": source.kind, "inputs": inputs}
    else:
        digest = hashlib.sha256(
            "\n".join(f"{i.key}\t{i.image}" for i in source.items).encode("utf-8")
        ).hexdigest()
        source_id = {
            "kind": source.kind,
            "path": str(Path(source.spec).resolve()),
            "items": len(source.items),
            "items_sha256": digest,
        }
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


def _remaining(out: Path, mine: list[Unit]) -> tuple[list[Unit], int]:
    """This rank's units minus the finished ones, and the number of output shards already done."""
    todo, skipped = [], 0
    for unit in mine:
        if unit.url:
            records = tar_records(out, unit)
            skipped += len(records) if records is not None else len(unit.done_parts)
            finished = records is not None
        else:
            finished = read_done(out, unit.name) is not None
            skipped += finished
        if not finished:
            todo.append(unit)
    return todo, skipped


def _log_plan(
    config, source, out: Path, units: list[Unit], todo: list[Unit], encoders: Encoders, world: int
) -> None:
    webdataset = source.kind == "webdataset"
    logger.info(
        "extracting %s from %s (%s) into %s: %d %s, %d to do%s; cond %s %s, target %s %s, head %s, crop %s",
        f"{len(source.urls)} tar(s)" if webdataset else f"{len(source.items)} images",
        ", ".join(config.source),
        source.kind,
        out,
        len(units),
        "tar(s)" if webdataset else "shard(s)",
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


def _wait_for_all(out: Path, units: list[Unit], world: int, poll: float = 2.0) -> list[dict]:
    """Every shard's done record in dataset order. With several processes, wait for the others by
    polling the file system (a barrier would time out when one rank has hours more work)."""

    def collect(unit: Unit) -> list[dict] | None:
        if unit.url:
            return tar_records(out, unit)
        record = read_done(out, unit.name)
        return [record] if record is not None else None

    found: dict[int, list[dict]] = {}
    last_log = time.monotonic()
    while True:
        for unit in units:
            if unit.number not in found:
                records = collect(unit)
                if records is not None:
                    found[unit.number] = records
        missing = [u.name for u in units if u.number not in found]
        if not missing:
            break
        if world == 1:  # nobody else is going to write them
            raise InputError(
                f"{out}: {len(missing)} shard(s) did not finish (first: {missing[0]}); rerun with --resume"
            )
        if time.monotonic() - last_log > 60:
            logger.info("waiting for %d shard(s) from the other processes", len(missing))
            last_log = time.monotonic()
        time.sleep(poll)
    return [record for unit in units for record in found[unit.number]]


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
