"""extract-embeddings: pipeline overhead over the bare encoder forward passes, and bounded memory.

- Throughput: `extract_embeddings` on 256 images (the bundled photos, copied, one caption each) with
  two ViT-B-sized encoders built from scratch (random weights): a CLIP ViT-B/16 at 224 px as target
  (vision tower, text tower and projections) and a BLIP-2 vision tower of the same size as
  conditioning encoder. The reference is the same encoders' forward passes alone (conditioning
  tokens, target tokens + global, target text embeddings) on the same batches, decoded and
  preprocessed beforehand, in the same process. Overhead = pipeline time / reference time - 1; target
  at most 15%. The pipeline time excludes loading the checkpoints (timed separately), and includes
  everything else: DataLoader start, decoding, pooling, writing the shards, the index.
- Memory: peak RSS of a run over 2,000 images against a run over 200 (each in a process of its own,
  small encoders at 64 px with 8x8 grids, so that keeping all outputs would show: 2,000 images of
  tokens are ~130 MB). Target: within 1.2x.

Each side is timed once (a second round would double a 4-minute measurement; the overhead target has
a wide margin: 3.8% measured against 15%).

`--quick`: tiny encoders, 16 images for throughput, 32 vs 96 images for memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_args, peak_rss_mb, report, target

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
CAPTIONS = [
    "a photo of a cat",
    "a photo of a dog",
    "a red car parked next to a tree",
    "a bowl of fruit on a table",
    "a child is flying a kite in a park",
    "two cats laying on a couch",
    "a man riding a bike down a street",
    "the quick brown fox jumps over the lazy dog",
]


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=None, help="images for the throughput run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument(
        "--part", choices=["all", "throughput", "memory"], default="all", help="what to measure"
    )
    parser.add_argument("--worker", choices=["memory"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)


def make_images(folder: Path, count: int) -> Path:
    """`count` images (the 8 photos in turn) with one caption each in a .txt file."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(SAMPLES.glob("*.jpg"))
    for i in range(count):
        shutil.copy(photos[i % len(photos)], folder / f"{i:06d}.jpg")
        (folder / f"{i:06d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n")
    return folder


def build_encoders(root: Path, kind: str) -> tuple[Path, Path]:
    """(conditioning BLIP-2 checkpoint, target CLIP checkpoint) of the given size, random weights."""
    from tests.builders import ModelSize, build_checkpoint

    if kind == "vit-b":  # ViT-B/16 at 224 px: 14x14 grid, 768 wide, 12 layers
        vision = dict(image_size=224, patch_size=16, hidden=768, layers=12, heads=12, intermediate=3072)
        clip = ModelSize(**vision, text_hidden=768, text_layers=12, projection=512, max_text_positions=77)
        blip2 = ModelSize(**vision, text_hidden=96, text_layers=1, num_query_tokens=4)  # LM never loaded
    elif kind == "small":  # 64 px, 8x8 grid
        vision = dict(image_size=64, patch_size=8, hidden=256, layers=2, heads=4, intermediate=512)
        clip = ModelSize(**vision, text_hidden=128, text_layers=2, projection=128)
        blip2 = ModelSize(**vision, text_hidden=64, text_layers=1)
    else:
        clip = blip2 = ModelSize()
    return (
        build_checkpoint("blip2-opt", root / f"{kind}-blip2", size=blip2),
        build_checkpoint("clip", root / f"{kind}-clip", size=clip),
    )


def reference_seconds(cond_path: Path, target_path: Path, folder: Path, batch_size: int) -> float:
    """The encoders' forward passes alone on pre-decoded, preprocessed batches (same batches as the
    pipeline: consecutive images of one shard)."""
    import torch

    from blip_toolkit.data.images import open_image
    from blip_toolkit.models.adapters import load_encoder

    cond = load_encoder(str(cond_path), "cond")
    target = load_encoder(str(target_path), "target")
    paths = sorted(folder.glob("*.jpg"))
    batches = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [open_image(p) for p in chunk]
        cond_pixels = torch.stack(
            [cond.image_processor(images=[im], return_tensors="pt")["pixel_values"][0] for im in images]
        )
        target_pixels = torch.stack(
            [target.image_processor(images=[im], return_tensors="pt")["pixel_values"][0] for im in images]
        )
        texts = [p.with_suffix(".txt").read_text().strip() for p in chunk]
        batches.append((cond_pixels, target_pixels, texts))
    start = time.perf_counter()
    for cond_pixels, target_pixels, texts in batches:
        cond.tokens(cond_pixels)
        target.encode_image(target_pixels)
        target.encode_text(texts, batch_size=batch_size)
    return time.perf_counter() - start


