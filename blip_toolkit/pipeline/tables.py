"""Parquet files and `datasets.save_to_disk` directories as pipeline units and rows.

Inputs (local paths or URLs):
- a `.parquet` file, a glob (`data/*.parquet`, `hf://datasets/org/name/data/*.parquet`) or a brace
  pattern (`data/train-{00000..00002}-of-00003.parquet`) of them;
- a directory holding `.parquet` files at any depth (the Hub's layout, `data/train-00000-of-00002.parquet`;
  names starting with `.` or `_` are skipped, as Arrow's dataset discovery does);
- a directory written by `datasets.Dataset.save_to_disk` (`state.json`, `dataset_info.json` and the
  `data-0000i-of-0000n.arrow` files `state.json` lists, each an Arrow IPC *stream*), or by
  `DatasetDict.save_to_disk` (`dataset_dict.json` and one such directory per split, in its order).

Units: one per Parquet row group (file order, then row-group order; empty row groups are kept with
rows = 0) and one per Arrow file. Listing them reads Parquet footers and Arrow message headers only.
Rows are streamed in record batches of at most 64 rows, reading only the named columns, so memory
holds at most one row group (Parquet) or one stored record batch (Arrow) of a file.

Image column types: binary / large_binary (image bytes); the `{bytes, path}` struct that the
`datasets.Image` feature stores (bytes when present, else the path); string (a path, relative to the
table file's folder, or a URL). Text column: a string, or a list of strings.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import struct
from collections.abc import Container, Iterator
from dataclasses import dataclass

import fsspec
from webdataset.shardlists import expand_urls

from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.pipeline.remote import TransportError, is_url, open_input
from blip_toolkit.pipeline.tars import unique_names

try:  # pyarrow is the optional `parquet` extra: is_table_spec works without it, reading does not
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - exercised only in an install without the extra
    pa = pq = None

BATCH_ROWS = 64
# Parquet pages are read through a buffer of this size instead of whole column chunks at once
# (pre_buffer), so a row group with large images is not held twice.
PARQUET_BUFFER_BYTES = 1 << 20
PARQUET_SUFFIX = ".parquet"
ARROW_SUFFIX = ".arrow"
_GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_LISTED_COLUMNS = 20
# names that are files of other sources, never save_to_disk or Parquet directories: not listed
_FILE_SUFFIXES = (
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tsv",
    ".txt",
    ".csv",
    ".json",
    ".jsonl",
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
)


@dataclass(frozen=True)
class TableColumns:
    """Which columns hold what (`--image-column`, `--key-column`, `--text-column`). `text` holds the
    questions for vqa and the captions for extract-embeddings."""

    image: str = "image"
    key: str | None = None
    text: str | None = None

    def names(self) -> list[str]:
        """The named columns, each once, in the order image, key, text."""
        names: list[str] = []
        for name in (self.image, self.key, self.text):
            if name is not None and name not in names:
                names.append(name)
        return names


@dataclass(frozen=True)
class TableUnit:
    """One unit of work: a Parquet row group or a whole Arrow file.

    `index`: the row group's number in the file (0 for an Arrow file); `rows`: its row count;
    `name`: the output-shard stem the records carry (the file's stem, unique across the inputs; all
    row groups of one file share it); `start`: the file row index of the unit's first row, so
    `start + offset` is the row's default key."""

    url: str
    kind: str  # "parquet" | "arrow"
    index: int
    rows: int
    name: str
    start: int = 0


@dataclass(frozen=True, slots=True)
class TableRow:
    """One row of a unit. `offset`: the row's position in the unit (0 .. rows - 1). `image`: bytes,
    or a path / URL to read; None when `error` says why. `text`: the text column's string (or the
    first of its list); `captions`: its non-empty strings."""

    offset: int
    key: str
    image: bytes | str | None
    text: str | None
    captions: tuple[str, ...]
    error: str | None = None


