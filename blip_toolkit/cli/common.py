"""Small pieces shared by the batch commands: inputs from arguments or a manifest, and streaming
results with per-item failures reported on stderr and counted into the exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from blip_toolkit.cli.output import Emitter
from blip_toolkit.errors import BlipError, PartialFailure

logger = logging.getLogger("blip")


class Display(NamedTuple):
    """How a command shows its records: --format, the text line of a record, what an item is called."""

    fmt: str
    text_line: Callable[[dict], str | None]
    what: str


def run_inference(prediction, source, load, output, engine, display: Display) -> None:
    """The tail shared by `caption`, `vqa` and `retrieval`: the records of `prediction` (jobs/predict.py)
    over `source` with the model `load` (LoadSpec) says, on `engine` (EngineSpec), to stdout or into
    the resumable `output` (OutputSpec) with its summary; exit 3 when some items failed."""
    from blip_toolkit.jobs.inference import OutputJob, run_to_file, stream_records

    ray = engine.ray()
    if output.output is None:
        emit_all(
            stream_records(prediction, source, load, ray), display.fmt, display.text_line, what=display.what
        )
        return
    job = OutputJob(
        output.output, resume=output.resume, overwrite=output.overwrite, retry_failed=output.retry_failed
    )
    summary = run_to_file(prediction, source, load, job, ray)
    if not summary.is_main:
        return
    if display.fmt != "text":
        with Emitter(display.fmt, single=True) as out:
            out.emit(summary.to_dict())
    what, path = display.what, output.output
    if summary.failed and summary.failed == summary.records:
        raise BlipError(f"all {summary.records} {what}(s) failed (each recorded in {path})")
    if summary.failed:
        raise PartialFailure(
            f"{summary.failed} of {summary.records} {what}(s) failed (each recorded in {path} with its "
            "error); the rest finished"
        )


def ray_options(engine, address: str | None, num_actors: int | None, gpus: float, cpus: float):
    """The Ray options of hand-written engine flags (EngineSpec.ray: None for the local engine)."""
    from blip_toolkit.pipeline.spec import EngineSpec

    return EngineSpec(getattr(engine, "value", engine), address, num_actors, gpus, cpus).ray()


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
