"""Shared option aliases, so every command spells a concept the same way."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from blip_toolkit.config import MIXED_PRECISION, QUANTIZE_MODES


class OutputFormat(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A Typer choice type from a library's tuple of choices (declared once, in the library)."""
    return Enum(name, {value.replace("+", "_").replace("-", "_"): value for value in values}, type=str)


MixedPrecision = choice_enum("MixedPrecision", MIXED_PRECISION)
Quantize = choice_enum("Quantize", QUANTIZE_MODES)


def unset_option(*names: str, help: str, **kwargs):
    """An option whose default None means "not given", so it does not override a config file."""
    return typer.Option(*names, help=help, show_default=False, **kwargs)


FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="Result format on stdout.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Hub id (org/name) or local checkpoint directory. [default: per task]"
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype", help="auto, float32, float16 or bfloat16 (auto: float32 on CPU, float16 on CUDA)."
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
ManifestOpt = Annotated[
    str | None,
    typer.Option("--manifest", help="TSV manifest of inputs, local or remote (see docs/formats.md)."),
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option(
        "--max-pixels", min=1, help="Refuse images with more pixels than this (decompression-bomb guard)."
    ),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in the same output.")]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow a checkpoint's own Python code to run (off by default)."),
]
SetOpt = Annotated[
    list[str] | None,
    unset_option(
        "--set",
        help="Any config field: --set key=value (repeatable; JSON values). Flags above win over --set.",
    ),
]
PrintConfigOpt = Annotated[
    bool,
    typer.Option(
        "--print-config", help="Print the resolved config (TOML, or JSON with --format json) and exit."
    ),
]
LogWithOpt = Annotated[
    str | None,
    unset_option(
        "--log-with",
        help="Accelerate trackers, comma-separated: tensorboard, wandb, ... (must be installed).",
    ),
]
QuantizeOpt = Annotated[
    Quantize | None,
    typer.Option(
        "--quantize",
        help="Quantized weights: int8 or 4bit (CUDA: bitsandbytes; CPU: int8 = torch dynamic int8, "
        "4bit = bitsandbytes' CPU backend). Needs the quantize extra for bitsandbytes.",
        show_default=False,
    ),
]
ImageColumnOpt = Annotated[
    str,
    typer.Option(
        "--image-column",
        help="Parquet / Arrow inputs: the column holding each image (bytes, datasets' {bytes, path} "
        "struct, or a path / URL relative to the file).",
    ),
]
KeyColumnOpt = Annotated[
    str | None,
    unset_option(
        "--key-column",
        help="Parquet / Arrow inputs: the column naming each row (default: its row number in the file).",
    ),
]
RetryFailedOpt = Annotated[
    bool,
    typer.Option(
        "--retry-failed",
        help="Rerun only the items recorded with an error in a finished --output, replacing them in place.",
    ),
]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[
    Engine,
    typer.Option(
        "--engine",
        help="local: this machine (or the processes of accelerate launch); ray: a Ray cluster, the model "
        "in an actor pool (pip install 'blip-toolkit[ray]'; docs/ray.md).",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    unset_option(
        "--ray-address",
        help="--engine ray: the cluster, 'auto' or HOST:PORT (default: start one on this machine).",
    ),
]
NumActorsOpt = Annotated[
    int | None,
    unset_option(
        "--num-actors",
        min=1,
        help="--engine ray: this many model actors (default: autoscale to the cluster).",
    ),
]
GpusPerActorOpt = Annotated[
    float, typer.Option("--gpus-per-actor", min=0.0, help="--engine ray: GPUs each model actor takes.")
]
CpusPerActorOpt = Annotated[
    float, typer.Option("--cpus-per-actor", min=0.01, help="--engine ray: CPUs each model actor takes.")
]
