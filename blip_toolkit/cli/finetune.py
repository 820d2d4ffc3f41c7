"""`blip finetune`: wiring only (options -> FinetuneConfig -> run_finetune -> summary). Every option
but the manifest, --config and the output flags is derived from a `FinetuneConfig` field (cli/derive.py):
the field is the setting's one home."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.derive import derived, options
from blip_toolkit.cli.options import FormatOpt, OutputFormat, PrintConfigOpt, SetOpt
from blip_toolkit.training.config import FinetuneConfig


@derived(settings=options(FinetuneConfig, given=True))
def finetune(
    manifest: Annotated[
        Path | None,
        typer.Argument(
            help="Training manifest (TSV, see docs/formats.md).", show_default=False, dir_okay=False
        ),
    ] = None,
    *,
    settings: dict,
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

    flags = {"manifest": str(manifest) if manifest is not None else None, **settings}
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
