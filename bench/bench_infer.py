"""Dataset inference (`blip caption --output`): pipeline overhead, decoding workers, memory, processes.

1. Overhead: `blip caption --output captions.jsonl` over 512 JPEGs of 640x480 with a BLIP-base-sized
   captioning model (transformers' default BlipConfig, random weights) against the model's own
   batched `generate` on the same images decoded and preprocessed beforehand (batch 8, greedy, 20 new
   tokens). Ours runs the whole pipeline except loading the model: DataLoader workers decoding and
   preprocessing, batching, the journal, the final merge and write. Interleaved rounds of 128 images
   (ours, then the reference); target: median time ratio <= 1.05, captions identical.
2. Decode-bound: a tiny model (32 px) over the same JPEGs: images/s with --num-workers 0, 1, 2
   (reported; 0 still decodes in a background thread while the model runs).
3. Memory: peak RSS of the main process over 20,000 webdataset items against 2,000 (tiny JPEGs in
   tars of 1,000, the tiny model, Parquet output; each run in a process of its own); target <= 1.1x.
4. Processes: `accelerate launch` with 2 CPU processes (gloo) against 1 over the same folder: the
   ratio of the runs' own wall times (from start to the merged output, model loading included). No
   target: the cores are shared.

`--quick`: a 2-layer model at 96 px, 32 photos in 2 rounds, 64 photos for the decode-bound case,
2,000 vs 200 items for memory, 32 photos for the processes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
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
    parser.add_argument("--part", choices=["all", "overhead", "decode", "memory", "processes"], default="all")
    parser.add_argument("--worker", choices=["memory"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)


def tiny_model(root: Path) -> Path:
    from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint

    path = root / "tiny-caption"
    if not path.is_dir():
        build_checkpoint("blip-caption", path, size=ModelSize(initializer_range=0.1))
    return path


def caption_file(runner, folder: Path, out: Path, *, batch_size: int, max_new_tokens: int, num_workers):
    """What `blip caption FOLDER --output OUT` runs once the model is loaded."""
    from blip_toolkit.jobs.inference import OutputJob, infer_to_file
    from blip_toolkit.pipeline.sources import open_inputs
    from blip_toolkit.predictors.caption import caption_task
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    options = CaptionOptions(
        batch_size=batch_size,
        generation=GenerationOptions(max_new_tokens=max_new_tokens),
        num_workers=num_workers,
    )
    source = open_inputs([str(folder)])
    return infer_to_file(
        lambda device: runner,
        lambda r: caption_task(r, options),
        source,
        OutputJob(str(out), overwrite=True, device="cpu"),
        options.settings(),
        {"task": "caption"},
    )


# ----------------------------------------------------------------------------- 1. overhead


def overhead(root: Path, quick: bool) -> tuple[list[dict], list[dict], dict]:
    import torch

    from blip_toolkit.data.images import open_image
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.pipeline.outputs import read_output

    rounds, per_round = (2, 16) if quick else (4, 128)
    max_new_tokens, batch = (8 if quick else 20), 8
    model_dir = build_blip(root, "BlipForConditionalGeneration", quick)
    folders = []
    for r in range(rounds):
        folder = root / f"photos-{r}"
        folder.mkdir()
        make_photos(folder, per_round)
        for i, path in enumerate(sorted(folder.iterdir())):  # distinct crops in every round
            path.rename(folder / f"r{r}-{i:03d}.jpg")
        folders.append(folder)
    runner = open_runner(str(model_dir), "caption", device="cpu")
    loaded = runner.loaded
    # The reference's inputs: decoded and preprocessed before its clock starts.
    pixels = {}
    for folder in folders:
        paths = sorted(folder.iterdir())
        images = [open_image(p) for p in paths]
        pixels[folder] = [
            loaded.processor(images=images[i : i + batch], return_tensors="pt")["pixel_values"]
            for i in range(0, len(images), batch)
        ]
    ours_captions, reference_captions = [], []
    ours_iter, ref_iter = iter(folders), iter(folders)

    def ours() -> None:
        folder = next(ours_iter)
        out = root / f"{folder.name}.jsonl"
        caption_file(runner, folder, out, batch_size=batch, max_new_tokens=max_new_tokens, num_workers=None)
        ours_captions.extend(r["caption"] for r in read_output(out))

    def reference() -> None:
        for pixel_values in pixels[next(ref_iter)]:
            with torch.inference_mode():
                out = loaded.model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens)
            reference_captions.extend(
                t.strip() for t in loaded.processor.batch_decode(out[:, 1:], skip_special_tokens=True)
            )

    caption_file(
        runner, folders[0], root / "warm.jsonl", batch_size=batch, max_new_tokens=2, num_workers=None
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
            ("ours", "blip caption --output (workers: default)"),
            ("reference", "model.generate on pre-decoded tensors"),
        )
    ]
    targets = [
        ratio_target(
            "time of blip caption --output / the model's generate",
            times["ours"],
            times["reference"],
            "<= 1.05",
            lambda r: r <= 1.05,
        ),
        target("captions identical to the reference", float(same), "1", same),
    ]
    return rows, targets, {"overhead rounds": f"{rounds} x {per_round} photos of 640x480, batch {batch}"}


# ----------------------------------------------------------------------------- 2. decode-bound


def decode_bound(root: Path, quick: bool) -> tuple[list[dict], dict]:
    from blip_toolkit.models.loading import open_runner

    count = 64 if quick else 512
    folder = root / "decode"
    folder.mkdir()
    make_photos(folder, count)
    for i, path in enumerate(sorted(folder.iterdir())):
        path.rename(folder / f"d-{i:04d}.jpg")
    runner = open_runner(str(tiny_model(root)), "caption", device="cpu")
    runs = {
        w: (
            lambda w=w: caption_file(
                runner, folder, root / f"decode-{w}.jsonl", batch_size=16, max_new_tokens=5, num_workers=w
            )
        )
        for w in (0, 1, 2)
    }
    times = interleaved_rounds(runs, 2 if quick else 3, warmup=1)
    base = statistics.median(times[0])
    rows = [
        {
            "run": f"tiny model, --num-workers {w}",
            "images": count,
            "images/s (slowest-fastest round)": rate_range(times[w], count),
            "speed vs 0 workers": base / statistics.median(times[w]),
        }
        for w in (0, 1, 2)
    ]
    return rows, {"cores available": len(os.sched_getaffinity(0))}


# ----------------------------------------------------------------------------- 3. memory


def write_tars(folder: Path, items: int, per_tar: int = 1000) -> str:
    """`items` small JPEGs (64x48 crops of the bundled photos) in tars of `per_tar`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(p).convert("RGB") for p in sorted((REPO / "data" / "samples").glob("*.jpg"))]
    encoded = []
    for i in range(64):
        image = sources[i % len(sources)]
        left, top = (i * 37) % max(1, image.width - 64), (i * 53) % max(1, image.height - 48)
        buffer = io.BytesIO()
        image.crop((left, top, left + 64, top + 48)).save(buffer, format="JPEG", quality=85)
        encoded.append(buffer.getvalue())
    tars = -(-items // per_tar)
    for t in range(tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(t * per_tar, min(items, (t + 1) * per_tar)):
                data = encoded[i % len(encoded)]
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{tars - 1:05d}}}.tar")


