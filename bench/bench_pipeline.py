"""The dataset pipeline over a Parquet input (`blip caption data.parquet --output ...`): memory and overhead.

1. Memory: peak RSS of the whole run (VmHWM of its process) over a Parquet file of 20,000 rows against
   one of 2,000 (small JPEG bytes in an image column, row groups of 1,000, the tiny captioning model,
   Parquet output), each run in a process of its own; target <= 1.1x: rows are streamed by row group,
   and records go through the journal, so memory does not grow with the file.
2. Overhead: `blip caption photos.parquet --output captions.jsonl` with a BLIP-base-sized captioning
   model (random weights) over 512 JPEGs of 640x480 stored in Parquet files (one per round) against the
   model's own batched `generate` on the same images decoded and preprocessed beforehand (batch 8,
   greedy, 20 new tokens). Interleaved rounds of 128 images; target: median time ratio <= 1.05,
   captions identical.

`--quick`: 2,000 vs 200 rows; a 2-layer model at 96 px, 2 rounds of 16 photos.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    build_blip,
    interleaved_rounds,
    make_photos,
    parse_args,
    peak_rss_mb,
    rate_range,
    ratio_target,
    report,
    target,
)

REPO = Path(__file__).resolve().parent.parent


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=["all", "memory", "overhead"], default="all")
    parser.add_argument("--worker", choices=["memory"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)


def small_jpegs(count: int = 64) -> list[bytes]:
    """`count` distinct 64x48 JPEG crops of the bundled photos."""
    from PIL import Image

    sources = [Image.open(p).convert("RGB") for p in sorted((REPO / "data" / "samples").glob("*.jpg"))]
    out = []
    for i in range(count):
        image = sources[i % len(sources)]
        left, top = (i * 37) % max(1, image.width - 64), (i * 53) % max(1, image.height - 48)
        buffer = io.BytesIO()
        image.crop((left, top, left + 64, top + 48)).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def write_parquet(path: Path, images: list[bytes], *, row_group: int = 1000) -> Path:
    """A Parquet file with `key` and `image` (binary) columns, written row group by row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("image", pa.binary())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(images), row_group):
            part = images[start : start + row_group]
            keys = [f"{i:08d}" for i in range(start, start + len(part))]
            writer.write_table(pa.table({"key": keys, "image": part}, schema=schema))
    return path


def tiny_model(root: Path) -> Path:
    from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint

    path = root / "tiny-caption"
    if not path.is_dir():
        build_checkpoint("blip-caption", path, size=ModelSize(initializer_range=0.1))
    return path


def caption_parquet(runner, table: Path, out: Path, *, batch_size: int, max_new_tokens: int, num_workers):
    """What `blip caption TABLE --key-column key --output OUT` runs once the model is loaded."""
    from blip_toolkit.jobs.inference import OutputJob, infer_to_file
    from blip_toolkit.pipeline.sources import open_inputs
    from blip_toolkit.pipeline.tables import TableColumns
    from blip_toolkit.predictors.caption import caption_task
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    options = CaptionOptions(
        batch_size=batch_size,
        generation=GenerationOptions(max_new_tokens=max_new_tokens),
        num_workers=num_workers,
    )
    return infer_to_file(
        lambda device: runner,
        lambda r: caption_task(r, options),
        open_inputs([str(table)], columns=TableColumns(key="key")),
        OutputJob(str(out), overwrite=True, device="cpu"),
        options.settings(),
        {"task": "caption"},
    )


# ----------------------------------------------------------------------------- 1. memory


