"""`blip finetune`: wiring only (options -> FinetuneConfig -> run_finetune -> summary)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from blip_toolkit.cli.options import (
    FormatOpt,
    LogWithOpt,
    MixedPrecision,
    OutputFormat,
    PrintConfigOpt,
    SetOpt,
    choice_enum,
    unset_option,
)
from blip_toolkit.training.config import TASKS, FinetuneConfig

# Defaults for the help text (the flags themselves default to None = "not given", so a config file
# value is not overridden by a default).
_D = SimpleNamespace(**{f.name: f.default for f in fields(FinetuneConfig)})


Task = choice_enum("Task", TASKS)


def finetune(
    manifest: Annotated[
        Path | None,
        typer.Argument(
            help="Training manifest (TSV, see docs/formats.md).", show_default=False, dir_okay=False
        ),
    ] = None,
    task: Annotated[Task | None, unset_option("--task", "-t", help="caption, vqa or retrieval.")] = None,
    model: Annotated[
        str | None, unset_option("--model", "-m", help="Checkpoint to start from: hub id or local directory.")
    ] = None,
    output_dir: Annotated[
        Path | None,
        unset_option(
            "--output-dir",
            "--out",
            "-o",
            help="Where the model, checkpoints and metrics go.",
            file_okay=False,
        ),
    ] = None,
    val_manifest: Annotated[
        Path | None,
        unset_option(
            "--val-manifest",
            help="Validation manifest (same format): loss and accuracy / recall@1 each epoch; best model in DIR/best.",
            dir_okay=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None, unset_option("--epochs", help=f"Passes over the data. \\[default: {_D.epochs}]")
    ] = None,
    max_steps: Annotated[
        int | None,
        unset_option(
            "--max-steps", "--steps", help="Stop after this many optimizer steps (overrides --epochs)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        unset_option(
            "--batch-size", "-b", help=f"Examples per process per micro-batch. \\[default: {_D.batch_size}]"
        ),
    ] = None,
    learning_rate: Annotated[
        float | None,
        unset_option(
            "--learning-rate", "--lr", help=f"Peak AdamW learning rate. \\[default: {_D.learning_rate:g}]"
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        unset_option(
            "--weight-decay",
            help=f"AdamW weight decay (not on biases and norms). \\[default: {_D.weight_decay:g}]",
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None,
        unset_option(
            "--warmup-steps", help=f"Linear warmup steps, then cosine decay. \\[default: {_D.warmup_steps}]"
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        unset_option(
            "--max-length",
            help=f"Maximum text tokens (prompt + caption / answer). \\[default: {_D.max_length}]",
        ),
    ] = None,
    grad_accum: Annotated[
        int | None,
        unset_option("--grad-accum", help=f"Micro-batches per optimizer step. \\[default: {_D.grad_accum}]"),
    ] = None,
    grad_clip: Annotated[
        float | None,
        unset_option(
            "--grad-clip", help=f"Clip the gradient norm to this (0 = off). \\[default: {_D.grad_clip:g}]"
        ),
    ] = None,
    mixed_precision: Annotated[
        MixedPrecision | None,
        unset_option("--mixed-precision", help="no, fp16 (GPU only) or bf16. \\[default: no]"),
    ] = None,
    num_workers: Annotated[
        int | None,
        unset_option("--num-workers", help=f"DataLoader worker processes. \\[default: {_D.num_workers}]"),
    ] = None,
    seed: Annotated[
        int | None,
        unset_option("--seed", help=f"Random seed (same seed = same weights on CPU). \\[default: {_D.seed}]"),
    ] = None,
    freeze: Annotated[
        list[str] | None,
        unset_option(
            "--freeze",
            help="Parts kept frozen (repeat or comma-separate): vision, text, qformer, language-model, projection, or none. \\[default: BLIP-2 freezes vision and language-model; BLIP trains everything]",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        unset_option(
            "--prompt", help="Caption: the text each caption continues; caption later with the same --prompt."
        ),
    ] = None,
    template: Annotated[
        str | None,
        unset_option(
            "--template", help=f"BLIP-2 VQA prompt; {{}} is the question. \\[default: {_D.template}]"
        ),
    ] = None,
    save_every: Annotated[
        int | None,
        unset_option("--save-every", help="Checkpoint and validate every N steps. \\[default: each epoch]"),
    ] = None,
    lora: Annotated[
        bool,
        typer.Option(
            "--lora",
            help="LoRA (peft): train low-rank adapters on the attention projections, freeze everything else; "
            "the output is the merged model. Needs the lora extra.",
        ),
    ] = False,
    lora_r: Annotated[
        int | None, unset_option("--lora-r", help=f"LoRA rank. \\[default: {_D.lora_r}]")
    ] = None,
    lora_alpha: Annotated[
        float | None,
        unset_option(
            "--lora-alpha", help=f"LoRA scale numerator (scale = alpha / r). \\[default: {_D.lora_alpha:g}]"
        ),
    ] = None,
    lora_dropout: Annotated[
        float | None,
        unset_option("--lora-dropout", help=f"Dropout on the LoRA input. \\[default: {_D.lora_dropout:g}]"),
    ] = None,
    lora_targets: Annotated[
        list[str] | None,
        unset_option(
            "--lora-targets",
            help="Module-name suffixes that get adapters (repeat or comma-separate), e.g. q_proj,v_proj. "
            "\\[default: the language model's and the Q-Former's attention projections; BLIP: the text model's]",
        ),
    ] = None,
    keep_adapter: Annotated[
        bool,
        typer.Option(
            "--keep-adapter",
            help="With --lora: also write the adapter alone to DIR/adapter (usable as --model on top of the base).",
        ),
    ] = False,
    skip_missing: Annotated[
        bool,
        typer.Option(
            "--skip-missing",
            help="Skip manifest rows whose image is missing or unreadable (counted) instead of stopping.",
        ),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last complete checkpoint in --output-dir.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output directory written by blip.")
    ] = False,
    log_with: LogWithOpt = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML, YAML or JSON file of these settings (keys = option names with _); flags override it.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    set_: SetOpt = None,
    print_config: PrintConfigOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Fine-tune a BLIP, BLIP-2 or InstructBLIP checkpoint for captioning, VQA or retrieval.

    Manifests are TSV: [bold]image<TAB>caption[/] (caption), [bold]image<TAB>question<TAB>answer[/]
    (vqa), [bold]image<TAB>text[/] (retrieval). The output directory works as --model for every other
    command; it also holds best/ (lowest validation loss), metrics.jsonl, blip_run.json and
    checkpoints/ for --resume. Runs on CPU, one GPU, or several under accelerate launch.

    [bold]Examples[/]

      blip finetune train.tsv --task caption --model Salesforce/blip-image-captioning-base -o runs/cap --val-manifest val.tsv
      blip finetune qa.tsv --task vqa --model Salesforce/blip2-opt-2.7b -o runs/vqa --mixed-precision bf16
      blip finetune train.tsv --task caption --model Salesforce/blip2-opt-2.7b -o runs/lora --lora --keep-adapter --mixed-precision bf16
      blip finetune pairs.tsv --task retrieval --model Salesforce/blip-itm-base-coco -o runs/itm --resume
      accelerate launch --multi_gpu --num_processes 2 -m blip_toolkit finetune train.tsv --task caption -m MODEL -o runs/cap
    """
    from blip_toolkit.cli.common import run_training_command
    from blip_toolkit.training.finetune import load_finetune_config, run_finetune

    flags = {
        "manifest": str(manifest) if manifest is not None else None,
        "task": task.value if task is not None else None,
        "model": model,
        "output_dir": str(output_dir) if output_dir is not None else None,
        "val_manifest": str(val_manifest) if val_manifest is not None else None,
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "max_length": max_length,
        "grad_accum": grad_accum,
        "grad_clip": grad_clip,
        "mixed_precision": mixed_precision.value if mixed_precision is not None else None,
        "num_workers": num_workers,
        "seed": seed,
        "freeze": [p for item in freeze for p in item.split(",") if p.strip()] if freeze else None,
        "prompt": prompt,
        "template": template,
        "save_every": save_every,
        "lora": lora or None,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "lora_targets": lora_targets,
        "keep_adapter": keep_adapter or None,
        "log_with": log_with,
        # False = not given: a config file's `true` stays.
        "skip_missing": skip_missing or None,
        "resume": resume or None,
        "overwrite": overwrite or None,
    }
    run_training_command(
        lambda overrides: load_finetune_config(config, overrides),
        flags,
        set_,
        print_config=print_config,
        fmt=fmt,
        run=run_finetune,
        text_summary=_text_summary,
    )


def _text_summary(s: dict) -> str:
    lines = [f"output\t{s['output_dir']}", f"steps\t{s['steps']} ({s['epochs']} epoch(s))"]
    if s["final_train_loss"] is not None:
        lines.append(f"train_loss\t{s['final_train_loss']:.4f}")
    if s["best_val_loss"] is not None:
        lines.append(f"best_val_loss\t{s['best_val_loss']:.4f} (step {s['best_step']}, saved in best/)")
    for key, value in s["val_metrics"].items():
        if key != "val_loss":
            lines.append(f"{key}\t{value:.4f}")
    if s["skipped_missing"]:
        lines.append(f"skipped\t{s['skipped_missing']} example(s) with missing images")
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
