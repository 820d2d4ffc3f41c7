"""The options of `blip sample` (`SampleConfig`), checked on construction. No torch import: the CLI
derives its options from these fields (cli/derive.py) when it builds the command, before any model
code is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from blip_toolkit.config import setting
from blip_toolkit.dit.config import SOLVERS, SPLITS, SolverName, SplitName
from blip_toolkit.embeddings.format import STORAGE_DTYPES, StorageDtype
from blip_toolkit.errors import UsageError

DTYPES = STORAGE_DTYPES


def _as_list(value) -> list | None:
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class SampleConfig:
    """Options of `blip sample`. None = the run's own setting (config.json "sample"), else the
    default shown. `steps` and `cfg_scale` take one value or several (a single number is accepted
    too): several make a sweep, one generated file per (steps, cfg_scale) pair in the directory `out`
    (docs/formats.md)."""

    checkpoint: str = setting(
        help="A train-dit run directory (its final model, else its latest checkpoint) or RUN/checkpoints/step-N."
    )
    data: str = setting(
        help="Embeddings directory whose conditioning tokens are sampled from.", flags=("-d",)
    )
    out: str = setting(
        help="Generated-features file (safetensors) for eval-recall --generated; with several --steps / "
        "--cfg-scale values a directory: one file per setting and sweep.json.",
        flags=("-o",),
    )
    solver: SolverName | None = setting(
        None, help="euler or heun (2 evaluations per step). [default: the run's, euler]"
    )
    steps: list[int] | None = setting(
        None,
        help="ODE steps; several values (--steps 10 30) sweep them. [default: the run's, 30]",
        metavar="N...",
    )
    cfg_scale: list[float] | None = setting(
        None,
        help="Classifier-free guidance (1 = none); conditional and unconditional in one batch. Several values "
        "(--cfg-scale 1 1.5 2 3) sweep them; eval-recall scores the sweep. [default: the run's]",
        metavar="SCALE...",
    )
    shift: float | None = setting(
        None, help="Timestep shift of the grid (>1: more steps near the noise). [default: the run's, 1.0]"
    )
    seed: int = setting(0, help="Noise seed (per image: results do not depend on the batch).")
    ema: bool = setting(True, help="Use the EMA weights (or the trained weights).", flag="--ema/--no-ema")
    batch_size: int = setting(64, help="Images per solver batch.", flags=("-b",), min=1)
    # None: the run's held-out images ("eval") on the embeddings it was trained on, every image ("all")
    # on others.
    split: SplitName | None = setting(
        None,
        help="all images, or the run's own train / eval split (needs the embeddings it was trained on). "
        "[default: eval (the held-out images) on the embeddings the run was trained on, else all]",
    )
    limit: int | None = setting(None, help="Only the first N images of the split.", min=1)
    # Of the written tokens; None: the embeddings' storage dtype. Python API only (no flag, as before).
    dtype: StorageDtype | None = setting(None, cli=False)
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    overwrite: bool = setting(False, help="Replace an existing --out file (or sweep directory).")

    def __post_init__(self) -> None:
        self.steps = _as_list(self.steps)
        self.cfg_scale = _as_list(self.cfg_scale)
        problems = []
        if not self.checkpoint:
            problems.append("--checkpoint is required")
        if not self.data:
            problems.append("--data is required")
        if not self.out:
            problems.append("--out is required")
        if self.steps is not None and (not self.steps or any(int(s) < 1 for s in self.steps)):
            problems.append(f"--steps must be at least 1 (got {self.steps})")
        if self.cfg_scale is not None and (not self.cfg_scale or any(float(c) < 0 for c in self.cfg_scale)):
            problems.append(f"--cfg-scale must be >= 0 (got {self.cfg_scale})")
        for name in ("steps", "cfg_scale"):
            values = getattr(self, name)
            if values is not None and len(set(values)) != len(values):
                problems.append(f"--{name.replace('_', '-')} lists a value twice ({values})")
        if self.solver is not None and self.solver not in SOLVERS:
            problems.append(f"--solver must be {' or '.join(SOLVERS)} (got {self.solver!r})")
        if self.shift is not None and self.shift <= 0:
            problems.append(f"--shift must be positive (got {self.shift})")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.split is not None and self.split not in SPLITS:
            problems.append(f"--split must be one of {', '.join(SPLITS)} (got {self.split!r})")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be at least 1 (got {self.limit})")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def is_sweep(self) -> bool:
        return len(self.steps or [None]) * len(self.cfg_scale or [None]) > 1