class UnitDataError(InputError):
    """A unit whose stored data cannot be decoded (a corrupt row group or record batch). The rows of
    the unit not yet yielded are lost; other units of the file may still read."""


# ----------------------------------------------------------------------------- specs


def is_table_spec(spec: str) -> bool:
    """Whether `spec` names Parquet files (a file, glob or brace pattern ending in .parquet), a
    `datasets.save_to_disk` directory, or a directory holding .parquet files. Only a directory is
    looked at (a remote one: a few listings; never over http(s), which has no directories and
    where a listing would download the file). A remote location that cannot be listed raises
    TransportError (one line naming it)."""
    path = _local(spec)
    if _strip_query(path).lower().endswith(PARQUET_SUFFIX):
        return True
    if _GLOB_CHARS.search(path) or "{" in path or "::" in path:
        return False  # a pattern of something else (tars)
    if path.lower().endswith(_FILE_SUFFIXES) or path.split("://", 1)[0].lower() in ("http", "https"):
        return False
    return _directory_kind(path) is not None


def table_units(specs: list[str], columns: TableColumns) -> list[TableUnit]:
    """Expand `specs` into files (a glob's matches sorted, otherwise in the given order), read their
    footers / stream headers and check the named columns: present, of a usable type, and of the same
    type in every file. Raises InputError (one line naming the file and column) on bad input."""
    _require_pyarrow()
    if not columns.image:
        raise UsageError("--image-column must name a column")
    files = _expand(specs)
    names = _unique_stems([url for url, _ in files])
    units: list[TableUnit] = []
    reference: tuple[str, dict[str, object]] | None = None
    for (url, kind), name in zip(files, names):
        if kind == "parquet":
            schema, row_counts = _parquet_layout(url)
        else:
            schema, row_counts = _arrow_layout(url)
        types = _check_schema(url, schema, columns)
        if reference is None:
            reference = (url, types)
        elif types != reference[1]:
            column = next(c for c in types if types[c] != reference[1][c])
            raise InputError(
                f"{url}: column '{column}' is {types[column]} but {reference[0]} has "
                f"{reference[1][column]}; all files must give the named columns the same type"
            )
        start = 0
        for index, rows in enumerate(row_counts):
            units.append(TableUnit(url=url, kind=kind, index=index, rows=rows, name=name, start=start))
            start += rows
    return units


def _local(spec: str) -> str:
    return spec[len("file://") :] if spec.startswith("file://") else spec


def _strip_query(url: str) -> str:
    return url.split("?", 1)[0] if is_url(url) else url


def _fs(url: str):
    """(filesystem, path) of a URL. (remote.url_to_fs when it lands.)"""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise InputError(f"{url}: cannot open this kind of URL ({_first_line(exc)})") from exc


def _query(url: str, function, *args):
    """A file-system query about `url`; a storage failure (no such bucket, access denied, no network)
    becomes one TransportError line naming the URL. (remote.is_dir / is_file / list_files / expand
    when they land.)"""
    try:
        return function(*args)
    except (TypeError, AttributeError, NotImplementedError):
        raise
    except Exception as exc:
        raise TransportError.from_exception(exc, url) from exc


def _unstrip(url: str, path: str) -> str:
    """A path the file system of `url` returned, as a URL with the scheme the user gave."""
    return path if "://" in path else f"{url.split('://', 1)[0]}://{path}"


def _directory_kind(path: str) -> str | None:
    """ "arrow" (Dataset.save_to_disk), "dict" (DatasetDict.save_to_disk), "parquet" (holds .parquet
    files) or None (not a directory, or none of these)."""
    if is_url(path):
        fs, root = _fs(path)
        if not _query(path, fs.isdir, root):
            return None
        exists = lambda p: _query(path, fs.exists, p)
        isfile = lambda p: _query(path, fs.isfile, p)
        join = posixpath.join
    else:
        if not os.path.isdir(path):
            return None
        root, exists, isfile, join = path, os.path.exists, os.path.isfile, os.path.join
    if isfile(join(root, "state.json")) and exists(join(root, "dataset_info.json")):
        return "arrow"
    if isfile(join(root, "dataset_dict.json")):
        return "dict"
    return "parquet" if _parquet_files_under(path) else None


