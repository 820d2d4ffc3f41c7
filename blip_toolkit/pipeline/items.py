"""What flows through the pipeline: raw items read from a unit, items prepared in DataLoader workers,
and the chunks workers hand to the main process.

Every item has a position `(unit, offset)`: the unit's number in the source's unit list and the item's
place in the unit. Positions order the output, identify an item in the resume state, and do not depend
on the number of processes, workers or the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

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
