"""Metrics of a run: `metrics.jsonl` (one JSON record per line), the console line, the NaN guard,
and Accelerate trackers (tensorboard, wandb, ...)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from blip_toolkit.errors import TrainingError, UsageError
from blip_toolkit.fsutil import atomic_write, json_safe

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Append one JSON object per line to `metrics.jsonl` (main process only; others no-op)."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), ensure_ascii=False) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill is dropped
                records.append(json.loads(line))
        return records

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drop records after `step` (written by a run killed after its last checkpoint); returns the
        records kept."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        if self.enabled:
            with atomic_write(self.path) as handle:
                for record in kept:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return kept


def check_finite(value: float, *, step: int, what: str = "loss", hint: str | None = None) -> None:
    """Stop training when `value` is NaN or Inf (the run cannot recover; the last checkpoint is intact)."""
    if not math.isfinite(value):
        raise TrainingError(
            f"the {what} became {value} at step {step}; training stopped (the last complete checkpoint is kept)",
            hint=hint
            or "lower the learning rate, keep gradient clipping on, or use mixed precision bf16 instead of fp16",
        )


def metric_line(record: dict[str, Any], *, total_steps: int | None = None) -> str:
    """`step 40/200 | epoch 1 | loss 2.3141 | lr 1.00e-05 | 35.1 samples/s` (and the eval keys)."""
    parts = []
    step = record.get("step")
    if step is not None:
        parts.append(f"step {step}/{total_steps}" if total_steps else f"step {step}")
    if "epoch" in record:
        parts.append(f"epoch {record['epoch']}")
    for key, value in record.items():
        if key in ("step", "epoch", "type", "time"):
            continue
        if isinstance(value, float):
            if key == "lr":
                parts.append(f"lr {value:.2e}")
            elif key.endswith("per_second"):
                parts.append(f"{value:.1f} {key.replace('_per_second', '')}/s")
            elif value != 0 and not 1e-3 <= abs(value) < 1e5:
                parts.append(f"{key} {value:.3e}")  # exploding gradient norms, tiny losses
            else:
                parts.append(f"{key} {value:.4f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{key} {value}")
    prefix = "eval " if record.get("type") == "eval" else ""
    return prefix + " | ".join(parts)


def check_trackers(names: list[str]) -> list[str]:
    """Requested Accelerate trackers, refused when unknown or not installed (Accelerate itself would
    skip a missing one silently). "all" means every installed one."""
    out = []
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()} if names else set()
    for name in names:
        if name == "all":
            out.extend(sorted(available))
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UsageError(
                f"--log-with {name}: unknown tracker (use one of {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})"
            )
        if name not in available:
            raise UsageError(f"--log-with {name}: {name} is not installed", hint=f"pip install {name}")
        out.append(name)
    return sorted(set(out))


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a train / eval record for a tracker (`train/loss`, `eval/val_loss`, ...)."""
    return {
        f"{record['type']}/{k}": v
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")
    }


def tracker_config(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config as trackers accept it (scalars; lists joined)."""
    values = {}
    for key, value in flat.items():
        if isinstance(value, (int, float, str, bool)):
            values[key] = value
        elif isinstance(value, list):
            values[key] = ",".join(map(str, value))
    return values


def count_label(n: int) -> str:
    """1234567 -> 1.2M (parameter counts in log lines)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
