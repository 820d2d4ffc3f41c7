"""The output file of dataset inference (`--output FILE`: .jsonl, .parquet or .tsv, local or remote).

The file is written once, at the end, from the journal in input order, streamed to the writer: JSONL
and TSV line by line, Parquet in row groups of `ROW_GROUP` rows. It is written to a temporary file
and moved into place (local) or uploaded with one put (remote: an object appears only complete), so
a killed or failed run never leaves a half-written output. `rewrite_output` replaces some records
of a finished output in place (--retry-failed): same order, same file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_toolkit.errors import BlipError, InputError, UsageError
from blip_toolkit.fsutil import json_safe
from blip_toolkit.pipeline import remote

OUTPUT_FORMATS = ("jsonl", "parquet", "tsv")
SIDECAR_SUFFIX = ".blip-run"
ROW_GROUP = 4096


def output_format(path: str | os.PathLike) -> str:
    """The output format from the file name's extension."""
    suffix = Path(str(path).split("?", 1)[0]).suffix.lower().lstrip(".")
    if suffix not in OUTPUT_FORMATS:
        raise UsageError(
            f"--output {remote.redact_url(str(path))}: unknown format {('.' + suffix) if suffix else '(no extension)'}; "
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
            "Parquet files need pyarrow (pip install 'blip-toolkit[parquet]'); or use .jsonl / .tsv"
        ) from exc
    return pa, pq


def run_directory(output: str | os.PathLike) -> Path:
    """Where the run state of `--output` lives: beside a local output (`out.parquet.blip-run`); for a
    remote one in the local cache, keyed by its URL (BLIP_RUN_DIR overrides the cache's location), so
    `--resume` works from the same machine or from any that shares that directory."""
    output = str(output)
    if not remote.is_url(output):
        path = Path(output)
        return path.with_name(path.name + SIDECAR_SUFFIX)
    base = Path(
        os.environ.get("BLIP_RUN_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blip" / "runs"
    )
    return base / (hashlib.sha256(output.encode("utf-8")).hexdigest()[:24] + SIDECAR_SUFFIX)


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


# ----------------------------------------------------------------------------- columns


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


def item_name(record: dict) -> str:
    """How a record names its input on a text line: the path, or shard/key for webdataset and tables."""
    if "image" in record:
        return str(record["image"])
    return f"{record.get('shard')}/{record.get('key') if record.get('key') is not None else ''}"


# ----------------------------------------------------------------------------- writers


def write_output(target: str, fmt: str, records: Iterable[dict], columns: Columns) -> int:
    """Write `records` to `target` (a path or URL) in `fmt`, atomically; returns the number written."""
    writer = {"jsonl": _write_jsonl, "tsv": _write_tsv, "parquet": _write_parquet}[fmt]
    try:
        with remote.atomic_output(target) as tmp:
            count = writer(Path(tmp), records, columns)
    except OSError as exc:
        raise BlipError(
            f"{remote.redact_url(target)}: cannot write the output ({exc.strerror or exc}); the journal is kept: "
            "free space and rerun with --resume"
        ) from exc
    return count


def _synced(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _write_jsonl(path: Path, records: Iterable[dict], columns: Columns) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(json_safe(record), ensure_ascii=False) + "\n")
            count += 1
        _synced(handle)
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
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\t".join(tsv_header(columns)) + "\n")
        for record in records:
            for row in tsv_rows(record, columns):
                handle.write("\t".join(row) + "\n")
            count += 1
        _synced(handle)
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
    writer = pq.ParquetWriter(path, schema)
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
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return count


# ----------------------------------------------------------------------------- reading back


def iter_output(target: str, columns: Columns | None = None) -> Iterator[dict]:
    """The records of a finished output, in order: JSONL records, Parquet rows (None columns dropped,
    as JSONL has no such keys), or TSV rows as dicts of strings (retrieval: the rows of one image
    grouped back into one record when `columns` is given)."""
    fmt = output_format(target)
    with remote.open_input(target) as handle:
        if fmt == "jsonl":
            for line in handle:
                yield json.loads(line)
            return
        if fmt == "parquet":
            _, pq = pyarrow()
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=ROW_GROUP):
                for row in batch.to_pylist():
                    yield {k: v for k, v in row.items() if v is not None}
            return
        lines = (line.decode("utf-8").rstrip("\n") for line in handle)
        header = next(lines).split("\t")
        rows = (dict(zip(header, line.split("\t"))) for line in lines)
        if columns is None or not columns.ranked:
            yield from rows
            return
        yield from _ranked_groups(rows, columns)


def _ranked_groups(rows: Iterator[dict], columns: Columns) -> Iterator[dict]:
    """Retrieval TSV rows grouped back into records (one per image: consecutive rows of one identity)."""
    identity = [c for c in columns.names if c not in ("results", "error")]
    current, key = None, None
    for row in rows:
        row_key = tuple(row.get(c) for c in identity)
        if row.get("error"):
            if current is not None:
                yield current
            current, key = None, None
            yield {**{c: row[c] for c in identity}, "error": row["error"]}
            continue
        if current is None or row_key != key:
            if current is not None:
                yield current
            current, key = {**{c: row[c] for c in identity}, "results": []}, row_key
        current["results"].append({k: v for k, v in row.items() if k not in identity and k != "error"})
    if current is not None:
        yield current


def read_output(path: str | os.PathLike, columns: Columns | None = None) -> list[dict]:
    """Every record of a finished output (tests and tools)."""
    return list(iter_output(str(path), columns))


def rewrite_output(target: str, fmt: str, replacements: dict[int, dict], columns: Columns) -> int:
    """Replace the records at the given rows of the finished output `target` (--retry-failed): the
    same records in the same order otherwise, written atomically; returns the number of records."""

    def merged() -> Iterator[dict]:
        for row, record in enumerate(iter_output(target, columns)):
            yield replacements.get(row, record)

    return write_output(target, fmt, merged(), columns)
