"""File-system helpers: atomic writes and output-directory policy.

Every output is written to a temporary name in the same directory and renamed into place, so a
killed run never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blip_toolkit.errors import OutputExistsError

# A directory holding one of these was made by blip, so --overwrite may clear it.
OWNED_MARKERS = ("blip_run.json", "index.json", "report.json")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary sibling path for writers that want a filename (safetensors, savefig)."""
    return _atomic_path(Path(path))


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing an older `dst` (two renames; the old copy
    is removed only after the new one is in place)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def prepare_output_dir(
    path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False, resumable: bool = True
) -> Path:
    """Apply the output policy: a missing or empty directory is used; an existing non-empty one is
    refused unless `resume` (kept as is) or `overwrite` (cleared, but only if blip made it).
    `resumable`: whether the refusal may suggest --resume (commands without it must not)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    has_content = path.is_dir() and any(path.iterdir())
    if has_content and not resume:
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
                hint="choose another directory",
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_output_file(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse to replace an existing output file without --overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists", hint="pass --overwrite to replace it")
    return path
