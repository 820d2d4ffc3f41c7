"""The extraction job behind `blip extract-embeddings`: images (+ captions) -> embedding shards.

Per image: the conditioning encoder's tokens, the target encoder's tokens and its own global image
embedding; per caption: the target encoder's text embedding. Both encoders see the same decoded
image, each through its own processor.

How the work is cut (so results do not depend on the number of processes or workers):

- folder / TSV: items sorted by key, grouped into shards of `shard_size` consecutive items
  (`shard-00000`, `shard-00001`, ...); shard i is done by rank i % world_size.
- webdataset: the unit is an input tar (split by node, then by DataLoader worker, the webdataset
  way); the samples of one tar are cut into parts of `shard_size` and written as
  `<tar name>-<part:05d>` (e.g. `data-003-00000`).
- Within a shard, images go to the encoders in batches of `batch_size` consecutive items counted
  from the shard's start, so every shard sees the same batches whoever computes it.

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
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS
from blip_toolkit.encoders.adapters import DEFAULT_COND, DEFAULT_TARGET
from blip_toolkit.errors import InputError, OutputExistsError, UsageError

logger = logging.getLogger("blip")

TOKEN_LAYOUTS = ("patch", "cls+patch")
# Settings that define the data: a resumed run must use the same ones.
_RESUME_KEYS = (
    "source",
    "cond_encoder",
    "target_encoder",
    "tokens",
    "pool",
    "cond_tokens",
    "cond_pool",
    "head_pool",
    "dtype",
    "encoder_dtype",
    "shard_size",
    "max_pixels",
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
    dtype: str = "float16"  # storage
    encoder_dtype: str = "auto"
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
        from blip_toolkit.data.shards import STORAGE_DTYPES
        from blip_toolkit.encoders.head import POOLINGS

        if isinstance(self.source, str):
            self.source = [self.source]
        if self.tokens not in TOKEN_LAYOUTS:
            raise UsageError(f"--tokens {self.tokens!r}: use patch or cls+patch")
        if self.cond_tokens is not None and self.cond_tokens not in TOKEN_LAYOUTS:
            raise UsageError(f"--cond-tokens {self.cond_tokens!r}: use patch or cls+patch")
        if self.pool is not None and self.pool < 1:
            raise UsageError("--pool must be at least 1")
        if self.cond_pool is not None and self.cond_pool < 0:
            raise UsageError("--cond-pool must be 0 (no pooling) or more")
        if self.head_pool is not None and self.head_pool not in POOLINGS:
            raise UsageError(f"--head-pool {self.head_pool!r}: use one of {', '.join(POOLINGS)}")
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


# ----------------------------------------------------------------------------- token layout


@dataclass(frozen=True)
class TokenLayout:
    """Which tokens of an encoder are stored: CLS kept or not, patch grid pooled to `pool` x `pool`.

    The encoder gives [B, (1 +) g*g, D]; `apply` returns [B, num_tokens, D] with the CLS token (when
    kept) first, then the (pooled) patch grid in row-major order. Pooling is torch's
    adaptive_avg_pool2d: equal to avg_pool2d with kernel g/pool when pool divides g, overlapping
    windows otherwise. The CLS token is never pooled."""

    has_cls: bool
    grid: int
    keep_cls: bool
    pool: int | None

    @property
    def side(self) -> int:
        return self.pool if self.pool else self.grid

    @property
    def num_tokens(self) -> int:
        return self.side * self.side + (1 if self.keep_cls else 0)

    @property
    def name(self) -> str:
        return "cls+patch" if self.keep_cls else "patch"

    def apply(self, tokens):
        """tokens [B, T, D] -> [B, num_tokens, D]."""
        from torch.nn import functional as F

        patches = tokens[:, 1:] if self.has_cls else tokens  # [B, g*g, D]
        if self.pool and self.pool != self.grid:
            b, _, d = patches.shape
            grid = patches.transpose(1, 2).reshape(b, d, self.grid, self.grid)  # [B, D, g, g]
            grid = F.adaptive_avg_pool2d(grid, self.pool)  # [B, D, p, p]
            patches = grid.flatten(2).transpose(1, 2)  # [B, p*p, D]
        if self.keep_cls:
            patches = torch.cat([tokens[:, :1], patches], dim=1)  # [B, 1 + p*p, D]
        return patches.contiguous()


def token_layout(encoder, tokens: str, pool: int | None, *, flag: str) -> TokenLayout:
    keep_cls = tokens == "cls+patch"
    if keep_cls and not encoder.has_cls:
        raise UsageError(
            f"{flag} cls+patch: {encoder.source} ({encoder.spec.label}) has no CLS token; use patch"
        )
    if pool and pool > encoder.grid:
        raise UsageError(
            f"pool {pool} is larger than {encoder.source}'s {encoder.grid}x{encoder.grid} patch grid"
        )
    if pool and encoder.grid % pool:
        logger.warning(
            "%s: %dx%d grid is not divisible by %d; using adaptive average pooling (overlapping windows)",
            encoder.source,
            encoder.grid,
            encoder.grid,
            pool,
        )
    return TokenLayout(encoder.has_cls, encoder.grid, keep_cls, pool)


# ----------------------------------------------------------------------------- work plan


@dataclass
class _Unit:
    """One unit of work: an output shard of a folder/TSV source, or an input tar of a webdataset."""

    number: int
    name: str
    items: list = field(default_factory=list)  # folder/TSV items
    url: str | None = None  # webdataset tar
    done_parts: set[int] = field(default_factory=set)


def _item_units(items: list, shard_size: int) -> list[_Unit]:
    return [
        _Unit(i, f"shard-{i:05d}", items[start : start + shard_size])
        for i, start in enumerate(range(0, len(items), shard_size))
    ]


def _wds_units(source) -> list[_Unit]:
    return [_Unit(i, name, url=url) for i, (url, name) in enumerate(zip(source.urls, source.names))]


def part_name(tar_name: str, part: int) -> str:
    return f"{tar_name}-{part:05d}"


def _tar_records(out: Path, unit: _Unit) -> list[dict] | None:
    """The done records of every part of a tar if the tar is finished, else None (and the finished
    parts in unit.done_parts, which a rerun does not recompute)."""
    from blip_toolkit.data.shards import read_done

    records = []
    part = 0
    while True:
        record = read_done(out, part_name(unit.name, part))
        if record is None:
            unit.done_parts = {r["part"] for r in records}
            return None
        records.append(record)
        if record.get("last"):
            return records
        part += 1


# ----------------------------------------------------------------------------- decoding (DataLoader workers)


class _Preprocess:
    """Decoded image -> pixel_values [3, H, W] with one encoder's image processor (picklable)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]


