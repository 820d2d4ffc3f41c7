"""Batching for the inference commands: decode images ahead of the model, keep failures in place,
and group texts of equal token length.

Why group by length: BLIP's VQA `generate` cross-attends to every question position, padding
included, and a decoder-only BLIP-2 model continues after right-padding. Batches whose prompts all
have the same token length need no padding, so a batched run gives exactly what one-at-a-time calls
give (and what a direct transformers call gives).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, InputItem, open_image
from blip_toolkit.errors import InputError


@dataclass
class Job:
    """One unit of work: an image and the task's text (question, prompt), with its input position."""

    index: int
    image_path: str
    text: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedBatch:
    jobs: list[Job]
    images: list[Any]  # PIL images, aligned with jobs


def jobs_from_items(items: Iterable[InputItem], texts: Iterable[str | None] | None = None) -> list[Job]:
    texts = list(texts) if texts is not None else None
    return [
        Job(index=i, image_path=item.path, text=(texts[i] if texts is not None else None), error=item.error)
        for i, item in enumerate(items)
    ]


def check_text(text: str, forbidden: Iterable[str], what: str = "text") -> None:
    """Refuse user text that contains a token the model reserves (BLIP-2's `<image>` placeholders are
    filled by position; an extra one ends in a masked_scatter error or a CUDA device-side assert)."""
    for token in forbidden:
        if token and token in text:
            raise InputError(f"{what} contains {token!r}, which this model reserves; remove it")


def load_images(jobs: list[Job], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[LoadedBatch, list[Job]]:
    """Open the images of `jobs`; jobs whose image fails come back in the second list with `error`."""
    good, images, bad = [], [], []
    cache: dict[str, Any] = {}
    for job in jobs:
        if job.error:
            bad.append(job)
            continue
        try:
            if job.image_path not in cache:
                cache[job.image_path] = open_image(job.image_path, max_pixels=max_pixels)
            images.append(cache[job.image_path])
            good.append(job)
        except ImageLoadError as exc:
            job.error = str(exc)
            bad.append(job)
    return LoadedBatch(good, images), bad


def prefetched(batches: Iterable[list[Job]], prepare: Callable[[list[Job]], Any]) -> Iterator[Any]:
    """Yield `prepare(batch)` for each batch, preparing the next one in a thread meanwhile (image
    decoding and resizing release the GIL, so they overlap with the model's forward pass)."""
    iterator = iter(batches)
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pending = pool.submit(prepare, next(iterator))
        except StopIteration:
            return
        for batch in iterator:
            result = pending.result()
            pending = pool.submit(prepare, batch)
            yield result
        yield pending.result()


def length_buckets(
    jobs: list[Job], length_of: Callable[[Job], int], batch_size: int, window: int | None = None
) -> Iterator[list[Job]]:
    """Batches of jobs whose `length_of` is equal. Jobs are taken in windows of `window` (default
    8 batches) so results can still be emitted in input order without holding everything."""
    window = window or batch_size * 8
    for start in range(0, len(jobs), window):
        groups: dict[int, list[Job]] = defaultdict(list)
        for job in jobs[start : start + window]:
            groups[length_of(job) if not job.error else -1].append(job)
        for group in groups.values():
            for offset in range(0, len(group), batch_size):
                yield group[offset : offset + batch_size]


def fixed_batches(jobs: list[Job], batch_size: int) -> Iterator[list[Job]]:
    for start in range(0, len(jobs), batch_size):
        yield jobs[start : start + batch_size]


class InOrder:
    """Re-emit results in input order when batches complete out of order."""

    def __init__(self) -> None:
        self._next = 0
        self._held: dict[int, dict] = {}

    def add(self, index: int, record: dict) -> Iterator[dict]:
        self._held[index] = record
        while self._next in self._held:
            yield self._held.pop(self._next)
            self._next += 1
