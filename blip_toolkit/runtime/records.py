"""Where dataset inference writes: the resume journal and the final output file.

Layout, for `--output out.parquet`:

    out.parquet                      the result, written once, at the end, atomically (temp + rename)
    out.parquet.blip-run/
      blip_run.json                  the run record: kind, status, the fingerprint ("config"), counts
      journal/a0001-r00000.jsonl     one JSON record a line, per attempt (a run or a resumed run) and
                                     process, each in input order; a line {"end": [unit, n]} says that
                                     tar `unit` has n positions
      journal/a0001-r00000.done      written when that process has finished its share of the attempt

The journal is what grows as the run goes (flushed after every window of batches, fsynced every few
seconds): a kill, -9 included, loses at most the line being written, which is dropped (a last line
without its newline) and redone by `--resume`. Any other line that is not a record is refused with
file:line. The final file is merged from the journals in input order (a k-way merge of files that are
each sorted, so memory does not grow with the dataset) and streamed to the writer: JSONL and TSV line
by line, Parquet in row groups of `ROW_GROUP` rows into a temporary file renamed at the end. A Parquet
file is unreadable until its footer is written, so nothing is written under the final name before the
last row group and the footer are on disk: a killed run never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip_toolkit.errors import BlipError, InputError, UsageError
from blip_toolkit.fsutil import atomic_path, atomic_write, fsync_path, json_safe

OUTPUT_FORMATS = ("jsonl", "parquet", "tsv")
SIDECAR_SUFFIX = ".blip-run"
JOURNAL_DIR = "journal"
ROW_GROUP = 4096
FSYNC_SECONDS = 5.0
_JOURNAL_NAME = re.compile(r"^a(\d{4,})-r(\d{5,})\.jsonl$")


def output_format(path: str | os.PathLike) -> str:
    """The output format from the file name's extension."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in OUTPUT_FORMATS:
        raise UsageError(
            f"--output {path}: unknown format {('.' + suffix) if suffix else '(no extension)'}; "
            f"use {', '.join('.' + f for f in OUTPUT_FORMATS)}"
        )
    if suffix == "parquet":
        pyarrow()
    return suffix


def pyarrow():
    """pyarrow and pyarrow.parquet (the optional `parquet` extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UsageError(
            "--output *.parquet needs pyarrow (pip install 'blip-toolkit[parquet]'); or use .jsonl / .tsv"
        ) from exc
    return pa, pq


def sidecar(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + SIDECAR_SUFFIX)


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and prove a file can be made in it (a permission check alone is
    wrong for root and for read-only mounts)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".blip-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{directory}: cannot write the output here ({exc.strerror or exc})") from exc


# ----------------------------------------------------------------------------- the journal


def _position(value: Any) -> tuple[int, int] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return value[0], value[1]
    return None


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


@dataclass
class JournalState:
    """What earlier attempts finished: the positions written (per unit), the tars whose end is known
    (unit -> number of positions), the record counts, and the journal files."""

    done: dict[int, Offsets] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    records: int = 0
    failed: int = 0
    last_attempt: int = 0

    def has(self, pos: tuple[int, int]) -> bool:
        offsets = self.done.get(pos[0])
        return offsets is not None and pos[1] in offsets

    def offsets(self, unit: int) -> Offsets:
        return self.done.get(unit) or Offsets()

    def complete(self, unit: int) -> bool:
        """Whether every position of tar `unit` is written."""
        return unit in self.ends and self.offsets(unit).count >= self.ends[unit]

    def add(self, pos: tuple[int, int], failed: bool) -> None:
        if self.done.setdefault(pos[0], Offsets()).add(pos[1]):
            self.records += 1
            self.failed += failed


def journal_files(run_dir: Path) -> list[Path]:
    directory = run_dir / JOURNAL_DIR
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _JOURNAL_NAME.match(p.name))


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


def read_journal(run_dir: Path) -> JournalState:
    state = JournalState(files=journal_files(run_dir))
    for path in state.files:
        state.last_attempt = max(state.last_attempt, int(_JOURNAL_NAME.match(path.name).group(1)))
        for entry in iter_journal(path):
            end = _position(entry.get("end"))
            if end is not None:
                state.ends[end[0]] = end[1]
                continue
            state.add(_position(entry["pos"]), "error" in entry["record"])
    return state


class JournalWriter:
    """Appends this process's records to its journal file of this attempt. `flush()` hands the lines
    to the OS (a kill -9 loses nothing flushed) and fsyncs at most every FSYNC_SECONDS (a power cut
    loses at most those seconds)."""

    def __init__(self, run_dir: Path, attempt: int, rank: int):
        directory = run_dir / JOURNAL_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"a{attempt:04d}-r{rank:05d}.jsonl"
        self.done_path = self.path.with_suffix(".done")
        self._handle = open(self.path, "ab")
        self._last_sync = time.monotonic()
        self.written = 0

    def record(self, pos: tuple[int, int], record: dict) -> None:
        self._write({"pos": list(pos), "record": record})
        self.written += 1

    def end(self, unit: int, count: int) -> None:
        self._write({"end": [unit, count]})

    def _write(self, entry: dict) -> None:
        line = json.dumps(json_safe(entry), ensure_ascii=False) + "\n"
        self._handle.write(line.encode("utf-8"))

    def flush(self, *, sync: bool = False) -> None:
        self._handle.flush()
        if sync or time.monotonic() - self._last_sync > FSYNC_SECONDS:
            os.fsync(self._handle.fileno())
            self._last_sync = time.monotonic()

    def finish(self) -> None:
        """Sync and close, then mark this process's share of the attempt finished."""
        self.flush(sync=True)
        self._handle.close()
        with atomic_write(self.done_path) as handle:
            handle.write(f"{self.written}\n")
        fsync_path(self.done_path.parent)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._handle.flush()
        with contextlib.suppress(OSError):
            self._handle.close()


