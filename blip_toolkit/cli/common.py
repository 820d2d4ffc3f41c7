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


def image_items(inputs: list[str] | None, manifest: Path | None, *, schema: str = "images"):
    """Image inputs from positional arguments or a manifest (not both). Returns (items, rows)."""
    from blip_toolkit.data.images import InputItem, collect_inputs
    from blip_toolkit.data.manifests import read_manifest

    if manifest is not None and inputs:
        raise UsageError("give images as arguments or with --manifest, not both")
    if manifest is not None:
        frame = read_manifest(manifest, schema, check_images=False).frame
        rows = frame.to_dict("records")
        return [InputItem(row["image"]) for row in rows], rows
    if not inputs:
        raise UsageError(
            "no images given (pass files, directories, glob patterns, - for stdin, or --manifest)"
        )
    return collect_inputs(inputs), None


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
