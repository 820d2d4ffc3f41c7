"""`--engine ray` on this machine: a local Ray head (`ray start --head --num-cpus 2` on 127.0.0.1,
started and stopped here) against the local engine.

1. Throughput: `blip caption FOLDER --output` over 64 JPEGs of 640x480 with a BLIP-base-sized captioning
   model (random weights), the whole job each time (model loading included: Ray's actors load their
   own), local engine vs Ray with 2 actors and with 1 actor; interleaved rounds. Reported, no target:
   on one 2-core machine Ray's actors and read tasks share the same two cores the local engine uses,
   so this measures Ray's overhead, not its scaling.
2. Driver memory: peak RSS of the driver process (VmHWM) over a Parquet file of 20,000 rows against
   2,000 (small JPEGs, the tiny model, 2 actors); target <= 1.1x: results stream through the driver's
   journal, it holds no dataset.
3. Projection: the per-actor rate of (1) and the driver's own cost per record (journal + merge, timed
   from a run whose actors are far faster than the driver: the tiny model), so N nodes x A actors give
   about min(N * A * per-actor rate, 1 / driver cost per record) records/s, if the object store and the
   network keep up (they are not measured here).

`--quick`: 16 photos with a 2-layer model at 96 px, one round; 2,000 vs 200 rows.
"""

from __future__ import annotations

import os

# Ray's single-machine mode: the head and this driver on 127.0.0.1 only (tests/servers.py ray_head);
# read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # a token of this run (tests/servers.py ray_token)
os.environ.setdefault("RAY_AUTH_TOKEN", __import__("secrets").token_hex(32))

