"""What a `blip train-dit` run is given, checked before anything is built or written (on every
process, so all stop together): the embeddings, their split, the model config with the data's dims,
the trackers and the output policy; and how the run describes them (blip_run.json's "data" and the
config.json of every export, the log line of the split). The task itself is dit/train.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_toolkit.dit.config import DiTConfig, FlowConfig
from blip_toolkit.dit.data import DataSplit, split_indices
from blip_toolkit.dit.train_config import RUN_KIND, TrainDiTConfig
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.engine.accelerate import check_mixed_precision
from blip_toolkit.engine.metrics import check_trackers
from blip_toolkit.engine.outputs import check_output_dir
from blip_toolkit.errors import ConfigError, UsageError

logger = logging.getLogger("blip")


@dataclass
class DiTInputs:
    """What `check_inputs` found: the embeddings, their split, the resolved model config and
    objective (contrastive_positive "auto" resolved from the embeddings)."""

    shards: EmbeddingShards
    split: DataSplit
    model_config: DiTConfig
    flow: FlowConfig
    log_with: list  # the trackers, checked

    def data_record(self) -> dict[str, Any]:
        """The embeddings the run trains on (blip_run.json and every export's config.json)."""
        shards = self.shards
        return {
            "dir": str(Path(shards.root).resolve()),
            "index_sha256": shards.index_sha256,
            "dims": shards.dims,
            "dtype": shards.index.get("dtype"),
            "encoders": {
                side: {
                    k: v
                    for k, v in shards.encoders.get(side, {}).items()
                    if isinstance(v, (str, int, float, bool)) or v is None
                }
                for side in ("cond", "target")
            },
            "num_samples": len(shards),
            "train_samples": len(self.split.train),
            "eval_samples": len(self.split.eval),
            "eval_kind": self.split.kind,
            # split_indices(shards, **split) gives the split again (`blip sample` defaults to its
            # held-out images); the default fraction is written out.
            "split": dict(self.split.settings),
            "split_default": self.split.default,
        }


def check_inputs(config: TrainDiTConfig) -> DiTInputs:
    """What can be checked before anything is built or written (on every process, so all stop
    together): required options, the embeddings, the split, the model dims, trackers, output policy."""
    problems = []
    if not config.data.dir:
        problems.append("--data is required (an extract-embeddings directory)")
    if not config.output_dir:
        problems.append("--output-dir is required (the run directory)")
    if problems:
        raise UsageError("; ".join(problems))
    shards = EmbeddingShards(config.data.dir, verify=config.data.verify, max_open=config.data.max_open_shards)
    data = config.data
    split = split_indices(
        shards,
        eval_shards=data.eval_shards,
        eval_fraction=data.eval_fraction,
        split_seed=data.split_seed,
        overfit=data.overfit,
    )
    model_config = _model_config(config.model, shards)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    if config.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} (the global batch) is not divisible by the {world} "
            "processes",
            hint="each process takes an equal slice of every global batch",
        )
    flow = _flow(config.flow, shards)
    if flow.contrastive_weight > 0 and config.train.batch_size < 2:
        raise ConfigError(
            "flow.contrastive_weight > 0 needs train.batch_size >= 2 (in-batch negatives)",
            hint="or set flow.contrastive_weight = 0",
        )
    check_mixed_precision(config.train.mixed_precision, config.train.cpu)
    log_with = check_trackers(config.train.log_with)
    check_output_dir(config.output_dir, overwrite=config.overwrite, resume=config.resume, kind=RUN_KIND)
    return DiTInputs(shards, split, model_config, flow, log_with)


def _flow(flow: FlowConfig, shards: EmbeddingShards) -> FlowConfig:
    """The objective with contrastive_positive "auto" resolved: the caption embedding when the
    embeddings hold captions, otherwise no contrastive term (logged, as the run then differs)."""
    resolved = flow.for_data(shards.num_captions > 0)
    if flow.contrastive_positive == "auto" and flow.contrastive_weight > 0:
        if resolved.contrastive_weight == 0:
            logger.info(
                "%s holds no captions: no contrastive term (flow.contrastive_positive = auto pulls towards "
                "the caption embedding when there are captions; set it to 'image' for the target's own)",
                shards.root,
            )
        else:
            logger.info(
                "contrastive term: weight %g towards the %s (flow.contrastive_positive = auto)",
                resolved.contrastive_weight,
                "caption embedding" if resolved.contrastive_positive == "text" else "true tokens",
            )
    return resolved


def _model_config(model: DiTConfig, shards: EmbeddingShards) -> DiTConfig:
    """The DiTConfig with the data's dims and token layouts; dims set in the config must match."""
    dims = shards.dims
    data = {
        "target_dim": dims["target_dim"],
        "cond_dim": dims["cond_dim"],
        "num_tokens": dims["target_tokens"],
        "num_cond_tokens": dims["cond_tokens"],
    }
    conflicts = [
        f"model.{k} = {getattr(model, k)} but {shards.root} has {v}"
        for k, v in data.items()
        if getattr(model, k) and getattr(model, k) != v
    ]
    if conflicts:
        raise ConfigError("; ".join(conflicts), hint="leave the data dims at 0 (taken from the embeddings)")
    encoders = shards.encoders
    layout = {
        "has_cls": encoders.get("target", {}).get("tokens") == "cls+patch",
        "cond_has_cls": encoders.get("cond", {}).get("tokens") == "cls+patch",
    }
    return dataclasses.replace(model, **data, **layout).resolved()


def describe_split(split: DataSplit, config: TrainDiTConfig) -> None:
    """Log what is held out and what is evaluated."""
    data, every = config.data, config.eval.every
    evaluated = min(len(split.eval), config.eval.max_samples)
    if split.kind == "overfit":
        logger.info("--overfit %d: evaluating on those training images (a memorisation check)", data.overfit)
    elif split.kind == "none":
        logger.info(
            "nothing held out (data.eval_fraction = 0): every image trains%s",
            "; no evaluation (it would only see training images; --overfit N evaluates on them)"
            if every
            else "",
        )
    elif split.default:
        logger.info(
            "no split configured: holding out %d image(s) (each with probability %g, data.split_seed %d; "
            "set data.eval_fraction or data.eval_shards to choose); evaluating on %d of them%s",
            len(split.eval),
            split.settings["eval_fraction"],
            split.settings["split_seed"],
            evaluated,
            "" if every else " (eval.every = 0: not evaluated)",
        )
    elif every:
        logger.info("evaluating on %d held-out image(s) of %d", evaluated, len(split.eval))
