"""Embedding shards: the writer used by `extract-embeddings`, and `EmbeddingShards`, the reader that
`train-dit`, `sample` and `eval-recall` use. Also the small "generated features" file that `sample`
writes and `eval-recall` reads. The layout is documented in docs/formats.md ("Embedding shards").

    from blip_toolkit.data.shards import EmbeddingShards
    shards = EmbeddingShards("emb/")                 # validates index.json
    len(shards)                                      # number of images
    shards[0]["cond"].shape                          # [M, Dc]  conditioning tokens
    shards[0]["target"].shape                        # [N, Dt]  target tokens
    for sample in shards.iter_samples(shuffle_buffer=1000, seed=0): ...
    texts = shards.text_embeddings()                 # all captions, for recall

Tensors come back in the storage dtype (float16 by default); convert with `.float()`.

Reading is lazy: a shard is memory-mapped with safetensors `safe_open` and only the rows asked for
are read; reading one shard never touches the others. Checksums (sha256 in index.json) are checked
per shard on first use (`verify="lazy"`), for all shards up front (`verify="open"`), or not at all.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blip_toolkit.errors import InputError

logger = logging.getLogger("blip")

FORMAT = "blip-embeddings"
VERSION = 1
SHARD_FORMAT = "blip-embeddings-shard"
GENERATED_FORMAT = "blip-generated"
GENERATED_VERSION = 1
INDEX_FILE = "index.json"
HEAD_FILE = "target_head.safetensors"
ERRORS_FILE = "errors.jsonl"
RUN_FILE = "blip_run.json"
TENSORS = ("cond", "target", "target_global", "text_emb", "caption_image")
SAMPLE_FIELDS = ("cond", "target", "target_global", "text_emb", "key", "image", "captions", "index")
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------- writing


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
    from safetensors.torch import save

    from blip_toolkit.fsutil import atomic_write, write_json

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
    errors = sum(len(r.get("errors", [])) for r in records)
    counts = {
        "samples": sum(s["samples"] for s in shards),
        "captions": sum(s["captions"] for s in shards),
        "shards": len(shards),
        "errors": errors,
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        **info,
        "counts": counts,
        "errors_file": ERRORS_FILE,
        "shards": shards,
    }


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in index.json, with its position in the dataset: images
    [offset, offset + samples) and captions [caption_offset, caption_offset + captions)."""

    index: int
    name: str
    path: Path
    meta_path: Path
    samples: int
    captions: int
    offset: int
    caption_offset: int
    sha256: str
    meta_sha256: str


@dataclass
class TextSet:
    """Every caption of a dataset (or of a subset of its images).

    text_emb [C, E] float32 (unnormalised), caption_image [C] int64 (the image each caption belongs
    to, as a global image index), captions: the C strings."""

    text_emb: torch.Tensor
    caption_image: torch.Tensor
    captions: list[str]


