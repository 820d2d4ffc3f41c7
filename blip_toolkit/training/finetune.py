"""`blip finetune`: caption, VQA and retrieval fine-tuning of BLIP / BLIP-2 checkpoints from TSV
manifests, a task on the training engine (engine/trainer.py: one CPU, one GPU, or many processes
under `accelerate launch`).

    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune
    result = run_finetune(FinetuneConfig(manifest="train.tsv", task="caption",
                                         model="Salesforce/blip-image-captioning-base", output_dir="runs/cap"))

The output directory is usable as `--model` by every other command:

    DIR/config.json, model.safetensors, processor files   the final model (save_pretrained)
    DIR/adapter/                                          --lora --keep-adapter: the LoRA adapter alone
    DIR/best/                                             the best model by validation loss
    DIR/blip_run.json                                     resolved config, status, summary
    DIR/metrics.jsonl                                     one JSON record per step / evaluation
    DIR/checkpoints/step-N/                               training state (safetensors + JSON) + COMPLETE
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from blip_toolkit.config import build_config, load_config_file
from blip_toolkit.engine.run import train
from blip_toolkit.engine.settings import RunPlace
from blip_toolkit.training.config import ALIASES, FinetuneConfig
from blip_toolkit.training.inputs import check_inputs
from blip_toolkit.training.trainer import FinetuneResult, FinetuneTrainer


def load_finetune_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> FinetuneConfig:
    """Defaults, then the file (TOML / YAML / JSON, flat keys) at `path`, then `overrides` (None values
    are skipped). Unknown keys are an error listing them; `lr`, `out` and `steps` are accepted for
    `learning_rate`, `output_dir` and `max_steps` (the spellings of `blip train-dit`)."""
    values = load_config_file(path) if path is not None else {}
    return build_config(
        FinetuneConfig, values, overrides, source=str(path) if path else "options", aliases=ALIASES
    )


def run_finetune(
    config: FinetuneConfig, *, callback: Callable[[dict[str, Any]], None] | None = None
) -> FinetuneResult:
    """Fine-tune `config.model` on `config.manifest` and write the output directory.

    `callback(record)` is called on the main process with every metrics record: `{"type": "train",
    "step", "epoch", "loss", "lr", "grad_norm", "samples_per_second"}`, `{"type": "eval", "step",
    "val_loss", "val_accuracy" | "val_recall@1"}`, `{"type": "checkpoint", "step", "path"}`. An
    exception raised by the callback stops the run (the last complete checkpoint stays usable).

    Deterministic for a seed on CPU: the same config gives the same weights, and an interrupted run
    continued with `resume=True` ends with the weights an uninterrupted run ends with."""
    inputs = check_inputs(config)
    place = run_place(config, inputs.log_with)
    # BLIP-2's generative models never use the Q-Former's text-only layers; DDP must not wait for
    # their gradients. Elsewhere every trainable parameter is used (and the search costs).
    family = inputs.family
    return train(
        lambda accelerator: FinetuneTrainer(config, inputs, place, accelerator, callback),
        config,
        place,
        find_unused_parameters=family.is_blip2 and family.name != "blip2-itm",
    )


def run_place(config: FinetuneConfig, trackers: list[str]) -> RunPlace:
    # Validation and a checkpoint every --save-every steps, else at each epoch's end.
    return RunPlace(
        output_dir=config.output_dir,
        resume=config.resume,
        overwrite=config.overwrite,
        eval_every=config.save_every or 0,
        trackers=trackers,
    )
