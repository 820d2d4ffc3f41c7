"""`blip eval retrieval` (LAVIS's ITC shortlist + ITM re-rank) at benchmark scale, with a tiny ITM model.

Data: 1,000 generated 32x32 PNG images x 5 captions each (5,000 texts) and the tiny BLIP ITM
checkpoint of the tests (`tests.builders`, ~0.3 MB of weights), so the numbers show the
protocol's own cost (ITC blocks, shortlists, pair bookkeeping) and how ITM work scales, not a real
model's speed.

Per k_test (each run in a process of its own, through `evaluate_retrieval`, the library function
behind the CLI):
- wall time and peak RSS above the process's RSS once the model is loaded;
- ITM pairs scored: must lie in [max(I, T) * k, (I + T) * k], i.e. grow with k_test and not with
  the I * T pairs;
- the reference, measured in the same worker: scoring ALL I * T pairs with the same ITM code
  (timed on the first images, extrapolated linearly: ITM cost is linear in pairs), which is what
  ranking with the ITM head alone would cost.

`--quick`: 100 images x 500 captions, k_test 8 and 32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_args, peak_rss_mb, report, target

WORDS = "a photo of cat dog two cats laying on couch man riding bike down street child flying kite park red car".split()


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # k_test of a worker run
    parser.add_argument("--data", help=argparse.SUPPRESS)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_data(root: Path, num_images: int, captions_per_image: int = 5) -> tuple[Path, Path, Path]:
    """Images, a Karpathy-style annotation file and the tiny BLIP ITM checkpoint under `root`."""
    from PIL import Image

    from tests.builders import TEST_SIZE, build_checkpoint

    rng = random.Random(0)
    images = root / "images"
    images.mkdir()
    entries = []
    for i in range(num_images):
        pixels = bytes(rng.randrange(256) for _ in range(32 * 32 * 3))
        Image.frombytes("RGB", (32, 32), pixels).save(images / f"{i:05d}.png")
        captions = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(captions_per_image)
        ]
        entries.append({"image": f"{i:05d}.png", "caption": captions})
    annotations = root / "coco_test.json"
    annotations.write_text(json.dumps(entries))
    model = build_checkpoint("blip-itm", root / "blip-itm", size=TEST_SIZE, seed=0)
    return annotations, images, model


def worker(args: argparse.Namespace) -> dict:
    import torch

    from blip_toolkit.jobs.eval_itm_features import ItmModel
    from blip_toolkit.jobs.eval_retrieval import evaluate_retrieval
    from blip_toolkit.jobs.evaluate import RetrievalEvalConfig
    from blip_toolkit.models.loading import load_model

    # One thread: on this shared 2-core machine two OpenMP threads made the small ITM batches up to 30x
    # slower whenever another process held a core (measured 37 s vs 1.3 s for the same 4,726 pairs).
    torch.set_num_threads(1)
    root = Path(args.data)
    annotations, images, model = root / "coco_test.json", root / "images", root / "blip-itm"
    loaded = load_model(str(model), "retrieval")  # warm the caches; the run loads its own copy
    del loaded
    baseline = current_rss_mb()
    start = time.perf_counter()
    report_ = evaluate_retrieval(
        RetrievalEvalConfig(
            annotations=str(annotations),
            images=str(images),
            model=str(model),
            k_test=args.worker,
            device="cpu",
        )
    )
    seconds = time.perf_counter() - start
    peak = peak_rss_mb() - baseline
    protocol = report_["protocol"]
    num_images, num_texts = report_["scored"]["images"], report_["scored"]["texts"]

    # Reference: ITM on every pair of the first few images (same scorer code and batch size).
    scorer = ItmModel(load_model(str(model), "retrieval"), batch_size=8, itm_batch_size=32)
    entries = json.loads(annotations.read_text())
    scorer.encode_texts([c for e in entries for c in e["caption"]])
    sample = max(2, num_images // 50)
    scorer.encode_images([str(images / e["image"]) for e in entries[:sample]])
    pairs_i = torch.arange(sample).repeat_interleave(num_texts)
    pairs_t = torch.arange(num_texts).repeat(sample)
    t0 = time.perf_counter()
    scorer.itm_scores(pairs_i, pairs_t)
    all_pairs_seconds = (time.perf_counter() - t0) * num_images / sample
    return {
        "k_test": args.worker,
        "images": num_images,
        "texts": num_texts,
        "seconds": seconds,
        "encode_s": report_["seconds"]["encode"],
        "peak_mb": peak,
        "itm_pairs": protocol["itm_pairs"],
        "lavis_passes": protocol["shortlist_entries"],
        "all_pairs": protocol["all_pairs"],
        "all_pairs_itm_s": all_pairs_seconds,
        "r_mean": report_["metrics"]["r_mean"],
    }


def spawn(k_test: int, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(k_test), "--data", str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker k_test={k_test} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    num_images = 100 if args.quick else 1000
    ks = (8, 32) if args.quick else (16, 64, 256)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, num_images)
        rows = [spawn(k, root) for k in ks]
    targets = []
    for row in rows:
        k, images, texts = row["k_test"], row["images"], row["texts"]
        row["speedup"] = row["all_pairs_itm_s"] / row["seconds"]
        targets.append(
            target(
                f"ITM pairs at k_test={k} between max(I,T)*k and (I+T)*k",
                row["itm_pairs"],
                f"{max(images, texts) * k}..{(images + texts) * k}",
                max(images, texts) * k <= row["itm_pairs"] <= (images + texts) * k,
            )
        )
    last = rows[-1]
    targets.append(
        target(
            f"ITM pairs / all I*T pairs at k_test={last['k_test']}",
            last["itm_pairs"] / last["all_pairs"],
            "<= (I+T)*k/(I*T)",
            last["itm_pairs"] <= (last["images"] + last["texts"]) * last["k_test"] < last["all_pairs"],
        )
    )
    report(
        "eval_retrieval",
        rows,
        quick=args.quick,
        targets=targets,
        notes={
            "model": "tiny BLIP ITM (tests.builders TEST_SIZE), 1 thread",
            "columns": "seconds: evaluate_retrieval wall time (model load, encoding, ITC, ITM); encode_s: "
            "texts + images; peak_mb: peak RSS over the RSS after a first model load; itm_pairs: pairs "
            "through the ITM head; lavis_passes: (I+T)*k, what LAVIS scores; all_pairs_itm_s: ITM on all "
            "I*T pairs, timed on I/50 images and extrapolated; speedup: all_pairs_itm_s / seconds",
        },
    )


if __name__ == "__main__":
    main()
