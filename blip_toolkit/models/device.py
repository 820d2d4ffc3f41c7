"""Device and dtype choice, and the CUDA-fault fallback to CPU."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from blip_toolkit.errors import UsageError

logger = logging.getLogger("blip")
T = TypeVar("T")

DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(spec: str = "auto"):
    """auto -> cuda when available, else cpu. cuda / cuda:N must exist."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {spec!r}: not a device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type not in ("cpu", "mps"):
        raise UsageError(f"--device {spec!r}: unsupported device type (use auto, cpu, cuda or cuda:N)")
    return device


# The CPU features that decide how fast float32 and bfloat16 matrix multiplies run (benchmarks print
# them beside every figure): AVX2 / AVX-512 float32 FMAs; AVX512-BF16 (bf16 dot products in AVX-512
# registers); AMX (Intel's tile unit: bf16 matmul several times float32's).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# CPUs whose bfloat16 matmul is fast enough for `--dtype auto` to choose bfloat16 (see auto_cpu_dtype).
FAST_BF16_FLAGS = ("amx_bf16",)
# ... and only for models this wide or wider: narrower layers spend their time in per-operator
# overhead and dtype conversions, not in matmuls (bench/bench_bf16.py, "inference speed by width").
BF16_MIN_WIDTH = 512
CPU_AUTO_DTYPE_ENV = "BLIP_CPU_AUTO_DTYPE"


def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (Linux /proc/cpuinfo; empty where it is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("flags") or line.startswith("Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_fast(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 matrices fast enough that `--dtype auto` picks bfloat16."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in FAST_BF16_FLAGS)


def auto_cpu_dtype(flags: frozenset[str] | None = None, *, width: int | None = None):
    """What `--dtype auto` means on CPU: bfloat16 where the CPU has fast bf16 matmul
    (`cpu_bf16_fast`) and the model's widest layer (`width`, when known) has at least
    BF16_MIN_WIDTH features, else float32. BLIP_CPU_AUTO_DTYPE=float32|bfloat16 overrides the choice
    (the test suite pins float32, so results do not depend on the machine)."""
    override = os.environ.get(CPU_AUTO_DTYPE_ENV, "").strip().lower()
    if override:
        if override not in ("float32", "bfloat16"):
            raise UsageError(f"{CPU_AUTO_DTYPE_ENV}={override!r}: use float32 or bfloat16")
        return getattr(torch, override)
    if not cpu_bf16_fast(flags) or (width is not None and width < BF16_MIN_WIDTH):
        return torch.float32
    return torch.bfloat16


def resolve_dtype(spec: str, device, *, width: int | None = None) -> Any:
    """auto -> float16 on CUDA; on CPU `auto_cpu_dtype(width=width)` (float32 unless the CPU has fast
    bf16 and the model is wide enough). `width`: the model's widest hidden size, when known."""
    spec = (spec or "auto").strip().lower()
    if spec not in DTYPES:
        raise UsageError(f"--dtype {spec!r}: use one of {', '.join(DTYPES)}")
    if spec == "auto":
        if device.type == "cuda":
            return torch.float16
        return auto_cpu_dtype(width=width) if device.type == "cpu" else torch.float32
    return getattr(torch, spec)


def model_width(config: dict) -> int | None:
    """The widest `hidden_size` of a config.json dict and its sub-configs (vision, text, Q-Former)."""
    sizes = [config.get("hidden_size")] + [
        (config.get(key) or {}).get("hidden_size")
        for key in ("vision_config", "text_config", "qformer_config")
    ]
    sizes = [s for s in sizes if isinstance(s, int)]
    return max(sizes) if sizes else None


_CUDA_MARKERS = ("cuda", "cublas", "cudnn", "device-side assert", "nccl", "out of memory")


def is_cuda_fault(exc: BaseException) -> bool:
    """Out of memory, device-side asserts (such as BLIP-2's masked_scatter count mismatch) and other
    CUDA runtime errors. After a device-side assert the CUDA context is unusable, so the only way
    on is a fresh model on CPU."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if isinstance(exc, oom) or (accelerator_error is not None and isinstance(exc, accelerator_error)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _CUDA_MARKERS)


class FallbackRunner:
    """Holds a loaded model and runs work on it. When a CUDA fault happens, the model is reloaded
    on CPU (float32), the failed call is retried there, and the rest of the run stays on CPU; one
    warning says so.

    `load(device, dtype)` builds the model object; `call(model_object)` does one batch of work
    (it must move its inputs to the model's device itself)."""

    def __init__(self, load: Callable[[Any, Any], Any], device, dtype):
        self._load = load
        self.device = device
        self.dtype = dtype
        self.fell_back = False
        self.loaded = load(device, dtype)

    def run(self, call: Callable[[Any], T]) -> T:
        try:
            return call(self.loaded)
        except Exception as exc:
            if self.fell_back or not is_cuda_fault(exc):
                raise
            self._fall_back(exc)
            return call(self.loaded)

    def _fall_back(self, exc: BaseException) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning(
            "CUDA failed (%s); reloading the model on CPU, retrying the batch, and staying on CPU",
            reason[:200],
        )
        self.loaded = None
        if torch.cuda.is_available():
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - the context may be broken after a device-side assert
                pass
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.fell_back = True
        self.loaded = self._load(self.device, self.dtype)
