"""Where a dataset job reads from, as ordered units, and how one unit is read.

Three kinds of source, each cut into units in a fixed order (the order of the output):
- files: image paths or URLs from arguments (files, folders searched recursively, glob patterns, `-`
  for stdin), a TSV manifest, or the Python API's lists. A unit is a slice of `unit_size` entries.
- webdataset: tar shards (local, remote or `pipe:`), brace patterns and `::` lists. A unit is a tar.
- table: Parquet files (a file, a glob, a folder of them, e.g. a Hub dataset's `data/`) and
  `datasets.save_to_disk` directories (pipeline/tables.py). A unit is a row group or an Arrow file.

A reader (`read_unit`) yields exactly one element per position of the unit, in order: a `RawItem`
when `want(offset)` is true, else None (nothing is decoded or kept for it). Positions that are
errors (a tar that ends early, a corrupt row group, a missing file) are RawItems with `error` set, so
every position gets exactly one record.

Remote tar and table files are read from a local copy staged once (pipeline/staging.py): `read_unit`
is given the local path. Remote images named in a file list or a table column are read one by one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from blip_toolkit.data.images import collect_inputs, is_image_path
from blip_toolkit.data.manifests import read_manifest
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.pipeline import remote, tables
from blip_toolkit.pipeline.items import RawItem
from blip_toolkit.pipeline.tars import (
    TAR_SUFFIXES,
    SampleError,
    decode_sample,
    is_webdataset_spec,
    tar_events,
    tar_names,
)

logger = logging.getLogger("blip")

# Positions of file items: (index // FILE_UNIT, index % FILE_UNIT). Small enough that several processes
# share a few hundred images, large enough that the resume state stays small for millions.
FILE_UNIT = 64

Want = Callable[[int], bool]


@dataclass(frozen=True)
class Entry:
    """One image of a file source: its path or URL, its key (extract-embeddings' shard rows), its
    question (vqa) and captions, or an input that already failed (`error`)."""

    image: str
    key: str = ""
    text: str | None = None
    captions: tuple[str, ...] = ()
    caption_file: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Unit:
    """One unit of work. `size` is its number of positions when known up front (files, tables);
    a tar's is known only once read. `url` is the tar or table file (remote ones are staged)."""

    number: int
    name: str
    kind: str  # "files" | "tar" | "table"
    url: str | None = None
    start: int = 0  # files: index of the first entry
    size: int | None = None
    table: tables.TableUnit | None = None

    @property
    def staged(self) -> bool:
        """Whether this unit's file is read from a local copy (remote tars and tables)."""
        return self.url is not None and remote.is_url(self.url)


class FileSource:
    """Image paths or URLs (with their texts and captions), in order."""

    kind = "files"

    def __init__(self, entries: list[Entry], spec: Iterable[str] = (), *, unit_size: int = FILE_UNIT):
        self.entries, self.spec, self.unit_size = list(entries), list(spec), unit_size
        self.units = [
            Unit(i, f"shard-{i:05d}", "files", start=start, size=min(unit_size, len(self.entries) - start))
            for i, start in enumerate(range(0, len(self.entries), unit_size))
        ]

    @property
    def total(self) -> int:
        return len(self.entries)

    def describe(self) -> dict:
        """What defines the inputs (part of the resume fingerprint): count and a hash of every path
        and text, so a folder that gained or lost an image is not resumed as if it were the same."""
        digest = hashlib.sha256()
        for entry in self.entries:
            digest.update(f"{entry.image}\t{entry.text or ''}\n".encode())
        return {"kind": self.kind, "items": len(self.entries), "sha256": digest.hexdigest()}

    def entry_of(self, unit: Unit, offset: int) -> Entry:
        return self.entries[unit.start + offset]

    def read_unit(self, unit: Unit, path: str | None, want: Want) -> Iterator[RawItem | None]:
        for offset in range(unit.size or 0):
            if not want(offset):
                yield None
                continue
            entry = self.entries[unit.start + offset]
            item = RawItem(
                offset,
                {"image": entry.image},
                key=entry.key or entry.image,
                label=entry.image,
                data=entry.image,
                text=entry.text,
                captions=entry.captions,
                error=entry.error,
            )
            if entry.caption_file is not None and item.error is None:
                try:
                    item.captions = tuple(read_caption_file(entry.caption_file))
                except SampleError as exc:
                    item.error = str(exc)
            yield item


class TarSource:
    """webdataset shards, in the given order; `text` is the one question asked of every sample (vqa)."""

    kind = "webdataset"
    total = None  # unknown until every tar has been read

    def __init__(self, urls: list[str], spec: Iterable[str] = (), *, text: str | None = None):
        self.urls, self.spec, self.text = list(urls), list(spec), text
        self.names = tar_names(self.urls)
        self.units = [
            Unit(i, name, "tar", url=url) for i, (url, name) in enumerate(zip(self.urls, self.names))
        ]

    def describe(self) -> dict:
        urls = [u if u.startswith("pipe:") or remote.is_url(u) else str(Path(u).resolve()) for u in self.urls]
        return {"kind": self.kind, "urls": urls, "question": self.text}

    def read_unit(self, unit: Unit, path: str | None, want: Want) -> Iterator[RawItem | None]:
        label = remote.redact_url(unit.url)
        for offset, (sample, error) in enumerate(tar_events(path or unit.url, label=label)):
            if not want(offset):
                yield None
                continue
            if sample is None:
                yield RawItem(
                    offset,
                    {"shard": unit.name, "key": None},
                    f"{unit.name}/",
                    label,
                    text=self.text,
                    error=error,
                )
                continue
            key = str(sample.get("__key__", offset))
            item = RawItem(
                offset,
                {"shard": unit.name, "key": key},
                f"{unit.name}/{key}",
                f"{label}#{key}",
                text=self.text,
            )
            try:
                suffix, item.data, captions = decode_sample(sample)
                item.label, item.captions = f"{item.label}.{suffix}", tuple(captions)
            except SampleError as exc:
                item.error = f"{item.label}: {exc}"
            yield item


class TableSource:
    """Parquet files and save_to_disk directories: rows of the named columns, by row group."""

    kind = "table"

    def __init__(self, specs: list[str], columns: tables.TableColumns, *, text: str | None = None):
        self.spec, self.columns, self.text = list(specs), columns, text
        table_units = tables.table_units(self.spec, columns)
        self.units = [
            Unit(i, t.name, "table", url=t.url, size=t.rows, table=t) for i, t in enumerate(table_units)
        ]

    @property
    def total(self) -> int:
        return sum(u.size or 0 for u in self.units)

    def describe(self) -> dict:
        def where(url: str) -> str:  # local files by absolute path: the same run from any folder
            return url if remote.is_url(url) else str(Path(url).resolve())

        digest = hashlib.sha256()
        for unit in self.units:
            digest.update(f"{where(unit.url)}\t{unit.table.index}\t{unit.size}\n".encode())
        return {
            "kind": self.kind,
            # Local files by their absolute path, as tars: a resume from another folder is the same run.
            "files": sorted(
                {u.url if remote.is_url(u.url) else str(Path(u.url).resolve()) for u in self.units}
            ),
            "units_sha256": digest.hexdigest(),
            "columns": [self.columns.image, self.columns.key, self.columns.text],
            "question": self.text,
        }

    def read_unit(self, unit: Unit, path: str | None, want: Want) -> Iterator[RawItem | None]:
        size = unit.size or 0
        skip = {offset for offset in range(size) if not want(offset)}
        label = remote.redact_url(unit.url)
        rows = tables.read_unit(unit.table, self.columns, skip=skip, local_path=path)
        offset = 0
        try:
            for row in rows:
                while offset < row.offset:
                    yield None
                    offset += 1
                yield self._item(unit, label, row)
                offset += 1
        except tables.UnitDataError as exc:
            # Every position of the unit not read yet fails with the unit's error (each gets a record);
            # its key column cannot be read either, so its key is its row number in the file.
            for rest in range(offset, size):
                if rest in skip:
                    yield None
                    continue
                key = str(unit.table.start + rest)
                fields = {"shard": unit.name, "key": key}
                yield RawItem(rest, fields, f"{unit.name}/{key}", label, text=self.text, error=str(exc))
            return
        while offset < size:
            yield None
            offset += 1

    def _item(self, unit: Unit, label: str, row) -> RawItem:
        text = self.text if self.text is not None else row.text
        item = RawItem(
            row.offset,
            {"shard": unit.name, "key": row.key},
            f"{unit.name}/{row.key}",
            f"{label}#{row.key}",
            data=row.image,
            text=text,
            captions=tuple(row.captions),
            error=row.error,
        )
        return item


Source = FileSource | TarSource | TableSource


# ----------------------------------------------------------------------------- opening sources


def open_inputs(
    inputs: list[str] | None,
    manifest: str | Path | None = None,
    *,
    text: str | None = None,
    manifest_schema: str = "images",
    allow_pipe: bool = False,
    columns: tables.TableColumns | None = None,
    stdin: Iterable[str] | None = None,
) -> Source:
    """The source of `blip caption | vqa | retrieval`: webdataset shards, Parquet / save_to_disk
    tables, image files / folders / globs / `-` (stdin), or a TSV manifest (`manifest_schema`
    "questions" reads image<TAB>question rows). `text` is the question asked of every image
    (vqa --question); `columns` the table columns (--image-column, --key-column, --text-column)."""
    inputs = list(inputs or [])
    if manifest is not None:
        if inputs:
            raise UsageError("give images as arguments or with --manifest, not both")
        with local_manifest(str(manifest)) as (path, base):
            frame = read_manifest(path, manifest_schema, check_images=False, base=base).frame
        texts = list(frame["question"]) if manifest_schema == "questions" else [text] * len(frame)
        return FileSource(
            [Entry(image, image, t) for image, t in zip(frame["image"], texts)], [str(manifest)]
        )
    if not inputs:
        raise UsageError(
            "no images given (pass files, directories, glob patterns, webdataset .tar shards, "
            "Parquet files, - for stdin, or --manifest)"
        )
    kind = _input_kind(inputs)
    if kind == "table":
        return TableSource(inputs, columns or tables.TableColumns(), text=text)
    if columns is not None and columns != tables.TableColumns():
        raise UsageError("--image-column, --key-column and --text-column apply to Parquet / Arrow inputs")
    if kind == "webdataset":
        return TarSource(expand_tars(inputs, allow_pipe=allow_pipe), inputs, text=text)
    entries = []
    for raw in [each for spec in inputs for each in (expand_urls(spec) if "{" in spec else [spec])]:
        if remote.is_url(raw):
            entries.extend(_remote_entries(raw, text))
        else:
            entries.extend(
                Entry(item.path, item.path, text, error=item.error)
                for item in collect_inputs([raw], stdin=stdin if raw == "-" else None)
            )
    return FileSource(_unique(entries), inputs)


def open_dataset(
    specs: list[str] | str,
    *,
    allow_pipe: bool = False,
    columns: tables.TableColumns | None = None,
    unit_size: int = FILE_UNIT,
) -> Source:
    """The source of `extract-embeddings`: one folder (captions from same-name .txt files), one TSV
    manifest (`image<TAB>caption`), webdataset tars, or Parquet / save_to_disk tables (captions from
    `columns.text`). Folder and TSV items are sorted by key, so the shard an image lands in does not
    depend on the file system or on how many processes run; `unit_size` is the shard size."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise UsageError(
            "no source given (a folder of images, a TSV manifest, webdataset .tar shards or Parquet files)"
        )
    kind = _input_kind(specs)
    if kind == "table":
        return TableSource(specs, columns or tables.TableColumns())
    if kind == "webdataset":
        return TarSource(expand_tars(specs, allow_pipe=allow_pipe), specs)
    if len(specs) > 1:
        raise UsageError(
            "several sources are only accepted as webdataset tar shards or Parquet files; give one folder "
            "or one TSV manifest"
        )
    spec = specs[0]
    if spec.lower().endswith(".tsv") and (remote.is_url(spec) or Path(spec).is_file()):
        entries = tsv_entries(spec)
    elif remote.is_url(spec) or Path(spec).is_dir():
        entries = folder_entries(spec)
    elif Path(spec).is_file():
        entries = tsv_entries(spec)
    else:
        raise InputError(f"{spec}: no such file or directory")
    return FileSource(entries, specs, unit_size=unit_size)


def tar_directory(spec: str) -> list[str]:
    """The tars in the folder or prefix `spec` (sorted; img2dataset's output, whose .parquet files are
    per-shard statistics), or [] when `spec` is not a folder holding tars."""
    if is_webdataset_spec(spec) or any(ch in spec for ch in "*?[{"):
        return []
    if remote.is_url(spec):
        if not remote.is_dir(spec):
            return []
        found = remote.list_files(spec)
    else:
        if not Path(spec).is_dir():
            return []
        found = [str(p) for p in Path(spec).rglob("*") if p.is_file()]  # recursive, as a remote prefix
    return sorted(f for f in found if f.lower().endswith(TAR_SUFFIXES))


def _spec_kind(spec: str) -> str:
    if tar_directory(spec):
        return "webdataset"
    if tables.is_table_spec(spec):
        return "table"
    return "webdataset" if is_webdataset_spec(spec) else "files"


def _input_kind(specs: list[str]) -> str:
    kinds = {_spec_kind(s) for s in specs}
    if len(kinds) > 1:
        raise UsageError(
            "give one kind of input: webdataset .tar shards, Parquet / Arrow tables, or image files"
        )
    return kinds.pop()


def expand_tars(specs: list[str], *, allow_pipe: bool = False) -> list[str]:
    """Expand brace patterns and `::` lists (and globs of remote tars); local tars must exist;
    remote ones must be readable; pipe: needs `allow_pipe`."""
    urls: list[str] = []
    for spec in specs:
        for url in tar_directory(spec) or expand_urls(spec):
            if url.startswith("pipe:"):
                if not allow_pipe:
                    raise UsageError(
                        f"{url}: pipe: sources run a shell command; pass --allow-pipe to allow it"
                    )
                urls.append(url)
            elif remote.is_url(url):
                found = remote.expand(url)
                if not found:
                    raise InputError(f"{remote.redact_url(url)}: the pattern matches no tar files")
                for each in found:
                    remote.check_readable(each)
                urls.extend(found)
            elif not Path(url).is_file():
                raise InputError(f"{url}: no such tar file")
            else:
                urls.append(url)
    if not urls:
        raise InputError(f"{' '.join(specs)}: the pattern gives no tar files")
    if len(set(urls)) != len(urls):
        duplicate = next(u for u in urls if urls.count(u) > 1)
        raise UsageError(f"{remote.redact_url(duplicate)}: the same tar is given twice")
    return urls


def _remote_entries(spec: str, text: str | None) -> list[Entry]:
    """Images under a remote prefix, matching a remote glob, or one remote image."""
    if any(ch in spec for ch in "*?["):
        found = [u for u in remote.expand(spec) if is_image_path(Path(u))]
        if not found:
            return [Entry(spec, spec, text, error=f"{remote.redact_url(spec)}: pattern matches no images")]
        return [Entry(u, u, text) for u in found]
    if remote.is_dir(spec):
        found = [u for u in remote.list_files(spec) if is_image_path(Path(u))]
        if not found:
            return [Entry(spec, spec, text, error=f"{remote.redact_url(spec)}: no images under this prefix")]
        return [Entry(u, u, text) for u in found]
    return [Entry(spec, spec, text)]


def _unique(entries: list[Entry]) -> list[Entry]:
    """Entries without repeated images (a path given twice is captioned once); failed inputs kept."""
    seen: set[str] = set()
    out = []
    for entry in entries:
        if entry.error is None and entry.image in seen:
            continue
        seen.add(entry.image)
        out.append(entry)
    return out


def read_caption_file(path: str) -> list[str]:
    """Captions of a `.txt` file (local or remote): one per non-empty line, stripped."""
    try:
        data = remote.read_bytes(path) if remote.is_url(path) else Path(path).read_bytes()
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SampleError(f"{path}: captions are not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise SampleError(f"{path}: cannot read captions ({exc.strerror or exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def folder_entries(root: str) -> list[Entry]:
    """Every image under `root` (local folder or remote prefix; sorted by relative path, hidden files
    and folders skipped), captions from same-name .txt files."""
    if remote.is_url(root):
        files = remote.list_files(root)
        base = root.rstrip("/") + "/"
        relative = {f: f[len(base) :] if f.startswith(base) else f for f in files}
    else:
        root_path = Path(root)
        files = [str(p) for p in root_path.rglob("*") if p.is_file()]
        relative = {f: Path(f).relative_to(root_path).as_posix() for f in files}
        files = [f for f in files if not any(part.startswith(".") for part in Path(relative[f]).parts)]
    present = set(files)
    entries = []
    for file in files:
        if not is_image_path(Path(file)):
            continue
        caption_file = re.sub(r"\.[^./]+$", ".txt", file)
        entries.append(
            Entry(file, relative[file], caption_file=caption_file if caption_file in present else None)
        )
    if not entries:
        raise InputError(f"{remote.redact_url(root)}: no images in this folder")
    entries.sort(key=lambda entry: entry.key)
    return entries


def tsv_entries(path: str | Path) -> list[Entry]:
    """A TSV manifest `image<TAB>caption`; rows of the same image are merged (captions in row order).
    Missing images are not refused here: like unreadable ones they are reported per item. Key: the
    image path as written, relative to the manifest's folder."""
    with local_manifest(str(path)) as (local, url_base):
        manifest = read_manifest(local, "embeddings", check_images=False, base=url_base)
    base = Path(path).parent
    captions: dict[str, list[str]] = {}
    for image, caption in zip(manifest.frame["image"], manifest.frame["caption"]):
        bucket = captions.setdefault(image, [])
        if caption:
            bucket.append(caption)
    entries = []
    for image, texts in captions.items():
        try:
            key = Path(image).relative_to(base).as_posix()
        except ValueError:
            key = image
        entries.append(Entry(image, key, captions=tuple(texts)))
    entries.sort(key=lambda entry: entry.key)
    return entries


@contextlib.contextmanager
def local_manifest(spec: str):
    """(a local path of the manifest `spec`, the folder its relative paths are relative to when not
    the local file's): a remote manifest is read from a temporary copy, its paths against its URL."""
    if not remote.is_url(spec):
        yield spec, None
        return
    with tempfile.TemporaryDirectory(prefix="blip-manifest-") as folder:
        local = Path(folder) / "manifest.tsv"
        local.write_bytes(remote.read_bytes(spec))
        yield str(local), spec.split("?", 1)[0].rsplit("/", 1)[0] + "/"


def list_source(paths: Iterable[str], texts: Iterable[str | None] | None = None, errors=None) -> FileSource:
    """A file source from paths held in memory (the Python API: `caption_images` and friends)."""
    paths = list(paths)
    texts = list(texts) if texts is not None else [None] * len(paths)
    errors = list(errors) if errors is not None else [None] * len(paths)
    if len(texts) != len(paths):
        raise UsageError(f"{len(paths)} images but {len(texts)} texts")
    return FileSource([Entry(p, p, t, error=e) for p, t, e in zip(paths, texts, errors)])
