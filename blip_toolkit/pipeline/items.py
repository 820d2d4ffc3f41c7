"""What flows through the pipeline: raw items read from a unit, items prepared in DataLoader workers,
and the chunks workers hand to the main process.

Every item has a position `(unit, offset)`: the unit's number in the source's unit list and the item's
place in the unit. Positions order the output, identify an item in the resume state, and do not depend
on the number of processes, workers or the batch size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load, save

from blip_toolkit.fsutil import json_safe

Position = tuple[int, int]


@dataclass
class RawItem:
    """One item as a unit reader gives it, before decoding.

    `fields` name the item in inference records ({"image": path} or {"shard", "key"}); `key` names it
    in embedding shards; `label` names it in error messages (a path, or url#key); `data` is the
    encoded image (bytes) or a path / URL to read it from; `text` is its question (vqa), `captions`
    its captions (extract-embeddings); `error` is set when the item failed before decoding."""

    offset: int
    fields: dict[str, Any]
    key: str
    label: str
    data: bytes | str | None = None
    text: str | None = None
    captions: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class Prepared:
    """One item after decoding and the task's preprocessing (in a worker): its position, the fields
    that name it, its text and captions, the model inputs the task's encoder made (tensors with a
    leading dimension of 1), or the error that stopped it."""

    pos: Position
    fields: dict[str, Any]
    key: str = ""
    label: str = ""
    text: str | None = None
    captions: tuple[str, ...] = ()
    inputs: dict[str, torch.Tensor] | None = None
    error: str | None = None


@dataclass
class Chunk:
    """Consecutive prepared items of this process, the units that end with them ((unit, number of
    positions in it)) and the units that could not be read ((unit, message): left for --resume)."""

    items: list[Prepared] = field(default_factory=list)
    ends: list[Position] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)


def pack(chunk: Chunk) -> Chunk:
    """Put the chunk's tensors of one key and shape into one tensor, each item keeping a view of its
    row: a worker then hands the main process one shared-memory block per key instead of one per item
    (each costs a file descriptor and a socket round trip)."""
    groups: dict[tuple, list[Prepared]] = {}
    for item in chunk.items:
        for key, value in (item.inputs or {}).items():
            groups.setdefault((key, tuple(value.shape[1:]), value.dtype), []).append(item)
    for (key, _, _), members in groups.items():
        if len(members) > 1:
            stacked = torch.cat([item.inputs[key] for item in members])
            for row, item in enumerate(members):
                item.inputs[key] = stacked[row : row + 1]
    return chunk


# ----------------------------------------------------------------------------- chunks as bytes
# What crosses a process boundary that is not a DataLoader (the Ray engine's object store): a JSON
# header and the tensors as one safetensors blob, never pickled Python objects.


def _pack(header: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    head = json.dumps(json_safe(header), ensure_ascii=False).encode("utf-8")
    # safetensors refuses tensors that share storage (the rows `pack` leaves are views of one block).
    blob = save({name: t.detach().contiguous().clone() for name, t in tensors.items()}) if tensors else b""
    return struct.pack("<Q", len(head)) + head + blob


def _unpack(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    (size,) = struct.unpack_from("<Q", data)
    header = json.loads(bytes(data[8 : 8 + size]).decode("utf-8"))
    blob = bytes(data[8 + size :])
    return header, (load(blob) if blob else {})


def _item_header(item: Prepared) -> dict:
    return {
        "pos": list(item.pos),
        "fields": item.fields,
        "key": item.key,
        "label": item.label,
        "text": item.text,
        "captions": list(item.captions),
        "error": item.error,
    }


def _item_from(header: dict) -> Prepared:
    return Prepared(
        tuple(header["pos"]),
        header["fields"],
        header["key"],
        header["label"],
        header["text"],
        tuple(header["captions"]),
        error=header["error"],
    )


def chunk_to_bytes(chunk: Chunk) -> bytes:
    tensors, items = {}, []
    for index, item in enumerate(chunk.items):
        entry = _item_header(item)
        entry["inputs"] = sorted(item.inputs or {})
        for name, value in (item.inputs or {}).items():
            tensors[f"{index}/{name}"] = value
        items.append(entry)
    return _pack({"items": items, "ends": chunk.ends, "failed": chunk.failed}, tensors)


def chunk_from_bytes(data: bytes) -> Chunk:
    header, tensors = _unpack(data)
    chunk = Chunk(ends=[tuple(e) for e in header["ends"]], failed=[tuple(f) for f in header["failed"]])
    for index, entry in enumerate(header["items"]):
        item = _item_from(entry)
        if entry["inputs"]:
            item.inputs = {name: tensors[f"{index}/{name}"] for name in entry["inputs"]}
        chunk.items.append(item)
    return chunk


def events_to_bytes(events: list[tuple[str, Any, Any]]) -> bytes:
    """The events of one chunk (pipeline/stream.py `process_chunks`): a record's result is None, a
    dict of JSON values (inference) or a dict holding tensors (extract-embeddings)."""
    tensors, out = {}, []
    for index, (kind, a, b) in enumerate(events):
        if kind != "record":
            out.append([kind, a, b])
            continue
        result = None
        if b is not None:
            result = {}
            for name, value in b.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}/{name}"] = value
                    result[name] = {"tensor": True}
                else:
                    result[name] = value
        out.append([kind, _item_header(a), result])
    return _pack({"events": out}, tensors)


def events_from_bytes(data: bytes) -> list[tuple[str, Any, Any]]:
    header, tensors = _unpack(data)
    events = []
    for index, (kind, a, b) in enumerate(header["events"]):
        if kind != "record":
            events.append((kind, a, b))
            continue
        result = None
        if b is not None:
            result = {
                name: tensors[f"{index}/{name}"] if isinstance(v, dict) and v.get("tensor") is True else v
                for name, v in b.items()
            }
        events.append((kind, _item_from(a), result))
    return events
