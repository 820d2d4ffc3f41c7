"""What earlier attempts of a run finished, in one form for every sink: the offsets done per unit and
the units whose end is known. The records journal (dataset inference) and the shards' done records
(extract-embeddings) are both read into a `ResumeState`; the pipeline skips what it says is done and
reads a unit again until it is complete."""

from __future__ import annotations

from dataclasses import dataclass, field

from blip_toolkit.pipeline.items import Position


class Offsets:
    """The finished offsets of one unit: a bitmap (one bit per item, so a resume of millions of items
    holds megabytes, not a set of ints) and their count."""

    __slots__ = ("bits", "count")

    def __init__(self) -> None:
        self.bits = bytearray()
        self.count = 0

    def __contains__(self, offset: int) -> bool:
        byte = offset >> 3
        return byte < len(self.bits) and bool(self.bits[byte] & (1 << (offset & 7)))

    def add(self, offset: int) -> bool:
        """Mark `offset`; False if it was already marked."""
        byte = offset >> 3
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits)))
        mask = 1 << (offset & 7)
        if self.bits[byte] & mask:
            return False
        self.bits[byte] |= mask
        self.count += 1
        return True

    def add_range(self, start: int, stop: int) -> None:
        for offset in range(start, stop):
            self.add(offset)


@dataclass
class ResumeState:
    """The positions written (per unit), the units whose end is known (unit -> number of positions),
    and the record counts."""

    done: dict[int, Offsets] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)
    records: int = 0
    failed: int = 0

    def has(self, pos: Position) -> bool:
        offsets = self.done.get(pos[0])
        return offsets is not None and pos[1] in offsets

    def offsets(self, unit: int) -> Offsets:
        return self.done.get(unit) or Offsets()

    def complete(self, unit: int) -> bool:
        """Whether every position of `unit` is written."""
        return unit in self.ends and self.offsets(unit).count >= self.ends[unit]

    def add(self, pos: Position, failed: bool = False) -> None:
        if self.done.setdefault(pos[0], Offsets()).add(pos[1]):
            self.records += 1
            self.failed += failed

    def end(self, unit: int, count: int) -> None:
        self.ends[unit] = count
