"""What `blip finetune` checks before a model is loaded or a file is written: the manifests (with
file:line problems, reserved tokens in user text, a validation manifest of another task), the
checkpoint family and task, --freeze, --lora, --mixed-precision, trackers and the output directory
policy. Every process runs it, so all stop together."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_toolkit.data.batching import check_text
from blip_toolkit.data.manifests import MAX_REPORTED, SCHEMAS, Manifest, ManifestError, read_manifest
from blip_toolkit.engine.accelerate import check_mixed_precision
from blip_toolkit.engine.metrics import check_trackers
from blip_toolkit.engine.outputs import check_output_dir
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.models.loading import Family, LoadedModel, inspect_source, load_processor, require_extra
from blip_toolkit.predictors.generation import forbidden_tokens
from blip_toolkit.training.config import RUN_KIND, TASKS, FinetuneConfig, check_required
from blip_toolkit.training.lora import resolve_targets
from blip_toolkit.training.modules import check_trainable, resolve_frozen

logger = logging.getLogger("blip")


@dataclass
class FinetuneInputs:
    train: Manifest
    val: Manifest | None
    resolved: Any
    family: Family
    processor: Any
    frozen: list[str]
    log_with: list  # the trackers, checked
    lora_targets: list[str] | None = None  # --lora: the module-name suffixes that get adapters


def check_inputs(config: FinetuneConfig) -> FinetuneInputs:
    """Everything that can be checked before a model is loaded or a file is written (on every process,
    so all stop together): the manifests (file:line problems), the checkpoint family and task,
    --freeze, --mixed-precision, trackers, the output directory policy."""
    check_required(config)
    train_manifest = read_manifest(
        config.manifest, config.task, skip_missing=config.skip_missing, verify_images=True
    )
    val = _read_val_manifest(config) if config.val_manifest else None
    for manifest in (train_manifest, val):
        if manifest is not None and manifest.skipped_missing:
            logger.warning(
                "%s: skipped %d example(s) whose image is missing or unreadable (first: %s)",
                manifest.path,
                len(manifest.skipped_missing),
                manifest.skipped_missing[0],
            )
    check_mixed_precision(config.mixed_precision, config.cpu)
    log_with = check_trackers(config.log_with)
    resolved, family = inspect_source(config.model)
    check_trainable(family, config.task, config.model)
    # --lora: peft freezes everything but its adapters (TaskModule keeps those parts in eval mode).
    frozen = [] if config.lora else resolve_frozen(family, config.freeze)
    lora_targets = None
    if config.lora:
        require_extra("peft", "lora", "--lora")
        lora_targets = resolve_targets(family, config.lora_targets)
        if config.keep_adapter and resolved.adapter is not None:
            raise UsageError(
                f"--keep-adapter: --model {config.model} is an adapter itself; an adapter trained on "
                "top of it would need both to load",
                hint="start from the merged model (the output directory that holds it) instead",
            )
    processor = load_processor(resolved)
    _check_reserved_tokens(config, family, processor, [m for m in (train_manifest, val) if m is not None])
    check_output_dir(config.output_dir, overwrite=config.overwrite, resume=config.resume, kind=RUN_KIND)
    return FinetuneInputs(train_manifest, val, resolved, family, processor, frozen, log_with, lora_targets)


def _check_reserved_tokens(config: FinetuneConfig, family, processor, manifests) -> None:
    """Reserved tokens (BLIP-2's <image>, [SEP], </s>, ...) in user text would break the image
    placeholders or the labels: report them as file:line before anything is loaded or written."""
    forbidden = forbidden_tokens(LoadedModel(config.model, family, None, processor, None, None))
    if config.prompt:
        check_text(config.prompt, forbidden, what="--prompt")
    check_text(config.template, forbidden, what="--template")
    for manifest in manifests:
        problems = []
        for row in manifest.records():
            for key, value in row.items():
                if key in ("image", "line") or not isinstance(value, str):
                    continue
                bad = [t for t in forbidden if t and t in value]
                if bad:
                    problems.append(
                        f"{manifest.path}:{row['line']}: {key} contains reserved token {bad[0]!r}"
                    )
        if problems:
            more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
            raise InputError(
                f"{manifest.path}: {len(problems)} problem(s) in the {manifest.task} manifest:\n  "
                + "\n  ".join(problems[:MAX_REPORTED])
                + more
            )


def _read_val_manifest(config: FinetuneConfig) -> Manifest:
    try:
        return read_manifest(
            config.val_manifest, config.task, skip_missing=config.skip_missing, verify_images=True
        )
    except ManifestError as exc:
        # A manifest of another task is the likely mistake: say so.
        width = _column_count(Path(config.val_manifest))
        expected = len(SCHEMAS[config.task][0])
        others = [t for t in TASKS if len(SCHEMAS[t][0]) == width and t != config.task]
        if width and width != expected and others:
            raise ManifestError(
                f"--val-manifest {config.val_manifest} has {width} columns: it looks like a {' / '.join(others)} "
                f"manifest, but --task {config.task} needs {expected} ({'<TAB>'.join(SCHEMAS[config.task][0])})"
            ) from exc
        raise


def _column_count(path: Path) -> int | None:
    """The column count shared by every data line, or None."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        widths = {
            len(line.split("\t"))
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        }
        if len(widths) == 1:
            return widths.pop()
    return None