def pipeline_seconds(
    cond_path: Path, target_path: Path, folder: Path, out: Path, batch_size: int, num_workers: int
) -> tuple[float, float]:
    """(time of extract_embeddings without checkpoint loading, loading time)."""
    from blip_toolkit.jobs.extract import extract_embeddings
    from blip_toolkit.jobs.extract_config import ExtractConfig
    from blip_toolkit.models.adapters import load_encoder

    start = time.perf_counter()
    load_encoder(str(cond_path), "cond")
    load_encoder(str(target_path), "target")
    loading = time.perf_counter() - start
    config = ExtractConfig(
        source=[str(folder)],
        out=str(out),
        cond_encoder=str(cond_path),
        target_encoder=str(target_path),
        batch_size=batch_size,
        shard_size=256,
        num_workers=num_workers,
        overwrite=True,
    )
    start = time.perf_counter()
    extract_embeddings(config)
    return time.perf_counter() - start - loading, loading


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def memory_worker(args: argparse.Namespace) -> dict:
    """One extraction over `--images` images in this process; report peak RSS."""
    from blip_toolkit.jobs.extract import extract_embeddings
    from blip_toolkit.jobs.extract_config import ExtractConfig

    root = Path(args.root)
    folder = make_images(root / f"images-{args.images}", args.images)
    cond, target_path = root / "small-blip2", root / "small-clip"
    start = time.perf_counter()
    summary = extract_embeddings(
        ExtractConfig(
            source=[str(folder)],
            out=str(root / f"out-{args.images}"),
            cond_encoder=str(cond),
            target_encoder=str(target_path),
            batch_size=32,
            shard_size=256,
            num_workers=args.num_workers,
            overwrite=True,
        )
    )
    return {
        "images": args.images,
        "samples": summary.samples,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def spawn_memory(root: Path, images: int, num_workers: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "memory",
        "--images",
        str(images),
        "--root",
        str(root),
        "--num-workers",
        str(num_workers),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    from blip_toolkit.log import setup_logging

    setup_logging(-1)
    if args.worker == "memory":
        print(json.dumps(memory_worker(args)))
        return 0
    quick = args.quick
    rows, targets = [], []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        root = Path(tmp)
        if args.part in ("all", "throughput"):
            images = args.images or (16 if quick else 256)
            cond, target_path = build_encoders(root, "tiny" if quick else "vit-b")
            folder = make_images(root / "images", images)
            cpu = _cpu_seconds()
            reference = reference_seconds(cond, target_path, folder, args.batch_size)
            reference_cpu, cpu = _cpu_seconds() - cpu, _cpu_seconds()
            pipeline, loading = pipeline_seconds(
                cond, target_path, folder, root / "out", args.batch_size, args.num_workers
            )
            pipeline_cpu = _cpu_seconds() - cpu  # includes loading and the DataLoader workers
            overhead = pipeline / reference - 1
            rows.append(
                {
                    "run": "encoders alone",
                    "images": images,
                    "seconds": reference,
                    "images_per_s": images / reference,
                    "cpu_s": reference_cpu,
                }
            )
            rows.append(
                {
                    "run": "extract-embeddings",
                    "images": images,
                    "seconds": pipeline,
                    "images_per_s": images / pipeline,
                    "cpu_s": pipeline_cpu,
                    "loading_s": loading,
                    "num_workers": args.num_workers,
                }
            )
            targets.append(
                target(
                    "pipeline overhead over the encoders' forward passes (wall time)",
                    overhead,
                    "<= 0.15",
                    overhead <= 0.15,
                )
            )
        if args.part in ("all", "memory"):
            build_encoders(root, "small")
            small, large = (32, 96) if quick else (200, 2000)
            runs = [spawn_memory(root, n, args.num_workers) for n in (small, large)]
            for run in runs:
                rows.append(
                    {
                        "run": f"memory, {run['images']} images",
                        "images": run["images"],
                        "seconds": run["seconds"],
                        "images_per_s": run["images"] / run["seconds"],
                        "peak_rss_mb": run["peak_rss_mb"],
                    }
                )
            ratio = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
            targets.append(
                target(f"peak RSS, {large} images / {small} images", ratio, "<= 1.2", ratio <= 1.2)
            )
    report(
        "extract" if args.part == "all" else f"extract-{args.part}",
        rows,
        quick=quick,
        targets=targets,
        notes={
            "encoders": "tiny" if quick else "CLIP ViT-B/16 224px (target) + BLIP-2 vision ViT-B/16 (cond)",
            "batch_size": args.batch_size,
            "quick": quick,
            "cpu_s": "user + sys CPU seconds of this process and its finished children (DataLoader workers)",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