def memory_worker(args: argparse.Namespace) -> dict:
    from blip_toolkit.models.loading import open_runner

    root = Path(args.root)
    jpegs = small_jpegs()
    table = write_parquet(
        root / f"rows-{args.items}.parquet", [jpegs[i % len(jpegs)] for i in range(args.items)]
    )
    runner = open_runner(str(tiny_model(root)), "caption", device="cpu")
    start = time.perf_counter()
    summary = caption_parquet(
        runner, table, root / f"out-{args.items}.parquet", batch_size=32, max_new_tokens=3, num_workers=1
    )
    return {"items": summary.records, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def memory(root: Path, quick: bool) -> tuple[list[dict], list[dict]]:
    small, large = (200, 2000) if quick else (2000, 20000)
    tiny_model(root)  # built once, before either run
    runs = []
    for items in (small, large):
        command = [sys.executable, __file__, "--worker", "memory", "--items", str(items), "--root", str(root)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker failed: {proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ratio = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    rows = [
        {
            "run": f"Parquet, {r['items']} rows",
            "peak RSS MB": r["peak_rss_mb"],
            "items/s": r["items"] / r["seconds"],
        }
        for r in runs
    ]
    return rows, [target(f"peak RSS, {large} rows / {small} rows", ratio, "<= 1.1", ratio <= 1.1)]


# ----------------------------------------------------------------------------- 2. overhead


def overhead(root: Path, quick: bool) -> tuple[list[dict], list[dict], dict]:
    import torch

    from blip_toolkit.data.images import open_image
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.pipeline.outputs import read_output

    rounds, per_round = (2, 16) if quick else (4, 128)
    max_new_tokens, batch = (8 if quick else 20), 8
    model_dir = build_blip(root, "BlipForConditionalGeneration", quick)
    tables, pixels = [], []
    runner = open_runner(str(model_dir), "caption", device="cpu")
    loaded = runner.loaded
    for r in range(rounds):
        folder = root / f"photos-{r}"
        folder.mkdir()
        paths = make_photos(folder, per_round)
        tables.append(
            write_parquet(root / f"round-{r}.parquet", [p.read_bytes() for p in paths], row_group=64)
        )
        # The reference's inputs: decoded and preprocessed before its clock starts.
        images = [open_image(p) for p in paths]
        pixels.append(
            [
                loaded.processor(images=images[i : i + batch], return_tensors="pt")["pixel_values"]
                for i in range(0, len(images), batch)
            ]
        )
    ours_captions, reference_captions = [], []
    ours_rounds, reference_rounds = iter(range(rounds)), iter(range(rounds))

    def ours() -> None:
        r = next(ours_rounds)
        out = root / f"round-{r}.jsonl"
        caption_parquet(
            runner, tables[r], out, batch_size=batch, max_new_tokens=max_new_tokens, num_workers=None
        )
        ours_captions.extend(record["caption"] for record in read_output(out))

    def reference() -> None:
        for pixel_values in pixels[next(reference_rounds)]:
            with torch.inference_mode():
                out = loaded.model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens)
            reference_captions.extend(
                t.strip() for t in loaded.processor.batch_decode(out[:, 1:], skip_special_tokens=True)
            )

    caption_parquet(
        runner, tables[0], root / "warm.jsonl", batch_size=batch, max_new_tokens=2, num_workers=None
    )
    times = interleaved_rounds({"ours": ours, "reference": reference}, rounds, warmup=0)
    same = ours_captions == reference_captions and len(ours_captions) == rounds * per_round
    rows = [
        {
            "run": name,
            "images": rounds * per_round,
            "images/s (slowest-fastest round)": rate_range(times[key], per_round),
            "seconds (all rounds)": sum(times[key]),
        }
        for key, name in (
            ("ours", "blip caption photos.parquet --output (workers: default)"),
            ("reference", "model.generate on pre-decoded tensors"),
        )
    ]
    targets = [
        ratio_target(
            "time of blip caption over Parquet / the model's generate",
            times["ours"],
            times["reference"],
            "<= 1.05",
            lambda r: r <= 1.05,
        ),
        target("captions identical to the reference", float(same), "1", same),
    ]
    return (
        rows,
        targets,
        {"overhead rounds": f"{rounds} x {per_round} photos of 640x480 in Parquet, batch {batch}"},
    )


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    if args.worker == "memory":
        print(json.dumps(memory_worker(args)))
        return 0
    import tempfile

    rows, targets, notes = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        if args.part in ("all", "memory"):
            (root / "memory").mkdir()
            memory_rows, memory_targets = memory(root / "memory", args.quick)
            rows += memory_rows
            targets += memory_targets
        if args.part in ("all", "overhead"):
            (root / "overhead").mkdir()
            overhead_rows, overhead_targets, overhead_notes = overhead(root / "overhead", args.quick)
            rows += overhead_rows
            targets += overhead_targets
            notes.update(overhead_notes)
    report("pipeline", rows, quick=args.quick, targets=targets, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
