"""`blip sample`: generate target tokens with a trained DiT for the conditioning tokens of embedding
shards, and write them (with their global embeddings) for `eval-recall`.

    from blip_toolkit.dit.sample import SampleConfig, load_dit, run_sample
    result = run_sample(SampleConfig(checkpoint="runs/dit", data="emb/", out="samples.safetensors"))

    model, normalizer, info = load_dit("runs/dit")           # EMA weights
    tokens = generate(model, cond, steps=30, cfg_scale=3.0, normalizer=normalizer)   # dit.solver

Noise is drawn per sample from (seed, global image index), so a sample's tokens do not depend on the
batch size or on which other images are sampled with it (`--split eval` gives the same tokens for an
image as `--split all`), and the evaluation of `train-dit` (same seed) reproduces them.

Module level imports stay light (the CLI imports SampleConfig).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip_toolkit.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("blip")

SPLITS = ("all", "train", "eval")
SOLVERS = ("euler", "heun")
DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class SampleConfig:
    """Options of `blip sample`. None = the run's own setting (config.json "sample"), else the
    default shown."""

    checkpoint: str = ""
    data: str = ""
    out: str = ""
    steps: int | None = None  # default: the run's sample.steps (30)
    cfg_scale: float | None = None  # default: the run's sample.cfg_scale (1.0)
    solver: str | None = None  # default: the run's sample.solver (euler)
    shift: float | None = None  # default: the run's sample.shift (1.0)
    seed: int = 0
    ema: bool = True
    batch_size: int = 64
    split: str = "all"  # all | train | eval (the run's own split; needs the embeddings it was trained on)
    limit: int | None = None  # at most this many images (the first of the split)
    dtype: str | None = None  # of the written tokens; default: the embeddings' storage dtype
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.checkpoint:
            problems.append("--checkpoint is required")
        if not self.data:
            problems.append("--data is required")
        if not self.out:
            problems.append("--out is required")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be at least 1 (got {self.steps})")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            problems.append(f"--cfg-scale must be >= 0 (got {self.cfg_scale})")
        if self.solver is not None and self.solver not in SOLVERS:
            problems.append(f"--solver must be {' or '.join(SOLVERS)} (got {self.solver!r})")
        if self.shift is not None and self.shift <= 0:
            problems.append(f"--shift must be positive (got {self.shift})")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.split not in SPLITS:
            problems.append(f"--split must be one of {', '.join(SPLITS)} (got {self.split!r})")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be at least 1 (got {self.limit})")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class SampleResult:
    """What `run_sample` wrote: `path` (the generated-features file) and the settings used."""

    path: str
    checkpoint: str
    data: str
    samples: int
    step: int | None
    ema: bool
    steps: int
    cfg_scale: float
    solver: str
    shift: float
    seed: int
    split: str
    seconds: float
    samples_per_second: float

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def load_dit(path: str | Path, ema: bool = True, *, device: str | torch.device = "cpu"):
    """(model, normalizer, info) of a trained DiT: see `blip_toolkit.dit.checkpoint.load_dit`."""
    from blip_toolkit.dit.checkpoint import load_dit as _load_dit

    return _load_dit(path, ema, device=device)


def sample_noise(indices, seed: int, shape: tuple[int, ...], *, dtype=None, device=None) -> torch.Tensor:
    """x_0 [B, *shape] ~ N(0, I), row b drawn from a generator seeded by (seed, indices[b])."""
    import torch

    from blip_toolkit.dit.data import STREAM_SAMPLE, mix_seed

    out = torch.empty((len(indices), *shape))
    generator = torch.Generator()
    for row, index in enumerate(indices.tolist() if hasattr(indices, "tolist") else indices):
        generator.manual_seed(mix_seed(seed, STREAM_SAMPLE, int(index)))
        torch.randn(shape, generator=generator, out=out[row])
    return out.to(device=device or "cpu", dtype=dtype or torch.float32)


def generate_tokens(
    model,
    cond: torch.Tensor,
    indices,
    *,
    seed: int,
    steps: int,
    cfg_scale: float,
    solver: str = "euler",
    shift: float = 1.0,
    normalizer=None,
) -> torch.Tensor:
    """Sample target tokens [B, N, Dt] for cond [B, M, Dc] of the images `indices` [B] (global image
    indices: they choose the noise, see `sample_noise`). The same ODE as `solver.generate` (the
    solver's `integrate` with `guided_velocity`), decoded with `normalizer`."""
    import torch

    from blip_toolkit.dit.solver import guided_velocity, integrate

    config = model.config
    dtype = next(model.parameters()).dtype
    x_0 = sample_noise(indices, seed, (config.num_tokens, config.target_dim), dtype=dtype, device=cond.device)
    with torch.no_grad():
        velocity = guided_velocity(model, cond.to(dtype), cfg_scale=cfg_scale)
        x_1 = integrate(velocity, x_0, steps=steps, solver=solver, shift=shift)  # [B, N, Dt]
    return normalizer.decode(x_1) if normalizer is not None else x_1


def run_sample(config: SampleConfig) -> SampleResult:
    """Generate tokens for the images of `config.split` and write them with `write_generated` (keys,
    the embeddings' index_sha256, the head's global embeddings, and the settings as metadata)."""
    import numpy as np
    import torch

    from blip_toolkit.data.shards import STORAGE_DTYPES, EmbeddingShards, write_generated
    from blip_toolkit.dit.checkpoint import check_dims
    from blip_toolkit.dit.data import ShardArrays, split_indices
    from blip_toolkit.fsutil import check_output_file
    from blip_toolkit.log import track

    start = time.perf_counter()
    check_output_file(config.out, overwrite=config.overwrite)  # before any work
    from blip_toolkit.runtime.device import resolve_device

    device = resolve_device(config.device)
    shards = EmbeddingShards(config.data)
    model, normalizer, info = load_dit(config.checkpoint, ema=config.ema, device=device)
    record = info["record"]
    check_dims(record, shards.dims, checkpoint=config.checkpoint, data=config.data)
    trained_on = record.get("data", {})
    for side in ("cond", "target"):
        was = trained_on.get("encoders", {}).get(side, {})
        now = shards.encoders.get(side, {})
        changed = [k for k in ("source", "tokens", "pool") if k in was and was.get(k) != now.get(k)]
        if changed:
            logger.warning(
                "%s encoder differs from the one the DiT was trained with (%s)",
                side,
                ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed),
            )

    defaults = info["sample"]
    steps = config.steps if config.steps is not None else int(defaults.get("steps", 30))
    cfg_scale = config.cfg_scale if config.cfg_scale is not None else float(defaults.get("cfg_scale", 1.0))
    solver = config.solver or defaults.get("solver", "euler")
    shift = config.shift if config.shift is not None else float(defaults.get("shift", 1.0))

    if config.split == "all":
        indices = np.arange(len(shards), dtype=np.int64)
    else:
        if trained_on.get("index_sha256") != shards.index_sha256:
            raise UsageError(
                f"--split {config.split} needs the embeddings the DiT was trained on ({trained_on.get('dir')}); "
                f"{config.data} is a different index",
                hint="use --split all for other embeddings",
            )
        split = split_indices(shards, **trained_on.get("split", {}))
        indices = split.train if config.split == "train" else split.eval
        if config.split == "eval" and split.kind == "train":
            logger.warning("the run held out no data: --split eval gives its first training images")
    if config.limit is not None:
        indices = indices[: config.limit]
    if len(indices) == 0:
        raise InputError(f"{config.data}: no images in --split {config.split}")

    keys_all = shards.keys()
    keys = [keys_all[i] for i in indices.tolist()]
    dims = shards.dims
    store = STORAGE_DTYPES[config.dtype or shards.index["dtype"]]
    tokens = torch.empty((len(indices), dims["target_tokens"], dims["target_dim"]), dtype=store)
    head = info["head"]
    global_emb = torch.empty((len(indices), head.embed_dim), dtype=torch.float32)
    arrays = ShardArrays(shards)
    logger.info(
        "sampling %d image(s) of %s with %s (step %s, %s weights): %d %s step(s), cfg %.2f, seed %d",
        len(indices),
        config.data,
        info["path"],
        info["step"],
        "EMA" if info["ema"] else "trained",
        steps,
        solver,
        cfg_scale,
        config.seed,
    )
    batches = range(0, len(indices), config.batch_size)
    for lo in track(batches, total=len(batches), description="sampling"):
        chunk = indices[lo : lo + config.batch_size]
        cond = arrays.gather(chunk, "cond").to(device)
        out = generate_tokens(
            model,
            cond,
            chunk,
            seed=config.seed,
            steps=steps,
            cfg_scale=cfg_scale,
            solver=solver,
            shift=shift,
            normalizer=normalizer,
        )  # [b, N, Dt]
        with torch.no_grad():
            global_emb[lo : lo + len(chunk)] = head(out.float()).float().cpu()
        tokens[lo : lo + len(chunk)] = out.cpu().to(store)
    arrays.close()
    if not bool(torch.isfinite(global_emb).all()):
        raise InputError(f"{info['path']}: the generated tokens hold NaN or Inf values (a diverged model?)")
    metadata = {
        "checkpoint": str(Path(info["path"]).resolve()),
        "step": str(info["step"]),
        "ema": str(info["ema"]).lower(),
        "steps": str(steps),
        "cfg_scale": repr(cfg_scale),
        "solver": solver,
        "shift": repr(shift),
        "seed": str(config.seed),
        "split": config.split,
    }
    path = write_generated(
        config.out,
        tokens,
        keys,
        index_sha256=shards.index_sha256,
        global_emb=global_emb,
        metadata=metadata,
        overwrite=config.overwrite,
    )
    seconds = time.perf_counter() - start
    return SampleResult(
        path=str(path),
        checkpoint=info["path"],
        data=str(config.data),
        samples=len(indices),
        step=info["step"],
        ema=info["ema"],
        steps=steps,
        cfg_scale=cfg_scale,
        solver=solver,
        shift=shift,
        seed=config.seed,
        split=config.split,
        seconds=seconds,
        samples_per_second=len(indices) / seconds if seconds > 0 else 0.0,
    )
