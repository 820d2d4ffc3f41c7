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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from blip_toolkit import __version__
from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS
from blip_toolkit.data.sources import ItemSource, WdsSource, open_source
from blip_toolkit.embeddings.adapter_base import EncoderAdapter, TargetAdapter
from blip_toolkit.embeddings.adapters import check_role, inspect_encoder, load_encoder
from blip_toolkit.embeddings.format import (
    CROP_MODES,
    DEFAULT_COND,
    DEFAULT_TARGET,
    ERRORS_FILE,
    HEAD_FILE,
    HEAD_POOLINGS,
    INDEX_FILE,
    RUN_KIND,
    STORAGE_DTYPES,
    TOKEN_LAYOUTS,
)
from blip_toolkit.embeddings.layout import TokenLayout, token_layout
from blip_toolkit.embeddings.reading import (
    ItemChunks,
    Preprocess,
    TarChunks,
    Unit,
    identity,
    item_units,
    part_name,
    square_coverage,
    tar_records,
    wds_units,
)
from blip_toolkit.embeddings.shards import TORCH_DTYPES, build_index, read_done, write_shard
from blip_toolkit.engine.accelerate import process_state
from blip_toolkit.engine.outputs import RunRecord, check_output_dir, check_resume_settings, prepare_output_dir
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.fsutil import atomic_write, sha256_file, write_json
from blip_toolkit.log import track
from blip_toolkit.runtime.device import resolve_device, resolve_dtype

logger = logging.getLogger("blip")

# Settings that define the data: a resumed run must use the same ones.
DATA_KEYS = (
    "cond_encoder",
    "target_encoder",
    "tokens",
    "pool",
    "cond_tokens",
    "cond_pool",
    "head_pool",
    "dtype",
    "encoder_dtype",
    "quantize",
    "shard_size",
    "max_pixels",
    "crop",
)


@dataclass
class ExtractConfig:
    """Options of `extract-embeddings` (see the command's help for each)."""

    source: list[str]
    out: str
    cond_encoder: str = DEFAULT_COND
    target_encoder: str = DEFAULT_TARGET
    tokens: str = "patch"  # target token layout: patch | cls+patch
    pool: int | None = None  # average-pool the target's patch grid to pool x pool
    cond_tokens: str | None = None  # None: same as tokens
    cond_pool: int | None = None  # None: same as pool; 0: no pooling
    head_pool: str | None = None  # cls | mean | map; None: cls for cls+patch, mean for patch (SigLIP: map)
    crop: str = "center"  # center: both encoders see the image's centred square; none: each its own view
    dtype: str = "float16"  # storage
    encoder_dtype: str = "auto"
    quantize: str | None = None  # int8 | 4bit: quantized encoders (runtime/quantize.py)
    device: str = "auto"
    batch_size: int = 32
    shard_size: int = 256
    num_workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_pipe: bool = False
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.source, str):
            self.source = [self.source]
        if self.tokens not in TOKEN_LAYOUTS:
            raise UsageError(f"--tokens {self.tokens!r}: use one of {', '.join(TOKEN_LAYOUTS)}")
        if self.cond_tokens is not None and self.cond_tokens not in TOKEN_LAYOUTS:
            raise UsageError(f"--cond-tokens {self.cond_tokens!r}: use one of {', '.join(TOKEN_LAYOUTS)}")
        if self.pool is not None and self.pool < 1:
            raise UsageError("--pool must be at least 1")
        if self.cond_pool is not None and self.cond_pool < 0:
            raise UsageError("--cond-pool must be 0 (no pooling) or more")
        if self.head_pool is not None and self.head_pool not in HEAD_POOLINGS:
            raise UsageError(f"--head-pool {self.head_pool!r}: use one of {', '.join(HEAD_POOLINGS)}")
        if self.crop not in CROP_MODES:
            raise UsageError(f"--crop {self.crop!r}: use one of {', '.join(CROP_MODES)}")
        if self.dtype not in STORAGE_DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: use one of {', '.join(STORAGE_DTYPES)}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise UsageError("--batch-size and --shard-size must be at least 1")
        if self.num_workers < 0:
            raise UsageError("--num-workers must be 0 or more")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")


@dataclass
class ExtractSummary:
    """What a run produced (read back from index.json on the main process)."""

    out: str
    samples: int
    captions: int
    shards: int
    errors: int
    skipped_shards: int = 0  # finished by an earlier run (--resume)
    seconds: float = 0.0
    is_main: bool = True
    errors_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Encoders:
    """Both encoders with their token layouts and the target head."""

    cond: EncoderAdapter
    target: TargetAdapter
    cond_layout: TokenLayout
    target_layout: TokenLayout
    head: Any  # TargetHead
    encoder_dtype: str


