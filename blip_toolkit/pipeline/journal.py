"""The records journal of dataset inference (`--output`), and the sink that writes it.

Layout, for `--output out.parquet` (the run directory; docs/formats.md):

    out.parquet.blip-run/
      blip_run.json                  the run record: kind, status, the fingerprint ("config"), counts
      journal/a0001-r00000.jsonl     one JSON record a line, per attempt (a run or a resumed run) and
                                     process, each in input order; {"pos": [unit, offset], "record": {...}},
                                     and {"end": [unit, n]} once unit `unit` is known to have n positions
      shares/a0001-r00000.done       that process finished its share of the attempt (pipeline/run.py)
      failed.jsonl                   after a finished run: the output row and position of each failed
                                     record, and the ends of their units (for --retry-failed)

The journal is what grows as the run goes (flushed after every batch, fsynced every few seconds): a
kill, -9 included, loses at most the line being written, which is dropped (a last line without its
newline) and redone by `--resume`. Any other line that is not a record is refused with file:line.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blip_toolkit.errors import BlipError, InputError
from blip_toolkit.fsutil import atomic_write, json_safe
from blip_toolkit.pipeline.items import Position, Prepared
from blip_toolkit.pipeline.resume import ResumeState

JOURNAL_DIR = "journal"
FAILED_FILE = "failed.jsonl"
FSYNC_SECONDS = 5.0
_JOURNAL_NAME = re.compile(r"^a(\d{4,})-r(\d{5,})\.jsonl$")


def _position(value: Any) -> Position | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return value[0], value[1]
    return None


def journal_files(run_dir: Path) -> list[Path]:
    directory = run_dir / JOURNAL_DIR
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _JOURNAL_NAME.match(p.name))


def last_attempt(run_dir: Path) -> int:
    return max((int(_JOURNAL_NAME.match(p.name).group(1)) for p in journal_files(run_dir)), default=0)


def iter_journal(path: Path) -> Iterator[dict]:
    """The lines of one journal file as dicts. A last line without its newline (a write cut by a
    kill) is dropped; any other line that is not a record or an end marker is refused."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return  # torn by a kill: redone by this run
            try:
                entry = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                entry = None
            if not isinstance(entry, dict) or (
                _position(entry.get("pos")) is None and _position(entry.get("end")) is None
            ):
                raise InputError(
                    f"{path}:{number}: not a journal record of blip; the run state is damaged "
                    "(remove the output and its .blip-run directory, or use --overwrite)"
                )
            yield entry


def read_journal(run_dir: Path, state: ResumeState | None = None) -> ResumeState:
    """What the journal holds, as a ResumeState (added to `state` when given)."""
    state = state or ResumeState()
    for path in journal_files(run_dir):
        for entry in iter_journal(path):
            end = _position(entry.get("end"))
            if end is not None:
                state.end(*end)
                continue
            state.add(_position(entry["pos"]), "error" in entry["record"])
    return state


def journal_records(run_dir: Path) -> Iterator[tuple[Position, dict]]:
    """Every (position, record) of the journals in input order (each file is in input order; a k-way
    merge, so memory does not grow with the dataset). A position written twice (a process cut between
    two attempts) is given once."""

    def entries(path: Path):
        for entry in iter_journal(path):
            if "pos" in entry:
                yield tuple(entry["pos"]), entry["record"]

    previous = None
    for pos, record in heapq.merge(*(entries(p) for p in journal_files(run_dir)), key=lambda e: e[0]):
        if pos == previous:
            continue
        previous = pos
        yield pos, record


def clear_journal(run_dir: Path) -> None:
    shutil.rmtree(run_dir / JOURNAL_DIR, ignore_errors=True)


class JournalSink:
    """The sink of dataset inference: this process's records, in input order, appended to its journal
    file of this attempt. `flush()` hands the lines to the OS (a kill -9 loses nothing flushed) and
    fsyncs at most every FSYNC_SECONDS (a power cut loses at most those seconds). `make_record(item,
    result)` turns a stream result into the output record."""

    def __init__(self, run_dir: Path, attempt: int, rank: int, resume: ResumeState, make_record):
        directory = run_dir / JOURNAL_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"a{attempt:04d}-r{rank:05d}.jsonl"
        self.resume, self.make_record = resume, make_record
        self._handle = open(self.path, "ab")
        self._last_sync = time.monotonic()
        self.written = 0

    def record(self, item: Prepared, result: Any) -> bool:
        record = self.make_record(item, result)
        try:
            self._write({"pos": list(item.pos), "record": record})
        except OSError as exc:  # a full disk: one line, the records so far kept for --resume
            raise self._stopped(exc) from exc
        self.written += 1
        return "error" in record

    def end(self, unit: int, count: int) -> None:
        try:
            self._write({"end": [unit, count]})
        except OSError as exc:
            raise self._stopped(exc) from exc

    def failed(self, unit: int, message: str) -> None:
        pass  # nothing is written: the unit has no end, so --resume reads it again

    def _write(self, entry: dict) -> None:
        line = json.dumps(json_safe(entry), ensure_ascii=False) + "\n"
        self._handle.write(line.encode("utf-8"))

    def flush(self, *, sync: bool = False) -> None:
        try:
            self._handle.flush()
            if sync or time.monotonic() - self._last_sync > FSYNC_SECONDS:
                os.fsync(self._handle.fileno())
                self._last_sync = time.monotonic()
        except OSError as exc:
            raise self._stopped(exc) from exc

    def close(self, ok: bool) -> None:
        if ok:
            self.flush(sync=True)
        with contextlib.suppress(OSError, ValueError):
            self._handle.flush()
        with contextlib.suppress(OSError):
            self._handle.close()

    def _stopped(self, exc: OSError) -> BlipError:
        return BlipError(
            f"{self.path}: cannot write ({exc.strerror or exc}); stopped after {self.written} record(s) "
            "of this run, which are kept: free space and rerun with --resume"
        )


# ----------------------------------------------------------------------------- failed records


def write_failed(run_dir: Path, rows: list[tuple[int, Position]], ends: dict[int, int]) -> None:
    """failed.jsonl: the output row and position of every failed record, and the ends of their units."""
    with atomic_write(run_dir / FAILED_FILE) as handle:
        for unit in sorted({pos[0] for _, pos in rows}):
            if unit in ends:
                handle.write(json.dumps({"end": [unit, ends[unit]]}) + "\n")
        for row, pos in rows:
            handle.write(json.dumps({"row": row, "pos": list(pos)}) + "\n")


def read_failed(run_dir: Path) -> tuple[dict[Position, int], dict[int, int]]:
    """(position -> output row of each failed record, unit -> end) from failed.jsonl."""
    path = run_dir / FAILED_FILE
    rows: dict[Position, int] = {}
    ends: dict[int, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                entry = json.loads(line)
                if "end" in entry:
                    ends[int(entry["end"][0])] = int(entry["end"][1])
                else:
                    rows[_position(entry["pos"])] = int(entry["row"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{path}:{number}: damaged ({exc}); rerun with --overwrite") from exc
    return rows, ends