def memory_worker(args: argparse.Namespace) -> dict:
    from blip_toolkit.jobs.inference import OutputJob, infer_to_file
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.pipeline.sources import open_inputs
    from blip_toolkit.predictors.caption import caption_task
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    root = Path(args.root)
    pattern = write_tars(root / f"wds-{args.items}", args.items)
    runner = open_runner(str(tiny_model(root)), "caption", device="cpu")
    options = CaptionOptions(batch_size=32, generation=GenerationOptions(max_new_tokens=3), num_workers=1)
    start = time.perf_counter()
    summary = infer_to_file(
        lambda device: runner,
        lambda r: caption_task(r, options),
        open_inputs([pattern]),
        OutputJob(str(root / f"out-{args.items}.parquet"), overwrite=True, device="cpu"),
        options.settings(),
        {"task": "caption"},
    )
    return {
        "items": summary.records,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def spawn_memory(root: Path, items: int) -> dict:
    command = [sys.executable, __file__, "--worker", "memory", "--items", str(items), "--root", str(root)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(root: Path, quick: bool) -> tuple[list[dict], list[dict]]:
    small, large = (200, 2000) if quick else (2000, 20000)
    tiny_model(root)  # built once, before either run
    runs = [spawn_memory(root, small), spawn_memory(root, large)]
    ratio = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    rows = [{"run": f"{r['items']} webdataset items -> parquet", **r} for r in runs]
    return rows, [target(f"peak RSS, {large} items / {small} items", ratio, "<= 1.1", ratio <= 1.1)]


# ----------------------------------------------------------------------------- 4. processes


def processes(root: Path, quick: bool) -> tuple[list[dict], dict]:
    count = 32 if quick else 256
    folder = root / "procs"
    folder.mkdir()
    make_photos(folder, count)
    for i, path in enumerate(sorted(folder.iterdir())):
        path.rename(folder / f"p-{i:04d}.jpg")
    model_dir = (
        root / "blip-base"
        if (root / "blip-base").is_dir()
        else build_blip(root, "BlipForConditionalGeneration", quick)
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    rows, seconds = [], {}
    for n in (1, 2):
        out = root / f"procs-{n}.jsonl"
        args = [
            "-m",
            "blip_toolkit",
            "caption",
            str(folder),
            "-m",
            str(model_dir),
            "--max-new-tokens",
            "8" if quick else "20",
            "--output",
            str(out),
            "-f",
            "json",
        ]
        if n == 1:
            command = [sys.executable, *args]
        else:
            command = [
                str(accelerate),
                "launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                *args,
            ]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{n} process run failed: {proc.stderr[-2000:]}")
        summary = json.loads(proc.stdout)
        seconds[n] = summary["seconds"]
        rows.append(
            {
                "run": f"{n} process(es)",
                "images": count,
                "run seconds": summary["seconds"],
                "wall seconds (with start-up)": wall,
                "images/s": count / summary["seconds"],
            }
        )
    same = (root / "procs-1.jsonl").read_bytes() == (root / "procs-2.jsonl").read_bytes()
    return rows, {"2 processes / 1, run time": seconds[2] / seconds[1], "outputs identical": same}


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    from blip_toolkit.log import setup_logging

    setup_logging(-1)
    if args.worker == "memory":
        print(json.dumps(memory_worker(args)))
        return 0
    rows, targets, notes = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        root = Path(tmp)
        if args.part in ("all", "overhead"):
            r, t, n = overhead(root, args.quick)
            rows += r
            targets += t
            notes.update(n)
        if args.part in ("all", "decode"):
            r, n = decode_bound(root, args.quick)
            rows += r
            notes.update(n)
        if args.part in ("all", "memory"):
            r, t = memory(root, args.quick)
            rows += r
            targets += t
        if args.part in ("all", "processes"):
            r, n = processes(root, args.quick)
            rows += r
            notes.update(n)
    report("infer", rows, quick=args.quick, targets=targets, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
