"""The batcher: concurrent callers are served in batches of at most max_batch_size, each caller
gets its own result or its own error, and an error of the whole batch reaches each of its callers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from blip_toolkit.ui.batcher import Batcher, BatcherClosed


def test_concurrent_callers_are_batched_and_get_their_own_results():
    sizes = []

    def square_all(requests):
        sizes.append(len(requests))
        time.sleep(0.05)  # while a batch runs, the next one gathers
        return [r * r for r in requests]

    batcher = Batcher(square_all, max_batch_size=4, wait=0.02)
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(batcher.submit, range(12)))
    finally:
        batcher.close()
    assert results == [r * r for r in range(12)]
    assert sum(sizes) == 12
    assert max(sizes) == 4  # bounded, and really batched
    assert all(1 <= s <= 4 for s in sizes)


def test_an_item_error_reaches_only_its_caller():
    def check(requests):
        return [ValueError(f"bad {r}") if r < 0 else r + 1 for r in requests]

    batcher = Batcher(check, max_batch_size=8, wait=0.05)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(batcher.submit, r) for r in (1, -1, 2, 3)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except ValueError as exc:
                outcomes.append(str(exc))
    finally:
        batcher.close()
    assert outcomes == [2, "bad -1", 3, 4]


def test_a_batch_error_reaches_every_caller_of_that_batch_and_the_worker_goes_on():
    calls = []

    def fail_first(requests):
        calls.append(list(requests))
        if len(calls) == 1:
            raise RuntimeError("model failed")
        return requests

    batcher = Batcher(fail_first, max_batch_size=8, wait=0.0)
    try:
        with pytest.raises(RuntimeError, match="model failed"):
            batcher.submit("a")
        assert batcher.submit("b") == "b"
    finally:
        batcher.close()


def test_a_wrong_number_of_results_is_an_error_not_a_hang():
    batcher = Batcher(lambda requests: [], max_batch_size=2)
    try:
        with pytest.raises(RuntimeError, match="0 results for 1 requests"):
            batcher.submit(1)
    finally:
        batcher.close()


def test_closed_batcher_refuses_new_requests():
    batcher = Batcher(lambda requests: requests, max_batch_size=1)
    assert batcher.submit(1) == 1
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(1)
    with pytest.raises(ValueError):
        Batcher(lambda r: r, max_batch_size=0)
