"""Typed errors. Library code raises these; the CLI's one error boundary (`cli.main.main`) turns
each into a single line on stderr and its exit code. `BLIP_DEBUG=1` shows the traceback too."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class BlipError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(BlipError):
    """Invalid option values or combinations (exit 2, like a command-line parsing error)."""

    exit_code = EXIT_USAGE


class InputError(BlipError):
    """A bad input file: missing, unreadable, malformed. The message names the file (and line or key)."""


class ConfigError(UsageError):
    """A config file that cannot be used: unknown keys, wrong types, unreadable."""


class ModelLoadError(BlipError):
    """A model that cannot be found or loaded."""


class TaskNotSupportedError(BlipError):
    """A checkpoint asked to do a task its family cannot do."""


class OutputExistsError(BlipError):
    """An output that already exists and would be overwritten (pass --overwrite or --resume)."""


class TrainingError(BlipError):
    """Training stopped: NaN/Inf loss, inconsistent resume state, ..."""


class PartialFailure(BlipError):
    """Batch work finished but some items failed; each was reported. Exit code 3."""

    exit_code = EXIT_PARTIAL
