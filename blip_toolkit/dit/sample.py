"""`blip sample`: generate target tokens with a trained DiT for the conditioning tokens of embedding
shards, and write them (with their global embeddings) for `eval-recall`.

    from blip_toolkit.dit.sample import SampleConfig, run_sample
    result = run_sample(SampleConfig(checkpoint="runs/dit", data="emb/", out="samples.safetensors"))

    # A guidance / steps sweep: one generated file per setting in a directory, scored by eval-recall.
    run_sample(SampleConfig(checkpoint="runs/dit", data="emb/", out="sweep/", cfg_scale=[1, 1.5, 2, 3], steps=[10, 30]))

    from blip_toolkit.dit.checkpoint import load_dit
    from blip_toolkit.dit.sample_config import SampleConfig
from blip_toolkit.dit.solver import generate
    model, normalizer, info = load_dit("runs/dit")           # EMA weights
    tokens = generate(model, cond, steps=30, cfg_scale=1.5, normalizer=normalizer)

Which images: by default the run's held-out images when `data` is the embeddings it was trained on
(same index.json), else every image. The training images of a run need `split = "train"` or
`"all"`; the file then says how many it holds (metadata `training_images`) and eval-recall warns.

Noise is drawn per sample from (seed, global image index), so a sample's tokens do not depend on the
batch size or on which other images are sampled with it (`--split eval` gives the same tokens for an
image as `--split all`), and the evaluation of `train-dit` (same seed) reproduces them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip_toolkit import __version__
from blip_toolkit.dit.checkpoint import CONFIG_FILE, check_dims, load_dit, read_record, resolve_dit_dir
from blip_toolkit.dit.data import sample_noise, split_indices
from blip_toolkit.dit.sample_config import SampleConfig
from blip_toolkit.dit.solver import generate
from blip_toolkit.embeddings.format import SWEEP_FILE, SWEEP_FORMAT, SWEEP_VERSION
from blip_toolkit.embeddings.generated import write_generated
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.embeddings.shards import TORCH_DTYPES
from blip_toolkit.engine.outputs import RunRecord, check_output_dir, check_output_file, prepare_output_dir
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.fsutil import write_json
from blip_toolkit.log import track
from blip_toolkit.models.device import resolve_device

logger = logging.getLogger("blip")

SWEEP_RUN_KIND = "blip-sample-sweep"


@dataclass
class SampleResult:
    """What `run_sample` wrote: `path` (the generated-features file, or the sweep directory) and the
    settings used (of the first setting for a sweep; `sweep` lists every setting and its file)."""

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
    training_images: int
    seconds: float
    samples_per_second: float
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def sweep_file_name(steps: int, cfg_scale: float) -> str:
    """The file of one setting in a sweep directory: steps-30_cfg-1.5.safetensors."""
    return f"steps-{int(steps)}_cfg-{float(cfg_scale):g}.safetensors"


def run_sample(config: SampleConfig) -> SampleResult:
    """Generate tokens for the images of the chosen split and write them with `write_generated` (keys,
    the embeddings' index_sha256, the head's global embeddings, and the settings as metadata): one
    file, or with several steps / cfg_scale values a sweep directory (one file per setting and
    sweep.json, written last)."""
    started = time.perf_counter()
    out = Path(config.out)
    if config.is_sweep:  # before any work
        check_output_dir(out, overwrite=config.overwrite, flag="--out", resumable=False)
    else:
        check_output_file(out, overwrite=config.overwrite)
    device = resolve_device(config.device)
    shards = EmbeddingShards(config.data)
    model, normalizer, info = load_dit(config.checkpoint, ema=config.ema, device=device)
    record = info["record"]
    check_dims(record, shards.dims, checkpoint=config.checkpoint, data=config.data)
    _warn_other_encoders(record, shards)
    settings = _settings(config, info["sample"])
    split, indices, training = _indices(config, shards, record)
    store = TORCH_DTYPES[config.dtype or shards.index["dtype"]]
    keys_all = shards.keys()
    keys = [keys_all[i] for i in indices.tolist()]
    common = {
        "checkpoint": str(Path(info["path"]).resolve()),
        "step": str(info["step"]),
        "ema": str(info["ema"]).lower(),
        "solver": settings[0]["solver"],
        "shift": repr(settings[0]["shift"]),
        "seed": str(config.seed),
        "split": split,
        "training_images": str(training),
        "run_index_sha256": str(record.get("data", {}).get("index_sha256", "")),
    }
    if config.is_sweep:
        prepare_output_dir(out, overwrite=config.overwrite, flag="--out", resumable=False)
        run_record = RunRecord(out, SWEEP_RUN_KIND)
        run_record.start({"config": {**asdict(config), "out": str(out)}})
    try:
        files = _sample_settings(
            config, out, model, normalizer, info, shards, indices, settings, keys, common, store, device
        )
    except BaseException as exc:
        if config.is_sweep:
            run_record.fail(exc)  # the directory says the sweep did not finish (it has no sweep.json)
        raise
    finally:
        shards.close()
    if config.is_sweep:
        write_json(
            out / SWEEP_FILE,
            {
                "format": SWEEP_FORMAT,
                "version": SWEEP_VERSION,
                "toolkit_version": __version__,
                "checkpoint": common["checkpoint"],
                "data": str(Path(config.data).resolve()),
                "index_sha256": shards.index_sha256,
                "split": split,
                "training_images": training,
                "samples": len(indices),
                "seed": config.seed,
                "ema": info["ema"],
                "settings": files,
            },
        )
        run_record.finish(settings=len(files))
    seconds = time.perf_counter() - started
    first = settings[0]
    return SampleResult(
        path=str(out),
        checkpoint=info["path"],
        data=str(config.data),
        samples=len(indices),
        step=info["step"],
        ema=info["ema"],
        steps=first["steps"],
        cfg_scale=first["cfg_scale"],
        solver=first["solver"],
        shift=first["shift"],
        seed=config.seed,
        split=split,
        training_images=training,
        seconds=seconds,
        samples_per_second=len(indices) * len(settings) / seconds if seconds > 0 else 0.0,
        sweep=files if config.is_sweep else [],
    )


def _sample_settings(
    config, out, model, normalizer, info, shards, indices, settings, keys, common, store, device
):
    """Sample every setting and write its file; returns [{**setting, "file", "seconds"}]."""
    files = []
    for setting in settings:
        begun = time.perf_counter()
        logger.info(
            "sampling %d image(s) of %s with %s (step %s, %s weights): %d %s step(s), cfg %g, seed %d",
            len(indices),
            config.data,
            info["path"],
            info["step"],
            "EMA" if info["ema"] else "trained",
            setting["steps"],
            setting["solver"],
            setting["cfg_scale"],
            config.seed,
        )
        tokens, global_emb = _generate_all(
            model, normalizer, info["head"], shards, indices, setting, config, store, device
        )
        name = sweep_file_name(setting["steps"], setting["cfg_scale"]) if config.is_sweep else None
        path = write_generated(
            out / name if name else out,
            tokens,
            keys,
            index_sha256=shards.index_sha256,
            global_emb=global_emb,
            metadata={**common, "steps": str(setting["steps"]), "cfg_scale": repr(setting["cfg_scale"])},
            overwrite=config.overwrite,
        )
        files.append({**setting, "file": name or str(path), "seconds": round(time.perf_counter() - begun, 3)})
    return files


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


def _settings(config: SampleConfig, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (steps, cfg_scale) setting to sample, steps-major, with the solver and shift: the
    command's values, else the run's own sampling defaults."""
    steps = config.steps or [int(defaults.get("steps", 30))]
    scales = config.cfg_scale or [float(defaults.get("cfg_scale", 1.0))]
    solver = config.solver or defaults.get("solver", "euler")
    shift = config.shift if config.shift is not None else float(defaults.get("shift", 1.0))
    return [
        {"steps": int(n), "cfg_scale": float(c), "solver": solver, "shift": shift}
        for n in steps
        for c in scales
    ]