class EmbeddingShards:
    """Reader of an `extract-embeddings` output directory.

    Map-style: `len(shards)` images, `shards[i]` -> dict with (by default) every field:
      cond [M, Dc], target [N, Dt], target_global [E], text_emb [k, E] (the k captions of the image),
      key (str), image (str), captions (list of k str), index (int).
    Restrict with `fields=("cond", "target")` (e.g. for a DataLoader with the default collate).

    Streaming: `iter_shards()` (one dict of stacked tensors per shard) and `iter_samples()` (per image,
    optionally shuffled with a buffer), both split by `rank`/`world_size` and DataLoader worker.

    Args:
        root: the directory holding index.json.
        verify: "lazy" (check a shard's sha256 when it is first read), "open" (check all now), "none".
        fields: what `__getitem__` and `iter_samples` return (default all of SAMPLE_FIELDS).
        rank, world_size: the split used by the streaming iterators (defaults 0, 1: no split).
        max_open: how many shards keep an open memory map (LRU) for map-style access.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        verify: str = "lazy",
        fields: Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        max_open: int = 8,
    ):
        if verify not in ("lazy", "open", "none"):
            raise ValueError("verify must be 'lazy', 'open' or 'none'")
        self.root = Path(root)
        self.verify_mode = verify
        self.fields = tuple(fields) if fields is not None else SAMPLE_FIELDS
        unknown = set(self.fields) - set(SAMPLE_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(SAMPLE_FIELDS)}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size, self.max_open = rank, world_size, max_open
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            hint = (
                "the extraction has not finished (rerun it with --resume)"
                if (self.root / RUN_FILE).exists()
                else None
            )
            raise InputError(f"{index_path}: no index.json; not an embeddings directory", hint=hint)
        raw = index_path.read_bytes()
        self.index_sha256 = sha256_bytes(raw)
        try:
            self.index: dict[str, Any] = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{index_path}: not valid JSON ({exc})") from exc
        self._validate_index(index_path)
        self.shards: list[ShardInfo] = []
        offset = caption_offset = 0
        for number, entry in enumerate(self.index["shards"]):
            self.shards.append(
                ShardInfo(
                    number,
                    entry["name"],
                    self.root / entry["file"],
                    self.root / entry["meta"],
                    int(entry["samples"]),
                    int(entry["captions"]),
                    offset,
                    caption_offset,
                    entry["sha256"],
                    entry["meta_sha256"],
                )
            )
            offset += int(entry["samples"])
            caption_offset += int(entry["captions"])
        self._offsets = [s.offset for s in self.shards]
        self.num_samples = offset
        self.num_captions = caption_offset
        self._verified: set[int] = set()
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._rows: OrderedDict[int, list[dict]] = OrderedDict()
        self._caption_images: OrderedDict[int, torch.Tensor] = OrderedDict()
        if verify == "open":
            self.verify()

    # --------------------------------------------------------------- description

    def _validate_index(self, path: Path) -> None:
        index = self.index
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise InputError(
                f"{path}: not an embeddings index (format {index.get('format') if isinstance(index, dict) else None!r})"
            )
        version = index.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise InputError(
                f"{path}: format version {version!r} is not supported (this toolkit reads up to {VERSION})"
            )
        for key in ("dims", "dtype", "shards", "encoders"):
            if key not in index:
                raise InputError(f"{path}: missing {key!r}")
        for number, entry in enumerate(index["shards"]):
            missing = [
                k
                for k in ("name", "file", "meta", "samples", "captions", "sha256", "meta_sha256")
                if k not in entry
            ]
            if missing:
                raise InputError(f"{path}: shard {number} is missing {', '.join(missing)}")

    @property
    def dims(self) -> dict[str, int]:
        """cond_tokens M, cond_dim Dc, target_tokens N, target_dim Dt, embed_dim E."""
        return dict(self.index["dims"])

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the float tensors."""
        return STORAGE_DTYPES[self.index["dtype"]]

    @property
    def encoders(self) -> dict[str, dict]:
        return self.index["encoders"]

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        d = self.dims
        return (
            f"EmbeddingShards({str(self.root)!r}: {self.num_samples} images, {self.num_captions} captions, "
            f"{len(self.shards)} shards, cond [{d['cond_tokens']}, {d['cond_dim']}], "
            f"target [{d['target_tokens']}, {d['target_dim']}], E={d['embed_dim']}, {self.index['dtype']})"
        )

    def head(self, device: str | torch.device = "cpu"):
        """The run's TargetHead (tokens [B, N, Dt] -> global [B, E])."""
        from blip_toolkit.encoders.head import TargetHead

        return TargetHead.load(self.root / self.index.get("head", {}).get("file", HEAD_FILE), device=device)

    # --------------------------------------------------------------- integrity

    def check_shard(self, j: int) -> None:
        """Check shard j's files against index.json (sha256); raises InputError naming the file."""
        if j in self._verified:
            return
        info = self.shards[j]
        for path, expected in ((info.path, info.sha256), (info.meta_path, info.meta_sha256)):
            if not path.is_file():
                raise InputError(f"{path}: shard file missing (listed in {self.root / INDEX_FILE})")
            from blip_toolkit.fsutil import sha256_file

            if sha256_file(path) != expected:
                raise InputError(
                    f"{path}: checksum mismatch: the file is corrupt or changed after extraction",
                    hint="re-extract it: delete the shard and its .done.json, then rerun with --resume",
                )
        self._verified.add(j)

    def verify(self) -> None:
        """Check every shard's checksum now."""
        for j in range(len(self.shards)):
            self.check_shard(j)

    def _prepare(self, j: int) -> None:
        if self.verify_mode != "none":
            self.check_shard(j)

    # --------------------------------------------------------------- shard access

    def _handle(self, j: int):
        """An open safe_open (memory map) of shard j, kept in a small LRU."""
        from safetensors import safe_open

        if j in self._handles:
            self._handles.move_to_end(j)
            return self._handles[j]
        self._prepare(j)
        path = self.shards[j].path
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types
            raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
        self._handles[j] = handle
        while len(self._handles) > self.max_open:
            self._handles.popitem(last=False)
        return handle

    def shard_rows(self, j: int) -> list[dict]:
        """Metadata rows of shard j: {"key", "image", "captions"} per image."""
        if j in self._rows:
            self._rows.move_to_end(j)
            return self._rows[j]
        self._prepare(j)
        path = self.shards[j].meta_path
        try:
            rows = [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable shard metadata ({exc})") from exc
        if len(rows) != self.shards[j].samples:
            raise InputError(f"{path}: {len(rows)} rows, index.json says {self.shards[j].samples}")
        self._rows[j] = rows
        while len(self._rows) > self.max_open:
            self._rows.popitem(last=False)
        return rows

    def _caption_image(self, j: int) -> torch.Tensor:
        if j not in self._caption_images:
            self._caption_images[j] = self._handle(j).get_tensor("caption_image")
            while len(self._caption_images) > self.max_open:
                self._caption_images.popitem(last=False)
        return self._caption_images[j]

    def read_shard(self, j: int, tensors: Sequence[str] = TENSORS) -> dict[str, Any]:
        """Shard j as whole tensors (only those named in `tensors` are read), plus `rows` (metadata),
        `shard` (j), `name`, `offset` (global index of its first image) and `caption_offset`.

        cond [n, M, Dc], target [n, N, Dt], target_global [n, E], text_emb [c, E], caption_image [c]
        (local image index within the shard)."""
        info = self.shards[j]
        handle = self._handle(j)
        out: dict[str, Any] = {name: handle.get_tensor(name) for name in tensors}
        out.update(
            rows=self.shard_rows(j),
            shard=j,
            name=info.name,
            offset=info.offset,
            caption_offset=info.caption_offset,
        )
        return out

    def locate(self, i: int) -> tuple[int, int]:
        """Global image index -> (shard number, row within the shard)."""
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"image index {i} out of range for {self.num_samples} images")
        j = bisect.bisect_right(self._offsets, i) - 1
        return j, i - self.shards[j].offset

    def __getitem__(self, i: int) -> dict[str, Any]:
        j, r = self.locate(int(i))
        handle = self._handle(j)
        return self._sample(j, r, lambda name: handle.get_slice(name)[r : r + 1][0], None)

    def _sample(self, j: int, r: int, row_tensor, shard: dict | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("cond", "target", "target_global"):
            if name in self.fields:
                out[name] = row_tensor(name)
        if "text_emb" in self.fields or "captions" in self.fields:
            caption_image = shard["caption_image"] if shard is not None else self._caption_image(j)
            positions = (caption_image == r).nonzero().flatten()
            if "text_emb" in self.fields:
                if shard is not None:
                    out["text_emb"] = shard["text_emb"][positions]
                elif len(positions):
                    # a shard's captions are stored image by image: one contiguous slice
                    lo, hi = int(positions[0]), int(positions[-1]) + 1
                    out["text_emb"] = self._handle(j).get_slice("text_emb")[lo:hi]
                else:
                    out["text_emb"] = torch.empty(0, self.dims["embed_dim"], dtype=self.dtype)
        if any(f in self.fields for f in ("key", "image", "captions")):
            row = (shard["rows"] if shard is not None else self.shard_rows(j))[r]
            for name in ("key", "image", "captions"):
                if name in self.fields:
                    out[name] = row[name]
        if "index" in self.fields:
            out["index"] = self.shards[j].offset + r
        return out

    # --------------------------------------------------------------- streaming

    def _split(self, order: list[int], split: bool) -> list[int]:
        """The shards of this (rank, DataLoader worker): split by node, then by worker, like
        webdataset's split_by_node / split_by_worker."""
        if not split:
            return order
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        mine = order[self.rank :: self.world_size]
        return mine[worker_id::workers]

    def shard_order(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[int]:
        """Shard numbers in dataset order, or permuted (the same permutation on every rank for a
        given seed and epoch)."""
        order = list(range(len(self.shards)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return order

    def iter_shards(
        self,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        split: bool = True,
        tensors: Sequence[str] = TENSORS,
    ) -> Iterator[dict[str, Any]]:
        """Yield `read_shard` dicts, one shard at a time (memory: one shard), for this rank and worker."""
        for j in self._split(self.shard_order(shuffle=shuffle, seed=seed, epoch=epoch), split):
            yield self.read_shard(j, tensors)

    def iter_samples(
        self, *, shuffle_buffer: int = 0, seed: int = 0, epoch: int = 0, split: bool = True
    ) -> Iterator[dict[str, Any]]:
        """Yield per-image dicts (same fields as `shards[i]`). With `shuffle_buffer` > 0 the shard order
        is permuted and samples are drawn at random from a buffer of that many (webdataset-style
        shuffling: memory = one shard + the buffer). Deterministic for a given seed, epoch, rank and
        worker count."""
        wanted = [
            t
            for t in TENSORS
            if t in self.fields
            or (t == "caption_image" and ("text_emb" in self.fields or "captions" in self.fields))
        ]
        worker = torch.utils.data.get_worker_info()
        part = self.rank * (worker.num_workers if worker else 1) + (worker.id if worker else 0)
        rng = random.Random((seed * 1_000_003 + epoch) * 65_537 + part)
        buffer: list[dict] = []
        shuffle = shuffle_buffer > 0
        for shard in self.iter_shards(shuffle=shuffle, seed=seed, epoch=epoch, split=split, tensors=wanted):
            j = shard["shard"]
            for r in range(len(shard["rows"])):
                # clone: a view would keep its whole shard alive while it waits in the buffer
                sample = self._sample(j, r, lambda name, r=r, shard=shard: shard[name][r].clone(), shard)
                if not shuffle:
                    yield sample
                    continue
                if len(buffer) < shuffle_buffer:
                    buffer.append(sample)
                    continue
                k = rng.randrange(len(buffer))
                buffer[k], sample = sample, buffer[k]
                yield sample
        rng.shuffle(buffer)
        yield from buffer

    def as_iterable(self, *, shuffle_buffer: int = 0, seed: int = 0) -> ShardStream:
        """A torch IterableDataset over `iter_samples` (call `.set_epoch(e)` between epochs)."""
        return ShardStream(self, shuffle_buffer=shuffle_buffer, seed=seed)

    # --------------------------------------------------------------- whole-dataset views (recall)

    def keys(self) -> list[str]:
        """Every image's key, in dataset order (reads the metadata files only)."""
        return [row["key"] for j in range(len(self.shards)) for row in self.shard_rows(j)]

    def gather(self, name: str = "target_global", *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One per-image tensor for the whole dataset, read shard by shard into one preallocated
        tensor: target_global -> [n, E]. (Do not gather tokens of a large dataset: n x N x Dt.)"""
        first = self._handle(0).get_slice(name).get_shape() if self.shards else [0]
        out = torch.empty(self.num_samples, *first[1:], dtype=dtype)
        for info in self.shards:
            out[info.offset : info.offset + info.samples] = (
                self._handle(info.index).get_tensor(name).to(dtype)
            )
        return out

    def text_embeddings(self, *, dtype: torch.dtype = torch.float32) -> TextSet:
        """All captions: text_emb [C, E], caption_image [C] (global image index), caption strings."""
        embed = self.dims["embed_dim"]
        text_emb = torch.empty(self.num_captions, embed, dtype=dtype)
        caption_image = torch.empty(self.num_captions, dtype=torch.int64)
        captions: list[str] = []
        for info in self.shards:
            handle = self._handle(info.index)
            lo, hi = info.caption_offset, info.caption_offset + info.captions
            if info.captions:
                text_emb[lo:hi] = handle.get_tensor("text_emb").to(dtype)
                caption_image[lo:hi] = handle.get_tensor("caption_image") + info.offset
            captions.extend(c for row in self.shard_rows(info.index) for c in row["captions"])
        if len(captions) != self.num_captions:
            raise InputError(
                f"{self.root}: the metadata lists {len(captions)} captions, the tensors {self.num_captions}"
            )
        return TextSet(text_emb, caption_image, captions)

    # --------------------------------------------------------------- pickling (DataLoader workers)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()  # memory maps do not pickle; each worker opens its own
        state["_rows"] = OrderedDict()
        state["_caption_images"] = OrderedDict()
        return state

    @staticmethod
    def collate(samples: list[dict]) -> dict[str, Any]:
        """Batch samples: fixed-shape tensors are stacked ([B, ...]); text_emb, captions, key and
        image stay lists (an image has any number of captions)."""
        out: dict[str, Any] = {}
        for name in samples[0]:
            values = [s[name] for s in samples]
            if name in ("cond", "target", "target_global"):
                out[name] = torch.stack(values)
            elif name == "index":
                out[name] = torch.tensor(values, dtype=torch.int64)
            else:
                out[name] = values
        return out


class ShardStream(torch.utils.data.IterableDataset):
    """IterableDataset view of EmbeddingShards.iter_samples, split by rank and DataLoader worker."""

    def __init__(self, shards: EmbeddingShards, *, shuffle_buffer: int = 0, seed: int = 0):
        super().__init__()
        self.shards, self.shuffle_buffer, self.seed, self.epoch = shards, shuffle_buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return self.shards.iter_samples(shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch=self.epoch)


# ----------------------------------------------------------------------------- generated features


def write_generated(
    path: str | Path,
    tokens: torch.Tensor,
    keys: Sequence[str],
    *,
    index_sha256: str,
    global_emb: torch.Tensor | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write generated target tokens for `eval-recall` (used by `blip sample`).

    tokens [n, N, Dt]; keys: the n sample keys (`EmbeddingShards.keys()`, any subset, no repeats);
    index_sha256: `EmbeddingShards.index_sha256` of the shards the samples were conditioned on;
    global_emb [n, E] optional (else eval-recall computes head(tokens)); metadata: extra str -> str
    (e.g. the DiT run and solver settings). Atomic; refuses to replace a file without `overwrite`."""
    from safetensors.torch import save

    from blip_toolkit.fsutil import atomic_write, check_output_file

    path = check_output_file(path, overwrite=overwrite)
    keys = list(keys)
    if tokens.dim() != 3 or tokens.shape[0] != len(keys):
        raise ValueError(
            f"tokens must be [n, N, Dt] with n = len(keys) = {len(keys)}, got {list(tokens.shape)}"
        )
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique")
    tensors = {"tokens": tokens.contiguous()}
    if global_emb is not None:
        if global_emb.dim() != 2 or global_emb.shape[0] != len(keys):
            raise ValueError(f"global_emb must be [n, E] with n = {len(keys)}, got {list(global_emb.shape)}")
        tensors["global"] = global_emb.contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(
        format=GENERATED_FORMAT,
        version=str(GENERATED_VERSION),
        keys=json.dumps(keys, ensure_ascii=False),
        index_sha256=index_sha256,
    )
    with atomic_write(path, "wb") as handle:
        handle.write(save(tensors, metadata=meta))
    return path


class GeneratedFeatures:
    """A generated-features file opened lazily: `keys` (n), `num`, `tokens_shape` (N, Dt),
    `has_global`, `index_sha256`, `metadata`; read rows with `tokens(start, stop)` -> [k, N, Dt] and
    `global_emb(start, stop)` -> [k, E]."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self.metadata: dict[str, str] = dict(self._handle.metadata() or {})
            names = set(self._handle.keys())
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        if self.metadata.get("format") != GENERATED_FORMAT:
            raise InputError(
                f"{self.path}: not a generated-features file (format {self.metadata.get('format')!r}, "
                f"expected {GENERATED_FORMAT!r})"
            )
        if int(self.metadata.get("version", "0")) > GENERATED_VERSION:
            raise InputError(
                f"{self.path}: version {self.metadata['version']} is newer than this toolkit reads"
            )
        if "tokens" not in names:
            raise InputError(f"{self.path}: has no 'tokens' tensor")
        try:
            self.keys: list[str] = json.loads(self.metadata["keys"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise InputError(f"{self.path}: metadata 'keys' missing or not a JSON list") from exc
        shape = self._handle.get_slice("tokens").get_shape()
        if len(shape) != 3 or shape[0] != len(self.keys):
            raise InputError(f"{self.path}: tokens {shape} do not match {len(self.keys)} keys")
        self.num = len(self.keys)
        self.tokens_shape = (int(shape[1]), int(shape[2]))
        self.has_global = "global" in names
        self.global_shape = tuple(self._handle.get_slice("global").get_shape()) if self.has_global else None
        if self.has_global and (len(self.global_shape) != 2 or self.global_shape[0] != self.num):
            raise InputError(f"{self.path}: global {list(self.global_shape)} does not match {self.num} keys")
        self.index_sha256 = self.metadata.get("index_sha256", "")

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._handle.get_slice("tokens")[start : self.num if stop is None else stop]

    def global_emb(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._handle.get_slice("global")[start : self.num if stop is None else stop]


def read_generated(path: str | Path) -> GeneratedFeatures:
    """Open a generated-features file written by `write_generated`."""
    return GeneratedFeatures(path)
