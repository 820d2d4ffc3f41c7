"""The DiT recipe study on tiny real-class encoders (docs/dit-recipes.md, "Tiny real-class encoders").

Each variant is `configs/dit-demo.toml` plus overrides, trained, tuned and scored through the CLI
exactly as the table's commands say: train-dit on the train shards, a guidance sweep on the
validation pairs (`eval-recall --update-run` keeps the best scale), then image-to-text R@1 of the
generated features on the test pairs beside the target encoder's own. Not part of `make bench` (it
takes about an hour); run it alone:

    python bench/dit_recipes.py [--work DIR] [--sets tiny-random tiny-weak tiny-weak-mean] [--variants NAME ...] [--lanes 2]

Encoder sets (checkpoints built with the real transformers classes, the tests' tiny size):
  tiny-random  conditioning: a random-weight CLIP; target: a random-weight BLIP ITM model
  tiny-weak    the same CLIP; target: that BLIP ITM model after one epoch of `blip finetune --task
               retrieval` on the demo's training pairs (a weak but real target)
  tiny-weak-mean  tiny-weak's encoders, but the target head that scores the generated tokens
               mean-pools the patch tokens (`extract-embeddings --head-pool mean`) instead of taking
               CLS; the target's own embedding is unchanged (its CLS projection)
Data: the full demo's digit pairs (`blip demo`'s write_dataset, seed 0: 4000 train, 100 validation,
560 test pairs). Writes bench/results/dit_recipes.json and prints a Markdown table."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import REPO, RESULTS, machine_line

from blip_toolkit.demo.data import CORPUS, write_dataset
from blip_toolkit.models.scratch.checkpoints import build_checkpoint
from tests.builders import TEST_SIZE

BLIP = str(Path(sys.executable).with_name("blip"))
CONFIG = REPO / "configs" / "dit-demo.toml"
SETS = ("tiny-random", "tiny-weak", "tiny-weak-mean")
SWEEP = ("1", "2", "3", "4")
# name -> train-dit overrides (appended to `blip train-dit -c configs/dit-demo.toml ...`)
VARIANTS: dict[str, list[str]] = {
    "no contrastive term": ["--set", "flow.contrastive_weight=0"],
    "image positive, weight 0.1": ["--set", "flow.contrastive_positive=image", "--set", "flow.contrastive_weight=0.1"],
    "image positive, weight 0.5": ["--set", "flow.contrastive_positive=image"],
    "image positive on the tokens, weight 0.5": [
        "--set", "flow.contrastive_positive=image", "--set", "flow.contrastive_space=tokens",
    ],
    "text positive, weight 0.1": ["--set", "flow.contrastive_weight=0.1"],
    "text positive, weight 0.5 (the recipe)": [],
    "text positive, weight 1.0": ["--set", "flow.contrastive_weight=1.0"],
    "text positive, temperature 0.2": ["--set", "flow.contrastive_temperature=0.2"],
    "text positive, 800 steps": ["--steps", "800", "--eval-every", "400"],
    "text positive, learned head": ["--set", "flow.contrastive_head=learned"],
}  # fmt: skip


def run(cmd: list[str], log: Path, threads: int) -> str:
    """Run one CLI command (printed as it would be typed), its stderr to `log`; return its stdout."""
    shown = " ".join(shlex.quote(part) for part in ["blip", *cmd[1:]]) if cmd[0] == BLIP else shlex.join(cmd)
    print(f"$ {shown}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BLIP_CPU_AUTO_DTYPE": "float32"}
    with log.open("a") as err:
        err.write(f"$ {shown}\n")
        err.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"{shown} exited {done.returncode}; see {log}")
    return done.stdout


def prepare(work: Path, name: str) -> Path:
    """The encoders and the train / val / test embedding shards of one encoder set."""
    data = work / "data"
    if not (data / "retrieval-test.tsv").is_file():
        write_dataset(data, train=4000, val=100, test_per_combo=4, seed=0)
    root = work / name
    models, emb, log = root / "models", root / "emb", root / "log.txt"
    root.mkdir(parents=True, exist_ok=True)
    cond = build_checkpoint("clip", models / "cond", size=TEST_SIZE, corpus=CORPUS, seed=0)
    target = build_checkpoint("blip-itm", models / "target-init", size=TEST_SIZE, corpus=CORPUS, seed=1)
    if name.startswith("tiny-weak"):
        trained = work / "tiny-weak" / "models" / "target"  # one trained target for both tiny-weak sets
        if not (trained / "model.safetensors").is_file():
            run(
                [BLIP, "finetune", str(data / "retrieval-train.tsv"), "--task", "retrieval", "-m", str(target),
                 "-o", str(trained), "--epochs", "1", "--lr", "1e-3", "--warmup-steps", "20", "-b", "32",
                 "--seed", "0", "--overwrite"],
                log, threads=2,
            )  # fmt: skip
        target = trained
    head_pool = "mean" if name.endswith("-mean") else "cls"
    for split in ("train", "val", "test"):
        if not (emb / split / "index.json").is_file():
            run(
                [BLIP, "extract-embeddings", str(data / f"retrieval-{split}.tsv"), "--out", str(emb / split),
                 "--cond-encoder", str(cond), "--target-encoder", str(target), "--tokens", "cls+patch",
                 "--head-pool", head_pool, "--dtype", "float32", "--device", "cpu", "--num-workers", "0",
                 "--overwrite"],
                log, threads=2,
            )  # fmt: skip
    return emb


def variant(work: Path, name: str, emb: Path, label: str, overrides: list[str]) -> dict:
    """Train, tune guidance on the validation pairs, score the test pairs; one row."""
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    runs = work / name / "runs"
    run_dir, log = runs / slug, runs / f"{slug}.log"
    runs.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    start = time.perf_counter()
    run(
        [BLIP, "train-dit", "-c", str(CONFIG), "-d", str(emb / "train"), "-o", str(run_dir),
         "--set", "data.split_seed=0", "--overwrite", *overrides],
        log, threads=1,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    sweep = runs / f"{slug}-sweep"
    run([BLIP, "sample", "--checkpoint", str(run_dir), "--data", str(emb / "val"), "--out", str(sweep),
         "--cfg-scale", *SWEEP, "--seed", "0", "--overwrite"], log, threads=1)  # fmt: skip
    recall = [BLIP, "eval-recall", "--format", "json", "--dedupe-captions", "--generated"]
    tuned = json.loads(
        run([*recall, str(sweep), str(emb / "val"), "--k", "1", "5", "--update-run"], log, threads=1)
    )
    test = runs / f"{slug}-test"
    run([BLIP, "sample", "--checkpoint", str(run_dir), "--data", str(emb / "test"), "--out", str(test),
         "--cfg-scale", *SWEEP, "--seed", "0", "--overwrite"], log, threads=1)  # fmt: skip
    scored = json.loads(run([*recall, str(test), str(emb / "test"), "--k", "1", "5", "10"], log, threads=1))
    chosen = tuned["best"]["cfg_scale"]
    by_scale = {row["cfg_scale"]: row["i2t"]["R@1"] for row in scored["sweep"]}
    target = scored["features"]["baseline"]["i2t"]["R@1"]
    generated = by_scale[chosen]
    row = {
        "set": name,
        "variant": label,
        "overrides": " ".join(overrides) or "none",
        "guidance chosen on val": chosen,
        "generated R@1": generated,
        "target R@1": target,
        "of target": generated / target if target else None,
        "test at cfg 1/2/3/4": [by_scale[float(s)] for s in SWEEP],
        "train s": round(seconds),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dit-recipes"))
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lanes", type=int, default=2, help="variants trained at once (one thread each)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    jobs = [(name, prepare(args.work, name)) for name in args.sets]
    with ThreadPoolExecutor(args.lanes) as pool:
        futures = [
            pool.submit(variant, args.work, name, emb, label, VARIANTS[label])
            for name, emb in jobs
            for label in args.variants
        ]
        rows = [f.result() for f in futures]
    path = RESULTS / "dit_recipes.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    keep = [r for r in old if (r["set"], r["variant"]) not in {(r2["set"], r2["variant"]) for r2 in rows}]
    path.write_text(json.dumps({"machine": machine_line(), "rows": keep + rows}, indent=1))
    print(
        "\n| set | variant | overrides | guidance | generated R@1 | target R@1 | of target | test at cfg 1/2/3/4 | train s |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in keep + rows:
        print(
            f"| {r['set']} | {r['variant']} | `{r['overrides']}` | {r['guidance chosen on val']:g} | "
            f"{r['generated R@1']:.2%} | {r['target R@1']:.2%} | {r['of target']:.3f} | "
            + " / ".join(f"{v * 100:.2f}" for v in r["test at cfg 1/2/3/4"])
            + f" | {r['train s']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