def _decode_into(
    chunk: dict, *, key: str, image_label: str, data, captions_fn, preprocess, max_pixels: int
) -> None:
    """Decode one image (path or bytes) for both encoders and add it to `chunk`, or add its error."""
    from blip_toolkit.data.images import ImageLoadError, open_image
    from blip_toolkit.data.sources import SampleError

    try:
        captions = captions_fn()
        image = open_image(data, max_pixels=max_pixels, name=image_label)
        pixels = [p(image) for p in preprocess]
    except (ImageLoadError, SampleError) as exc:
        chunk["errors"].append({"key": key, "image": image_label, "error": str(exc)})
        return
    except Exception as exc:  # noqa: BLE001 - a processor failing on one odd image must not stop the run
        chunk["errors"].append(
            {"key": key, "image": image_label, "error": f"{image_label}: {type(exc).__name__}: {exc}"}
        )
        return
    chunk["rows"].append({"key": key, "image": image_label, "captions": captions})
    for bucket, value in zip(chunk["pixels"], pixels):
        bucket.append(value)


def _new_chunk(unit: int, **extra) -> dict:
    return {"unit": unit, "rows": [], "pixels": ([], []), "errors": [], **extra}


def _stack(chunk: dict) -> dict:
    chunk["pixels"] = tuple(torch.stack(p) if p else None for p in chunk["pixels"])
    return chunk


class _ItemChunks:
    """Map-style dataset over this rank's folder/TSV chunks (a chunk = up to batch_size consecutive
    items of one shard). Order is preserved by the DataLoader, so shards arrive whole and in order."""

    def __init__(self, chunks: list[tuple[int, list, bool]], preprocess, max_pixels: int):
        self.chunks, self.preprocess, self.max_pixels = chunks, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict:
        unit, items, last = self.chunks[k]
        chunk = _new_chunk(unit, part=None, part_end=last, tar_end=last)
        for item in items:
            _decode_into(
                chunk,
                key=item.key,
                image_label=item.image,
                data=item.image,
                captions_fn=item.load_captions,
                preprocess=self.preprocess,
                max_pixels=self.max_pixels,
            )
        return _stack(chunk)