import argparse  # noqa: E402
import json
import shutil
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
    report,
    target,
)
from bench_pipeline import small_jpegs, tiny_model, write_parquet

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.servers import ray_head  # noqa: E402 - the same head the tests start


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=["all", "throughput", "memory"], default="all")
    parser.add_argument("--worker", choices=["driver"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)


def caption_job(
    model: Path, inputs: list[str], out: Path, *, ray=None, max_new_tokens: int = 20, columns=None
):
    """What `blip caption INPUTS --output OUT [--engine ray ...]` runs, model loading included."""
    from blip_toolkit.jobs.inference import OutputJob, run_to_file
    from blip_toolkit.jobs.predict import captioning
    from blip_toolkit.models.spec import LoadSpec
    from blip_toolkit.pipeline.sources import open_inputs
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    options = CaptionOptions(
        batch_size=8, generation=GenerationOptions(max_new_tokens=max_new_tokens), num_workers=None
    )
    source = open_inputs(inputs, columns=columns)
    job = OutputJob(str(out), overwrite=True)
    return run_to_file(captioning(options), source, LoadSpec(model=str(model), device="cpu"), job, ray)


def ray_options(address: str, actors: int):
    from blip_toolkit.pipeline.ray_engine import RayOptions

    # Actors of half a CPU leave a CPU of the 2-CPU head to the read tasks.
    return RayOptions(address=address, num_actors=actors, cpus_per_actor=0.5)


def throughput(root: Path, address: str, quick: bool) -> tuple[list[dict], dict, list[dict]]:
    from blip_toolkit.pipeline.outputs import read_output

    count, rounds = (16, 1) if quick else (64, 2)
    model = build_blip(root, "BlipForConditionalGeneration", quick)
    folder = root / "photos"
    folder.mkdir()
    make_photos(folder, count)
    outputs: dict[str, list] = {}

    def run(name, ray):
        def job():
            out = root / f"{name}.jsonl"
            caption_job(model, [str(folder)], out, ray=ray, max_new_tokens=8 if quick else 20)
            outputs[name] = read_output(out)

        return job

    functions = {
        "local": run("local", None),
        "ray-2": run("ray-2", ray_options(address, 2)),
        "ray-1": run("ray-1", ray_options(address, 1)),
    }
    times = interleaved_rounds(functions, rounds, warmup=0)
    same = outputs["ray-2"] == outputs["local"] and outputs["ray-1"] == outputs["local"]
    names = {
        "local": "local engine (blip caption --output)",
        "ray-2": "--engine ray, 2 actors",
        "ray-1": "--engine ray, 1 actor",
    }
    rows = [
        {
            "run": names[key],
            "images": count,
            "images/s (slowest-fastest round)": rate_range(times[key], count),
            "vs local": sorted(times["local"])[len(times["local"]) // 2]
            / sorted(times[key])[len(times[key]) // 2],
        }
        for key in functions
    ]
    per_actor = count / sorted(times["ray-1"])[len(times["ray-1"]) // 2]
    targets = [target("Ray's records equal the local engine's", float(same), "1", same)]
    return rows, {"per_actor_rate": per_actor, "rounds": rounds}, targets


def driver_worker(args: argparse.Namespace) -> dict:
    from blip_toolkit.pipeline.tables import TableColumns

    root = Path(args.root)
    jpegs = small_jpegs()
    table = write_parquet(
        root / f"rows-{args.items}.parquet", [jpegs[i % len(jpegs)] for i in range(args.items)]
    )
    model = tiny_model(root)
    start = time.perf_counter()
    summary = caption_job(
        model,
        [str(table)],
        root / f"out-{args.items}.jsonl",
        ray=ray_options(args.address, 2),
        max_new_tokens=3,
        columns=TableColumns(key="key"),
    )
    return {"items": summary.records, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def driver_memory(root: Path, address: str, quick: bool) -> tuple[list[dict], list[dict], dict]:
    small, large = (200, 2000) if quick else (2000, 20000)
    tiny_model(root)
    runs = []
    for items in (small, large):
        command = [
            sys.executable,
            __file__,
            "--worker",
            "driver",
            "--items",
            str(items),
            "--root",
            str(root),
            "--address",
            address,
        ]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"driver run failed: {proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ratio = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    rows = [
        {
            "run": f"Ray driver, Parquet of {r['items']} rows (tiny model, 2 actors)",
            "peak RSS MB": r["peak_rss_mb"],
            "images/s": r["items"] / r["seconds"],
        }
        for r in runs
    ]
    return (
        rows,
        [target(f"driver peak RSS, {large} rows / {small} rows", ratio, "<= 1.1", ratio <= 1.1)],
        runs[1],
    )


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    if args.worker == "driver":
        print(json.dumps(driver_worker(args)))
        return 0
    import tempfile

    rows, targets, notes = [], [], {}
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        with ray_head(root / "head", num_cpus=2) as head:
            if args.part in ("all", "throughput"):
                (root / "throughput").mkdir()
                t_rows, facts, t_targets = throughput(root / "throughput", head.address, args.quick)
                rows += t_rows
                targets += t_targets
                notes["per-actor rate"] = (
                    f"{facts['per_actor_rate']:.3f} images/s (BLIP-base, one actor of half a CPU here)"
                )
            if args.part in ("all", "memory"):
                (root / "memory").mkdir()
                m_rows, m_targets, large = driver_memory(root / "memory", head.address, args.quick)
                rows += m_rows
                targets += m_targets
                driver_rate = large["items"] / large["seconds"]
                notes["driver rate"] = (
                    f"{driver_rate:.1f} records/s taken in with the tiny model, whose actors were the limit: "
                    "the driver's journal and merge absorb at least this"
                )
                if "per-actor rate" in notes:
                    per_actor = facts["per_actor_rate"]
                    notes["projection"] = (
                        f"N nodes x A actors: about N * A * {per_actor:.3f} images/s for this model on CPU actors "
                        f"like these, until the driver's {driver_rate:.0f} records/s; e.g. 8 nodes x 4 actors: "
                        f"{min(32 * per_actor, driver_rate):.1f} images/s. A GPU actor's rate replaces the CPU one."
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    notes["what one machine shows"] = (
        "the engine's overhead and that its results equal the local engine's; not scaling: Ray's actors "
        "share this machine's 2 cores with each other and with the read tasks"
    )
    report("ray", rows, quick=args.quick, targets=targets, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
