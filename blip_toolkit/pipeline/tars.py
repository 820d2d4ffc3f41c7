"""webdataset tar shards: naming, reading one tar's samples and errors in stream order, and the
fields of a sample (img2dataset's layout).

A sample's image is its `jpg`, `jpeg`, `png` or `webp` member; its captions come from `txt` (one per
non-empty line), else from `json` (a `caption`, `captions` or `text` field holding a string or a list,
or a bare list). `pipe:` URLs run a shell command and are accepted only on opt-in (`--allow-pipe`).
Remote tars (s3://, https://, ...) are staged to local disk before they are read
(pipeline/staging.py), so everything here reads local files or pipe: streams.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class SampleError(Exception):
    """One sample that cannot be used (recorded with its error; the rest goes on)."""


def is_webdataset_spec(spec: str) -> bool:
    """Whether a command-line input names webdataset shards (a tar, a brace pattern, a `::` list or a
    pipe: URL; local or remote) rather than an image, a folder, a table or a manifest."""
    if spec.startswith("pipe:") or "::" in spec:
        return True
    # A brace pattern is tars when what it expands to is (photos/{cat,dog}.jpg is two images).
    first = expand_urls(spec)[0] if "{" in spec else spec
    return first.lower().endswith(TAR_SUFFIXES)


def tar_names(urls: list[str]) -> list[str]:
    """Output-shard stems for input tars: the tar's file name without .tar/.tar.gz/.tgz, characters
    outside [A-Za-z0-9._-] replaced by '_'; when two inputs share a stem, each gets its position in the
    input list as a prefix (`00003_data`)."""
    stems = []
    for url in urls:
        last = url.split()[-1] if url.startswith("pipe:") else url
        name = last.rstrip("/").rsplit("/", 1)[-1]
        for suffix in TAR_SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        stems.append(re.sub(r"[^A-Za-z0-9._-]", "_", name) or "tar")
    return unique_names(stems)


def unique_names(stems: list[str]) -> list[str]:
    """The stems, each prefixed with its position (`00003_data`) where two share one."""
    counts = {stem: stems.count(stem) for stem in stems}
    return [f"{i:05d}_{stem}" if counts[stem] > 1 else stem for i, stem in enumerate(stems)]


class ErrorCollector:
    """webdataset exception handler that records and continues. The default handler re-raises (one
    bad tar kills the job) and `warn_and_continue` sleeps 0.5 s per error; this one only collects."""

    def __init__(self, label: str):
        self.label = label
        self.errors: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        first = str(exn.args[0]) if exn.args else str(exn)
        first = re.sub(r" @ <.*$", "", first)  # webdataset appends the stream object's repr
        self.errors.append(f"{self.label}: {type(exn).__name__}: {first}")
        return True

    def drain(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors


def iter_tar(path: str, handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """Raw webdataset samples ({"__key__", "jpg": bytes, ...}) of one local tar or pipe: stream,
    through webdataset's own url_opener -> tar_file_expander -> group_by_keys with our handler."""
    yield from tarfile_samples([{"url": path}], handler=handler)


def tar_events(path: str, label: str | None = None) -> Iterator[tuple[dict | None, str | None]]:
    """The samples and the errors of one tar in stream order: `(sample, None)` or `(None, error)`.
    `label` names the tar in errors (its URL when `path` is a staged copy). The order is the same on
    every read of the same file (DataLoader workers that share a tar rely on it). A truncated or
    damaged tar is reported after the samples before it (`tar_end_problem`)."""
    label = label or path
    handler = ErrorCollector(label)
    for sample in iter_tar(path, handler):
        for error in handler.drain():
            yield None, error
        yield sample, None
    problem = tar_end_problem(path)
    if problem:
        handler.errors.append(f"{label}: {problem}")
    for error in handler.drain():
        yield None, error


def tar_end_problem(path: str) -> str | None:
    """Why a local uncompressed tar ends early, or None. Python's tarfile ends its iteration quietly
    at a truncated member or a damaged header anywhere past the first one, so a cut download would
    lose samples without a word; this walks the member headers (one 512-byte read each) and checks
    that the last member's data is all there and only zero blocks follow it. Compressed tars are
    not checked here: their decompressor already raises on a cut stream."""
    if path.startswith("pipe:") or not path.lower().endswith(".tar"):
        return None
    file = Path(path)
    try:
        size = file.stat().st_size
        end, last = 0, None
        with tarfile.open(file, "r:") as tar:
            for member in tar:
                end, last = member.offset_data + -(-member.size // 512) * 512, member.name
        if end > size:
            return f"truncated: member {last} needs {end - size} more byte(s) than the file holds"
        with open(file, "rb") as handle:
            handle.seek(end)
            while block := handle.read(1 << 16):
                if block.strip(b"\0"):
                    after = f"after member {last}" if last else "at its start"
                    return f"truncated or damaged {after}: data follows that is not a tar member"
    except (OSError, tarfile.TarError) as exc:
        return f"unreadable tar ({exc})"
    return None


def decode_sample(sample: dict) -> tuple[str, bytes, list[str]]:
    """(image member suffix, image bytes, captions) of a raw webdataset sample, or SampleError."""
    suffix = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
    if suffix is None:
        members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        raise SampleError(f"no image member ({'/'.join(WDS_IMAGE_KEYS)}; the sample has: {members})")
    return suffix, sample[suffix], sample_captions(sample)


def sample_captions(sample: dict) -> list[str]:
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SampleError(f"txt member is not valid UTF-8 (byte {exc.start})") from exc
        return [line.strip() for line in text.splitlines() if line.strip()]
    if "json" in sample:
        try:
            data = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SampleError(f"json member is not valid JSON ({exc})") from exc
        value = data
        if isinstance(data, dict):
            value = next((data[k] for k in ("caption", "captions", "text") if k in data), [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SampleError("json member: caption(s) must be a string or a list of strings")
        return [v.strip() for v in value if v.strip()]
    return []
