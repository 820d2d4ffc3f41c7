"""Embedding shards as `extract-embeddings` writes them: one shard's files and its done record
(`write_shard`, `read_done`) and index.json (`build_index`). `EmbeddingShards`
(embeddings/shard_reader.py) is the one reader. The layout is documented in docs/formats.md
("Embedding shards").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from blip_toolkit.embeddings.format import FORMAT, SHARD_FORMAT, VERSION
from blip_toolkit.fsutil import atomic_write, write_json

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def done_path(root: Path, name: str) -> Path:
    return root / f"{name}.done.json"


def write_shard(
    root: str | Path,
    name: str,
    tensors: dict[str, torch.Tensor],
    rows: list[dict],
    *,
    errors: Sequence[dict] = (),
    extra: dict[str, Any] | None = None,
) -> dict:
    """Write one shard: `<name>.safetensors` (tensors), `<name>.jsonl` (one row per image) and, last,
    `<name>.done.json` (the record that makes the shard count as finished). Each file is written to a
    temporary name and renamed, so a killed run leaves either a finished shard or one that `--resume`
    redoes. A shard with no samples writes only its done record. Returns the done record.

    `tensors`: cond [n, M, Dc], target [n, N, Dt], target_global [n, E], text_emb [c, E],
    caption_image [c] (int64, index of the caption's image within the shard)."""
    root = Path(root)
    samples = len(rows)
    captions = int(tensors["caption_image"].shape[0]) if "caption_image" in tensors else 0
    record: dict[str, Any] = {"name": name, "samples": samples, "captions": captions}
    if samples:
        # One metadata key: safetensors writes its metadata map in random order, and shards must be
        # byte-identical whoever writes them (checksums, resume, multi-process runs).
        blob = save(
            {k: v.contiguous() for k, v in tensors.items()},
            metadata={
                "blip": json.dumps({"format": SHARD_FORMAT, "version": VERSION, "name": name}, sort_keys=True)
            },
        )
        with atomic_write(root / f"{name}.safetensors", "wb") as handle:
            handle.write(blob)
        meta = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        with atomic_write(root / f"{name}.jsonl", "wb") as handle:
            handle.write(meta)
        record.update(
            file=f"{name}.safetensors",
            meta=f"{name}.jsonl",
            sha256=sha256_bytes(blob),
            meta_sha256=sha256_bytes(meta),
            bytes=len(blob),
        )
    record.update(extra or {})
    record["errors"] = list(errors)
    write_json(done_path(root, name), record)
    return record


def read_done(root: str | Path, name: str) -> dict | None:
    """The done record of shard `name` if the shard is finished (record present, files present with
    the recorded size), else None."""
    root = Path(root)
    path = done_path(root, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("samples"):
        data = root / record["file"]
        if (
            not data.is_file()
            or data.stat().st_size != record.get("bytes")
            or not (root / record["meta"]).is_file()
        ):
            return None
    return record


def build_index(*, records: list[dict], info: dict[str, Any]) -> dict:
    """index.json from the done records of every shard (in dataset order) and the run description
    `info` (source, encoders, dims, dtypes, head). Empty shards are left out of `shards`."""
    shards = []
    for record in records:
        if not record["samples"]:
            continue
        entry = {
            k: record[k]
            for k in ("name", "file", "meta", "samples", "captions", "sha256", "meta_sha256", "bytes")
        }
        for k in ("input", "part"):
            if k in record:
                entry[k] = record[k]
        shards.append(entry)
    counts = {
        "samples": sum(s["samples"] for s in shards),
        "captions": sum(s["captions"] for s in shards),
        "shards": len(shards),
        "errors": sum(len(r.get("errors", [])) for r in records),
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        **info,
        "counts": counts,
        "errors_file": "errors.jsonl",
        "shards": shards,
    }
