"""`blip train-dit` and `blip sample`: wiring only (options -> config -> run -> summary). Their options
are derived from the config dataclasses' fields (cli/derive.py); the config modules import no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blip_toolkit.cli.derive import derived, options
from blip_toolkit.cli.options import (
    FormatOpt,
    OutputFormat,
    PrintConfigOpt,
    SetOpt,
    unset_option,
)
from blip_toolkit.dit.config import DiTConfig
from blip_toolkit.dit.sample_config import SampleConfig
from blip_toolkit.dit.train_config import DataConfig, EvalConfig, TrainConfig, TrainDiTConfig


@derived(
    run=options(TrainDiTConfig, only=("output_dir", "resume", "overwrite"), given=True),
    data=options(DataConfig, only=("dir", "overfit"), section="data", given=True),
    model=options(DiTConfig, only=("preset",), section="model", given=True),
    train=options(TrainConfig, section="train", given=True),
    eval=options(EvalConfig, only=("every",), section="eval", given=True),
)
def train_dit(
    *,
    run: dict,
    data: dict,
    model: dict,
    train: dict,
    eval: dict,
    config: Annotated[
        Path | None,
        unset_option(
            "--config",
            "-c",
            help="TOML, YAML or JSON config (\\[data], \\[model], \\[flow], \\[train], \\[eval], \\[sample]); see --print-config.",
            dir_okay=False,
        ),
    ] = None,
    set_: SetOpt = None,
    print_config: PrintConfigOpt = False,
    fmt: FormatOpt = OutputFormat.text,
) -> None:
    """Train the CLIP-feature DiT: generate target-encoder tokens from conditioning tokens (rectified flow).

    Reads the shards of [bold]blip extract-embeddings[/]; writes RUN/ with checkpoints/step-N (also the
    state for --resume), metrics.jsonl, blip_run.json (resolved config) and the final model for
    [bold]blip sample --checkpoint RUN[/]. Every config field can be set in --config or with --set;
    unknown keys are an error. Under accelerate launch the losses equal a 1-process run with the same
    global --batch-size.

    [bold]Examples[/]

      blip train-dit --config configs/dit-blip3o.toml --data emb/ --out runs/dit
      blip train-dit --data emb/ --out runs/tiny --preset tiny --steps 2000 --set model.num_layers=4
      blip train-dit --data emb/ --out runs/check --overfit 16 --steps 500 --eval-every 100
      blip train-dit --config configs/dit-blip3o.toml --data emb/ --out runs/dit --resume
      blip train-dit --print-config > my-dit.toml
      ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m blip_toolkit train-dit -c my-dit.toml -d emb/ -o runs/dit
    """
    from blip_toolkit.cli.common import run_training_command
    from blip_toolkit.dit.train import run_train_dit
    from blip_toolkit.dit.train_config import load_train_config

    run_training_command(
        lambda overrides: load_train_config(config, overrides),
        {**run, **data, **model, **train, **eval},
        set_,
        print_config=print_config,
        fmt=fmt,
        run=run_train_dit,
        text_summary=_train_text,
    )


def _train_text(s: dict) -> str:
    lines = [f"run\t{s['run_dir']}", f"steps\t{s['steps']}"]
    if s["final_loss"] is not None:
        lines.append(f"loss\t{s['final_loss']:.4f}")
    for key, value in s["eval"].items():
        if isinstance(value, float):
            lines.append(f"{key}\t{value:.4f}")
    if s["train_samples_per_second"]:
        lines.append(f"samples/s\t{s['train_samples_per_second']:.1f}")
    return "\n".join(lines) + "\n"


@derived(settings=options(SampleConfig))
def sample(*, settings: SampleConfig, fmt: FormatOpt = OutputFormat.text) -> None:
    """Generate target tokens with a trained DiT for the images of an embeddings directory.

    Writes the tokens, their keys and their global embeddings (the target head of the run) to one
    safetensors file that [bold]blip eval-recall DIR --generated FILE[/] scores. On the embeddings the
    run was trained on it samples the run's held-out images unless --split says otherwise. The
    checkpoint's dims must match the embeddings'.

    [bold]Examples[/]

      blip sample --checkpoint runs/dit --data emb/ --out heldout.safetensors
      blip eval-recall emb/ --generated heldout.safetensors
      blip sample --checkpoint runs/dit --data emb/ --out sweep/ --cfg-scale 1 1.5 2 3 --steps 10 30
      blip eval-recall emb/ --generated sweep/ --update-run
      blip sample --checkpoint runs/dit/checkpoints/step-4000 --data val-emb/ -o s.safetensors --no-ema --solver heun
    """
    from blip_toolkit.cli.output import Emitter
    from blip_toolkit.dit.sample import run_sample

    summary = run_sample(settings).summary()
    if fmt == OutputFormat.text:
        sweep = summary.pop("sweep")
        lines = [f"{k}\t{v}" for k, v in summary.items() if not (sweep and k in ("steps", "cfg_scale"))]
        lines += [f"setting\tsteps {s['steps']}, cfg {s['cfg_scale']:g}\t{s['file']}" for s in sweep]
        typer.echo("\n".join(lines))
    else:
        with Emitter(fmt.value, single=True) as emitter:
            emitter.emit(summary)


def register(app: typer.Typer) -> None:
    app.command("train-dit")(train_dit)
    app.command("sample")(sample)
