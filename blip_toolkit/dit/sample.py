"""`blip sample`: generate target tokens with a trained DiT for the conditioning tokens of embedding
shards, and write them (with their global embeddings) for `eval-recall`.

    from blip_toolkit.dit.sample import SampleConfig, run_sample
    result = run_sample(SampleConfig(checkpoint="runs/dit", data="emb/", out="samples.safetensors"))

    from blip_toolkit.dit.checkpoint import load_dit
    from blip_toolkit.dit.solver import generate
    model, normalizer, info = load_dit("runs/dit")           # EMA weights
    tokens = generate(model, cond, steps=30, cfg_scale=3.0, normalizer=normalizer)

Noise is drawn per sample from (seed, global image index), so a sample's tokens do not depend on the
batch size or on which other images are sampled with it (`--split eval` gives the same tokens for an
image as `--split all`), and the evaluation of `train-dit` (same seed) reproduces them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip_toolkit.dit.checkpoint import check_dims, load_dit
from blip_toolkit.dit.config import SOLVERS, SPLITS
from blip_toolkit.dit.data import sample_noise, split_indices
from blip_toolkit.dit.solver import generate
from blip_toolkit.embeddings.format import STORAGE_DTYPES
from blip_toolkit.embeddings.generated import write_generated
from blip_toolkit.embeddings.shards import TORCH_DTYPES, EmbeddingShards
from blip_toolkit.engine.outputs import check_output_file
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.log import track
from blip_toolkit.runtime.device import resolve_device

logger = logging.getLogger("blip")

DTYPES = STORAGE_DTYPES


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


def run_sample(config: SampleConfig) -> SampleResult:
    """Generate tokens for the images of `config.split` and write them with `write_generated` (keys,
    the embeddings' index_sha256, the head's global embeddings, and the settings as metadata)."""
    started = time.perf_counter()
    check_output_file(config.out, overwrite=config.overwrite)  # before any work
    device = resolve_device(config.device)
    shards = EmbeddingShards(config.data)
    model, normalizer, info = load_dit(config.checkpoint, ema=config.ema, device=device)
    record = info["record"]
    check_dims(record, shards.dims, checkpoint=config.checkpoint, data=config.data)
    _warn_other_encoders(record, shards)
    settings = _settings(config, info["sample"])
    indices = _indices(config, shards, record)
    logger.info(
        "sampling %d image(s) of %s with %s (step %s, %s weights): %d %s step(s), cfg %.2f, seed %d",
        len(indices),
        config.data,
        info["path"],
        info["step"],
        "EMA" if info["ema"] else "trained",
        settings["steps"],
        settings["solver"],
        settings["cfg_scale"],
        config.seed,
    )
    store = TORCH_DTYPES[config.dtype or shards.index["dtype"]]
    tokens, global_emb = _generate_all(
        model, normalizer, info["head"], shards, indices, settings, config, store, device
    )
    metadata = {
        "checkpoint": str(Path(info["path"]).resolve()),
        "step": str(info["step"]),
        "ema": str(info["ema"]).lower(),
        "steps": str(settings["steps"]),
        "cfg_scale": repr(settings["cfg_scale"]),
        "solver": settings["solver"],
        "shift": repr(settings["shift"]),
        "seed": str(config.seed),
        "split": config.split,
    }
    keys_all = shards.keys()
    path = write_generated(
        config.out,
        tokens,
        [keys_all[i] for i in indices.tolist()],
        index_sha256=shards.index_sha256,
        global_emb=global_emb,
        metadata=metadata,
        overwrite=config.overwrite,
    )
    seconds = time.perf_counter() - started
    return SampleResult(
        path=str(path),
        checkpoint=info["path"],
        data=str(config.data),
        samples=len(indices),
        step=info["step"],
        ema=info["ema"],
        seed=config.seed,
        split=config.split,
        seconds=seconds,
        samples_per_second=len(indices) / seconds if seconds > 0 else 0.0,
        **settings,
    )


def _warn_other_encoders(record: dict[str, Any], shards: EmbeddingShards) -> None:
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


def _settings(config: SampleConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """steps, cfg_scale, solver, shift: the command's, else the run's own sampling defaults."""
    return {
        "steps": config.steps if config.steps is not None else int(defaults.get("steps", 30)),
        "cfg_scale": config.cfg_scale
        if config.cfg_scale is not None
        else float(defaults.get("cfg_scale", 1.0)),
        "solver": config.solver or defaults.get("solver", "euler"),
        "shift": config.shift if config.shift is not None else float(defaults.get("shift", 1.0)),
    }


def _indices(config: SampleConfig, shards: EmbeddingShards, record: dict[str, Any]) -> np.ndarray:
    """Global image indices of `config.split` (the first `limit`)."""
    trained_on = record.get("data", {})
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
    return indices


def _generate_all(model, normalizer, head, shards, indices, settings, config: SampleConfig, store, device):
    """(tokens [n, N, Dt] in `store`, global [n, E] float32) of the images `indices`."""
    dims = shards.dims
    shape = (dims["target_tokens"], dims["target_dim"])
    tokens = torch.empty((len(indices), *shape), dtype=store)
    global_emb = torch.empty((len(indices), head.embed_dim), dtype=torch.float32)
    dtype = next(model.parameters()).dtype
    batches = range(0, len(indices), config.batch_size)
    for lo in track(batches, total=len(batches), description="sampling"):
        chunk = indices[lo : lo + config.batch_size]
        cond = shards.rows(chunk, "cond").to(device)  # [b, M, Dc]
        x_0 = sample_noise(chunk, config.seed, shape, dtype=dtype, device=device)
        out = generate(
            model,
            cond,
            x_0=x_0,
            steps=settings["steps"],
            cfg_scale=settings["cfg_scale"],
            solver=settings["solver"],
            shift=settings["shift"],
            normalizer=normalizer,
        )  # [b, N, Dt]
        with torch.no_grad():
            global_emb[lo : lo + len(chunk)] = head(out.float()).float().cpu()
        tokens[lo : lo + len(chunk)] = out.cpu().to(store)
    shards.close()
    if not bool(torch.isfinite(global_emb).all()):
        raise InputError(
            f"{config.checkpoint}: the generated tokens hold NaN or Inf values (a diverged model?)"
        )
    return tokens, global_emb
