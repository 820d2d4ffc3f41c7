"""The output policy and the run record, for every command that writes a directory or a file.

- A missing or empty output directory is used; an existing non-empty one is refused unless `resume`
  (continue it: it must be a run of the same kind) or `overwrite` (replace it: only if blip wrote
  it, recognised by one of OWNED_MARKERS). `check_output_dir` applies the refusals without touching
  anything (call it on every process before any work); `prepare_output_dir` then clears or creates.
- `RunRecord` is `blip_run.json`: the kind of run, its resolved settings, its status
  (running / finished / failed / interrupted) and summary. It is written first, so it also marks
  the directory as blip's.
- `check_resume_settings`: a resumed run must use the settings that define what was being computed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blip_toolkit import __version__
from blip_toolkit.errors import InputError, OutputExistsError, UsageError
from blip_toolkit.fsutil import write_json

logger = logging.getLogger("blip")

RUN_FILE = "blip_run.json"
# A directory holding one of these was made by blip, so --overwrite may clear it.
OWNED_MARKERS = (RUN_FILE, "index.json", "report.json")


def _has_content(path: Path) -> bool:
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    return path.is_dir() and any(path.iterdir())


def check_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    kind: str | None = None,
    flag: str = "--output-dir",
    resumable: bool = True,
) -> Path:
    """Raise OutputExistsError when the policy refuses `path`; change nothing.

    `kind`: with `resume`, the directory's blip_run.json must be a run of this kind (e.g.
    "blip-train-dit"). `resumable`: whether the refusal may suggest --resume."""
    path = Path(path)
    if not _has_content(path):
        return path
    if resume:
        if kind is not None and read_run_kind(path) != kind:
            raise OutputExistsError(
                f"{path} is not a {describe_kind(kind)} run (no {RUN_FILE} of one); cannot resume it",
                hint=f"choose another {flag}",
            )
        return path
    if not overwrite:
        raise OutputExistsError(
            f"{path} already exists and is not empty",
            hint="pass --resume to continue or --overwrite to replace it"
            if resumable
            else "pass --overwrite to replace it",
        )
    if not any((path / marker).exists() for marker in OWNED_MARKERS):
        raise OutputExistsError(
            f"{path} is not empty and was not written by blip; refusing to clear it",
            hint=f"choose another {flag}",
        )
    return path


def prepare_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    kind: str | None = None,
    flag: str = "--output-dir",
    resumable: bool = True,
) -> Path:
    """Apply the policy (see `check_output_dir`): clear the directory on overwrite, create it."""
    path = check_output_dir(
        path, overwrite=overwrite, resume=resume, kind=kind, flag=flag, resumable=resumable
    )
    if _has_content(path) and not resume:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_output_file(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse to replace an existing output file without --overwrite."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; expected a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists", hint="pass --overwrite to replace it")
    return path


def publish_files(source: Path, target: Path, *, last: str = "config.json") -> None:
    """Move every file of the finished directory `source` into `target`, one by one, `last` at the end
    (and an old `last` removed first): a directory whose `last` file is there is complete, so a kill
    half-way never leaves a loadable half-export (`from_pretrained` and `load_dit` need config.json)."""
    (target / last).unlink(missing_ok=True)
    for name in sorted((p.name for p in source.iterdir()), key=lambda n: n == last):
        destination = target / name
        if destination.is_dir():
            shutil.rmtree(destination)
        os.replace(source / name, destination)
    shutil.rmtree(source, ignore_errors=True)


def describe_kind(kind: str) -> str:
    """`blip-train-dit` -> `train-dit` (the command that writes such a run)."""
    return kind.removeprefix("blip-")


def read_run_kind(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((path / RUN_FILE).read_text(encoding="utf-8")).get("kind")
    return None


class RunRecord:
    """`blip_run.json` of a run directory: {"kind", "status", "config", ..., "started", "finished"}.
    Only the main process writes it."""

    def __init__(self, directory: str | os.PathLike, kind: str, *, enabled: bool = True):
        self.path = Path(directory) / RUN_FILE
        self.kind = kind
        self.enabled = enabled

    def read(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{self.path}: unreadable ({exc})") from exc
        return record if isinstance(record, dict) else None

    def start(self, fields: dict[str, Any], *, previous: dict[str, Any] | None = None) -> None:
        """Write the record of a starting (or resumed) run; a resumed run keeps its start time."""
        started = (previous or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S")
        record = {"kind": self.kind, "status": "running", "toolkit_version": __version__, **fields}
        record["started"] = started
        self._write(record)

    def update(self, **fields: Any) -> None:
        record = self.read() or {"kind": self.kind}
        record.update(fields)
        self._write(record)

    def finish(self, **summary: Any) -> None:
        self.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **summary)

    def fail(self, exc: BaseException, **fields: Any) -> None:
        """Mark the run failed (or interrupted); never raises (it runs while an error propagates)."""
        if not self.enabled or not self.path.is_file():
            return
        with contextlib.suppress(Exception):
            self.update(
                status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                **fields,
            )

    def _write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            write_json(self.path, record)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resume_settings(
    previous: dict[str, Any],
    current: dict[str, Any],
    *,
    free: Iterable[str],
    where: str,
    flag: str = "--output-dir",
    quiet: Iterable[str] = ("resume", "overwrite"),
) -> None:
    """Refuse a resume whose settings changed anything but the `free` ones (dotted keys; a key ending
    in "." frees a whole section); warn about the free ones that changed (except `quiet`)."""
    free, quiet = tuple(free), set(quiet)
    before, now = flatten(previous), flatten(current)
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]

    def is_free(key: str) -> bool:
        return any(key == f or (f.endswith(".") and key.startswith(f)) for f in free)

    locked = [k for k in changed if not is_free(k)]
    if locked:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in locked)
        raise UsageError(
            f"--resume: {where} was started with other settings ({details})",
            hint=f"resume with the same settings, or start a new {flag}",
        )
    noted = [k for k in changed if k not in quiet]
    if noted:
        logger.warning(
            "--resume with changed settings: %s",
            ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in noted),
        )
