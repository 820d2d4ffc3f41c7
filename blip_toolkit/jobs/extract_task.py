"""The encoding side of `blip extract-embeddings` on the dataset pipeline: both encoders loaded with
their token layouts and the target head (`load_encoders`), the task that encodes a batch of prepared
images and their captions (`ExtractionTask`), and the sink that buffers each output shard and writes
it once complete (`ShardSink`; embeddings/shards.py `write_shard`: atomically, done record last).

Output shards: a unit of `shard_size` images of a folder / TSV source is one shard (`shard-00000`);
a tar or a table unit (a row group) is cut into parts of `shard_size` positions (`<tar>-00000`,
`<file>-<row group>-00000`). One shard's outputs, preallocated, are the memory bound of the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blip_toolkit.embeddings.layout import TokenLayout, token_layout
from blip_toolkit.embeddings.shards import TORCH_DTYPES, read_done, write_shard
from blip_toolkit.jobs.extract_config import ExtractConfig
from blip_toolkit.jobs.extract_preprocess import Preprocess
from blip_toolkit.models.adapter_base import EncoderAdapter, TargetAdapter
from blip_toolkit.models.adapters import load_encoder
from blip_toolkit.models.device import resolve_device, resolve_dtype
from blip_toolkit.pipeline.items import Prepared
from blip_toolkit.pipeline.resume import ResumeState
from blip_toolkit.pipeline.sources import Unit

logger = logging.getLogger("blip")


@dataclass
class Encoders:
    """Both encoders with their token layouts and the target head."""

    cond: EncoderAdapter
    target: TargetAdapter
    cond_layout: TokenLayout
    target_layout: TokenLayout
    head: Any  # TargetHead
    encoder_dtype: str


def load_encoders(config: ExtractConfig, state) -> Encoders:
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
    return Encoders(cond, target, cond_layout, target_layout, head, str(encoder_dtype).replace("torch.", ""))


class ExtractionTask:
    """Encode a batch of prepared images (both encoders' pixels) and their captions (the pipeline's
    task protocol, pipeline/stream.py). Each chunk is one batch: chunks never cross a shard, so every
    shard sees the same batches whoever computes it."""

    varying_lengths = False
    chunk_batches = True

    def __init__(self, encoders: Encoders, config: ExtractConfig):
        self.encoders, self.config = encoders, config
        self.encoder = Preprocess(
            (encoders.cond.image_processor, encoders.target.image_processor), config.crop
        )

    def start(self) -> None:
        pass

    def group(self, item: Prepared) -> int:
        return 0

    def error_fields(self, item: Prepared) -> dict:
        return {}

    def run(self, runner, items: list[Prepared]) -> list[dict]:
        """Per item: cond [M, Dc], target [N, Dt], target_global [E], text [c, E] (its captions)."""
        enc = self.encoders
        cond_pixels = torch.cat([item.inputs["cond_pixels"] for item in items])
        target_pixels = torch.cat([item.inputs["target_pixels"] for item in items])
        cond_tokens = enc.cond_layout.apply(enc.cond.tokens(cond_pixels))  # [b, M, Dc]
        target_tokens, target_global = enc.target.encode_image(target_pixels)  # [b, T, Dt], [b, E]
        target_tokens = enc.target_layout.apply(target_tokens)  # [b, N, Dt]
        captions = [c for item in items for c in item.captions]
        text = (
            enc.target.encode_text(captions, batch_size=max(self.config.batch_size, 1)) if captions else None
        )
        out, start = [], 0
        for row, item in enumerate(items):
            count = len(item.captions)
            out.append(
                {
                    "cond": cond_tokens[row],
                    "target": target_tokens[row],
                    "target_global": target_global[row],
                    "text": text[start : start + count] if count else None,
                }
            )
            start += count
        return out


def shard_name(unit: Unit, part: int) -> str:
    """The output shard of `part` of `unit` (see the module docstring)."""
    if unit.kind == "files":
        return unit.name
    if unit.kind == "table":
        return f"{unit.name}-{unit.table.index:05d}-{part:05d}"
    return f"{unit.name}-{part:05d}"


def unit_records(out: Path, unit: Unit) -> list[dict]:
    """The done records of `unit`'s shards written so far, in order (the last one says `last`)."""
    records = []
    while True:
        record = read_done(out, shard_name(unit, len(records)))
        if record is None:
            return records
        records.append(record)
        if record.get("last") or unit.kind == "files":
            return records


def shards_state(out: Path, units: list[Unit], shard_size: int) -> ResumeState:
    """What earlier attempts wrote, as the pipeline's ResumeState: the positions of every finished
    shard, and the end of every unit whose last shard is written."""
    state = ResumeState()
    for unit in units:
        for part, record in enumerate(unit_records(out, unit)):
            start, stop = record.get("offsets", (part * shard_size, (part + 1) * shard_size))
            for offset in range(start, stop):
                state.add((unit.number, offset), False)
            if record.get("last") or unit.kind == "files":
                state.end(unit.number, record.get("positions", stop))
    return state