def _indices(
    config: SampleConfig, shards: EmbeddingShards, record: dict[str, Any]
) -> tuple[str, np.ndarray, int]:
    """(the split sampled, its global image indices (the first `limit`), how many of them are training
    images of the run)."""
    trained_on = record.get("data", {})
    own_data = trained_on.get("index_sha256") == shards.index_sha256
    split_name = config.split or ("eval" if own_data else "all")
    if split_name != "all" and not own_data:
        raise UsageError(
            f"--split {split_name} needs the embeddings the DiT was trained on ({trained_on.get('dir')}); "
            f"{config.data} is a different index",
            hint="use --split all for other embeddings",
        )
    split = split_indices(shards, **trained_on.get("split", {})) if own_data else None
    if split_name == "all":
        indices = np.arange(len(shards), dtype=np.int64)
    elif split_name == "train":
        indices = split.train
    else:
        if split.kind == "none" or len(split.eval) == 0:
            raise UsageError(
                f"{config.checkpoint} held out no images of {config.data} (its split: {trained_on.get('split')})"
                + (
                    "; blip sample defaults to a run's held-out images on the data it was trained on"
                    if config.split is None
                    else ""
                ),
                hint="sample other embeddings, or pass --split train / --split all to sample training images",
            )
        indices = split.eval
        if split.kind == "overfit":
            logger.warning("the run was an --overfit check: its evaluation images are its training images")
    if config.limit is not None:
        indices = indices[: config.limit]
    if len(indices) == 0:
        raise InputError(f"{config.data}: no images in --split {split_name}")
    training = int(np.isin(indices, split.train).sum()) if split is not None else 0
    if config.split is None:
        logger.info(
            "--split %s (default: %s)",
            split_name,
            "the run's held-out images of the embeddings it was trained on"
            if own_data
            else "other embeddings than the run's",
        )
    if training:
        logger.warning(
            "%d of the %d sampled image(s) are training images of the run (--split %s): recall on them is not "
            "a held-out number",
            training,
            len(indices),
            split_name,
        )
    return split_name, indices, training


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
    if not bool(torch.isfinite(global_emb).all()):
        raise InputError(
            f"{config.checkpoint}: the generated tokens hold NaN or Inf values (a diverged model?)"
        )
    return tokens, global_emb


def set_sample_defaults(
    checkpoint: str | Path, *, steps: int, cfg_scale: float, evidence: dict[str, Any]
) -> Path:
    """Make `steps` and `cfg_scale` the sampling defaults of a DiT export: its config.json "sample"
    (what `blip sample` uses unless told otherwise), with `evidence` (how they were chosen, e.g. the
    eval-recall sweep) under "sample_tuning". Returns the config.json written. A training run that is
    resumed later writes its config's [sample] again."""
    directory = resolve_dit_dir(checkpoint)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise InputError(f"{directory}: no {CONFIG_FILE} to update (a checkpoint still being written?)")
    record = read_record(directory)
    record["sample"] = {**record.get("sample", {}), "steps": int(steps), "cfg_scale": float(cfg_scale)}
    record["sample_tuning"] = evidence
    write_json(config_file, record)
    logger.info("%s: sampling defaults set to %d steps, cfg %g", config_file, int(steps), float(cfg_scale))
    return config_file