def _with_last(iterator: Iterator) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs: one item of look-ahead, so a tar's last part is known when it ends."""
    iterator = iter(iterator)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


class _TarChunks(torch.utils.data.IterableDataset):
    """This rank's tars, split between DataLoader workers (webdataset's split_by_worker); yields
    chunks of up to batch_size samples that never cross a part boundary."""

    def __init__(self, units: list[_Unit], shard_size: int, batch_size: int, preprocess, max_pixels: int):
        super().__init__()
        self.units, self.shard_size, self.batch_size = units, shard_size, batch_size
        self.preprocess, self.max_pixels = preprocess, max_pixels

    def __iter__(self):
        from webdataset.shardlists import split_by_worker

        for unit in split_by_worker(self.units):
            yield from self._tar(unit)

    def _tar(self, unit: _Unit):
        from blip_toolkit.data.sources import ErrorCollector, decode_sample, iter_tar

        handler = ErrorCollector(unit.url)
        position = 0
        chunk = _new_chunk(unit.number, part=0)
        for sample, is_last in _with_last(iter_tar(unit.url, handler)):
            part = position // self.shard_size
            position += 1
            part_end = is_last or position % self.shard_size == 0
            if part in unit.done_parts:  # finished by an earlier run: read past it only
                handler.drain()
                chunk = _new_chunk(unit.number, part=part + 1)
                continue
            chunk["part"] = part
            key = f"{unit.name}/{sample.get('__key__', position - 1)}"
            label = f"{unit.url}#{sample.get('__key__', position - 1)}"

            def captions(sample=sample):
                return decode_sample(sample)[2]

            try:
                suffix, data, _ = decode_sample(sample)
                label = f"{label}.{suffix}"
            except Exception:  # noqa: BLE001 - reported by _decode_into with the same message
                data = b""
            _decode_into(
                chunk,
                key=key,
                image_label=label,
                data=data,
                captions_fn=captions,
                preprocess=self.preprocess,
                max_pixels=self.max_pixels,
            )
            if part_end or len(chunk["rows"]) + len(chunk["errors"]) >= self.batch_size:
                chunk["errors"].extend(
                    {"key": unit.url, "image": unit.url, "error": e} for e in handler.drain()
                )
                chunk.update(part_end=part_end, tar_end=is_last)
                yield _stack(chunk)
                chunk = _new_chunk(unit.number, part=part + 1 if part_end else part)
        if position == 0:  # an empty or unreadable tar: one empty part, so the tar counts as done
            chunk["errors"].extend({"key": unit.url, "image": unit.url, "error": e} for e in handler.drain())
            chunk.update(part=0, part_end=True, tar_end=True)
            yield _stack(chunk)


def _identity(x):
    return x


# ----------------------------------------------------------------------------- shard assembly


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


class _SingleProcess:
    process_index, num_processes, is_main_process, device = 0, 1, True, None

    def wait_for_everyone(self) -> None:
        pass


