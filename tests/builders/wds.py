"""webdataset tars for the inference tests, written with tarfile (img2dataset layout)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Each sample {"__key__": k, "jpg": bytes, "txt": str, ...}, members written in order."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = value if isinstance(value, bytes) else str(value).encode()
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def photo_tars(root: Path, images: list[Path], sizes=(3, 3, 2)) -> list[Path]:
    """The photos split over tars of `sizes` samples: part-000.tar, ...; keys 0000, 0001, ..."""
    root.mkdir(parents=True, exist_ok=True)
    samples = [{"__key__": f"{i:04d}", "jpg": p.read_bytes(), "txt": "a photo"} for i, p in enumerate(images)]
    tars, start = [], 0
    for number, size in enumerate(sizes):
        tars.append(write_tar(root / f"part-{number:03d}.tar", samples[start : start + size]))
        start += size
    return tars
