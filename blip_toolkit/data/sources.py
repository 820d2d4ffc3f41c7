"""Where `extract-embeddings` reads images and captions from: a folder, a TSV manifest, or
webdataset tar shards.

- Folder: every image under it (recursively, hidden files and folders skipped); captions from a
  same-name `.txt` file next to the image (`cat.jpg` -> `cat.txt`), one caption per non-empty line.
  Key: the image path relative to the folder.
- TSV manifest (`image<TAB>caption`, read with `data.manifests`, schema "embeddings"): several rows
  with the same image give that image several captions; a row without a caption adds none. Key: the
  image path as written, relative to the manifest's folder.
- webdataset: local `.tar` files (also `.tar.gz` / `.tgz`) and brace patterns (`data/{000..009}.tar`),
  several separated by `::`, or several arguments. A sample's image is its `jpg`, `jpeg`, `png` or
  `webp` member; captions come from `txt` (one per non-empty line), else from `json` (a `caption`,
  `captions` or `text` field holding a string or a list, or a bare list). `pipe:` URLs run a shell
  command and are accepted only with `allow_pipe=True` (`--allow-pipe`). Key: `<tar name>/<__key__>`.

Folder and TSV items are sorted by key, so the order (and so the shard a sample lands in) does not
depend on the file system or on how many processes run.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from blip_toolkit.data.images import is_image_path
from blip_toolkit.data.manifests import read_manifest
from blip_toolkit.errors import InputError, UsageError

logger = logging.getLogger("blip")

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class SampleError(Exception):
    """One sample that cannot be used (reported in errors.jsonl, the rest goes on)."""


@dataclass(frozen=True)
class Item:
    """One image of a folder or TSV source. `captions` is known up front (TSV) or read from
    `caption_file` when the item is loaded (folder), so a bad .txt fails that item only."""

    key: str
    image: str
    captions: tuple[str, ...] = ()
    caption_file: str | None = None

    def load_captions(self) -> list[str]:
        if self.caption_file is None:
            return list(self.captions)
        return read_caption_file(self.caption_file)


@dataclass
class ItemSource:
    """A folder or TSV source: `items` sorted by key."""

    kind: str  # "folder" | "tsv"
    spec: str
    items: list[Item]

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": [self.spec], "items": len(self.items)}


@dataclass
class WdsSource:
    """webdataset tar shards: `urls` in the given order and `names[i]`, the stem output shards of
    `urls[i]` are named after (unique)."""

    spec: list[str]
    urls: list[str]
    names: list[str] = field(default_factory=list)
    kind: str = "webdataset"

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": list(self.spec), "tars": len(self.urls)}


def read_caption_file(path: str | Path) -> list[str]:
    """Captions of a `.txt` file: one per non-empty line, stripped."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SampleError(f"{path}: captions are not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise SampleError(f"{path}: cannot read captions ({exc.strerror or exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def open_source(specs: list[str] | str, *, allow_pipe: bool = False) -> ItemSource | WdsSource:
    """Recognise and validate a source given on the command line (one folder, one TSV file, or one or
    more tar paths / brace patterns / pipe: URLs)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise UsageError("no source given (a folder of images, a TSV manifest, or webdataset .tar shards)")
    kinds = [_kind(spec) for spec in specs]
    if len(specs) > 1 and any(kind != "webdataset" for kind in kinds):
        raise UsageError(
            "several sources are only accepted as webdataset tar shards; give one folder or one TSV manifest"
        )
    if kinds[0] == "folder":
        return folder_source(specs[0])
    if kinds[0] == "tsv":
        return tsv_source(specs[0])
    return wds_source(specs, allow_pipe=allow_pipe)


def is_webdataset_spec(spec: str) -> bool:
    """Whether a command-line input names webdataset shards (a tar, a brace pattern, a `::` list or a
    pipe: URL) rather than an image, a folder or a manifest."""
    return spec.startswith("pipe:") or "{" in spec or "::" in spec or spec.lower().endswith(TAR_SUFFIXES)


def _kind(spec: str) -> str:
    if is_webdataset_spec(spec):
        return "webdataset"
    if "://" in spec:
        raise UsageError(
            f"{spec}: remote URLs are not read directly; download the shards, or stream them with a "
            "pipe: URL (e.g. 'pipe:curl -s URL') and --allow-pipe"
        )
    path = Path(spec)
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "tsv"
    raise InputError(f"{spec}: no such file or directory")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def folder_source(root: str | Path) -> ItemSource:
    """Every image under `root` (sorted by relative path), captions from same-name .txt files."""
    root_path = Path(root)
    items = []
    for path in root_path.rglob("*"):
        relative = path.relative_to(root_path)
        if _hidden(relative) or not is_image_path(path) or not path.is_file():
            continue
        caption_file = path.with_suffix(".txt")
        items.append(
            Item(
                key=relative.as_posix(),
                image=str(path),
                caption_file=str(caption_file) if caption_file.is_file() else None,
            )
        )
    if not items:
        raise InputError(f"{root}: no images in this folder")
    items.sort(key=lambda item: item.key)
    return ItemSource("folder", str(root), items)


def tsv_source(path: str | Path) -> ItemSource:
    """A TSV manifest `image<TAB>caption`; rows of the same image are merged (captions in row order).
    Missing images are not refused here: like unreadable ones they are reported per item."""
    manifest = read_manifest(path, "embeddings", check_images=False)
    base = Path(path).parent
    captions: dict[str, list[str]] = {}
    for image, caption in zip(manifest.frame["image"], manifest.frame["caption"]):
        bucket = captions.setdefault(image, [])
        if caption:
            bucket.append(caption)
    items = []
    for image, texts in captions.items():
        try:
            key = Path(image).relative_to(base).as_posix()
        except ValueError:
            key = image
        items.append(Item(key=key, image=image, captions=tuple(texts)))
    items.sort(key=lambda item: item.key)
    return ItemSource("tsv", str(path), items)


def wds_source(specs: list[str], *, allow_pipe: bool = False) -> WdsSource:
    """Expand brace patterns and `::` lists; local tars must exist; pipe: needs `allow_pipe`."""
    urls: list[str] = []
    for spec in specs:
        for url in expand_urls(spec):
            if url.startswith("pipe:"):
                if not allow_pipe:
                    raise UsageError(
                        f"{url}: pipe: sources run a shell command; pass --allow-pipe to allow it"
                    )
            elif "://" in url:
                raise UsageError(
                    f"{url}: remote URLs are not read directly; use a pipe: URL with --allow-pipe"
                )
            elif not Path(url).is_file():
                raise InputError(f"{url}: no such tar file")
            urls.append(url)
    if not urls:
        raise InputError(f"{' '.join(specs)}: the pattern gives no tar files")
    if len(set(urls)) != len(urls):
        duplicate = next(u for u in urls if urls.count(u) > 1)
        raise UsageError(f"{duplicate}: the same tar is given twice")
    return WdsSource(spec=list(specs), urls=urls, names=tar_names(urls))


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
    counts = {stem: stems.count(stem) for stem in stems}
    return [f"{i:05d}_{stem}" if counts[stem] > 1 else stem for i, stem in enumerate(stems)]


# ----------------------------------------------------------------------------- reading tars


class ErrorCollector:
    """webdataset exception handler that records and continues. The default handler re-raises (one
    bad tar kills the job) and `warn_and_continue` sleeps 0.5 s per error; this one only collects,
    and the extraction reports what it collected in errors.jsonl."""

    def __init__(self, url: str):
        self.url = url
        self.errors: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        first = str(exn.args[0]) if exn.args else str(exn)
        first = re.sub(r" @ <.*$", "", first)  # webdataset appends the stream object's repr
        self.errors.append(f"{self.url}: {type(exn).__name__}: {first}")
        return True

    def drain(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors


def iter_tar(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """Raw webdataset samples ({"__key__", "jpg": bytes, ...}) of one tar, through webdataset's own
    url_opener -> tar_file_expander -> group_by_keys with our handler."""
    yield from tarfile_samples([{"url": url}], handler=handler)


def tar_samples(url: str, handler: ErrorCollector) -> Iterator[dict]:
    """Raw samples of one tar (`iter_tar`), then the end check (`tar_end_problem`): a truncated or
    damaged tar is reported to `handler` like webdataset's own errors, after the samples before it."""
    yield from iter_tar(url, handler)
    problem = tar_end_problem(url)
    if problem:
        handler.errors.append(f"{url}: {problem}")


def tar_events(url: str) -> Iterator[tuple[dict | None, str | None]]:
    """The samples and the errors of one tar in stream order: `(sample, None)` or `(None, error)`.
    The order is the same on every read of the same file (DataLoader workers that share a tar rely
    on it)."""
    handler = ErrorCollector(url)
    for sample in tar_samples(url, handler):
        for error in handler.drain():
            yield None, error
        yield sample, None
    for error in handler.drain():
        yield None, error


def tar_end_problem(url: str) -> str | None:
    """Why a local uncompressed tar ends early, or None. Python's tarfile ends its iteration quietly
    at a truncated member or a damaged header anywhere past the first one, so a cut download would
    lose samples without a word; this walks the member headers (one 512-byte read each) and checks
    that the last member's data is all there and only zero blocks follow it. Compressed tars are
    not checked here: their decompressor already raises on a cut stream."""
    if url.startswith("pipe:") or not url.lower().endswith(".tar"):
        return None
    path = Path(url)
    try:
        size = path.stat().st_size
        end, last = 0, None
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                end, last = member.offset_data + -(-member.size // 512) * 512, member.name
        if end > size:
            return f"truncated: member {last} needs {end - size} more byte(s) than the file holds"
        with open(path, "rb") as handle:
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
