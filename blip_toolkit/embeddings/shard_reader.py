"""`EmbeddingShards`, the one reader of embedding shards, used by `train-dit`, `sample` and
`eval-recall` (the writer is embeddings/shards.py). The layout is documented in docs/formats.md
("Embedding shards").

    from blip_toolkit.embeddings.shard_reader import EmbeddingShards
    shards = EmbeddingShards("emb/")                 # validates index.json
    len(shards)                                      # number of images
    shards[0]["cond"].shape                          # [M, Dc]  conditioning tokens of image 0
    shards.rows(np.array([5, 2]), "target")          # [2, N, Dt] float32, straight from the memory maps
    texts = shards.text_embeddings()                 # all captions, for recall

Reading is lazy and zero-copy: a shard file is memory-mapped and its tensors are views on the map, so
reading rows copies only those rows, and reading one shard never touches the others. At most
`max_open` shards stay mapped (an LRU). Checksums (sha256 in index.json) are checked per shard on
first use (`verify="lazy"`), for all shards up front (`verify="open"`), or not at all.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip_toolkit.embeddings.format import (
    FORMAT,
    HEAD_FILE,
    IMAGE_TENSORS,
    INDEX_FILE,
    SAMPLE_FIELDS,
    TENSORS,
    VERIFY_MODES,
    VERSION,
)
from blip_toolkit.embeddings.head import TargetHead
from blip_toolkit.embeddings.shards import TORCH_DTYPES, sha256_bytes
from blip_toolkit.engine.outputs import RUN_FILE
from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import sha256_file

# safetensors dtype names of the tensors a shard holds.
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}


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


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Zero-copy views of every tensor of a safetensors file, on a private copy-on-write memory map
    (pages are read from the file on first touch and never written back).

    The file is a little-endian u64 header length, a JSON header name -> {dtype, shape,
    data_offsets} (offsets from the end of the header), then the data; safetensors' own reader copies
    every tensor it returns, which a training stream reading random rows cannot afford."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
    raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    views = {}
    for name, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if name != "__metadata__" else None
        if dtype is None:
            continue
        start, end = (8 + length + offset for offset in entry["data_offsets"])
        shape = tuple(entry["shape"])
        size = torch.empty((), dtype=dtype).element_size()
        if end - start != math.prod(shape) * size or end > raw.numel():
            raise InputError(
                f"{path}: tensor {name} has {end - start} bytes, expected {math.prod(shape) * size}"
            )
        data = raw[start:end]
        if start % size:  # unaligned (not written by our writer): a copy
            data = data.clone()
        views[name] = data.view(dtype).view(shape)
    return views


class EmbeddingShards:
    """Reader of an `extract-embeddings` output directory.

    Map-style: `len(shards)` images, `shards[i]` -> dict with (by default) every field:
      cond [M, Dc], target [N, Dt], target_global [E], text_emb [k, E] (the k captions of the image),
      key (str), image (str), captions (list of k str), index (int).
    Restrict with `fields=("cond", "target")` (e.g. for a DataLoader with the default collate).
    Batches of rows: `rows(indices, name)` (float32, the fast path of the DiT's training stream).
    Whole shards: `read_shard(j)` and `iter_shards()`; whole-dataset views: `keys()`,
    `column(name)`, `text_embeddings()`.

    Args:
        root: the directory holding index.json.
        verify: "lazy" (check a shard's sha256 when it is first read), "open" (check all now), "none".
        fields: what `__getitem__` returns (default all of SAMPLE_FIELDS).
        max_open: how many shards stay memory-mapped at once (LRU).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        verify: str = "lazy",
        fields: Sequence[str] | None = None,
        max_open: int = 8,
    ):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}")
        self.root = Path(root)
        self.verify_mode = verify
        self.fields = tuple(fields) if fields is not None else SAMPLE_FIELDS
        unknown = set(self.fields) - set(SAMPLE_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(SAMPLE_FIELDS)}"
            )
        self.max_open = max(1, int(max_open))
        self.index_sha256, self.index = self._read_index()
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
        self.offsets = np.array([s.offset for s in self.shards] + [offset], dtype=np.int64)
        self.num_samples = offset
        self.num_captions = caption_offset
        self._verified: set[int] = set()
        self._maps: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._rows: OrderedDict[int, list[dict]] = OrderedDict()
        if verify == "open":
            self.verify()

    # --------------------------------------------------------------- description

    def _read_index(self) -> tuple[str, dict[str, Any]]:
        path = self.root / INDEX_FILE
        if not path.is_file():
            hint = (
                "the extraction has not finished (rerun it with --resume)"
                if (self.root / RUN_FILE).exists()
                else None
            )
            raise InputError(f"{path}: no index.json; not an embeddings directory", hint=hint)
        raw = path.read_bytes()
        try:
            index = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else None
            raise InputError(f"{path}: not an embeddings index (format {found!r})")
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
        return sha256_bytes(raw), index

    @property
    def dims(self) -> dict[str, int]:
        """cond_tokens M, cond_dim Dc, target_tokens N, target_dim Dt, embed_dim E."""
        return dict(self.index["dims"])

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the float tensors."""
        return TORCH_DTYPES[self.index["dtype"]]

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

    def head(self, device: str | torch.device = "cpu") -> TargetHead:
        """The run's TargetHead (tokens [B, N, Dt] -> global [B, E])."""
        return TargetHead.load(self.root / self.index.get("head", {}).get("file", HEAD_FILE), device=device)

    def shape(self, name: str) -> tuple[int, ...]:
        """The per-image shape of an image tensor (cond, target, target_global)."""
        d = self.dims
        return {
            "cond": (d["cond_tokens"], d["cond_dim"]),
            "target": (d["target_tokens"], d["target_dim"]),
            "target_global": (d["embed_dim"],),
        }[name]

    # --------------------------------------------------------------- integrity

    def check_shard(self, j: int) -> None:
        """Check shard j's files against index.json (sha256); raises InputError naming the file."""
        if j in self._verified:
            return
        info = self.shards[j]
        for path, expected in ((info.path, info.sha256), (info.meta_path, info.meta_sha256)):
            if not path.is_file():
                raise InputError(f"{path}: shard file missing (listed in {self.root / INDEX_FILE})")
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

    def views(self, j: int) -> dict[str, torch.Tensor]:
        """Memory-mapped tensors of shard j in the storage dtype (name -> [n, ...]); LRU of max_open."""
        if j in self._maps:
            self._maps.move_to_end(j)
            return self._maps[j]
        self._prepare(j)
        views = map_safetensors(self.shards[j].path)
        self._maps[j] = views
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return views

    def close(self) -> None:
        """Drop the memory maps (they are reopened on use)."""
        self._maps.clear()

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

    def read_shard(self, j: int, tensors: Sequence[str] = TENSORS) -> dict[str, Any]:
        """Shard j as whole tensors (copies of those named in `tensors`), plus `rows` (metadata),
        `shard` (j), `name`, `offset` (global index of its first image) and `caption_offset`.

        cond [n, M, Dc], target [n, N, Dt], target_global [n, E], text_emb [c, E], caption_image [c]
        (local image index within the shard)."""
        info = self.shards[j]
        views = self.views(j)
        out: dict[str, Any] = {}
        for name in tensors:
            if name not in views:
                raise InputError(f"{info.path}: no tensor {name!r}")
            out[name] = views[name].clone()
        out.update(
            rows=self.shard_rows(j),
            shard=j,
            name=info.name,
            offset=info.offset,
            caption_offset=info.caption_offset,
        )
        return out

    def iter_shards(self, tensors: Sequence[str] = TENSORS) -> Iterator[dict[str, Any]]:
        """`read_shard` of every shard in dataset order (memory: one shard)."""
        for j in range(len(self.shards)):
            yield self.read_shard(j, tensors)

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global image indices [B] -> (shard number [B], row within the shard [B])."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"image index out of range for {self.num_samples} images")
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        return shard, indices - self.offsets[shard]

    def rows(self, indices: np.ndarray, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `indices` [B] (global image indices, any order) of image tensor `name` as float32
        [B, ...] (into `out` when given). Only those rows are copied out of the memory maps."""
        indices = np.asarray(indices, dtype=np.int64)
        shard, rows = self.locate(indices)
        result = (
            out if out is not None else torch.empty((len(indices), *self.shape(name)), dtype=torch.float32)
        )
        for j in np.unique(shard).tolist():
            view = self.views(j)
            if name not in view:
                raise InputError(f"{self.shards[j].path}: no tensor {name!r}")
            picked = (shard == j).nonzero()[0]
            src = view[name].index_select(0, torch.from_numpy(rows[picked]))
            if len(picked) == len(indices):
                result.copy_(src)
            else:
                result.index_copy_(0, torch.from_numpy(picked), src.to(result.dtype))
        return result

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i) + (self.num_samples if int(i) < 0 else 0)
        (j,), (r,) = self.locate(np.array([i]))
        j, r = int(j), int(r)
        out: dict[str, Any] = {}
        views = self.views(j) if any(f in self.fields for f in (*IMAGE_TENSORS, "text_emb")) else {}
        for name in IMAGE_TENSORS:
            if name in self.fields:
                out[name] = views[name][r].clone()
        if "text_emb" in self.fields:
            # a shard's captions are stored image by image: one contiguous run per image
            positions = (views["caption_image"] == r).nonzero().flatten()
            lo = int(positions[0]) if len(positions) else 0
            out["text_emb"] = views["text_emb"][lo : lo + len(positions)].clone()
        if any(f in self.fields for f in ("key", "image", "captions")):
            row = self.shard_rows(j)[r]
            out.update({name: row[name] for name in ("key", "image", "captions") if name in self.fields})
        if "index" in self.fields:
            out["index"] = i
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()  # memory maps do not pickle; each DataLoader worker maps its own
        state["_rows"] = OrderedDict()
        return state

    # --------------------------------------------------------------- whole-dataset views

    def keys(self) -> list[str]:
        """Every image's key, in dataset order (reads the metadata files only)."""
        return [row["key"] for j in range(len(self.shards)) for row in self.shard_rows(j)]

    def column(self, name: str = "target_global", *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One per-image tensor for the whole dataset: target_global -> [n, E]. (Do not do this with
        the tokens of a large dataset: n x N x Dt.)"""
        out = torch.empty(self.num_samples, *self.shape(name), dtype=dtype)
        for info in self.shards:
            out[info.offset : info.offset + info.samples] = self.views(info.index)[name].to(dtype)
        return out

    def text_embeddings(self, *, dtype: torch.dtype = torch.float32) -> TextSet:
        """All captions: text_emb [C, E], caption_image [C] (global image index), caption strings."""
        text_emb = torch.empty(self.num_captions, self.dims["embed_dim"], dtype=dtype)
        caption_image = torch.empty(self.num_captions, dtype=torch.int64)
        captions: list[str] = []
        for info in self.shards:
            lo, hi = info.caption_offset, info.caption_offset + info.captions
            if info.captions:
                views = self.views(info.index)
                text_emb[lo:hi] = views["text_emb"].to(dtype)
                caption_image[lo:hi] = views["caption_image"] + info.offset
            captions.extend(c for row in self.shard_rows(info.index) for c in row["captions"])
        if len(captions) != self.num_captions:
            raise InputError(
                f"{self.root}: the metadata lists {len(captions)} captions, the tensors {self.num_captions}"
            )
        return TextSet(text_emb, caption_image, captions)
