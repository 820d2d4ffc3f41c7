"""The inputs of `blip caption`, `blip vqa` and `blip retrieval` as a stream of prepared items.

Two kinds of source:
- files: image paths from arguments (files, folders searched recursively, glob patterns, `-` for
  stdin) or a TSV manifest; the list of paths is read up front (a path is a few dozen bytes).
- webdataset: tar shards and brace patterns (`data/{00000..00099}.tar`), read by the same code as
  `extract-embeddings` (`data/sources.py`: img2dataset layout, `pipe:` only with `allow_pipe`). The
  samples are never listed: they stream, so memory does not grow with the dataset.

Every item has a position `(unit, offset)` that orders the output and identifies the item in the
resume journal: for files `(index // BLOCK, index % BLOCK)`, for webdataset `(tar number, place of
the sample in the tar)`. A tar-level error (a truncated tar, a corrupt header) takes a position of its
own, after the samples read before it, so it is recorded like an item.

Decoding and preprocessing run in DataLoader workers (`chunk_loader`). Chunks of `chunk_size` items
are dealt to workers in turn and the DataLoader hands them back in the same turn, so items arrive in
input order whatever the number of workers: files through a map-style dataset, webdataset through
an iterable one whose workers all read this process's tars and each decodes only its own chunks
(reading a tar costs little next to decoding its JPEGs).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip_toolkit.data.images import ImageLoadError, collect_inputs, open_image
from blip_toolkit.data.manifests import read_manifest
from blip_toolkit.data.sources import SampleError, decode_sample, is_webdataset_spec, tar_events, wds_source
from blip_toolkit.errors import BlipError, InputError, UsageError
from blip_toolkit.runtime.batching import read_ahead

logger = logging.getLogger("blip")

BLOCK = 4096  # positions of file items: (index // BLOCK, index % BLOCK)

Position = tuple[int, int]


@dataclass(frozen=True)
class Entry:
    """One input of a file source: an image path and the item's text (a question), or an input that
    already failed (`error`: a pattern that matched nothing, a missing file)."""

    image: str
    text: str | None = None
    error: str | None = None


@dataclass
class FileSource:
    """Image paths (with their texts), in input order."""

    entries: list[Entry]
    spec: list[str] = field(default_factory=list)
    kind: str = "files"

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


@dataclass
class TarSource:
    """webdataset shards; `text` is the one question asked of every sample (vqa)."""

    urls: list[str]
    names: list[str]
    spec: list[str]
    text: str | None = None
    kind: str = "webdataset"

    @property
    def total(self) -> None:
        return None  # unknown until every tar has been read

    def describe(self) -> dict:
        urls = [u if u.startswith("pipe:") else str(Path(u).resolve()) for u in self.urls]
        return {"kind": self.kind, "urls": urls, "question": self.text}


Source = FileSource | TarSource


def open_inputs(
    inputs: list[str] | None,
    manifest: str | os.PathLike | None = None,
    *,
    text: str | None = None,
    manifest_schema: str = "images",
    allow_pipe: bool = False,
    stdin: Iterable[str] | None = None,
) -> Source:
    """The source named on the command line: webdataset shards, or image files / folders / globs /
    `-` (stdin), or a TSV manifest (`manifest_schema` "questions" reads image<TAB>question rows).
    `text` is the question asked of every image (vqa --question)."""
    inputs = list(inputs or [])
    if manifest is not None:
        if inputs:
            raise UsageError("give images as arguments or with --manifest, not both")
        frame = read_manifest(manifest, manifest_schema, check_images=False).frame
        texts = list(frame["question"]) if manifest_schema == "questions" else [text] * len(frame)
        entries = [Entry(image, t) for image, t in zip(frame["image"], texts)]
        return FileSource(entries, [str(manifest)])
    if not inputs:
        raise UsageError(
            "no images given (pass files, directories, glob patterns, webdataset .tar shards, "
            "- for stdin, or --manifest)"
        )
    tars = [is_webdataset_spec(spec) for spec in inputs]
    if any(tars):
        if not all(tars):
            raise UsageError("give either webdataset .tar shards or image files / folders, not both")
        source = wds_source(inputs, allow_pipe=allow_pipe)
        return TarSource(source.urls, source.names, list(inputs), text)
    items = collect_inputs(inputs, stdin=stdin)
    return FileSource([Entry(item.path, text, item.error) for item in items], list(inputs))


def list_source(paths: Iterable[str], texts: Iterable[str | None] | None = None, errors=None) -> FileSource:
    """A file source from paths held in memory (the Python API: `caption_images` and friends)."""
    paths = list(paths)
    texts = list(texts) if texts is not None else [None] * len(paths)
    errors = list(errors) if errors is not None else [None] * len(paths)
    if len(texts) != len(paths):
        raise UsageError(f"{len(paths)} images but {len(texts)} texts")
    return FileSource([Entry(p, t, e) for p, t, e in zip(paths, texts, errors)])


def file_position(index: int) -> Position:
    return index // BLOCK, index % BLOCK


# ----------------------------------------------------------------------------- prepared items


@dataclass
class Prepared:
    """One item after decoding and preprocessing (in a worker): its position, the fields that name
    it in the output ({"image": path} or {"shard", "key"}), its text, the model inputs the task's
    encoder made (tensors with a leading dimension of 1), or the error that stopped it."""

    pos: Position
    fields: dict[str, Any]
    text: str | None = None
    inputs: dict[str, torch.Tensor] | None = None
    error: str | None = None


@dataclass
class Chunk:
    """Consecutive prepared items of this process, and the tars that end with them: (unit, number
    of positions in the tar)."""

    items: list[Prepared] = field(default_factory=list)
    ends: list[Position] = field(default_factory=list)


Encoder = Callable[[Any, str | None], dict[str, torch.Tensor]]


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


def prepare_item(
    pos: Position, fields: dict, text: str | None, data, label: str, encoder: Encoder, max_pixels: int
) -> Prepared:
    """Decode one image (a path or encoded bytes) and run the task's encoder on it; any failure
    becomes the item's error (one bad image never stops the run)."""
    try:
        image = open_image(data, max_pixels=max_pixels, name=label)
        return Prepared(pos, fields, text, encoder(image, text))
    except (ImageLoadError, SampleError) as exc:
        return Prepared(pos, fields, text, error=str(exc))
    except BlipError as exc:  # e.g. a question holding a token the model reserves
        return Prepared(pos, fields, text, error=f"{label}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a processor failing on one odd image must not stop the run
        return Prepared(pos, fields, text, error=f"{label}: {type(exc).__name__}: {exc}")


class FileChunks(torch.utils.data.Dataset):
    """Map-style dataset of this process's file items, `chunk_size` at a time."""

    def __init__(self, work: list[tuple[int, Entry]], chunk_size: int, encoder: Encoder, max_pixels: int):
        self.chunks = [work[i : i + chunk_size] for i in range(0, len(work), chunk_size)]
        self.encoder, self.max_pixels = encoder, max_pixels

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> Chunk:
        chunk = Chunk()
        for index, entry in self.chunks[k]:
            pos, fields = file_position(index), {"image": entry.image}
            if entry.error:
                chunk.items.append(Prepared(pos, fields, entry.text, error=entry.error))
            else:
                chunk.items.append(
                    prepare_item(
                        pos, fields, entry.text, entry.image, entry.image, self.encoder, self.max_pixels
                    )
                )
        return pack(chunk)


@dataclass(frozen=True)
class TarUnit:
    number: int
    url: str
    name: str


class TarChunks(torch.utils.data.IterableDataset):
    """This process's tars as chunks. Every worker reads the same tars in the same order and cuts
    the same chunks (`chunk_size` positions still to do, and a last one at the end of each tar that
    carries the tar's end); chunk k is decoded and yielded by worker k % workers, which is the order
    in which the DataLoader collects from its workers, so the stream stays in input order.
    `done[unit]` holds the offsets finished by an earlier run (read past, not decoded; anything with
    `in`)."""

    def __init__(
        self,
        units: list[TarUnit],
        chunk_size: int,
        encoder: Encoder,
        max_pixels: int,
        *,
        text: str | None = None,
        done: dict | None = None,
    ):
        super().__init__()
        self.units, self.chunk_size, self.encoder, self.max_pixels = units, chunk_size, encoder, max_pixels
        self.text, self.done = text, done or {}

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        number = 0  # chunk counter over this process's stream
        for unit in self.units:
            done = self.done.get(unit.number, ())
            pending: list[tuple[int, dict | None, str | None]] = []
            offset = 0
            for sample, error in tar_events(unit.url):
                if offset not in done:
                    pending.append((offset, sample, error))
                offset += 1
                if len(pending) == self.chunk_size:
                    if number % workers == worker:
                        yield self._chunk(unit, pending)
                    number, pending = number + 1, []
            if number % workers == worker:
                yield self._chunk(unit, pending, end=offset)
            number += 1

    def _chunk(self, unit: TarUnit, pending: list, end: int | None = None) -> Chunk:
        chunk = Chunk(ends=[(unit.number, end)] if end is not None else [])
        for offset, sample, error in pending:
            pos = (unit.number, offset)
            if sample is None:
                chunk.items.append(Prepared(pos, {"shard": unit.name, "key": None}, self.text, error=error))
                continue
            key = str(sample.get("__key__", offset))
            fields, label = {"shard": unit.name, "key": key}, f"{unit.url}#{key}"
            try:
                suffix, data, _ = decode_sample(sample)
            except SampleError as exc:
                chunk.items.append(Prepared(pos, fields, self.text, error=f"{label}: {exc}"))
                continue
            chunk.items.append(
                prepare_item(pos, fields, self.text, data, f"{label}.{suffix}", self.encoder, self.max_pixels)
            )
        return pack(chunk)


def _identity(x):
    return x


def default_workers(total: int | None, chunk_size: int) -> int:
    """Workers when --num-workers is not given: none for a single chunk (starting a worker would cost
    more than it saves), else up to 4, leaving one core to the model."""
    chunks = None if total is None else -(-total // chunk_size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = max(0, min(4, cores - 1))
    return 0 if chunks is not None and chunks <= 1 else max(wanted, 1 if cores > 1 else 0)


def chunk_loader(dataset, num_workers: int) -> Iterator[Chunk]:
    """Chunks of `dataset` in order: from `num_workers` DataLoader workers, or (0) prepared in one
    background thread, one chunk ahead of the model (decoding releases the GIL)."""
    if num_workers == 0:
        iterator = (
            iter(dataset)
            if isinstance(dataset, torch.utils.data.IterableDataset)
            else (dataset[k] for k in range(len(dataset)))
        )
        return read_ahead(iterator)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        prefetch_factor=2,
        persistent_workers=False,
    )
    return iter(loader)


def file_work(source: FileSource, rank: int, world: int, done) -> list[tuple[int, Entry]]:
    """This process's file items still to do: index i belongs to rank i % world."""
    return [
        (i, entry)
        for i, entry in enumerate(source.entries)
        if i % world == rank and not done.has(file_position(i))
    ]


def tar_units(source: TarSource) -> list[TarUnit]:
    return [TarUnit(i, url, name) for i, (url, name) in enumerate(zip(source.urls, source.names))]


def check_readable(source: Source) -> None:
    """Local tars must still be there when the run starts (a missing shard is refused up front)."""
    if isinstance(source, TarSource):
        for url in source.urls:
            if not url.startswith("pipe:") and not Path(url).is_file():
                raise InputError(f"{url}: no such tar file")
