"""LoRA against full fine-tuning on CPU: trainable parameters, peak RSS and samples/s of
`blip finetune --lora` and of full fine-tuning (`--freeze none`) of a BLIP-2 whose OPT language model
has 353M parameters (random weights, built with blip_toolkit.models.scratch); and learning: LoRA fine-tuning
of the demo's caption task (the digits, the demo's model size, from scratch) reaching its test
accuracy, next to the demo's full fine-tuning recipe.

Each fine-tuning run of the large model is its own process (its peak RSS is its own); LoRA and full
runs alternate for `rounds` rounds. Samples/s is the median time between step ends after the first
step, over the steps of every round, with the slowest and fastest step beside it.

    python bench/bench_lora.py            # full: 353M-parameter OPT, 2 rounds of 5 steps; 20 demo epochs
    python bench/bench_lora.py --quick    # small model and few digits: checks the script works
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import caption_in_order, demo_caption_task, parse_args, peak_rss_mb, rate_range, report, target

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "data" / "samples"
BATCH = 4
# BLIP-2 with an OPT of 353M parameters (hidden 1024, 28 layers, FFN 4096: OPT-350m's width with
# four more layers, as the local vocabulary is small), a 6-layer 768-wide Q-Former with 32 queries
# and a small ViT. The same model as bench_quantize.py.
BLIP2_350M = dict(
    image_size=224, patch_size=32, hidden=384, layers=6, heads=16, intermediate=1536, text_hidden=1024,
    text_layers=28, lm_intermediate=4096, qformer_hidden=768, qformer_layers=6, num_query_tokens=32,
)  # fmt: skip
QUICK_SIZE = dict(image_size=64, patch_size=16, hidden=64, layers=2, heads=4, intermediate=128)
# LoRA on the demo's caption model: the settings this benchmark reports (rank 16, alpha 32, no
# dropout, the demo's batch and warm-up with a LoRA-sized learning rate).
DEMO_LORA = dict(lora=True, lora_r=16, lora_alpha=32.0, lora_dropout=0.0, learning_rate=5e-3)


# ----------------------------------------------------------------------------- one run (subprocess)


def child(mode: str, model_dir: str, manifest: str, steps: int, out: str) -> None:
    from blip_toolkit.log import setup_logging
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune

    setup_logging(-1)
    extra = dict(lora=True) if mode == "lora" else dict(freeze=["none"])
    result = run_finetune(
        FinetuneConfig(
            manifest=manifest,
            task="caption",
            model=model_dir,
            output_dir=out,
            max_steps=steps,
            batch_size=BATCH,
            learning_rate=1e-4,
            save_every=10**9,
            keep_checkpoints=1,
            log_every=1,  # a record per step, written when the step ends: the step times
            cpu=True,
            **extra,
        )
    )
    times = [r["time"] for r in result.history if r["type"] == "train"]
    print(
        "RESULT "
        + json.dumps(
            {
                "trainable": result.trainable_parameters,
                "frozen": result.frozen_parameters,
                "step_seconds": [b - a for a, b in zip(times, times[1:], strict=False)],
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def run_child(mode: str, model_dir: Path, manifest: Path, steps: int, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(model_dir), str(manifest), str(steps), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{mode} run failed")
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])


def build(root: Path, quick: bool) -> tuple[Path, Path, int]:
    from safetensors import safe_open
    from transformers.utils import logging as hf_logging

    from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint

    hf_logging.disable_progress_bar()
    model = build_checkpoint(
        "blip2-opt", root / "blip2", size=ModelSize(**(QUICK_SIZE if quick else BLIP2_350M))
    )
    lines = [x for x in (SAMPLES / "captions.tsv").read_text().splitlines() if x and not x.startswith("#")]
    manifest = root / "train.tsv"
    rows = [f"{SAMPLES / x.split(chr(9))[0]}\t{x.split(chr(9))[1]}" for x in lines]
    manifest.write_text("\n".join(rows * 4) + "\n")
    lm = 0
    with safe_open(str(model / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            if key.startswith("language_model."):
                count = 1
                for n in handle.get_slice(key).get_shape():
                    count *= n
                lm += count
    return model, manifest, lm


# ----------------------------------------------------------------------------- learning on the digits


def demo_learning(root: Path, quick: bool) -> list[dict]:
    """LoRA and the demo's full fine-tuning of its caption model from the same from-scratch
    checkpoint; test accuracy = both digits of the pair named in order (the demo's measure)."""
    import torch

    from blip_toolkit.log import setup_logging
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune

    setup_logging(-1)
    torch.set_num_threads(1)  # a 128-wide model: one thread is fastest (and steady on a shared machine)
    task = demo_caption_task(root, quick)
    rows = []
    for name, settings in (("LoRA", DEMO_LORA), ("full (the demo's recipe)", {})):
        out = root / f"digits-{len(rows)}"
        started = time.perf_counter()
        result = run_finetune(
            FinetuneConfig(
                manifest=task["manifest"],
                task="caption",
                model=task["init"],
                output_dir=str(out),
                epochs=task["epochs"],
                seed=0,
                log_every=10_000,
                **{**task["finetune"], **settings},
            )
        )
        seconds = time.perf_counter() - started
        scored = caption_in_order(str(out), task["images"], task["truth"])
        rows.append(
            {
                "digits caption run": name,
                "trainable params": result.trainable_parameters,
                "epochs": task["epochs"],
                "learning rate": settings.get("learning_rate", task["finetune"]["learning_rate"]),
                "train samples/s": result.train_samples_per_second,
                "seconds": seconds,
                "test accuracy (both digits in order)": sum(ok for _, ok in scored) / len(scored),
                "test pairs": len(scored),
            }
        )
    return rows


# ----------------------------------------------------------------------------- driver


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, mode, model_dir, manifest, steps, out = sys.argv
        child(mode, model_dir, manifest, int(steps), out)
        return
    args = parse_args(__doc__.splitlines()[0])
    rounds, steps = (1, 3) if args.quick else (2, 6)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        root = Path(tmp)
        model, manifest, lm_params = build(root, args.quick)
        runs: dict[str, list[dict]] = {"lora": [], "full": []}
        for index in range(rounds):
            for mode in runs:
                runs[mode].append(run_child(mode, model, manifest, steps, root / f"out-{mode}-{index}"))
        learning = demo_learning(root, args.quick)
    rows = []
    for mode, results in runs.items():
        seconds = [s for r in results for s in r["step_seconds"]]
        rows.append(
            {
                "BLIP-2 OPT run": "--lora (defaults)" if mode == "lora" else "full (--freeze none)",
                "LM params (M)": lm_params / 1e6,
                "trainable params (M)": results[0]["trainable"] / 1e6,
                "trainable share": results[0]["trainable"] / (results[0]["trainable"] + results[0]["frozen"]),
                "samples/s (slowest-fastest step)": rate_range(seconds, BATCH),
                "peak RSS MB": statistics.median(r["peak_rss_mb"] for r in results),
                "timed steps": len(seconds),
            }
        )
    lora_s = statistics.median(s for r in runs["lora"] for s in r["step_seconds"])
    full_s = statistics.median(s for r in runs["full"] for s in r["step_seconds"])
    memory = rows[0]["peak RSS MB"] / rows[1]["peak RSS MB"]
    share = runs["lora"][0]["trainable"] / runs["full"][0]["trainable"]
    lora_accuracy = learning[0]["test accuracy (both digits in order)"]
    report(
        "lora",
        rows + learning,
        quick=args.quick,
        targets=[
            target("LoRA trainable parameters vs full", share, "< 0.02", share < 0.02),
            target("LoRA peak RSS vs full", memory, "< 0.7", memory < 0.7),
            target(
                "LoRA samples/s vs full (median step times)", full_s / lora_s, ">= 1", full_s / lora_s >= 1
            ),
            # LoRA adapts a from-scratch (random) model here, the hardest case for it; 10x chance (1 in
            # 100 ordered pairs) says it learned the composition, the full run's figure is in the table.
            target(
                "LoRA test caption accuracy on the digit pairs (both in order)",
                lora_accuracy,
                ">= 0.10",
                lora_accuracy >= 0.10,
            ),
        ],
        notes={
            "language model parameters (M)": round(lm_params / 1e6, 1),
            "BLIP-2 runs": f"batch {BATCH}, {steps} steps per run ({steps - 1} timed), {rounds} round(s), CPU float32",
            "LoRA on the digits": DEMO_LORA,
        },
    )


if __name__ == "__main__":
    main()