class _ShardBuffer:
    """One shard's outputs, preallocated in the storage dtype (the memory bound of the job)."""

    def __init__(
        self, capacity: int, cond_shape: tuple[int, int], target_shape: tuple[int, int], embed_dim: int, dtype
    ):
        self.cond = torch.empty(capacity, *cond_shape, dtype=dtype)
        self.target = torch.empty(capacity, *target_shape, dtype=dtype)
        self.target_global = torch.empty(capacity, embed_dim, dtype=dtype)
        self.text: list = []
        self.caption_image: list[int] = []
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.dtype = dtype
        self.embed_dim = embed_dim

    def add(self, cond, target, target_global, rows: list[dict], text_emb) -> None:
        n, b = len(self.rows), len(rows)
        self.cond[n : n + b] = cond
        self.target[n : n + b] = target
        self.target_global[n : n + b] = target_global
        for local, row in enumerate(rows):
            self.caption_image.extend([n + local] * len(row["captions"]))
        if text_emb is not None and len(text_emb):
            self.text.append(text_emb.to(self.dtype))
        self.rows.extend(rows)

    def tensors(self) -> dict:
        n = len(self.rows)
        text = torch.cat(self.text) if self.text else torch.empty(0, self.embed_dim, dtype=self.dtype)
        return {
            "cond": self.cond[:n],
            "target": self.target[:n],
            "target_global": self.target_global[:n],
            "text_emb": text,
            "caption_image": torch.tensor(self.caption_image, dtype=torch.int64),
        }


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
    encoders = _load_encoders(config, state)
    # Nothing is written before every check has passed (encoders, layouts, head).
    state.wait_for_everyone()  # everyone has checked the directory before rank 0 changes it
    if state.is_main_process:
        _prepare_output(out, config, spec, encoders)
    state.wait_for_everyone()

    units = wds_units(source) if source.kind == "webdataset" else item_units(source.items, config.shard_size)
    todo, skipped = _remaining(out, units[state.process_index :: state.num_processes])
    if state.is_main_process:
        _log_plan(config, source, out, units, todo, encoders, state.num_processes)
    for record in _extract(config, source, out, units, todo, encoders):
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


def _prepare_output(out: Path, config: ExtractConfig, spec: dict, encoders: _Encoders) -> None:
    record = RunRecord(out, RUN_KIND)
    previous = record.read() if config.resume else None
    prepare_output_dir(out, overwrite=config.overwrite, resume=config.resume, kind=RUN_KIND, flag="--out")
    for stale in (INDEX_FILE, ERRORS_FILE):  # rewritten at the end; never describe a half-done run
        (out / stale).unlink(missing_ok=True)
    record.start({"config": spec}, previous=previous)
    encoders.head.save(out / HEAD_FILE)


def _load_encoders(config: ExtractConfig, state) -> _Encoders:
    """Both encoders on this process's device, their token layouts and the target head."""
    if config.device == "auto" and state.num_processes > 1 and state.device is not None:
        device = state.device
    else:
        device = resolve_device(config.device)
    encoder_dtype = resolve_dtype(config.encoder_dtype, device)
    kwargs = dict(
        device=device,
        dtype=encoder_dtype,
        trust_remote_code=config.trust_remote_code,
        quantize=config.quantize,
    )
    cond = load_encoder(config.cond_encoder, "cond", **kwargs)
    target = load_encoder(config.target_encoder, "target", **kwargs)
    target_layout = token_layout(target, config.tokens, config.pool, flag="--tokens")
    cond_pool = config.pool if config.cond_pool is None else (config.cond_pool or None)
    cond_layout = token_layout(cond, config.cond_tokens or config.tokens, cond_pool, flag="--cond-tokens")
    pooling = config.head_pool or target.default_pooling(target_layout.keep_cls)
    head = target.head(
        pooling,
        has_cls=target_layout.keep_cls,
        info={
            "source": target.source,
            "family": target.spec.name,
            "tokens": target_layout.name,
            "pool": target_layout.pool,
            "grid": target.grid,
        },
    )
    return _Encoders(cond, target, cond_layout, target_layout, head, str(encoder_dtype).replace("torch.", ""))


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
    config, source, out: Path, units: list[Unit], todo: list[Unit], encoders: _Encoders, world: int
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