def _listed(relative: str) -> bool:
    """Arrow's dataset discovery skips names starting with '.' or '_' (_SUCCESS, _metadata, .cache)."""
    return not any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _parquet_files_under(directory: str) -> list[str]:
    """The .parquet files below `directory`, sorted by path. (remote.list_files when it lands.)"""
    if is_url(directory):
        fs, root = _fs(directory)
        root = root.rstrip("/")
        found = _query(directory, fs.find, root)
        return sorted(
            _unstrip(directory, p)
            for p in found
            if p.lower().endswith(PARQUET_SUFFIX) and _listed(p[len(root) :])
        )
    found = []
    for folder, subfolders, filenames in os.walk(directory):
        subfolders[:] = [d for d in subfolders if _listed(d)]
        found += [
            os.path.join(folder, f) for f in filenames if f.lower().endswith(PARQUET_SUFFIX) and _listed(f)
        ]
    return sorted(found)


def _expand(specs: list[str]) -> list[tuple[str, str]]:
    """(url, kind) of every table file the specs name, kind "parquet" or "arrow"."""
    if not specs:
        raise UsageError("no input given")
    files: list[tuple[str, str]] = []
    for spec in specs:
        spec = _local(spec)
        before = len(files)
        for pattern in expand_urls(spec):
            if _GLOB_CHARS.search(pattern):
                files += [(url, "parquet") for url in _glob(pattern)]
            elif _strip_query(pattern).lower().endswith(PARQUET_SUFFIX):
                if not is_url(pattern) and not os.path.isfile(pattern):
                    raise InputError(f"{pattern}: no such file")
                files.append((pattern, "parquet"))
            else:
                files += _directory_files(pattern)
        if len(files) == before:
            raise InputError(f"{spec}: the pattern matches no Parquet files")
    urls = [url for url, _ in files]
    if len(set(urls)) != len(urls):
        duplicate = next(u for u in urls if urls.count(u) > 1)
        raise UsageError(f"{duplicate}: the same file is given twice")
    return files


def _glob(pattern: str) -> list[str]:
    if is_url(pattern):
        fs, path = _fs(pattern)
        matches = _query(pattern, fs.glob, path)
        return sorted(_unstrip(pattern, p) for p in matches if p.lower().endswith(PARQUET_SUFFIX))
    return sorted(
        p
        for p in glob.glob(pattern, recursive=True)
        if p.lower().endswith(PARQUET_SUFFIX) and os.path.isfile(p)
    )


def _directory_files(directory: str) -> list[tuple[str, str]]:
    kind = _directory_kind(directory)
    if kind is None:
        if is_url(directory) or os.path.exists(directory):
            raise InputError(
                f"{directory}: neither Parquet files nor a directory written by datasets' save_to_disk"
            )
        raise InputError(f"{directory}: no such file or directory")
    if kind == "parquet":
        return [(url, "parquet") for url in _parquet_files_under(directory)]
    if kind == "dict":
        splits = _read_json(_join(directory, "dataset_dict.json")).get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise InputError(f"{_join(directory, 'dataset_dict.json')}: no list of splits")
        return [entry for split in splits for entry in _directory_files(_join(directory, split))]
    state_path = _join(directory, "state.json")
    data_files = _read_json(state_path).get("_data_files")
    try:
        filenames = [entry["filename"] for entry in data_files]
    except (TypeError, KeyError) as exc:
        raise InputError(f"{state_path}: no '_data_files' list of {{'filename': ...}}") from exc
    return [(_join(directory, filename), "arrow") for filename in filenames]