def _process_state(device: str):
    """accelerate's PartialState under a multi-process launch (rank, world size, barrier), else a
    trivial stand-in (importing accelerate is not needed for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _SingleProcess()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState only builds a gloo (CPU) process group when told to: AcceleratorState reads
    # ACCELERATE_USE_CPU, PartialState does not.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        # Independent "rank 0" processes would all write the same shards and the index.
        raise UsageError(
            f"launched as {world} processes (WORLD_SIZE) but no process group was set up; on CPU "
            "launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N"
        )
    return state


def _run_spec(config: ExtractConfig, source) -> dict:
    """blip_run.json: the settings that define the data (compared on --resume) and the input list."""
    from blip_toolkit import __version__

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
    spec = {k: getattr(config, k) for k in _RESUME_KEYS if k != "source"}
    return {"command": "extract-embeddings", "toolkit_version": __version__, "source": source_id, **spec}


def _check_output(out: Path, config: ExtractConfig, spec: dict) -> None:
    """The output policy, read-only (every rank runs it before rank 0 changes anything)."""
    from blip_toolkit.data.shards import RUN_FILE
    from blip_toolkit.fsutil import OWNED_MARKERS

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if config.resume:
        run_file = out / RUN_FILE
        if not run_file.is_file():
            raise OutputExistsError(
                f"{out}: not an extract-embeddings output (no {RUN_FILE}); cannot resume it"
            )
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{run_file}: unreadable ({exc})") from exc
        changed = [k for k in _RESUME_KEYS if old.get(k) != spec.get(k)]
        if changed:
            what = "; ".join(
                f"{k}: was {json.dumps(old.get(k))}, now {json.dumps(spec.get(k))}" for k in changed
            )
            raise UsageError(
                f"--resume: {out} was extracted with other settings ({what})",
                hint="use the same settings, or --overwrite to start again",
            )
    elif not config.overwrite:
        raise OutputExistsError(
            f"{out} already exists and is not empty",
            hint="pass --resume to continue or --overwrite to replace it",
        )
    elif not any((out / marker).exists() for marker in OWNED_MARKERS):
        raise OutputExistsError(
            f"{out} is not empty and was not written by blip; refusing to clear it",
            hint="choose another directory",
        )


def extract_embeddings(
    config: ExtractConfig, *, after_shard: Callable[[dict], None] | None = None
) -> ExtractSummary:
    """Run the extraction described by `config`; return the summary (on every rank; `is_main` tells
    which one wrote index.json). `after_shard(record)` is called after each shard this process
    writes (tests use it to simulate a kill)."""
    from blip_toolkit.data.shards import (
        ERRORS_FILE,
        HEAD_FILE,
        INDEX_FILE,
        RUN_FILE,
        STORAGE_DTYPES,
        read_done,
    )
    from blip_toolkit.data.sources import open_source
    from blip_toolkit.encoders.adapters import check_role, inspect_encoder, load_encoder
    from blip_toolkit.fsutil import prepare_output_dir, write_json
    from blip_toolkit.log import track
    from blip_toolkit.runtime.device import resolve_device, resolve_dtype

    started = time.perf_counter()
    source = open_source(config.source, allow_pipe=config.allow_pipe)
    # Refuse an impossible target before anything heavy happens.
    check_role(inspect_encoder(config.target_encoder)[1], "target", config.target_encoder)
    check_role(inspect_encoder(config.cond_encoder)[1], "cond", config.cond_encoder)
    state = _process_state(config.device)
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    out = Path(config.out)
    spec = _run_spec(config, source)
    _check_output(out, config, spec)

    if config.device == "auto" and world > 1 and state.device is not None:
        device = state.device
    else:
        device = resolve_device(config.device)
    encoder_dtype = resolve_dtype(config.encoder_dtype, device)
    storage = STORAGE_DTYPES[config.dtype]
    cond = load_encoder(
        config.cond_encoder,
        "cond",
        device=device,
        dtype=encoder_dtype,
        trust_remote_code=config.trust_remote_code,
    )
    target = load_encoder(
        config.target_encoder,
        "target",
        device=device,
        dtype=encoder_dtype,
        trust_remote_code=config.trust_remote_code,
    )
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
    # Nothing is written before every check has passed (encoders, layouts, head).
    state.wait_for_everyone()  # everyone has checked the directory before rank 0 changes it
    if is_main:
        prepare_output_dir(out, overwrite=config.overwrite, resume=config.resume)
        for stale in (INDEX_FILE, ERRORS_FILE):  # rewritten at the end; never describe a half-done run
            (out / stale).unlink(missing_ok=True)
        write_json(out / RUN_FILE, spec)
        head.save(out / HEAD_FILE)
    state.wait_for_everyone()

    # ---- plan: this rank's units, minus finished ones
    if source.kind == "webdataset":
        units = _wds_units(source)
    else:
        units = _item_units(source.items, config.shard_size)
    mine = units[rank::world]  # shard / tar i -> rank i % world (webdataset's split_by_node)
    todo, skipped = [], 0  # skipped: output shards finished by an earlier run
    for unit in mine:
        if unit.url:
            records = _tar_records(out, unit)
            skipped += len(records) if records is not None else len(unit.done_parts)
            finished = records is not None
        else:
            finished = read_done(out, unit.name) is not None
            skipped += finished
        if not finished:
            todo.append(unit)
    if is_main:
        what = f"{len(source.items)} images" if source.kind != "webdataset" else f"{len(source.urls)} tar(s)"
        logger.info(
            "extracting %s from %s (%s) into %s: %d %s, %d to do%s; cond %s %s, target %s %s, head %s",
            what,
            ", ".join(config.source),
            source.kind,
            out,
            len(units),
            "tar(s)" if source.kind == "webdataset" else "shard(s)",
            len(todo),
            f" by this process (rank 0 of {world})" if world > 1 else "",
            cond.source,
            [cond_layout.num_tokens, cond.hidden_size],
            target.source,
            [target_layout.num_tokens, target.hidden_size],
            pooling,
        )

    preprocess = (_Preprocess(cond.image_processor), _Preprocess(target.image_processor))
    if source.kind == "webdataset":
        dataset = _TarChunks(todo, config.shard_size, config.batch_size, preprocess, config.max_pixels)
        total = None
        workers = min(config.num_workers, len(todo))
    else:
        chunks = []
        for unit in todo:
            starts = list(range(0, len(unit.items), config.batch_size))
            chunks.extend(
                (unit.number, unit.items[s : s + config.batch_size], s == starts[-1]) for s in starts
            )
        dataset = _ItemChunks(chunks, preprocess, config.max_pixels)
        total = len(chunks)
        workers = min(config.num_workers, len(chunks))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )

    cond_shape = (cond_layout.num_tokens, cond.hidden_size)
    target_shape = (target_layout.num_tokens, target.hidden_size)
    names = {u.number: u.name for u in units}
    inputs = {u.number: u.url for u in units}
    buffers: dict[tuple[int, Any], _ShardBuffer] = {}
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
            cond_tokens = cond_layout.apply(cond.tokens(cond_pixels))  # [b, M, Dc]
            target_tokens, target_global = target.encode_image(target_pixels)  # [b, T, Dt], [b, E]
            target_tokens = target_layout.apply(target_tokens)  # [b, N, Dt]
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
            record = _write(out, buffers.pop(key), chunk, names, inputs, storage)
            if after_shard is not None:
                after_shard(record)

    # ---- rank 0 waits for every shard (done records), then writes errors.jsonl and index.json
    if not is_main:
        logger.debug("rank %d finished its shards", rank)
        return ExtractSummary(
            str(out), 0, 0, 0, 0, skipped_shards=skipped, seconds=time.perf_counter() - started, is_main=False
        )
    records = _wait_for_all(out, units, world)
    _write_errors(out / ERRORS_FILE, records)
    info = _index_info(
        config,
        source,
        cond,
        target,
        cond_layout,
        target_layout,
        head,
        out / HEAD_FILE,
        encoder_dtype=str(encoder_dtype).replace("torch.", ""),
    )
    from blip_toolkit.data.shards import build_index

    index = build_index(records=records, info=info)
    write_json(out / INDEX_FILE, index)
    counts = index["counts"]
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


def _write(out: Path, buffer: _ShardBuffer, chunk: dict, names: dict, inputs: dict, storage) -> dict:
    from blip_toolkit.data.shards import write_shard

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


def _wait_for_all(out: Path, units: list[_Unit], world: int, poll: float = 2.0) -> list[dict]:
    """Every shard's done record in dataset order. With several processes, wait for the others by
    polling the file system (a barrier would time out when one rank has hours more work)."""
    from blip_toolkit.data.shards import read_done

    def collect(unit: _Unit) -> list[dict] | None:
        if unit.url:
            return _tar_records(out, unit)
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


def _write_errors(path: Path, records: list[dict]) -> None:
    from blip_toolkit.fsutil import atomic_write

    with atomic_write(path) as handle:
        for record in records:
            for error in record.get("errors", []):
                handle.write(json.dumps({"shard": record["name"], **error}, ensure_ascii=False) + "\n")


def _index_info(
    config: ExtractConfig,
    source,
    cond,
    target,
    cond_layout: TokenLayout,
    target_layout: TokenLayout,
    head,
    head_path: Path,
    *,
    encoder_dtype: str,
) -> dict:
    from blip_toolkit import __version__
    from blip_toolkit.fsutil import sha256_file

    def encoder(adapter, layout: TokenLayout) -> dict:
        return {
            **adapter.describe(),
            "tokens": layout.name,
            "pool": layout.pool,
            "num_tokens": layout.num_tokens,
            "encoder_dtype": encoder_dtype,
        }

    dims = {
        "cond_tokens": cond_layout.num_tokens,
        "cond_dim": cond.hidden_size,
        "target_tokens": target_layout.num_tokens,
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
    return {
        "toolkit_version": __version__,
        "source": source.describe(),
        "encoders": {"cond": encoder(cond, cond_layout), "target": encoder(target, target_layout)},
        "dims": dims,
        "dtype": config.dtype,
        "tensors": tensors,
        "shard_size": config.shard_size,
        "head": {
            "file": head_path.name,
            "sha256": sha256_file(head_path),
            "pooling": head.pooling,
            "has_cls": head.has_cls,
        },
    }
