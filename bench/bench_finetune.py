"""Fine-tuning throughput and peak memory on CPU: `run_finetune` vs transformers' `Trainer`.

The same model (a BLIP-base-sized captioning model: transformers' default BlipConfig, ViT-B/16 at
384 px + BERT-base decoder, ~224M parameters, random weights), the same data (the 8 bundled photos
repeated, through the same collate function), the same optimizer settings (AdamW, weight decay
0.05, cosine schedule, gradient clipping at 1.0), batch 8. Each run is its own subprocess, so peak
RSS is per run. Samples/s is the median over the steps after the first (warm-up) one (the time
between two step ends), with the spread over those steps; the two runs are not interleaved (each
needs a process of its own for its peak RSS).

    python bench/bench_finetune.py            # full: BLIP-base size, 7 timed steps per run
    python bench/bench_finetune.py --quick    # small model, 3 timed steps: checks the script works
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_args, peak_rss_mb, rate_range, report, target

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "data" / "samples"
BATCH = 8
LR = 1e-5


def build(root: Path, quick: bool) -> tuple[Path, Path]:
    """Save the random model + processor and a manifest of the sample photos (repeated)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.utils import logging as hf_logging

    from blip_toolkit.models.scratch import tokenizers

    hf_logging.disable_progress_bar()
    lines = [
        line
        for line in (SAMPLES / "captions.tsv").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    tokenizer = tokenizers.wordpiece_tokenizer([line.split("\t")[1] for line in lines], blip_decoder=True)
    text = dict(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )
    if quick:
        vision = dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=96,
            patch_size=16,
        )
        text.update(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=128,
            vocab_size=len(tokenizer),
        )
        config = BlipConfig(text_config=text, vision_config=vision)
        image_processor = BlipImageProcessorPil(size={"height": 96, "width": 96})
    else:
        # The default BlipConfig is BLIP base (Salesforce/blip-image-captioning-base's shapes,
        # vocab 30524); the default image processor is 384 px.
        config = BlipConfig(text_config=text)
        image_processor = BlipImageProcessorPil()
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)
    manifest = root / "train.tsv"
    rows = [f"{SAMPLES / line.split(chr(9))[0]}\t{line.split(chr(9))[1]}" for line in lines]
    manifest.write_text("\n".join(rows * 8) + "\n")
    params = sum(p.numel() for p in model.parameters())
    return model_dir, manifest, params


# ----------------------------------------------------------------------------- one run (subprocess)


def run_ours(model_dir: str, manifest: str, steps: int, out: str) -> dict:
    from blip_toolkit.training.config import FinetuneConfig
    from blip_toolkit.training.finetune import run_finetune

    result = run_finetune(
        FinetuneConfig(
            manifest=manifest,
            task="caption",
            model=model_dir,
            output_dir=out,
            max_steps=steps,
            batch_size=BATCH,
            learning_rate=LR,
            weight_decay=0.05,
            grad_clip=1.0,
            save_every=10**9,
            keep_checkpoints=1,
            # Records are stamped when the trainer flushes them: flush every step to time each step.
            log_every=1,
            cpu=True,
        )
    )
    times = [r["time"] for r in result.history if r["type"] == "train"]
    return {"step_times": times}


def run_trainer(model_dir: str, manifest: str, steps: int, out: str) -> dict:
    from transformers import (
        AutoProcessor,
        BlipForConditionalGeneration,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from blip_toolkit.data.manifests import read_manifest
    from blip_toolkit.models.loading import FAMILIES
    from blip_toolkit.training.data import Collator, ManifestDataset, make_examples

    family = FAMILIES["blip-caption"]
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    model = BlipForConditionalGeneration.from_pretrained(model_dir)
    records = read_manifest(manifest, "caption").records()
    dataset = ManifestDataset(make_examples(records, "caption", family, prompt=None, template="{}"), manifest)
    collate = Collator("caption", family, processor, max_length=40)

    def collator(items):
        batch = collate(items)
        return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.time())

    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Clock()]
    ).train()
    return {"step_times": times}


def child(which: str, model_dir: str, manifest: str, steps: int, out: str) -> None:
    from blip_toolkit.log import setup_logging

    setup_logging(-1)
    result = (run_ours if which == "ours" else run_trainer)(model_dir, manifest, steps, out)
    times = result["step_times"]
    result.update(
        step_seconds=[b - a for a, b in zip(times, times[1:], strict=False)],
        peak_rss_mb=peak_rss_mb(),
        steps=len(times),
    )
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------- driver


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, which, model_dir, manifest, steps, out = sys.argv
        child(which, model_dir, manifest, int(steps), out)
        return
    args = parse_args(__doc__.splitlines()[0])
    steps = 4 if args.quick else 8  # an odd number of timed steps (the first one is not timed)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = Path(tmp)
        model_dir, manifest, params = build(root, args.quick)
        results = {}
        for which in ("ours", "trainer"):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    which,
                    str(model_dir),
                    str(manifest),
                    str(steps),
                    str(root / f"out-{which}"),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"{which} run failed")
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            results[which] = json.loads(line[len("RESULT ") :])
    ours, trainer = results["ours"], results["trainer"]
    rows = [
        {
            "run": name,
            "params_M": params / 1e6,
            "batch": BATCH,
            "timed_steps": len(r["step_seconds"]),
            "samples_per_s": BATCH / statistics.median(r["step_seconds"]),
            "samples_per_s (slowest-fastest step)": rate_range(r["step_seconds"], BATCH),
            "peak_rss_mb": r["peak_rss_mb"],
        }
        for name, r in (("blip finetune (run_finetune)", ours), ("transformers Trainer", trainer))
    ]
    speed = statistics.median(trainer["step_seconds"]) / statistics.median(ours["step_seconds"])
    memory = ours["peak_rss_mb"] / trainer["peak_rss_mb"]
    report(
        "finetune",
        rows,
        quick=args.quick,
        targets=[
            # 3% / 2% allow for timing and allocator noise on a shared machine; the numbers are shown raw.
            target(
                "speed vs Trainer (median samples/s ratio)",
                speed,
                ">= 1 (0.97 allowed for noise)",
                speed >= 0.97,
            ),
            target("peak RSS vs Trainer (ratio)", memory, "<= 1 (1.02 allowed for noise)", memory <= 1.02),
        ],
        notes={
            "quick": args.quick,
            "model": "BlipConfig() default (BLIP base)" if not args.quick else "small",
        },
    )


if __name__ == "__main__":
    main()
