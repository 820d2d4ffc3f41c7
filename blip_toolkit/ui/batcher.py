"""Dynamic batching of concurrent requests: callers block in `submit`, one worker thread runs what
has gathered as one batch.

Why not Gradio's own batched events (`batch=True, max_batch_size=N`): in the Gradio release we
pin (6.31), an exception in a batched function fails every request of the batch, so one bad upload
would fail the good requests that happened to arrive with it, and the per-request `validator=` hook
of batched events does not work (with several inputs the validator is called with the wrong
arguments and a `gr.validate(False, ...)` is ignored). Here each request gets its own result or its
own error, while the model still sees one batch. The Gradio queue stays in front (it bounds how many
requests wait in here, see `ui.app`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger("blip")

Request = TypeVar("Request")
Result = TypeVar("Result")


class BatcherClosed(RuntimeError):
    """The batcher was closed before the request ran."""


class Batcher(Generic[Request, Result]):
    """Run `run_batch(requests)` on up to `max_batch_size` requests at a time, on one worker thread.

    `run_batch` returns one entry per request, in order: the result, or an Exception instance that
    is raised to that request's caller only. An exception raised by `run_batch` itself (a model that
    fails to load, say) goes to every request of that batch.

    The worker takes the first waiting request, then whatever else arrives within `wait` seconds
    (up to `max_batch_size`); requests that arrive while a batch runs form the next one."""

    def __init__(
        self,
        run_batch: Callable[[list[Request]], list[Result | Exception]],
        *,
        max_batch_size: int,
        wait: float = 0.005,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait = wait
        self._queue: queue.Queue[tuple[Request, Future] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Result:
        """Block until `request` has run; return its result or raise its error."""
        future: Future = Future()
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        self._queue.put((request, future))
        return future.result()

    def close(self) -> None:
        """Stop the worker after the batch it is running; waiting requests get BatcherClosed."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not None:
                entry[1].set_exception(BatcherClosed("the server is shutting down"))

    def _collect(self, first: tuple[Request, Future]) -> tuple[list[tuple[Request, Future]], bool]:
        batch = [first]
        deadline = time.monotonic() + self.wait
        while len(batch) < self.max_batch_size:
            try:
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is None:
                return batch, True
            batch.append(entry)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            requests = [request for request, _ in batch]
            try:
                results = self._run_batch(requests)
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # noqa: BLE001 - delivered to every caller of this batch
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
