"""Logging and progress on stderr. stdout is reserved for results (see cli/output.py)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

logger = logging.getLogger("blip")

_state = {"verbosity": 0, "console": None}


def verbosity() -> int:
    """-1 quiet, 0 normal, 1 verbose."""
    return _state["verbosity"]


def stderr_console():
    """The one Rich console, on stderr."""
    if _state["console"] is None:
        _state["console"] = Console(stderr=True, highlight=False, soft_wrap=True)
    return _state["console"]


def setup_logging(level: int = 0) -> None:
    """Route the `blip` logger to stderr. Third-party chatter (transformers' progress bars, the
    PIL-backend notice, hub warnings) is silenced unless verbose."""
    _state["verbosity"] = level
    root = logging.getLogger("blip")
    root.handlers.clear()
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING if level < 0 else logging.DEBUG if level > 0 else logging.INFO)
    root.propagate = False
    if level <= 0:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        warnings.filterwarnings("ignore", module=r"transformers\..*")
        warnings.filterwarnings("ignore", module=r"accelerate\..*")


def quiet_transformers() -> None:
    """Called after transformers is imported (it is imported lazily)."""
    if verbosity() > 0:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (tests and tools swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns it in __init__; the property wins
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def progress_enabled() -> bool:
    return verbosity() >= 0 and stderr_console().is_terminal


def track(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a progress bar on stderr when it is a terminal; plain iteration otherwise."""
    if not progress_enabled():
        yield from items
        return

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