class _ShardBuffer:
    """One shard's outputs, preallocated in the storage dtype (the memory bound of the job)."""

    def __init__(self, unit: Unit, part: int, capacity: int, dims: dict, dtype):
        self.unit, self.part = unit, part
        self.cond = torch.empty(capacity, dims["cond_tokens"], dims["cond_dim"], dtype=dtype)
        self.target = torch.empty(capacity, dims["target_tokens"], dims["target_dim"], dtype=dtype)
        self.target_global = torch.empty(capacity, dims["embed_dim"], dtype=dtype)
        self.text: list[torch.Tensor] = []
        self.caption_image: list[int] = []
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.dtype, self.embed_dim = dtype, dims["embed_dim"]
        self.first: int | None = None
        self.last = -1

    def add(self, item: Prepared, result: dict | None) -> None:
        offset = item.pos[1]
        self.first = offset if self.first is None else self.first
        self.last = offset
        if result is None:
            self.errors.append({"key": item.key, "image": item.label, "error": item.error})
            return
        n = len(self.rows)
        self.cond[n] = result["cond"]
        self.target[n] = result["target"]
        self.target_global[n] = result["target_global"]
        if result["text"] is not None:
            self.text.append(result["text"].to(self.dtype))
            self.caption_image.extend([n] * len(item.captions))
        self.rows.append({"key": item.key, "image": item.label, "captions": list(item.captions)})

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


class ShardSink:
    """The sink of extract-embeddings: results in input order, buffered per output shard (part of a
    unit) and written when the shard is complete: when a later position arrives, or at the unit's
    end. `after_shard(record)` is called after each shard is written (tests simulate a kill there)."""

    def __init__(
        self,
        out: Path,
        units: list[Unit],
        config: ExtractConfig,
        dims: dict,
        resume: ResumeState,
        after_shard=None,
    ):
        self.out, self.config, self.dims, self.resume = out, config, dims, resume
        self.units = {u.number: u for u in units}
        self.storage = TORCH_DTYPES[config.dtype]
        self.after_shard = after_shard
        self.buffer: _ShardBuffer | None = None
        self.records: list[dict] = []

    def _part(self, unit: Unit, offset: int) -> int:
        return 0 if unit.kind == "files" else offset // self.config.shard_size

    def record(self, item: Prepared, result: Any) -> bool:
        unit, offset = self.units[item.pos[0]], item.pos[1]
        part = self._part(unit, offset)
        if self.buffer is not None and (self.buffer.unit.number, self.buffer.part) != (unit.number, part):
            self._write(end=None)
        if self.buffer is None:
            capacity = unit.size if unit.kind == "files" else self.config.shard_size
            self.buffer = _ShardBuffer(unit, part, capacity, self.dims, self.storage)
        if result is None:
            logger.warning("%s", item.error)
        self.buffer.add(item, result)
        return result is None

    def end(self, unit_number: int, count: int) -> None:
        unit = self.units[unit_number]
        if self.buffer is not None and self.buffer.unit.number == unit_number:
            self._write(end=count)
        elif count == 0 or not self.resume.offsets(unit_number).count:
            # An empty or unreadable unit: one empty shard, so the unit counts as done.
            self.buffer = _ShardBuffer(unit, 0, 0, self.dims, self.storage)
            self._write(end=count)
        else:
            # The unit's last shard was written by an earlier attempt without its end: mark it now.
            logger.debug("unit %s: end %d after a resume", unit.name, count)

    def _write(self, end: int | None) -> None:
        buffer, self.buffer = self.buffer, None
        unit, part = buffer.unit, buffer.part
        tensors = buffer.tensors()
        for name in ("cond", "target", "target_global", "text_emb"):
            if tensors[name].numel() and not torch.isfinite(tensors[name]).all():
                logger.warning(
                    "shard of %s: %s has NaN/Inf values (out of the %s range?)",
                    unit.name,
                    name,
                    self.config.dtype,
                )
        start = part * self.config.shard_size if unit.kind != "files" else 0
        stop = buffer.last + 1 if end is None else end
        extra: dict[str, Any] = {"offsets": [start, stop]}
        if unit.kind != "files":
            extra.update(input=unit.url, part=part, last=end is not None)
        if end is not None:
            extra["positions"] = end
        record = write_shard(
            self.out, shard_name(unit, part), tensors, buffer.rows, errors=buffer.errors, extra=extra
        )
        logger.debug(
            "wrote %s: %d images, %d captions, %d errors",
            record["name"],
            record["samples"],
            record["captions"],
            len(buffer.errors),
        )
        self.records.append(record)
        if self.after_shard is not None:
            self.after_shard(record)

    def failed(self, unit: int, message: str) -> None:
        pass  # nothing is written: the unit has no last shard, so --resume reads it again

    def flush(self) -> None:
        pass  # shards are written whole

    def close(self, ok: bool) -> None:
        self.buffer = None  # an unfinished shard is redone by --resume
