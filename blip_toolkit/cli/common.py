"""Small pieces shared by the batch commands: inputs from arguments or a manifest, and streaming
results with per-item failures reported on stderr and counted into the exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from blip_toolkit.cli.output import Emitter
from blip_toolkit.errors import BlipError, PartialFailure, UsageError

logger = logging.getLogger("blip")


def run_inference(
    task: str,
    *,
    inputs: list[str] | None,
    manifest: Path | None,
    model: str | None,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    options,
    make_task,
    fingerprint: dict,
    output: str | None,
    resume: bool,
    overwrite: bool,
    allow_pipe: bool,
    fmt: str,
    retry_failed: bool = False,
    columns: tuple[str, str | None, str | None] = ("image", None, None),
    ray=None,
    text_line: Callable[[dict], str | None],
    what: str,
    question: str | None = None,
    manifest_schema: str = "images",
    quantize: str | None = None,
) -> None:
    """The tail shared by `caption`, `vqa` and `retrieval`: records to stdout, or the resumable
    (multi-process) run into `--output` and its summary; exit 3 when some items failed."""
    from blip_toolkit.jobs.inference import OutputJob, run_to_file, stream_records
    from blip_toolkit.pipeline.sources import open_inputs
    from blip_toolkit.pipeline.tables import TableColumns

    source = open_inputs(
        inputs,
        manifest,
        text=question,
        manifest_schema=manifest_schema,
        allow_pipe=allow_pipe,
        columns=TableColumns(*columns),
    )
    loading = dict(model=model, dtype=dtype, trust_remote_code=trust_remote_code, quantize=quantize)
    if output is None:
        if resume or overwrite or retry_failed:
            raise UsageError("--resume, --overwrite and --retry-failed apply to --output FILE")
        records = stream_records(task, source, options, make_task, device=device, ray=ray, **loading)
        emit_all(records, fmt, text_line, what=what)
        return
    job = OutputJob(str(output), resume=resume, overwrite=overwrite, retry_failed=retry_failed, device=device)
    summary = run_to_file(task, source, options, make_task, fingerprint, job, ray=ray, **loading)
    if not summary.is_main:
        return
    if fmt != "text":
        with Emitter(fmt, single=True) as out:
            out.emit(summary.to_dict())
    if summary.failed and summary.failed == summary.records:
        raise BlipError(f"all {summary.records} {what}(s) failed (each recorded in {output})")
    if summary.failed:
        raise PartialFailure(
            f"{summary.failed} of {summary.records} {what}(s) failed (each recorded in {output} with its "
            "error); the rest finished"
        )


def ray_options(engine, address: str | None, num_actors: int | None, gpus: float, cpus: float):
    """The Ray engine's options for --engine ray, None for the local engine (whose flags are refused
    with the Ray ones)."""
    from blip_toolkit.pipeline.ray_engine import RayOptions

    if engine.value != "ray":
        if address is not None or num_actors is not None or gpus or cpus != 1.0:
            raise UsageError(
                "--ray-address, --num-actors, --gpus-per-actor and --cpus-per-actor need --engine ray"
            )
        return None
    return RayOptions(address=address, num_actors=num_actors, gpus_per_actor=gpus, cpus_per_actor=cpus)


def read_texts_file(path: Path) -> list[str]:
    """Candidate texts, one per non-empty line (UTF-8)."""
    from blip_toolkit.errors import InputError

    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise InputError(f"{path}: no texts")
    return texts


def emit_all(
    records: Iterable[dict], fmt: str, text_line: Callable[[dict], str | None], *, what: str = "item"
) -> None:
    """Write every record; report failures on stderr as they happen; exit 3 if some failed, 1 if all did."""
    total = failed = 0
    with Emitter(fmt, lambda r: None if "error" in r else text_line(r)) as out:
        for record in records:
            total += 1
            if "error" in record:
                failed += 1
                logger.error(record["error"])
            out.emit(record)
    if failed and failed == total:
        raise BlipError(f"all {total} {what}(s) failed")
    if failed:
        raise PartialFailure(f"{failed} of {total} {what}(s) failed (reported above); the rest finished")


def run_training_command(
    load, flags: dict, set_: list[str] | None, *, print_config: bool, fmt, run, text_summary
) -> None:
    """The tail shared by `finetune` and `train-dit`: --set overrides under the flags, the resolved
    config (`load(overrides)`), --print-config, the run, and the summary (main process only)."""
    from blip_toolkit.config import dump_config, parse_overrides

    overrides = parse_overrides(set_)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    config = load(overrides)
    if print_config:
        sys.stdout.write(dump_config(config, "json" if fmt.value != "text" else "toml"))
        return
    result = run(config)
    if not result.is_main_process:
        return  # under accelerate launch, one summary (from the main process)
    summary = result.summary()
    if fmt.value == "text":
        sys.stdout.write(text_summary(summary))
    else:
        with Emitter(fmt.value, single=True) as out:
            out.emit(summary)
