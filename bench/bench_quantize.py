"""Quantized inference on CPU (`--quantize int8|4bit`) against float32: memory and images/s of a
BLIP-base-sized captioner and of a BLIP-2 whose OPT language model has >= 350M parameters (random
weights, built with blip_toolkit.models.scratch), and the caption accuracy of the demo's fine-tuned caption
model (the digits, trained here with the demo's recipe) quantized against float32.

Every (model, mode) runs in its own process (its peak RSS is its own); the processes of one model
alternate mode by mode for `rounds` rounds, so a burst of load from other work falls on every mode.
Each process loads the model through `runtime.loading.load_model` (what `blip caption --quantize`
does), runs one untimed warm-up batch, then times captioning batches with a fixed number of new
tokens (min = max), so every mode does the same work. Also measured, for the choice of the CPU int8
path: bitsandbytes' LLM.int8() on CPU (transformers' `BitsAndBytesConfig(load_in_8bit=True)`).
Targets: `int8`'s peak RSS below float32's, and the demo's caption accuracy within 2 points of
float32's; 4bit's peak RSS is reported without a target (FOUR_BIT_MEMORY says why).

    python bench/bench_quantize.py            # full sizes
    python bench/bench_quantize.py --quick    # small models: checks the script works
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
MODES = ("float32", "int8", "4bit", "bnb-int8")

# BLIP base (Salesforce/blip-image-captioning-base's shapes: ViT-B/16 at 384 px, BERT-base decoder;
# the vocabulary is the small local one).
BLIP_BASE = dict(
    image_size=384, patch_size=16, hidden=768, layers=12, heads=12, intermediate=3072, projection=256,
    max_text_positions=512,
)  # fmt: skip
# BLIP-2 with an OPT of 353M parameters (hidden 1024, 28 layers, FFN 4096: OPT-350m's width with
# four more layers, as the local vocabulary is small), a 6-layer 768-wide Q-Former with 32 queries
# and a small ViT (its cost is not what this measures).
BLIP2_350M = dict(
    image_size=224, patch_size=32, hidden=384, layers=6, heads=16, intermediate=1536, text_hidden=1024,
    text_layers=28, lm_intermediate=4096, qformer_hidden=768, qformer_layers=6, num_query_tokens=32,
)  # fmt: skip
# Why 4bit has no memory target on CPU: without AVX512-BF16 (this machine), bitsandbytes' CPU 4-bit
# matmul dequantizes each weight to a float copy in every forward pass; the packed weights are small,
# but glibc's heap keeps those per-call copies (with MALLOC_MMAP_THRESHOLD_=1048576 the run's RSS
# falls to a fraction, at twice the time), so 4bit on such a CPU saves no memory during a run.
FOUR_BIT_MEMORY = (
    "no target: without AVX512-BF16, bitsandbytes dequantizes every 4-bit weight to float in each "
    "forward pass, and the heap keeps those copies (the comment above FOUR_BIT_MEMORY in bench_quantize.py)"
)
QUICK_SIZE = dict(image_size=64, patch_size=16, hidden=64, layers=2, heads=4, intermediate=128)


def build_models(root: Path, quick: bool) -> dict[str, Path]:
    from transformers.utils import logging as hf_logging

    from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint

    hf_logging.disable_progress_bar()
    sizes = {"blip-caption": BLIP_BASE, "blip2-opt": BLIP2_350M}
    return {
        kind: build_checkpoint(kind, root / kind, size=ModelSize(**(QUICK_SIZE if quick else size)))
        for kind, size in sizes.items()
    }


# ----------------------------------------------------------------------------- one process


def child(model_dir: str, mode: str, batches: int, batch: int, tokens: int) -> None:
    import psutil
    import torch
    import transformers

    from blip_toolkit.data.images import open_image
    from blip_toolkit.log import setup_logging
    from blip_toolkit.models.loading import LoadedModel, inspect_source, load_model, load_processor
    from blip_toolkit.predictors.generation import generate
    from blip_toolkit.predictors.options import GenerationOptions

    setup_logging(-1)
    images = [open_image(p) for p in sorted(SAMPLES.glob("*.jpg"))]
    images = (images * batch)[:batch]
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if mode == "bnb-int8":  # bitsandbytes' CPU LLM.int8(), straight through transformers
        resolved, family = inspect_source(model_dir)
        model = (
            family.model_class()
            .from_pretrained(
                model_dir,
                quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
                device_map={"": "cpu"},
            )
            .eval()
        )
        loaded = LoadedModel(
            model_dir, family, model, load_processor(resolved), torch.device("cpu"), torch.float32
        )
    else:
        loaded = load_model(model_dir, "caption", quantize=None if mode == "float32" else mode)
    load_seconds = time.perf_counter() - start
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens)
    prompts = [""] * batch if loaded.family.is_blip2 else None
    captions = generate(loaded, images, prompts, options)  # warm-up
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        generate(loaded, images, prompts, options)
        times.append(time.perf_counter() - start)
    weights = sum(
        t.numel() * t.element_size()
        for t in list(loaded.model.state_dict().values())
        if isinstance(t, torch.Tensor)
    )
    result = {
        "seconds": times,
        "load_seconds": load_seconds,
        "rss_after_mb": (psutil.Process().memory_info().rss - before) / 2**20,
        "peak_rss_mb": peak_rss_mb(),
        "state_dict_mb": weights / 2**20,
        "captions": captions,
    }
    print("RESULT " + json.dumps(result))


def run_child(model_dir: Path, mode: str, batches: int, batch: int, tokens: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(model_dir), mode, str(batches), str(batch), str(tokens)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])


# ----------------------------------------------------------------------------- quality on the digits


def demo_quality(root: Path, quick: bool) -> dict:
    """Fine-tune the demo's caption model (its data, model size and recipe), then caption the test
    pairs in float32, int8 and 4bit: accuracy = both digits named in order (the demo's measure)."""
    from blip_toolkit.log import setup_logging
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune

    setup_logging(-1)
    task = demo_caption_task(root, quick)
    out = root / "digits-caption"
    run_finetune(
        FinetuneConfig(
            manifest=task["manifest"],
            task="caption",
            model=task["init"],
            output_dir=str(out),
            epochs=task["epochs"],
            seed=0,
            log_every=10_000,
            **task["finetune"],
        )
    )
    scored = {
        mode: caption_in_order(str(out), task["images"], task["truth"], None if mode == "float32" else mode)
        for mode in ("float32", "int8", "4bit")
    }
    rows = []
    for mode, results in scored.items():
        rows.append(
            {
                "mode": mode,
                "test pairs": len(results),
                "caption accuracy (both digits in order)": sum(ok for _, ok in results) / len(results),
                "captions identical to float32": sum(
                    a == b for (a, _), (b, _) in zip(results, scored["float32"])
                )
                / len(results),
                "errors (empty output)": sum(t is None for t, _ in results),
            }
        )
    return {"rows": rows, "epochs": task["epochs"]}


# ----------------------------------------------------------------------------- driver


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model_dir, mode, batches, batch, tokens = sys.argv
        child(model_dir, mode, int(batches), int(batch), int(tokens))
        return
    args = parse_args(__doc__.splitlines()[0])
    rounds, batches, batch, tokens = (1, 1, 2, 4) if args.quick else (2, 2, 4, 20)
    rows, targets, notes = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        root = Path(tmp)
        models = build_models(root, args.quick)
        for kind, path in models.items():
            runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for _ in range(rounds):
                for mode in MODES:
                    runs[mode].append(run_child(path, mode, batches, batch, tokens))
            params, lm_params = _params(path)
            if lm_params:
                notes[f"{kind} language model parameters (M)"] = round(lm_params / 1e6, 1)
            base = runs["float32"]
            for mode, results in runs.items():
                if any("error" in r for r in results):
                    rows.append(
                        {
                            "model": kind,
                            "mode": mode,
                            "error": next(r["error"] for r in results if "error" in r),
                        }
                    )
                    continue
                seconds = [s for r in results for s in r["seconds"]]
                rows.append(
                    {
                        "model": kind,
                        "params_M": params / 1e6,
                        "mode": mode,
                        "images/s (slowest-fastest batch)": rate_range(seconds, batch),
                        "weights MB (state_dict)": statistics.median(r["state_dict_mb"] for r in results),
                        "RSS after load + run, MB": statistics.median(r["rss_after_mb"] for r in results),
                        "peak RSS MB": statistics.median(r["peak_rss_mb"] for r in results),
                        "load s": statistics.median(r["load_seconds"] for r in results),
                        "captions = float32": all(
                            r["captions"] == b["captions"] for r, b in zip(results, base)
                        ),
                    }
                )
            fp32 = [s for r in base for s in r["seconds"]]
            for mode in ("int8", "4bit"):
                if any("error" in r for r in runs[mode]):
                    continue
                mine = [s for r in runs[mode] for s in r["seconds"]]
                memory = statistics.median(r["peak_rss_mb"] for r in runs[mode]) / statistics.median(
                    r["peak_rss_mb"] for r in base
                )
                speed = statistics.median(fp32) / statistics.median(mine)
                if mode == "int8":
                    targets.append(target(f"{kind} {mode}: peak RSS vs float32", memory, "< 1", memory < 1))
                else:  # reported, no target: see FOUR_BIT_MEMORY
                    notes[f"{kind} {mode} peak RSS vs float32"] = round(memory, 3)
                notes[f"{kind} {mode} images/s vs float32"] = round(speed, 3)
        quality = demo_quality(root, args.quick)
    rows += [{"model": "demo caption (digits)", **row} for row in quality["rows"]]
    by_mode = {row["mode"]: row for row in quality["rows"]}
    for mode in ("int8", "4bit"):
        measure = "caption accuracy (both digits in order)"
        change = by_mode[mode][measure] - by_mode["float32"][measure]
        notes[f"demo caption accuracy change, {mode} vs float32 (points)"] = round(100 * change, 2)
        targets.append(
            target(
                f"demo caption accuracy, {mode} vs float32 (change in points)",
                100 * change,
                ">= -2 points",
                change >= -0.02,
            )
        )
    notes["4bit memory on this CPU"] = FOUR_BIT_MEMORY
    notes["demo caption model"] = f"blip_toolkit.demo MODEL_SIZE, FINETUNE recipe, {quality['epochs']} epochs"
    notes["generation"] = (
        f"greedy, {tokens} new tokens (min = max), batch {batch}, {batches} timed batches x {rounds} rounds"
    )
    report("quantize", rows, quick=args.quick, targets=targets, notes=notes)


def _params(path: Path) -> tuple[int, int]:
    """(all parameters, the language model's) of a saved checkpoint."""
    from safetensors import safe_open

    total = lm = 0
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            count = 1
            for n in handle.get_slice(key).get_shape():
                count *= n
            total += count
            lm += count if key.startswith("language_model.") else 0
    return total, lm


if __name__ == "__main__":
    main()
