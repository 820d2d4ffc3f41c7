"""The encoding phase of `blip extract-embeddings`: both encoders loaded with their token layouts and
the target head, this process's chunks decoded in DataLoader workers (embeddings/reading.py), encoded,
buffered per shard (one shard's outputs is the memory bound of the job) and written when the shard's
last chunk is in (embeddings/shards.py `write_shard`: atomically, done record last)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blip_toolkit.embeddings.adapter_base import EncoderAdapter, TargetAdapter
from blip_toolkit.embeddings.adapters import load_encoder
from blip_toolkit.embeddings.extract_config import ExtractConfig
from blip_toolkit.embeddings.layout import TokenLayout, token_layout
from blip_toolkit.embeddings.reading import ItemChunks, Preprocess, TarChunks, Unit, identity, part_name
from blip_toolkit.embeddings.shards import TORCH_DTYPES, write_shard
from blip_toolkit.log import track
from blip_toolkit.runtime.device import resolve_device, resolve_dtype

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


def _chunk_loader(config: ExtractConfig, source, todo: list[Unit], encoders: Encoders):
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


def encode_shards(
    config: ExtractConfig, source, out: Path, units: list[Unit], todo: list[Unit], encoders: Encoders
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
    loader, total = _chunk_loader(config, source, todo, encoders)
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
            yield _write_buffer(out, buffers.pop(key), chunk, names, inputs, storage)


def _write_buffer(out: Path, buffer: _ShardBuffer, chunk: dict, names: dict, inputs: dict, storage) -> dict:
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
