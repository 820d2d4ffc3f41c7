"""How extraction reads its source, in DataLoader workers: the work plan (output shards of a folder /
TSV source, input tars of a webdataset) and the decoding of each image for both encoders' processors.

- folder / TSV: items sorted by key, grouped into shards of `shard_size` consecutive items
  (`shard-00000`, ...); shard i is done by rank i % world_size.
- webdataset: the unit is an input tar (split by node, then by DataLoader worker, the webdataset
  way); the samples of one tar are cut into parts of `shard_size`, written as `<tar name>-<part:05d>`.
- Within a shard, images go to the encoders in chunks of `batch_size` consecutive items counted
  from the shard's start, so every shard sees the same batches whoever computes it.
- Both encoders see the same pixels: with crop "center" every decoded image is cut once to its
  centred square before either processor runs. Image processors disagree on non-square images
  (BLIP / BLIP-2 squash the whole image to a square, CLIP resizes the short side and centre-crops),
  so without the crop token (i, j) of one grid and token (i, j) of the other cover different parts
  of the image. On a square image both processors keep all of it (`square_coverage` says when one
  does not).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from webdataset.shardlists import split_by_worker

from blip_toolkit.data.images import ImageLoadError, open_image
from blip_toolkit.data.sources import ErrorCollector, SampleError, decode_sample, tar_samples
from blip_toolkit.embeddings.format import CROP_MODES
from blip_toolkit.embeddings.shards import read_done


@dataclass
class Unit:
    """One unit of work: an output shard of a folder/TSV source, or an input tar of a webdataset."""

    number: int
    name: str
    items: list = field(default_factory=list)  # folder/TSV items
    url: str | None = None  # webdataset tar
    done_parts: set[int] = field(default_factory=set)


def item_units(items: list, shard_size: int) -> list[Unit]:
    return [
        Unit(i, f"shard-{i:05d}", items[start : start + shard_size])
        for i, start in enumerate(range(0, len(items), shard_size))
    ]


def wds_units(source) -> list[Unit]:
    return [Unit(i, name, url=url) for i, (url, name) in enumerate(zip(source.urls, source.names))]


def part_name(tar_name: str, part: int) -> str:
    return f"{tar_name}-{part:05d}"


def tar_records(out: Path, unit: Unit) -> list[dict] | None:
    """The done records of every part of a tar if the tar is finished, else None (and the finished
    parts in unit.done_parts, which a rerun does not recompute)."""
    records = []
    part = 0
    while True:
        record = read_done(out, part_name(unit.name, part))
        if record is None:
            unit.done_parts = {r["part"] for r in records}
            return None
        records.append(record)
        if record.get("last"):
            return records
        part += 1


# ----------------------------------------------------------------------------- decoding (DataLoader workers)


def center_square(image):
    """The centred square of a PIL image, side min(width, height); the offsets round down as
    transformers' `center_crop` rounds them. A square image is returned as it is."""
    width, height = image.size
    side = min(width, height)
    if width == height:
        return image
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _field(size, name: str):
    """A field of a processor's size dict (a transformers SizeDict or a plain dict)."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def square_coverage(processor) -> float:
    """The fraction of a square image's side that `processor` keeps: 1.0 unless it centre-crops a
    smaller square out of its resize (e.g. a CLIP processor with shortest_edge 256 and crop 224)."""
    if not getattr(processor, "do_center_crop", False):
        return 1.0
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    if size is None or crop is None:
        return 1.0
    edge = _field(size, "shortest_edge") or min(
        (v for v in (_field(size, "height"), _field(size, "width")) if v), default=0
    )
    kept = min((v for v in (_field(crop, "height"), _field(crop, "width")) if v), default=0)
    return min(kept / edge, 1.0) if edge and kept else 1.0


class Preprocess:
    """Decoded image -> one pixel_values [3, H, W] per encoder (picklable, runs in DataLoader workers).

    crop "center": the image is cut to its centred square once, then every processor sees that same
    square (see the module docstring); "none": each processor gets the whole image."""

    def __init__(self, processors, crop: str = "center"):
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")
        self.processors = tuple(processors)
        self.crop = crop

    def __call__(self, image) -> tuple:
        if self.crop == "center":
            image = center_square(image)
        return tuple(p(images=[image], return_tensors="pt")["pixel_values"][0] for p in self.processors)


def _decode_into(
    chunk: dict, *, key: str, image_label: str, data, captions_fn, preprocess, max_pixels: int
) -> None:
    """Decode one image (path or bytes) for both encoders and add it to `chunk`, or add its error."""
    try:
        captions = captions_fn()
        image = open_image(data, max_pixels=max_pixels, name=image_label)
        pixels = preprocess(image)
    except (ImageLoadError, SampleError) as exc:
        chunk["errors"].append({"key": key, "image": image_label, "error": str(exc)})
        return
    except Exception as exc:  # noqa: BLE001 - a processor failing on one odd image must not stop the run
        chunk["errors"].append(
            {"key": key, "image": image_label, "error": f"{image_label}: {type(exc).__name__}: {exc}"}
        )
        return
    chunk["rows"].append({"key": key, "image": image_label, "captions": captions})
    for bucket, value in zip(chunk["pixels"], pixels):
        bucket.append(value)


def _new_chunk(unit: int, **extra) -> dict:
    return {"unit": unit, "rows": [], "pixels": ([], []), "errors": [], **extra}


def _stack(chunk: dict) -> dict:
    chunk["pixels"] = tuple(torch.stack(p) if p else None for p in chunk["pixels"])
    return chunk


class ItemChunks:
    """Map-style dataset over this rank's folder/TSV chunks (a chunk = up to batch_size consecutive
    items of one shard). Order is preserved by the DataLoader, so shards arrive whole and in order."""

    def __init__(self, chunks: list[tuple[int, list, bool]], preprocess, max_pixels: int):
        self.chunks, self.preprocess, self.max_pixels = chunks, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict:
        unit, items, last = self.chunks[k]
        chunk = _new_chunk(unit, part=None, part_end=last, tar_end=last)
        for item in items:
            _decode_into(
                chunk,
                key=item.key,
                image_label=item.image,
                data=item.image,
                captions_fn=item.load_captions,
                preprocess=self.preprocess,
                max_pixels=self.max_pixels,
            )
        return _stack(chunk)


def _with_last(iterator: Iterator) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs: one item of look-ahead, so a tar's last part is known when it ends."""
    iterator = iter(iterator)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