def _join(directory: str, relative: str) -> str:
    """`relative` under `directory` (a remote join keeps the scheme). (remote.join when it lands.)"""
    if is_url(directory):
        return directory.rstrip("/") + "/" + relative
    return os.path.join(directory, relative)


def _read_json(url: str) -> dict:
    try:
        with _open(url) as file:
            data = json.loads(file.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{url}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{url}: expected a JSON object")
    return data


def _unique_stems(urls: list[str]) -> list[str]:
    """Output-shard stems: the file name without .parquet / .arrow, characters outside
    [A-Za-z0-9._-] replaced by '_'. A stem shared by several files is qualified by the file's folder
    (a DatasetDict's split: `train_data-00000-of-00001`), and what still collides gets the file's
    position as a prefix (`00003_data`), as tars do (pipeline/tars.py `unique_names`)."""

    def clean(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", name)

    stems, folders = [], []
    for url in urls:
        parts = _strip_query(url).rstrip("/").rsplit("/", 2)
        name = parts[-1]
        for suffix in (PARQUET_SUFFIX, ARROW_SUFFIX):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        stems.append(clean(name) or "table")
        folders.append(clean(parts[-2]) if len(parts) > 1 else "")
    qualified = [
        f"{folder}_{stem}" if folder and stems.count(stem) > 1 else stem
        for stem, folder in zip(stems, folders)
    ]
    return unique_names(qualified)


# ----------------------------------------------------------------------------- schemas


def _require_pyarrow() -> None:
    if pa is None:
        raise UsageError(
            "reading Parquet files and datasets directories needs pyarrow",
            hint="pip install 'blip-toolkit[parquet]'",
        )


def _columns_text(schema) -> str:
    names = list(schema.names)
    shown = ", ".join(names[:_MAX_LISTED_COLUMNS])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED_COLUMNS else "")


def _value_type(arrow_type):
    return arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type


def _is_string(arrow_type) -> bool:
    t = _value_type(arrow_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(arrow_type) -> bool:
    t = _value_type(arrow_type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _image_kind(arrow_type) -> str | None:
    """ "binary", "struct" (datasets' Image storage: {bytes: binary, path: string}, either field
    optional), "string", or None (unusable)."""
    if _is_binary(arrow_type):
        return "binary"
    if _is_string(arrow_type):
        return "string"
    if pa.types.is_struct(arrow_type):
        fields = {arrow_type.field(i).name: arrow_type.field(i).type for i in range(arrow_type.num_fields)}
        has_bytes = "bytes" in fields and _is_binary(fields["bytes"])
        has_path = "path" in fields and _is_string(fields["path"])
        if (has_bytes or has_path) and set(fields) <= {"bytes", "path"}:
            return "struct"
    return None


def _text_kind(arrow_type) -> str | None:
    if _is_string(arrow_type):
        return "string"
    is_list = (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_fixed_size_list(arrow_type)
        or pa.types.is_list_view(arrow_type)
        or pa.types.is_large_list_view(arrow_type)
    )
    if is_list and _is_string(arrow_type.value_type):
        return "list"
    return None


def _key_kind(arrow_type) -> str | None:
    return "value" if _is_string(arrow_type) or pa.types.is_integer(_value_type(arrow_type)) else None


def _check_schema(url: str, schema, columns: TableColumns) -> dict[str, object]:
    """The arrow type of each named column; InputError when one is missing or unusable."""
    for name in columns.names():
        if schema.get_field_index(name) < 0:
            raise InputError(f"{url}: no column '{name}' (columns: {_columns_text(schema)})")
    image_type = schema.field(columns.image).type
    if _image_kind(image_type) is None:
        raise InputError(
            f"{url}: column '{columns.image}' is {image_type}; expected image bytes (binary), a "
            "{bytes, path} struct as datasets writes, or paths / URLs (string)"
        )
    if columns.text is not None and _text_kind(schema.field(columns.text).type) is None:
        raise InputError(
            f"{url}: column '{columns.text}' is {schema.field(columns.text).type}; expected text "
            "(string) or a list of strings"
        )
    if columns.key is not None and _key_kind(schema.field(columns.key).type) is None:
        raise InputError(
            f"{url}: column '{columns.key}' is {schema.field(columns.key).type}; expected keys as "
            "strings or integers"
        )
    return {name: schema.field(name).type for name in columns.names()}


# ----------------------------------------------------------------------------- files


def _open(url: str):
    """`url` opened for reading as remote.py's TrackedFile (local paths too): its `transport_error`
    records an exception the file itself raised, which pyarrow re-raises unchanged or re-wraps, so a
    failed read (network, disk) is told apart from data pyarrow cannot decode (it raises OSError for
    corrupt data too)."""
    return open_input(url)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _transport_error(file) -> TransportError | None:
    return getattr(file, "transport_error", None) if file is not None else None


def _parquet_file(file):
    return pq.ParquetFile(
        file,
        pre_buffer=False,
        buffer_size=PARQUET_BUFFER_BYTES,
        # verifies page CRCs where the writer stored them (pyarrow's write_page_checksum), so
        # flipped bytes inside image data are caught, not handed on as a different image
        page_checksum_verification=True,
    )


def _parquet_layout(url: str) -> tuple[object, list[int]]:
    """(arrow schema, rows per row group) from the footer."""
    with _open(url) as file:
        try:
            parquet = _parquet_file(file)
            metadata = parquet.metadata
            return parquet.schema_arrow, [
                metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)
            ]
        except Exception as exc:
            error = _transport_error(file)
            if error is not None:
                raise error from error.__cause__  # what the file raised
            if isinstance(exc, pa.ArrowException | OSError):
                raise InputError(f"{url}: not a Parquet file ({_first_line(exc)})") from exc
            raise


# Arrow IPC framing (Arrow columnar format, "Encapsulated message format"; Message.fbs): each message
# is <0xFFFFFFFF><int32 metadata size><flatbuffer Message, padded><body of Message.bodyLength bytes>;
# streams before Arrow 0.15 omit the 0xFFFFFFFF. A size of 0 ends the stream.
_CONTINUATION = 0xFFFFFFFF
_HEADER_RECORD_BATCH = 3  # MessageHeader union: NONE, Schema, DictionaryBatch, RecordBatch, ...
# Message fields: version (0), header (a union: its type in slot 1, the table in slot 2), bodyLength (3)
_MESSAGE_HEADER_TYPE = 1
_MESSAGE_HEADER = 2
_MESSAGE_BODY_LENGTH = 3
_RECORD_BATCH_LENGTH = 0  # RecordBatch: length (rows), nodes, buffers, ...


def _flatbuffer_field(buffer: bytes, table: int, slot: int) -> int | None:
    """Position of field `slot` of the flatbuffer table at `table`, or None when it has the default
    value (absent from the vtable)."""
    vtable = table - struct.unpack_from("<i", buffer, table)[0]
    vtable_size = struct.unpack_from("<H", buffer, vtable)[0]
    entry = 4 + 2 * slot
    if entry >= vtable_size:
        return None
    offset = struct.unpack_from("<H", buffer, vtable + entry)[0]
    return table + offset if offset else None


def _record_batch_rows(metadata: bytes) -> tuple[int, int]:
    """(rows, body length) of one message's flatbuffer metadata; rows is 0 unless a record batch."""
    message = struct.unpack_from("<I", metadata, 0)[0]
    position = _flatbuffer_field(metadata, message, _MESSAGE_BODY_LENGTH)
    body_length = struct.unpack_from("<q", metadata, position)[0] if position is not None else 0
    position = _flatbuffer_field(metadata, message, _MESSAGE_HEADER_TYPE)
    header_type = metadata[position] if position is not None else 0
    if header_type != _HEADER_RECORD_BATCH:
        return 0, body_length
    position = _flatbuffer_field(metadata, message, _MESSAGE_HEADER)
    if position is None:
        return 0, body_length
    header = position + struct.unpack_from("<I", metadata, position)[0]
    position = _flatbuffer_field(metadata, header, _RECORD_BATCH_LENGTH)
    rows = struct.unpack_from("<q", metadata, position)[0] if position is not None else 0
    return rows, body_length


def arrow_stream_rows(file) -> int:
    """Rows of the Arrow IPC stream in `file` (a seekable binary file at its start), read from the
    message headers alone: bodies are skipped with seek, so a remote file costs a few small reads,
    not a download. ValueError for a stream that is not Arrow or is cut short."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    rows = 0
    while True:
        prefix = file.read(4)
        if len(prefix) < 4:
            break  # streams may end without the end-of-stream marker
        (length,) = struct.unpack("<I", prefix)
        if length == _CONTINUATION:
            prefix = file.read(4)
            if len(prefix) < 4:
                raise ValueError("cut short after a continuation marker")
            (length,) = struct.unpack("<I", prefix)
        if length == 0:
            break
        if length > size:
            raise ValueError(f"a message metadata size of {length} bytes is larger than the file")
        metadata = file.read(length)
        if len(metadata) < length:
            raise ValueError("cut short inside a message header")
        try:
            batch_rows, body_length = _record_batch_rows(metadata)
        except (struct.error, IndexError) as exc:
            raise ValueError(f"unreadable message header ({exc})") from exc
        if batch_rows < 0 or body_length < 0:
            raise ValueError("negative row count or body length in a message header")
        rows += batch_rows
        body_end = file.tell() + body_length
        if body_end > size:
            raise ValueError("cut short inside a record batch")
        file.seek(body_end)
    return rows


def _arrow_layout(url: str) -> tuple[object, list[int]]:
    """(arrow schema, [rows]) of a save_to_disk Arrow stream file."""
    with _open(url) as file:
        try:
            schema = pa.ipc.open_stream(file).schema
            rows = arrow_stream_rows(file)
        except Exception as exc:
            error = _transport_error(file)
            if error is not None:
                raise error from error.__cause__  # what the file raised
            if isinstance(exc, pa.ArrowException | OSError | ValueError):
                raise InputError(f"{url}: not an Arrow stream file ({_first_line(exc)})") from exc
            raise
    return schema, [rows]


# ----------------------------------------------------------------------------- rows


def read_unit(
    unit: TableUnit, columns: TableColumns, *, skip: Container[int] = (), local_path: str | None = None
) -> Iterator[TableRow]:
    """The rows of `unit` in order, streamed in batches of at most 64 rows of the named columns.
    `local_path`: a local copy of the unit's file to read instead (a staged remote file); names,
    messages and relative image paths still refer to `unit.url`.

    Rows whose offset is in `skip` (done in an earlier run) are not converted to Python objects;
    the other rows keep their offsets. A row without an image comes with `error` set.
    Raises UnitDataError when pyarrow cannot decode the unit's data (the rows not yet yielded are
    lost), and remote.py's TransportError when the file itself failed to read (network, disk: the
    unit is incomplete, resume it later)."""
    _require_pyarrow()
    if unit.rows == 0:
        return
    names = columns.names()
    where = local_path or unit.url
    if unit.kind == "arrow" and not is_url(where):
        # a memory map: record batches point into the page cache, nothing is copied
        try:
            source = pa.memory_map(where)
        except FileNotFoundError as exc:
            raise InputError(f"{unit.url}: no such file") from exc
        file = None
    else:
        file = source = _open(where)
    try:
        batches = (
            _parquet_batches(source, unit, names) if unit.kind == "parquet" else _arrow_batches(source, names)
        )
        offset = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:
                error = _transport_error(file)
                if error is not None:
                    raise error from error.__cause__  # what the file raised
                if isinstance(exc, pa.ArrowException | OSError | ValueError):
                    where = (
                        f"row group {unit.index}" if unit.kind == "parquet" else f"row {unit.start + offset}"
                    )
                    raise UnitDataError(f"{unit.url} {where}: cannot decode ({_first_line(exc)})") from exc
                raise
            yield from _batch_rows(batch, offset, unit, columns, skip)
            offset += batch.num_rows
        if offset != unit.rows:
            raise UnitDataError(f"{unit.url}: the unit has {offset} rows, its metadata says {unit.rows}")
    finally:
        source.close()


def _parquet_batches(file, unit: TableUnit, names: list[str]) -> Iterator:
    parquet = _parquet_file(file)
    yield from parquet.iter_batches(
        batch_size=BATCH_ROWS, row_groups=[unit.index], columns=names, use_threads=False
    )


def _arrow_batches(source, names: list[str]) -> Iterator:
    schema = pa.ipc.open_stream(source).schema
    source.seek(0)  # reopened to decode only the named columns
    wanted = sorted(schema.get_field_index(name) for name in names)
    reader = pa.ipc.open_stream(
        source, options=pa.ipc.IpcReadOptions(included_fields=wanted, use_threads=False)
    )
    for stored in reader:
        # IPC data is not checksummed: full validation turns corrupt offsets into an error here
        # instead of out-of-bounds reads when rows are converted
        stored.validate(full=True)
        for start in range(0, stored.num_rows, BATCH_ROWS):
            yield stored.slice(start, BATCH_ROWS)


def _batch_rows(batch, first_offset: int, unit: TableUnit, columns: TableColumns, skip) -> Iterator[TableRow]:
    image = batch.column(columns.image)
    image_kind = _image_kind(image.type)
    if image_kind == "struct":
        struct_type = image.type
        image_bytes = image.field("bytes") if struct_type.get_field_index("bytes") >= 0 else None
        image_path = image.field("path") if struct_type.get_field_index("path") >= 0 else None
    key = batch.column(columns.key) if columns.key is not None else None
    text = batch.column(columns.text) if columns.text is not None else None
    text_is_list = text is not None and _text_kind(text.type) == "list"
    for i in range(batch.num_rows):
        offset = first_offset + i
        if offset in skip:
            continue
        file_row = unit.start + offset
        row_name = f"{unit.url} row {file_row}"
        try:
            key_value = key[i].as_py() if key is not None else None
            row_key = str(key_value) if key_value is not None else str(file_row)
            row_text, captions = _row_text(text[i].as_py() if text is not None else None, text_is_list)
            if image_kind == "struct":
                value = None
                if image[i].is_valid:
                    value = image_bytes[i].as_py() if image_bytes is not None else None
                    if value is None and image_path is not None:
                        value = image_path[i].as_py()
                        value = _resolve(unit.url, value) if value else value
            else:
                value = image[i].as_py()
                if image_kind == "string" and value:
                    value = _resolve(unit.url, value)
        except (pa.ArrowException, UnicodeDecodeError, ValueError) as exc:
            yield TableRow(offset, str(file_row), None, None, (), f"{row_name}: {_first_line(exc)}")
            continue
        error = None
        if value is None:
            error = f"{row_name}: no image (null)"
        elif not value:
            error = f"{row_name}: no image (empty)"
            value = None
        yield TableRow(offset, row_key, value, row_text, captions, error)


def _row_text(value, is_list: bool) -> tuple[str | None, tuple[str, ...]]:
    if value is None:
        return None, ()
    if is_list:
        captions = tuple(v for v in value if v is not None and v.strip())
        return (captions[0] if captions else None), captions
    return value, ((value,) if value.strip() else ())


def _resolve(table_url: str, path: str) -> str:
    """An image path stored in a table, resolved against the table file's folder: URLs and
    absolute paths are kept; a remote join keeps the scheme. (remote.join when it lands.)"""
    if is_url(path) or path.startswith("/"):
        return path
    if is_url(table_url):
        scheme, rest = table_url.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), path))}"
    return os.path.normpath(os.path.join(os.path.dirname(table_url), path))