def merged_records(files: list[Path]) -> Iterator[dict]:
    """Every record of the journals in input order (each file is in input order; a k-way merge)."""

    def entries(path: Path):
        for entry in iter_journal(path):
            if "pos" in entry:
                yield tuple(entry["pos"]), entry["record"]

    previous = None
    for pos, record in heapq.merge(*(entries(p) for p in files), key=lambda e: e[0]):
        if pos == previous:
            continue  # written twice (a process that was cut between two attempts); keep one
        previous = pos
        yield record


def clear_journal(run_dir: Path) -> None:
    shutil.rmtree(run_dir / JOURNAL_DIR, ignore_errors=True)


# ----------------------------------------------------------------------------- output writers


@dataclass(frozen=True)
class Columns:
    """The columns of an output: the fields that name an item ("image", or "shard" and "key"), the
    task's fields, and "error". `ranked` is set for retrieval: its "results" list of ranked texts."""

    names: tuple[str, ...]
    ranked: tuple[str, ...] = ()


def columns_for(task: str, source_kind: str, ranked_fields: tuple[str, ...] = ()) -> Columns:
    identity = ("image",) if source_kind == "files" else ("shard", "key")
    task_fields = {"caption": ("caption",), "vqa": ("question", "answer"), "retrieval": ("results",)}[task]
    return Columns(identity + task_fields + ("error",), ranked_fields)


def write_output(path: Path, fmt: str, records: Iterable[dict], columns: Columns) -> int:
    """Write `records` to `path` in `fmt`, atomically; returns the number written."""
    writer = {"jsonl": _write_jsonl, "tsv": _write_tsv, "parquet": _write_parquet}[fmt]
    try:
        return writer(path, records, columns)
    except OSError as exc:
        raise BlipError(
            f"{path}: cannot write the output ({exc.strerror or exc}); the journal is kept: free space "
            "and rerun with --resume"
        ) from exc


def _write_jsonl(path: Path, records: Iterable[dict], columns: Columns) -> int:
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(json_safe(record), ensure_ascii=False) + "\n")
            count += 1
    return count


def _tsv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def tsv_header(columns: Columns) -> list[str]:
    if not columns.ranked:
        return list(columns.names)
    identity = [c for c in columns.names if c not in ("results", "error")]
    return identity + ["rank", "text", *[f for f in columns.ranked if f not in ("rank", "text")], "error"]


def tsv_rows(record: dict, columns: Columns) -> Iterator[list[str]]:
    """TSV rows of one record: one row, or for retrieval one row per ranked text (an error: one row
    with the error and the other columns empty)."""
    if not columns.ranked:
        yield [_tsv_cell(record.get(name)) for name in columns.names]
        return
    header = tsv_header(columns)
    identity = [c for c in columns.names if c not in ("results", "error")]
    if "error" in record:
        yield [_tsv_cell(record.get(c)) if c in identity or c == "error" else "" for c in header]
        return
    for entry in record.get("results", []):
        yield [_tsv_cell(record.get(c)) if c in identity else _tsv_cell(entry.get(c)) for c in header]


def _write_tsv(path: Path, records: Iterable[dict], columns: Columns) -> int:
    count = 0
    with atomic_write(path) as handle:
        handle.write("\t".join(tsv_header(columns)) + "\n")
        for record in records:
            for row in tsv_rows(record, columns):
                handle.write("\t".join(row) + "\n")
            count += 1
    return count


def parquet_schema(columns: Columns):
    pa, _ = pyarrow()
    fields = []
    for name in columns.names:
        if name == "results":
            ranked = [
                pa.field(f, pa.int32() if f == "rank" else pa.string() if f == "text" else pa.float64())
                for f in columns.ranked
            ]
            fields.append(pa.field("results", pa.list_(pa.struct(ranked))))
        else:
            fields.append(pa.field(name, pa.string()))
    return pa.schema(fields)


def _write_parquet(path: Path, records: Iterable[dict], columns: Columns) -> int:
    pa, pq = pyarrow()
    schema = parquet_schema(columns)
    count = 0
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema)
        try:
            rows: list[dict] = []
            for record in records:
                rows.append({name: record.get(name) for name in columns.names})
                count += 1
                if len(rows) == ROW_GROUP:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows = []
            if rows or count == 0:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        finally:
            writer.close()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    return count


def read_output(path: Path) -> list[dict]:
    """The records of a finished output (tests and tools): JSONL records, Parquet rows (None columns
    dropped, as JSONL has no such keys), or TSV rows as dicts of strings."""
    fmt = output_format(path)
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if fmt == "parquet":
        _, pq = pyarrow()
        rows = pq.read_table(path).to_pylist()
        return [{k: v for k, v in row.items() if v is not None} for row in rows]
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def item_name(record: dict) -> str:
    """How a record names its input on a text line: the path, or shard/key for webdataset."""
    if "image" in record:
        return str(record["image"])
    return f"{record.get('shard')}/{record.get('key') if record.get('key') is not None else ''}"
