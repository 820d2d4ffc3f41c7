"""TSV manifests: one example a line, tab-separated, no header.

Blank lines and lines starting with `#` are ignored. Image paths are absolute or relative to the
manifest's own folder. Quotes are ordinary characters (a `"` in a caption is just a `"`).

Validation happens up front, before any model loads: non-UTF-8 bytes, wrong column counts, empty
fields and missing images are reported as `file:line: problem` (the first 20, and a count).
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import atomic_write

MAX_REPORTED = 20
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Column layouts. `required` columns must be present and non-empty; `optional` ones may follow.
SCHEMAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # training manifests (blip finetune)
    "caption": (("image", "caption"), ()),
    "vqa": (("image", "question", "answer"), ()),
    "retrieval": (("image", "text"), ()),
    # inference manifests: extra training columns are allowed and ignored
    "images": (("image",), ("caption",)),
    "questions": (("image", "question"), ("answer",)),
    # extract-embeddings: captions optional
    "embeddings": (("image",), ("caption",)),
}


def _resolve(value: str, base: str) -> str:
    """An image path of a manifest against the manifest's folder (a local folder or a URL)."""
    if _URL.match(value) or Path(value).is_absolute():
        return value
    if _URL.match(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, value))}"
    return str(Path(base) / value)


class ManifestError(InputError):
    """A manifest with problems; the message lists them as file:line."""


@dataclass
class Manifest:
    """A validated manifest. `frame` is a pandas DataFrame with the schema's columns, `image`
    resolved to a path, and `line` (1-based line number in the file)."""

    path: Path
    task: str
    frame: object  # pandas.DataFrame (pandas is imported lazily)
    skipped_missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)

    def records(self) -> list[dict]:
        return self.frame.to_dict("records")


def read_manifest(
    path: str | Path,
    task: str,
    *,
    check_images: bool = True,
    skip_missing: bool = False,
    min_rows: int = 1,
    verify_images: bool = False,
    base: str | None = None,
) -> Manifest:
    """Read and validate a manifest for `task` (a key of SCHEMAS). `base`: the folder relative image
    paths are relative to, when not the file's own (a URL: a remote manifest read from a local copy).

    `verify_images` (with `check_images`) also reads each existing image's header, so a file that is
    not an image is reported as file:line up front rather than hours into a training run; with
    `skip_missing` such rows are skipped like missing ones. Decoding problems past the header
    (truncated data) still surface when the image is opened."""
    path = Path(path)
    required, optional = SCHEMAS[task]
    max_columns = len(required) + len(optional)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    problems: list[str] = []
    kept_lines: list[str] = []
    line_numbers: list[int] = []
    widths: list[int] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(
                f"{path}:{number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            )
            continue
        if number == 1:
            text = text.lstrip("\ufeff")
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        fields = text.split("\t")
        if not len(required) <= len(fields) <= max_columns:
            expected = " or ".join(str(n) for n in range(len(required), max_columns + 1))
            layout = "<TAB>".join(required + tuple(f"[{c}]" for c in optional))
            problems.append(
                f"{path}:{number}: expected {expected} tab-separated columns ({layout}), found {len(fields)}"
            )
            continue
        empty = [name for name, value in zip(required, fields) if not value.strip()]
        if empty:
            problems.append(f"{path}:{number}: empty {', '.join(empty)}")
            continue
        kept_lines.append(text)
        line_numbers.append(number)
        widths.append(len(fields))

    columns = list(required + optional)
    if kept_lines:
        frame = pd.read_csv(
            io.StringIO("\n".join(kept_lines) + "\n"),
            sep="\t",
            header=None,
            names=columns,
            quoting=csv.QUOTE_NONE,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
            engine="c",
        )
    else:
        frame = pd.DataFrame({name: pd.Series(dtype=str) for name in columns})
    for name in columns:
        frame[name] = frame[name].fillna("").astype(str).str.strip()
    frame["line"] = line_numbers

    skipped: list[str] = []
    if kept_lines:
        # A URL (s3://, https://, ...) is kept as it is: Path() would fold its "//", and it is read
        # (and checked) when the item is, by the dataset pipeline.
        resolved = [_resolve(value, base or str(path.parent)) for value in frame["image"]]
        frame["image"] = resolved
        if check_images:
            bad: dict[int, str] = {}
            for i, p in enumerate(resolved):
                if _URL.match(p):
                    bad[i] = f"{path}:{line_numbers[i]}: {p}: a URL; this command reads local image files"
                elif not Path(p).is_file():
                    bad[i] = f"{path}:{line_numbers[i]}: image not found: {resolved[i]}"
                elif verify_images:
                    reason = _unreadable(p)
                    if reason:
                        bad[i] = f"{path}:{line_numbers[i]}: image not readable: {resolved[i]} ({reason})"
            missing = sorted(bad)
            if missing and skip_missing:
                skipped = [bad[i] for i in missing]
                frame = frame.drop(index=frame.index[missing]).reset_index(drop=True)
            else:
                problems.extend(bad[i] for i in missing)

    if problems:
        problems.sort(key=_line_of)
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        message = f"{path}: {len(problems)} problem(s) in the {task} manifest:\n  " + "\n  ".join(shown)
        if more:
            message += f"\n  ... and {more} more"
        hint = (
            "missing images can be skipped with --skip-missing"
            if any("image not found" in p or "image not readable" in p for p in problems)
            else None
        )
        raise ManifestError(message, hint=hint)
    if len(frame) < min_rows:
        raise ManifestError(
            f"{path}: the {task} manifest has no examples"
            + (" left after skipping missing images" if skipped else "")
        )
    return Manifest(path=path, task=task, frame=frame, skipped_missing=skipped)


def _unreadable(path: str) -> str | None:
    """Why `path` is not an image PIL can open (header only, no decoding), or None."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - parsing the header is the check
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError:
        return "refused: too many pixels"
    except (OSError, SyntaxError, ValueError) as exc:
        return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return None


def _line_of(problem: str) -> int:
    try:
        return int(problem.split(":")[1])
    except (IndexError, ValueError):
        return 0


def write_manifest(path: str | Path, rows: list[tuple[str, ...]]) -> None:
    """Write rows as TSV atomically (tabs and newlines inside fields are replaced by spaces)."""
    with atomic_write(path) as handle:
        for row in rows:
            handle.write("\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in row) + "\n")
