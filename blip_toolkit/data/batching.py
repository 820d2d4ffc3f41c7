"""Batching for the inference commands: read ahead of the model, and group items whose model inputs
have the same token length.

Why group by length: BLIP's VQA `generate` cross-attends to every question position, padding
included, and a decoder-only BLIP-2 model continues after right-padding. Batches whose prompts all
have the same token length need no padding, so a batched run gives exactly what one-at-a-time calls
give (and what a direct transformers call gives).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from blip_toolkit.errors import InputError

T = TypeVar("T")


def check_text(text: str, forbidden: Iterable[str], what: str = "text") -> None:
    """Refuse user text that contains a token the model reserves (BLIP-2's `<image>` placeholders are
    filled by position; an extra one ends in a masked_scatter error or a CUDA device-side assert)."""
    for token in forbidden:
        if token and token in text:
            raise InputError(f"{what} contains {token!r}, which this model reserves; remove it")


def prefetched(batches: Iterable[T], prepare: Callable[[T], Any]) -> Iterator[Any]:
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


_END = object()


def read_ahead(iterator: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Iterate `iterator` in a background thread, `depth` items ahead of the consumer (the work done
    inside `next()`, such as decoding images, overlaps with the consumer's). Exceptions are re-raised
    in the consumer; the thread stops when the consumer stops."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put((_END, exc))

    thread = threading.Thread(target=produce, name="blip-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def equal_key_batches(items: list[T], key: Callable[[T], Hashable], batch_size: int) -> list[list[T]]:
    """Batches of at most `batch_size` items with equal `key` (e.g. the prompt's token length), groups
    in order of first appearance, items in input order within each group."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
