"""bfloat16 on CPU: what it costs in quality against float32 on the demo's digit pairs, whether
training in bfloat16 learns as well, and the matmul rates behind `--dtype auto`.

1. The matmul rates of this CPU, float32 (torch's own `a @ b`, and oneDNN with a packed operand:
   what `blip` runs) and bfloat16 (oneDNN), in interleaved rounds: `--dtype auto` picks bfloat16 on
   CPU only where the CPU has the flags that make it fast (models/device.py), and these rates, with
   bench_caption.py's model throughput, are the measurement behind that rule. The CPU flags are
   printed with every table.
2. The demo's models (its data, sizes and recipes: `blip demo`'s own stages), trained in float32,
   then run in float32 and in bfloat16 (`--dtype bfloat16`): caption accuracy (both digits named in
   order) and captions identical to float32's; VQA accuracy (the official metric, `blip eval vqa`)
   and answers identical; retrieval R@1 both ways (`blip eval retrieval`, ITC shortlist + ITM).
3. Training in bfloat16: the demo's caption model fine-tuned with `--mixed-precision bf16`
   (Accelerate's CPU autocast) from the same start, against float32 training: accuracy and time.

Targets: every bfloat16 quality figure within 2 points of float32's (training: 5 points, as two
trainings take different paths).

    python bench/bench_bf16.py            # the demo's full plan (4000 training pairs)
    python bench/bench_bf16.py --quick    # 200 pairs, one epoch each: checks the script works
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import (
    MatmulProbe,
    blip_tokenizer,
    build_blip,
    interleaved_rounds,
    make_photos,
    parse_args,
    rate_range,
    report,
    target,
)

QUALITY_POINTS = 2.0
TRAINING_POINTS = 5.0


def matmul_rates(quick: bool) -> tuple[list[dict], dict]:
    import torch

    size, seconds, rounds = (256, 0.1, 2) if quick else (1024, 1.0, 5)
    probes = {
        "float32, torch (MKL sgemm)": MatmulProbe(size, seconds),
        "float32, oneDNN packed (what blip runs)": MatmulProbe(size, seconds, kernel="onednn"),
        "bfloat16, oneDNN packed": MatmulProbe(size, seconds, kernel="onednn", dtype=torch.bfloat16),
        "bfloat16, torch (a @ b)": MatmulProbe(size, seconds, dtype=torch.bfloat16),
    }
    times = interleaved_rounds(probes, rounds)
    rates = {name: probes[name].flops / statistics.median(t) for name, t in times.items()}
    rows = [
        {
            "matmul": name,
            "size": f"{size} x {size} x {size}",
            "GFLOP/s (slowest-fastest round)": rate_range(times[name], probes[name].flops / 1e9),
            "vs float32 oneDNN": rates[name] / rates["float32, oneDNN packed (what blip runs)"],
        }
        for name in probes
    ]
    return rows, rates


def quality(state: dict, dtype: str) -> dict:
    """The trained demo models of `state` run in `dtype`: captions, VQA accuracy, retrieval recall."""
    from blip_toolkit.data.images import InputItem
    from blip_toolkit.demo.data import digits_in
    from blip_toolkit.jobs.eval_retrieval import evaluate_retrieval
    from blip_toolkit.jobs.eval_vqa import evaluate_vqa
    from blip_toolkit.jobs.evaluate import GenerateConfig, RetrievalEvalConfig, VqaEvalConfig
    from blip_toolkit.jobs.predict import caption_images
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.models.spec import LoadSpec
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions, VqaOptions

    data, trained = state["data"], state["trained"]
    truth = [(p.left, p.right) for p in data.pairs["test"]]
    started = time.perf_counter()
    runner = open_runner(str(trained["caption"]), "caption", device="cpu", dtype=dtype)
    options = CaptionOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=16), num_workers=0)
    items = [InputItem(str(p)) for p in data.images("test")]
    captions = [r.get("caption", "") for r in caption_images(runner, items, options)]
    caption_seconds = time.perf_counter() - started
    answers_file = state["out"] / f"answers-{dtype}.jsonl"
    files = data.eval_files["test"]
    started = time.perf_counter()
    vqa = evaluate_vqa(
        VqaEvalConfig(
            questions=str(files["vqa_questions"]),
            annotations=str(files["vqa_annotations"]),
            images=str(data.root / "images"),
            image_pattern=state["image_pattern"],
            generate=GenerateConfig(
                LoadSpec(model=str(trained["vqa"]), device="cpu", dtype=dtype),
                VqaOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=4)),
            ),
            save_predictions=str(answers_file),
        )
    )
    vqa_seconds = time.perf_counter() - started
    started = time.perf_counter()
    retrieval = evaluate_retrieval(
        RetrievalEvalConfig(
            annotations=str(files["retrieval"]),
            images=str(data.root / "images"),
            model=str(trained["retrieval"]),
            k_test=16,
            device="cpu",
            dtype=dtype,
            dedupe_captions=True,
        )
    )
    retrieval_seconds = time.perf_counter() - started
    import json

    answers = [
        json.loads(line).get("answer") for line in answers_file.read_text().splitlines() if line.strip()
    ]
    return {
        "captions": captions,
        "answers": answers,
        "caption accuracy": 100
        * sum(digits_in(c)[:2] == list(t) for c, t in zip(captions, truth))
        / len(truth),
        "VQA accuracy": vqa["metrics"]["overall"],
        "image-to-text R@1": retrieval["metrics"]["txt_r1"],
        "text-to-image R@1": retrieval["metrics"]["img_r1"],
        "seconds (caption / vqa / retrieval)": f"{caption_seconds:.1f} / {vqa_seconds:.1f} / {retrieval_seconds:.1f}",
    }


def train_caption(state: dict, out: Path, mixed_precision: str) -> tuple[float, float]:
    """The demo's caption fine-tuning from the demo's initial checkpoint, in `mixed_precision`;
    (test accuracy in float32 inference, training seconds)."""
    from blip_toolkit.data.images import InputItem
    from blip_toolkit.demo.data import digits_in
    from blip_toolkit.demo.stages import FINETUNE
    from blip_toolkit.jobs.predict import caption_images
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune

    data = state["data"]
    started = time.perf_counter()
    run_finetune(
        FinetuneConfig(
            manifest=str(data.manifests["train"]["caption"]),
            task="caption",
            model=str(state["initial"]["caption"]),
            output_dir=str(out),
            epochs=state["plan"].caption_epochs,
            seed=state["seed"],
            log_every=10_000,
            mixed_precision=mixed_precision,
            cpu=True,
            **FINETUNE,
        )
    )
    seconds = time.perf_counter() - started
    runner = open_runner(str(out), "caption", device="cpu", dtype="float32")
    options = CaptionOptions(batch_size=64, generation=GenerationOptions(max_new_tokens=16), num_workers=0)
    items = [InputItem(str(p)) for p in data.images("test")]
    captions = [r.get("caption", "") for r in caption_images(runner, items, options)]
    truth = [(p.left, p.right) for p in data.pairs["test"]]
    accuracy = 100 * sum(digits_in(c)[:2] == list(t) for c, t in zip(captions, truth)) / len(truth)
    return accuracy, seconds


def width_speed(root: Path, quick: bool) -> list[dict]:
    """Captioning speed, float32 against bfloat16 (both as `blip caption` runs them), of BLIP models
    of several widths (4 layers each, 224 px, 10 new tokens, batch 8): where bfloat16 starts to pay
    on this CPU (the width rule of `--dtype auto`, models/device.py)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from blip_toolkit.data.images import InputItem
    from blip_toolkit.jobs.predict import caption_images
    from blip_toolkit.log import quiet_transformers
    from blip_toolkit.models.loading import open_runner
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    quiet_transformers()
    widths, rounds, size = ((64, 128), 2, 64) if quick else ((128, 256, 512, 768), 3, 224)
    (root / "width-photos").mkdir()
    photos = [InputItem(str(p)) for p in make_photos(root / "width-photos", 8)]
    tokenizer = blip_tokenizer(2000)
    options = CaptionOptions(batch_size=8, generation=GenerationOptions(max_new_tokens=10, min_new_tokens=10))
    rows = []
    for width in widths:
        shape = dict(hidden_size=width, num_hidden_layers=4, num_attention_heads=max(2, width // 64),
                     intermediate_size=4 * width)  # fmt: skip
        text = dict(shape, encoder_hidden_size=width, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    sep_token_id=tokenizer.sep_token_id, pad_token_id=0)  # fmt: skip
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(
            BlipConfig(text_config=text, vision_config=dict(shape, image_size=size, patch_size=16))
        )
        out = root / f"width-{width}"
        model.save_pretrained(out)
        processor = BlipImageProcessorPil(size={"height": size, "width": size})
        BlipProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
        runners = {
            dt: open_runner(str(out), "caption", device="cpu", dtype=dt) for dt in ("float32", "bfloat16")
        }
        for runner in runners.values():
            list(caption_images(runner, photos[:2], options))  # warm-up
        times = interleaved_rounds(
            {
                dt: (lambda r=runner: list(caption_images(r, photos, options)))
                for dt, runner in runners.items()
            },
            rounds,
            warmup=0,
        )
        rows.append(
            {
                "width (4 layers, 224 px)": width,
                "float32 images/s": rate_range(times["float32"], len(photos)),
                "bfloat16 images/s": rate_range(times["bfloat16"], len(photos)),
                "bfloat16 speed-up": statistics.median(times["float32"])
                / statistics.median(times["bfloat16"]),
            }
        )
    return rows


def training_speed(root: Path, quick: bool) -> list[dict]:
    """Fine-tuning steps of a BLIP-base-sized captioner (random weights; the 8 sample photos, batch
    4) in float32 and with bf16 autocast, alternating twice: samples/s from the time between step
    ends after the first step of each run."""
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune

    samples = Path(__file__).resolve().parent.parent / "data" / "samples"
    lines = [x for x in (samples / "captions.tsv").read_text().splitlines() if x and not x.startswith("#")]
    manifest = root / "train.tsv"
    manifest.write_text(
        "\n".join(f"{samples / x.split(chr(9))[0]}\t{x.split(chr(9))[1]}" for x in lines * 2) + "\n"
    )
    model = build_blip(root, "BlipForConditionalGeneration", quick)
    steps, batch = (3, 2) if quick else (4, 4)
    times: dict[str, list[float]] = {"no": [], "bf16": []}
    for run in range(2):
        for precision in times:
            result = run_finetune(
                FinetuneConfig(
                    manifest=str(manifest),
                    task="caption",
                    model=str(model),
                    output_dir=str(root / f"speed-{precision}-{run}"),
                    max_steps=steps,
                    batch_size=batch,
                    learning_rate=1e-5,
                    save_every=10**9,
                    log_every=1,
                    mixed_precision=precision,
                    cpu=True,
                )
            )
            ends = [r["time"] for r in result.history if r["type"] == "train"]
            times[precision] += [b - a for a, b in zip(ends, ends[1:])]
    return [
        {
            "BLIP-base captioner, batch": batch,
            "training": name,
            "samples/s (slowest-fastest step)": rate_range(times[precision], batch),
            "vs float32": statistics.median(times["no"]) / statistics.median(times[precision]),
            "timed steps": len(times[precision]),
        }
        for precision, name in (("no", "float32"), ("bf16", "bf16 autocast"))
    ]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    from blip_toolkit.demo.data import IMAGE_PATTERN
    from blip_toolkit.demo.run import PLANS, Plan
    from blip_toolkit.demo.stages import stage_build, stage_caption, stage_data, stage_retrieval, stage_vqa
    from blip_toolkit.log import setup_logging

    setup_logging(-1)
    quick = args.quick
    matmul_rows, rates = matmul_rates(quick)
    plan = (
        Plan(train_pairs=200, test_per_combo=1, caption_epochs=1, vqa_epochs=1, retrieval_epochs=1, dit_steps=0,
             val_pairs=10)
        if quick
        else PLANS["full"]
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as tmp:
        state = {"plan": plan, "out": Path(tmp), "seed": 0, "java": False, "image_pattern": IMAGE_PATTERN}
        started = time.perf_counter()
        for stage in (stage_data, stage_build, stage_caption, stage_vqa, stage_retrieval):
            stage(state)
        demo_seconds = time.perf_counter() - started
        results = {dtype: quality(state, dtype) for dtype in ("float32", "bfloat16")}
        fp32_trained, fp32_seconds = train_caption(state, Path(tmp) / "train-fp32", "no")
        bf16_trained, bf16_seconds = train_caption(state, Path(tmp) / "train-bf16", "bf16")
        speed_rows = training_speed(Path(tmp), quick)
        width_rows = width_speed(Path(tmp), quick)

    base, bf16 = results["float32"], results["bfloat16"]
    measures = ("caption accuracy", "VQA accuracy", "image-to-text R@1", "text-to-image R@1")
    rows = []
    for dtype, result in results.items():
        rows.append(
            {
                "inference dtype": dtype,
                **{m: result[m] for m in measures},
                "captions = float32": sum(a == b for a, b in zip(result["captions"], base["captions"]))
                / len(base["captions"]),
                "answers = float32": sum(a == b for a, b in zip(result["answers"], base["answers"]))
                / max(1, len(base["answers"])),
                "seconds (caption / vqa / retrieval)": result["seconds (caption / vqa / retrieval)"],
            }
        )
    training_rows = [
        {"training": "float32 (--mixed-precision no)", "caption accuracy": fp32_trained, "seconds": fp32_seconds},
        {"training": "bfloat16 autocast (--mixed-precision bf16)", "caption accuracy": bf16_trained,
         "seconds": bf16_seconds},
    ]  # fmt: skip
    targets = [
        target(
            f"bfloat16 {m} vs float32 (change in points)",
            bf16[m] - base[m],
            f">= -{QUALITY_POINTS:g}",
            bf16[m] - base[m] >= -QUALITY_POINTS,
        )
        for m in measures
    ]
    targets.append(
        target(
            "caption accuracy, bf16-trained vs float32-trained (change in points)",
            bf16_trained - fp32_trained,
            f">= -{TRAINING_POINTS:g}",
            bf16_trained - fp32_trained >= -TRAINING_POINTS,
        )
    )
    from blip_toolkit.models.device import auto_cpu_dtype

    notes = {
        "demo plan": f"{plan.train_pairs} training pairs, epochs caption {plan.caption_epochs} / vqa "
        f"{plan.vqa_epochs} / retrieval {plan.retrieval_epochs}; demo stages {demo_seconds:.0f} s",
        "test pairs": len(base["captions"]),
        "bfloat16 / float32 matmul rate (oneDNN packed both)": round(
            rates["bfloat16, oneDNN packed"] / rates["float32, oneDNN packed (what blip runs)"], 2
        ),
        "--dtype auto on this CPU": str(auto_cpu_dtype()).replace("torch.", ""),
    }
    report(
        "bf16",
        rows,
        quick=quick,
        targets=targets,
        notes=notes,
        tables={
            "matmul rates (interleaved rounds)": matmul_rows,
            "training in bfloat16: the demo's caption model (accuracy, seconds)": training_rows,
            "training in bfloat16: speed at BLIP-base size": speed_rows,
            "inference speed by model width (where bfloat16 pays)": width_rows,
        },
    )


if __name__ == "__main__":
    main()
