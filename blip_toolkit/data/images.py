"""Opening images safely, and turning command-line inputs into a list of image paths.

`open_image` refuses decompression bombs before decoding (the header gives the size), decodes fully
so truncated or corrupt files fail here rather than deep in a model, applies the EXIF orientation,
and converts every mode (CMYK, RGBA, LA, palette, 16-bit) to 8-bit RGB correctly.
"""

from __future__ import annotations

import glob
import io
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip_toolkit.data.image_defaults import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from blip_toolkit.errors import InputError


class ImageLoadError(InputError):
    """One image that cannot be used; batch commands report it and go on."""


@dataclass(frozen=True)
class InputItem:
    """One input of a batch command: an image path, or an input that already failed (`error`)."""

    path: str
    error: str | None = None


def open_image(
    source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
):
    """Open `source` (a path or encoded bytes) as an 8-bit RGB PIL image, or raise ImageLoadError."""
    # Our pixel limit (checked on the header, before decoding) replaces PIL's, which would refuse
    # anything over 2x its default even when --max-pixels allows more.
    Image.MAX_IMAGE_PIXELS = None
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(f"{label}: no such file")
        if path.is_dir():
            raise ImageLoadError(f"{label}: is a directory")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{label}: empty file")
        data = path.read_bytes()
    else:
        data = source
        if not data:
            raise ImageLoadError(f"{label}: empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{label}: not an image (unrecognised format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{label}: refused, too many pixels ({exc})") from exc
    except OSError as exc:
        raise ImageLoadError(f"{label}: cannot read image ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: refused, {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
            "(possible decompression bomb; raise --max-pixels to allow it)"
        )
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{label}: refused, too many pixels ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated JPEG, bad PNG CRC, ...
        raise ImageLoadError(f"{label}: corrupt or truncated image ({exc})") from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        pass
    return to_rgb(image)


def to_rgb(image):
    """Convert any PIL mode to 8-bit RGB. Transparency is composited on white (not dropped to
    whatever colour hides under alpha 0); 16- and 32-bit greyscale is rescaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            top = 65535.0
        elif mode == "I":
            top = 65535.0 if array.max(initial=0) <= 65535 else float(array.max())
        else:  # float images: stretch their own range
            low, high = float(array.min(initial=0)), float(array.max(initial=1))
            array, top = array - low, max(high - low, 1e-12)
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(inputs: Iterable[str], *, stdin: Iterable[str] | None = None) -> list[InputItem]:
    """Expand command-line inputs into image paths, in order, without duplicates.

    A file is taken as is (its content is checked when opened); a directory is searched recursively
    for image extensions; a pattern with * ? [ is a glob; `-` reads one path per line from stdin.
    Inputs that match nothing become failed items, so the rest of the batch still runs."""
    items: list[InputItem] = []
    seen: set[str] = set()

    def add(item: InputItem) -> None:
        if item.error is None and item.path in seen:
            return
        seen.add(item.path)
        items.append(item)

    for raw in inputs:
        if raw == "-":
            lines = stdin if stdin is not None else sys.stdin
            for line in lines:
                line = line.strip()
                if line:
                    add(_single(line))
            continue
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p))
            if not found:
                add(InputItem(raw, f"{raw}: directory has no images ({', '.join(IMAGE_EXTENSIONS)})"))
            for p in found:
                add(InputItem(str(p)))
        elif any(ch in raw for ch in "*?[") and not path.exists():
            matches = sorted(m for m in glob.glob(raw, recursive=True) if Path(m).is_file())
            if not matches:
                add(InputItem(raw, f"{raw}: pattern matches no files"))
            for m in matches:
                add(InputItem(m))
        else:
            add(_single(raw))
    return items


def _single(raw: str) -> InputItem:
    path = Path(raw)
    if not path.exists():
        return InputItem(raw, f"{raw}: no such file")
    if path.is_dir():
        return InputItem(raw, f"{raw}: is a directory")
    return InputItem(raw)
