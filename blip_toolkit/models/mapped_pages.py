"""Giving back the memory of checkpoint weights that are no longer used.

transformers loads safetensors weights as views of the memory-mapped file: a weight costs no memory
until it is read, and from then on its pages count in the process's resident set for as long as the
file stays mapped, which is as long as any weight of the file is alive. When a Linear layer is
quantized, its float weight is read once and never again, but its pages would stay resident beside
the quantized copy: the quantized model would end up larger than the float one (measured in
bench/bench_quantize.py). `release` drops those pages with `madvise(MADV_DONTNEED)`.

Why this is safe: only whole pages inside the released tensor are dropped, so no other tensor's
bytes are touched; the mapping is of a `.safetensors` file, so a page read again later is read back
from the file (what it held when loaded) rather than zero-filled; and the caller releases only
weights it no longer uses. Linux only; elsewhere `release` does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from dataclasses import dataclass

import torch

logger = logging.getLogger("blip")

_MADV_DONTNEED = 4  # Linux <sys/mman.h>
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class CheckpointMappings:
    """The address ranges of this process's memory-mapped `.safetensors` files, read once."""

    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def current(cls) -> CheckpointMappings:
        if not sys.platform.startswith("linux"):
            return cls(())
        ranges = []
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip().endswith(".safetensors"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
        return cls(tuple(ranges))

    def contains(self, start: int, end: int) -> bool:
        return any(low <= start and end <= high for low, high in self.ranges)


def release(tensors, mappings: CheckpointMappings) -> int:
    """Drop the resident pages of `tensors` (CPU tensors the caller no longer uses) that lie in a
    memory-mapped checkpoint; returns the bytes released. Tensors elsewhere are left to the
    allocator: they are freed when their last reference goes."""
    if not mappings.ranges:
        return 0
    released = 0
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not mappings.contains(start, end):
            continue
        first = -(-start // _PAGE) * _PAGE  # whole pages inside the tensor only
        last = end // _PAGE * _PAGE
        if last > first and _madvise(first, last - first) == 0:
            released += last - first
    return released


def _madvise(address: int, length: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_DONTNEED)
    if result != 0:
        logger.debug("madvise(MADV_DONTNEED) failed: errno %d", ctypes.get_errno())
    return result


def shared_storages(model: torch.nn.Module) -> set[int]:
    """Storages that back more than one of the model's parameters and buffers (tied weights): such a
    weight stays in use after one of its layers is quantized, so it is never released."""
    seen: set[int] = set()
    shared: set[int] = set()
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    tensors += [b for _, b in model.named_buffers(remove_duplicate=False)]
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        key = tensor.untyped_storage().data_ptr()
        (shared if key in seen else seen).add(key)
    return shared
