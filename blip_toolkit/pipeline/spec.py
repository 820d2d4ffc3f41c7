"""The dataset jobs' settings, declared once with their command-line help (config.setting), from which
`blip caption | vqa | retrieval` (and extract-embeddings) derive their options: what to read
(`InputSpec`), where to write (`OutputSpec`), and where to run (`EngineSpec`: this machine or a Ray
cluster, `RayOptions`). No torch here: the CLI reads these classes for --help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blip_toolkit.config import setting
from blip_toolkit.errors import UsageError

Engine = Literal["local", "ray"]


@dataclass
class InputSpec:
    """Where the items come from, beside the command's arguments."""

    manifest: str | None = setting(
        None, help="TSV manifest of inputs, local or remote (see docs/formats.md)."
    )
    image_column: str = setting(
        "image",
        help="Parquet / Arrow inputs: the column holding each image (bytes, datasets' {bytes, path} "
        "struct, or a path / URL relative to the file).",
    )
    key_column: str | None = setting(
        None, help="Parquet / Arrow inputs: the column naming each row (default: its row number in the file)."
    )
    text_column: str | None = setting(
        None, help="Parquet / Arrow inputs: the column holding each row's question."
    )
    allow_pipe: bool = setting(False, help="Accept 'pipe:' webdataset URLs (they run shell commands).")

    def open(self, inputs: list[str] | None, *, text: str | None = None, manifest_schema: str = "images"):
        """The pipeline source of `inputs` (or of the manifest); `text`: one question for every image."""
        from blip_toolkit.pipeline.sources import open_inputs
        from blip_toolkit.pipeline.tables import TableColumns

        return open_inputs(
            inputs,
            self.manifest,
            text=text,
            manifest_schema=manifest_schema,
            allow_pipe=self.allow_pipe,
            columns=TableColumns(self.image_column, self.key_column, self.text_column),
        )


@dataclass
class OutputSpec:
    """`--output FILE` and its policy; without a file the records stream to stdout."""

    output: str | None = setting(
        None,
        help="Write the records to FILE (.jsonl, .parquet or .tsv, by extension; local or s3:// / gs:// / "
        "hf://), resumable, in input order; without it they stream to stdout.",
        flags=("-o",),
    )
    resume: bool = setting(False, help="Continue an interrupted run in the same output.")
    overwrite: bool = setting(False, help="Replace existing outputs.")
    retry_failed: bool = setting(
        False,
        help="Rerun only the items recorded with an error in a finished --output, replacing them in place.",
    )

    def __post_init__(self) -> None:
        if self.output is None and (self.resume or self.overwrite or self.retry_failed):
            raise UsageError("--resume, --overwrite and --retry-failed apply to --output FILE")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: `address` of an existing cluster ("auto", "HOST:PORT", or None to
    start one on this machine), actors (None: autoscale from 1 to what the cluster holds), and the
    GPUs / CPUs each actor asks for."""

    address: str | None = None
    num_actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise UsageError("--num-actors must be at least 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise UsageError("--gpus-per-actor must be 0 or more and --cpus-per-actor more than 0")


@dataclass
class EngineSpec:
    engine: Engine = setting(
        "local",
        help="local: this machine (or the processes of accelerate launch); ray: a Ray cluster, the model "
        "in an actor pool (pip install 'blip-toolkit[ray]'; docs/ray.md).",
    )
    ray_address: str | None = setting(
        None, help="--engine ray: the cluster, 'auto' or HOST:PORT (default: start one on this machine)."
    )
    num_actors: int | None = setting(
        None, help="--engine ray: this many model actors (default: autoscale to the cluster).", min=1
    )
    gpus_per_actor: float = setting(0.0, help="--engine ray: GPUs each model actor takes.", min=0.0)
    cpus_per_actor: float = setting(1.0, help="--engine ray: CPUs each model actor takes.", min=0.01)

    def ray(self) -> RayOptions | None:
        """The Ray engine's options for --engine ray, None for the local engine (whose flags are
        refused with the Ray ones)."""
        if self.engine != "ray":
            if (
                self.ray_address is not None
                or self.num_actors is not None
                or self.gpus_per_actor
                or self.cpus_per_actor != 1.0
            ):
                raise UsageError(
                    "--ray-address, --num-actors, --gpus-per-actor and --cpus-per-actor need --engine ray"
                )
            return None
        return RayOptions(self.ray_address, self.num_actors, self.gpus_per_actor, self.cpus_per_actor)