def _loader(config: ExtractConfig, source, todo: list[Unit], encoders: _Encoders):
    """(DataLoader of decoded chunks, number of chunks or None for webdataset)."""
    preprocess = Preprocess((encoders.cond.image_processor, encoders.target.image_processor), config.crop)
    if source.kind == "webdataset":
        dataset = TarChunks(todo, config.shard_size, config.batch_size, preprocess, config.max_pixels)
        total, workers = None, min(config.num_workers, len(todo))
    else:
        chunks = []
        for unit in todo:
            starts = list(range(0, len(unit.items), config.batch_size))
            chunks.extend(
                (unit.number, unit.items[s : s + config.batch_size], s == starts[-1]) for s in starts
            )
        dataset = ItemChunks(chunks, preprocess, config.max_pixels)
        total, workers = len(chunks), min(config.num_workers, len(chunks))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=identity,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    return loader, total


def _extract(
    config: ExtractConfig, source, out: Path, units: list[Unit], todo: list[Unit], encoders: _Encoders
):
    """Encode this rank's chunks and write each shard when its last chunk is in; yields the done
    records."""
    storage = TORCH_DTYPES[config.dtype]
    cond, target = encoders.cond, encoders.target
    cond_shape = (encoders.cond_layout.num_tokens, cond.hidden_size)
    target_shape = (encoders.target_layout.num_tokens, target.hidden_size)
    names = {u.number: u.name for u in units}
    inputs = {u.number: u.url for u in units}
    buffers: dict[tuple[int, Any], _ShardBuffer] = {}
    loader, total = _loader(config, source, todo, encoders)
    for chunk in track(loader, total=total, description="extracting"):
        key = (chunk["unit"], chunk["part"])
        buffer = buffers.get(key)
        if buffer is None:
            buffer = buffers[key] = _ShardBuffer(
                config.shard_size, cond_shape, target_shape, target.embed_dim, storage
            )
        for error in chunk["errors"]:
            logger.warning("%s", error["error"])
        buffer.errors.extend(chunk["errors"])
        if chunk["rows"]:
            cond_pixels, target_pixels = chunk["pixels"]
            cond_tokens = encoders.cond_layout.apply(cond.tokens(cond_pixels))  # [b, M, Dc]
            target_tokens, target_global = target.encode_image(target_pixels)  # [b, T, Dt], [b, E]
            target_tokens = encoders.target_layout.apply(target_tokens)  # [b, N, Dt]
            captions = [c for row in chunk["rows"] for c in row["captions"]]
            text = target.encode_text(captions, batch_size=max(config.batch_size, 1)) if captions else None
            buffer.add(
                cond_tokens.to(storage),
                target_tokens.to(storage),
                target_global.to(storage),
                chunk["rows"],
                text,
            )
        if chunk["part_end"]:
            yield _write(out, buffers.pop(key), chunk, names, inputs, storage)


def _write(out: Path, buffer: _ShardBuffer, chunk: dict, names: dict, inputs: dict, storage) -> dict:
    unit, part = chunk["unit"], chunk["part"]
    tensors = buffer.tensors()
    for name in ("cond", "target", "target_global", "text_emb"):
        if tensors[name].numel() and not torch.isfinite(tensors[name]).all():
            logger.warning(
                "shard of %s: %s has NaN/Inf values (out of the %s range?)", names[unit], name, storage
            )
    if part is None:
        name, extra = names[unit], {}
    else:
        name = part_name(names[unit], part)
        extra = {"input": inputs[unit], "part": part, "last": bool(chunk["tar_end"])}
    record = write_shard(out, name, tensors, buffer.rows, errors=buffer.errors, extra=extra)
    logger.debug(
        "wrote %s: %d images, %d captions, %d errors",
        name,
        record["samples"],
        record["captions"],
        len(buffer.errors),
    )
    return record


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


def _write_index(out: Path, config: ExtractConfig, source, encoders: _Encoders, records: list[dict]) -> dict:
    """errors.jsonl and index.json from the done records (main process, last); returns the counts."""
    with atomic_write(out / ERRORS_FILE) as handle:
        for record in records:
            for error in record.get("errors", []):
                handle.write(json.dumps({"shard": record["name"], **error}, ensure_ascii=False) + "\n")
    index = build_index(records=records, info=_index_info(config, source, encoders, out / HEAD_FILE))
    write_json(out / INDEX_FILE, index)
    RunRecord(out, RUN_KIND).finish(counts=index["counts"])
    return index["counts"]


def _index_info(config: ExtractConfig, source, encoders: _Encoders, head_path: Path) -> dict:
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