class TarChunks(torch.utils.data.IterableDataset):
    """This rank's tars, split between DataLoader workers (webdataset's split_by_worker); yields
    chunks of up to batch_size samples that never cross a part boundary."""

    def __init__(self, units: list[Unit], shard_size: int, batch_size: int, preprocess, max_pixels: int):
        super().__init__()
        self.units, self.shard_size, self.batch_size = units, shard_size, batch_size
        self.preprocess, self.max_pixels = preprocess, max_pixels

    def __iter__(self):
        for unit in split_by_worker(self.units):
            yield from self._tar(unit)

    def _tar(self, unit: Unit):
        handler = ErrorCollector(unit.url)
        position = 0
        chunk = _new_chunk(unit.number, part=0)
        for sample, is_last in _with_last(tar_samples(unit.url, handler)):
            part = position // self.shard_size
            position += 1
            part_end = is_last or position % self.shard_size == 0
            if part in unit.done_parts:  # finished by an earlier run: read past it only
                handler.drain()
                chunk = _new_chunk(unit.number, part=part + 1)
                continue
            chunk["part"] = part
            key = f"{unit.name}/{sample.get('__key__', position - 1)}"
            label = f"{unit.url}#{sample.get('__key__', position - 1)}"

            def captions(sample=sample):
                return decode_sample(sample)[2]

            try:
                suffix, data, _ = decode_sample(sample)
                label = f"{label}.{suffix}"
            except Exception:  # noqa: BLE001 - reported by _decode_into with the same message
                data = b""
            _decode_into(
                chunk,
                key=key,
                image_label=label,
                data=data,
                captions_fn=captions,
                preprocess=self.preprocess,
                max_pixels=self.max_pixels,
            )
            if part_end or len(chunk["rows"]) + len(chunk["errors"]) >= self.batch_size:
                chunk["errors"].extend(
                    {"key": unit.url, "image": unit.url, "error": e} for e in handler.drain()
                )
                chunk.update(part_end=part_end, tar_end=is_last)
                yield _stack(chunk)
                chunk = _new_chunk(unit.number, part=part + 1 if part_end else part)
        if position == 0:  # an empty or unreadable tar: one empty part, so the tar counts as done
            chunk["errors"].extend({"key": unit.url, "image": unit.url, "error": e} for e in handler.drain())
            chunk.update(part=0, part_end=True, tar_end=True)
            yield _stack(chunk)


def identity(x):
    return x
