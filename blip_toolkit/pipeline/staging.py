"""Remote tar and table files, copied once to local disk before they are read.

Every DataLoader worker reads every unit of its process (pipeline/stream.py deals chunks, not units,
to workers, which keeps the output in input order); reading a remote object once per worker would
download it once per worker. So a `Stager` thread in the main process copies each remote file of
this process's units into a spool directory, in unit order and at most `ahead` files ahead, and marks
it `.ready` (or `.failed` with the one-line reason). Workers wait for the marker, read the local
copy, and leave a `.passed-<worker>` marker once past the file's last unit; the stager deletes a copy
when every worker has passed it. A copy that failed (a cut connection, a denied key) makes its units
fail as a whole: the run goes on and `--resume` reads them again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from blip_toolkit.fsutil import atomic_write
from blip_toolkit.pipeline import remote

logger = logging.getLogger("blip")

POLL = 0.05


def spool_name(url: str) -> str:
    """The local file name of `url`'s copy: a hash of the URL and its own suffix (readers choose the
    format by suffix: .tar, .tar.gz, .parquet, .arrow)."""
    base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    suffix = "".join(Path(base).suffixes[-2:]) if base.lower().endswith(".tar.gz") else Path(base).suffix
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:24] + suffix


class StagingFailed(Exception):
    """A remote file could not be copied; the message is one line naming its URL."""


def wait_staged(spool: Path, url: str) -> Path:
    """The local copy of `url` once the stager has made it (workers call this), or StagingFailed."""
    path = spool / spool_name(url)
    ready, failed = path.with_name(path.name + ".ready"), path.with_name(path.name + ".failed")
    while True:
        if ready.exists():
            return path
        if failed.exists():
            raise StagingFailed(failed.read_text(encoding="utf-8").strip())
        time.sleep(POLL)


def mark_passed(spool: Path, url: str, worker: int) -> None:
    """Worker `worker` no longer needs the copy of `url`."""
    marker = spool / f"{spool_name(url)}.passed-{worker}"
    with contextlib.suppress(OSError):
        marker.touch()


class Stager:
    """Copies the remote files of `urls` (in order, each once) into `spool`, `ahead` at a time, and
    deletes each copy once `workers` workers have passed it."""

    def __init__(self, spool: Path, urls: Iterable[str], workers: int, *, ahead: int = 2):
        self.spool, self.workers, self.ahead = Path(spool), max(workers, 1), max(ahead, 1)
        self.urls = list(dict.fromkeys(u for u in urls if remote.is_url(u)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Stager:
        if self.urls:
            self.spool.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._run, name="blip-stager", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        shutil.rmtree(self.spool, ignore_errors=True)

    def _run(self) -> None:
        live: list[str] = []  # staged, not yet passed by every worker
        for url in self.urls:
            while len(live) >= self.ahead and not self._stop.is_set():
                live = [u for u in live if not self._release_if_passed(u)]
                if len(live) >= self.ahead:
                    time.sleep(POLL)
            if self._stop.is_set():
                return
            self._stage(url)
            live.append(url)
        while live and not self._stop.is_set():
            live = [u for u in live if not self._release_if_passed(u)]
            time.sleep(POLL)

    def _stage(self, url: str) -> None:
        path = self.spool / spool_name(url)
        partial = path.with_name(path.name + ".partial")
        try:
            with remote.open_input(url) as source, open(partial, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
            partial.replace(path)
        except Exception as exc:  # noqa: BLE001 - any failure of the copy fails this file's units only
            partial.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                message = f"{remote.redact_url(url)}: cannot copy it to {self.spool}: no space left on device"
            else:
                message = remote.describe(exc, url)
            logger.debug("staging failed: %s", message)
            with atomic_write(path.with_name(path.name + ".failed")) as handle:
                handle.write(message + "\n")
            return
        with atomic_write(path.with_name(path.name + ".ready")) as handle:
            handle.write(url + "\n")

    def _release_if_passed(self, url: str) -> bool:
        name = spool_name(url)
        if not all((self.spool / f"{name}.passed-{w}").exists() for w in range(self.workers)):
            return False
        for leftover in self.spool.glob(name + "*"):
            leftover.unlink(missing_ok=True)
        return True
