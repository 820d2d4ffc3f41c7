"""VQA throughput on CPU against the strongest plain baseline and against the machine's limit.

`blip vqa` (the library call it makes: `answer_questions` through `open_runner`, the CLI's default
worker setting) on a BLIP-base-sized VQA model (`BlipForQuestionAnswering` with transformers' default
BlipConfig: ViT-B/16 at 384 px, BERT-base question encoder and answer decoder, random weights, a
tokenizer of BLIP's 30,524 tokens), 32 JPEG photos of 640x480 with 2 questions each, batch 8,
greedy, up to 10 new tokens (the CLI's default), against, in the same rounds:

(a) a hand-written batched transformers loop: the same checkpoint, batch size, dtype and `generate`
    options, images opened with PIL in the main process; questions batched with others of the same
    token length (BLIP's VQA decoder cross-attends to every question position, padding included, so
    padded batches change answers: the loop that pads is measured too, as a row, with how many
    answers it changes);
(b) the matmul roofline: FLOPs per question from the shapes (vision tower, question encoder,
    decoding steps taken; bench/_flops.py) over the best float32 matmul rate measured in the rounds.

Plus `--dtype bfloat16` and `--quantize int8` rows with their agreement with float32, a profile of
one batch and the text-attention lever. `--quick`: a tiny model, 2 rounds of 4 questions.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from _common import (
    MatmulProbe,
    agreement,
    build_blip,
    environment,
    interleaved_rounds,
    make_photos,
    parse_args,
    rate_range,
    ratio_target,
    report,
    target,
    timed_calls,
)
from _flops import vqa_flops

TARGET = 1.3
# Two token lengths (with [CLS] and [SEP]; the notes list them), alternating, so every share of 16
# questions fills two batches of 8 of one length each, for ours and the loop alike.
QUESTIONS = (
    "what is in the picture?",
    "how many dogs are there in the picture?",
    "what color is the car?",
    "what is the man riding down the street?",
)


class Ours:
    def __init__(self, model_dir, batch, max_new_tokens, *, dtype="float32", quantize=None, num_workers=None):
        from blip_toolkit.models.loading import open_runner
        from blip_toolkit.predictors.options import GenerationOptions, VqaOptions

        self.runner = open_runner(str(model_dir), "vqa", device="cpu", dtype=dtype, quantize=quantize)
        self.options = VqaOptions(
            batch_size=batch,
            generation=GenerationOptions(max_new_tokens=max_new_tokens),
            num_workers=num_workers,
        )
        self.answers: dict[tuple, str] = {}

    def __call__(self, pairs: list[tuple[str, str]]) -> None:
        from blip_toolkit.data.images import InputItem
        from blip_toolkit.jobs.predict import answer_questions

        items, questions = [InputItem(p) for p, _ in pairs], [q for _, q in pairs]
        for pair, record in zip(pairs, answer_questions(self.runner, items, questions, self.options)):
            self.answers[pair] = record.get("answer", record.get("error"))


class Reference:
    """The hand-written loop: batches of questions of one token length (`pad=False`), or batches in
    input order with padding (`pad=True`, what a loop that ignores the padding issue does)."""

    def __init__(self, model_dir, batch, max_new_tokens, *, dtype=None, pad=False):
        import torch
        import transformers

        self.torch, self.pad, self.batch = torch, pad, batch
        self.dtype = dtype or torch.float32
        self.processor = transformers.AutoProcessor.from_pretrained(model_dir, backend="pil")
        self.model = transformers.BlipForQuestionAnswering.from_pretrained(model_dir, dtype=self.dtype).eval()
        self.kwargs = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False}
        self.answers: dict[tuple, str] = {}
        self.steps: dict[tuple, int] = {}
        self.question_tokens: dict[tuple, int] = {}

    def batches(self, pairs):
        if self.pad:
            return [pairs[i : i + self.batch] for i in range(0, len(pairs), self.batch)]
        groups: dict[int, list] = {}
        for pair in pairs:
            groups.setdefault(len(self.processor.tokenizer(pair[1])["input_ids"]), []).append(pair)
        return [g[i : i + self.batch] for g in groups.values() for i in range(0, len(g), self.batch)]

    def __call__(self, pairs: list[tuple[str, str]]) -> None:
        from PIL import Image

        for chunk in self.batches(pairs):
            images = [Image.open(p).convert("RGB") for p, _ in chunk]
            inputs = self.processor(
                images=images, text=[q for _, q in chunk], padding=True, return_tensors="pt"
            )
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with self.torch.inference_mode():
                out = self.model.generate(**inputs, **self.kwargs)
            for pair, text in zip(chunk, self.processor.batch_decode(out, skip_special_tokens=True)):
                self.answers[pair] = text.strip()
                self.steps[pair] = out.shape[1] - 1  # the decoder's bos + the new tokens
                self.question_tokens[pair] = inputs["input_ids"].shape[1]


def profile_run(run, model, pairs) -> dict:
    """Seconds of one call, split: vision tower, question encoder, answer decoder passes, the rest
    of `generate` and what is around it."""
    import time

    vision, question, decoder = [], [], []
    start = time.perf_counter()
    with timed_calls(model.vision_model, vision), timed_calls(model.text_encoder, question):
        with timed_calls(model.text_decoder, decoder):
            run(pairs)
    wall = time.perf_counter() - start
    return {
        "vision tower": sum(vision),
        "question encoder": sum(question),
        "decoder first pass": decoder[0] if decoder else 0.0,
        "decoding steps": sum(decoder[1:]),
        "everything else (generate's Python, preprocessing, pipeline)": wall
        - sum(vision)
        - sum(question)
        - sum(decoder),
        "total": wall,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch
    from transformers import BlipConfig

    from blip_toolkit.log import setup_logging
    from blip_toolkit.models.fast_attention import use_fused_text_attention

    setup_logging(-1)
    quick = args.quick
    rounds, photos_count, batch, max_new_tokens = (2, 4, 4, 4) if quick else (4, 32, 8, 10)
    probe_size, probe_seconds = (256, 0.1) if quick else (1024, 1.0)
    probes = {
        "matmul float32 (torch: MKL)": MatmulProbe(probe_size, probe_seconds),
        "matmul float32 (oneDNN, packed)": MatmulProbe(probe_size, probe_seconds, kernel="onednn"),
        "matmul bfloat16 (oneDNN, packed)": MatmulProbe(
            probe_size, probe_seconds, kernel="onednn", dtype=torch.bfloat16
        ),
    }
    with tempfile.TemporaryDirectory(prefix="bench-vqa-") as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        photos = [str(p) for p in make_photos(tmp / "photos", photos_count)]
        # each photo with two questions of different lengths, alternating lengths
        pairs = [(p, QUESTIONS[(2 * i + j) % len(QUESTIONS)]) for i, p in enumerate(photos) for j in range(2)]
        model_dir = build_blip(tmp, "BlipForQuestionAnswering", quick)
        config = BlipConfig.from_pretrained(model_dir)
        runs = {
            "blip vqa float32": Ours(model_dir, batch, max_new_tokens),
            "transformers loop float32 (equal-length batches)": Reference(
                str(model_dir), batch, max_new_tokens
            ),
            "transformers loop float32, padded batches": Reference(
                str(model_dir), batch, max_new_tokens, pad=True
            ),
            "blip vqa --quantize int8": Ours(model_dir, batch, max_new_tokens, quantize="int8"),
            "blip vqa --dtype bfloat16": Ours(model_dir, batch, max_new_tokens, dtype="bfloat16"),
        }
        lengths = {len(runs["blip vqa float32"].runner.loaded.tokenizer(q)["input_ids"]) for q in QUESTIONS}
        for run in runs.values():
            run(pairs[:2])  # warm-up
        per_round = len(pairs) // rounds
        iterators = {
            name: iter([pairs[i * per_round : (i + 1) * per_round] for i in range(rounds)]) for name in runs
        }
        functions = {name: (lambda n=name: runs[n](next(iterators[n]))) for name in runs}
        times = interleaved_rounds({**functions, **probes}, rounds, warmup=0)

        ours = runs["blip vqa float32"]
        ref = runs["transformers loop float32 (equal-length batches)"]
        same = ours.answers == ref.answers and len(ours.answers) == len(pairs)
        flops = [vqa_flops(config, ref.question_tokens[p], ref.steps[p])["total"] for p in pairs]
        per_question = statistics.mean(flops)
        fp32_rate = max(
            probes[n].flops / statistics.median(times[n])
            for n in ("matmul float32 (torch: MKL)", "matmul float32 (oneDNN, packed)")
        )
        bf16_rate = probes["matmul bfloat16 (oneDNN, packed)"].flops / statistics.median(
            times["matmul bfloat16 (oneDNN, packed)"]
        )
        reference_time = statistics.median(times["transformers loop float32 (equal-length batches)"])
        rows = []
        for name, run in runs.items():
            seconds = statistics.median(times[name])
            rate = bf16_rate if "bfloat16" in name else fp32_rate
            rows.append(
                {
                    "model": "BLIP-base VQA (361M)" if not quick else "BLIP VQA (tiny)",
                    "run": name,
                    "questions/s (slowest-fastest round)": rate_range(times[name], per_round),
                    "vs transformers loop float32": reference_time / seconds,
                    "of the matmul roofline": None
                    if "int8" in name
                    else per_question * per_round / seconds / rate,  # int8: not a float roofline
                    "answers = blip float32": agreement(run.answers, ours.answers),
                    "answers = transformers float32": agreement(run.answers, ref.answers),
                }
            )
        rows.append(
            {
                "model": rows[0]["model"],
                "run": "roofline float32 (FLOPs / the best float32 matmul rate)",
                "questions/s (slowest-fastest round)": fp32_rate / per_question,
                "of the matmul roofline": 1.0,
            }
        )
        sample = pairs[:batch]
        profile_rows = [
            {"run": "blip vqa float32", **profile_run(ours, ours.runner.loaded.model, sample)},
            {"run": "transformers loop float32", **profile_run(ref, ref.model, sample)},
        ]
        runs.clear()
        # The lever tried on top: SDPA in BLIP's text transformer (question encoder and decoder).
        text_sdpa = Ours(model_dir, batch, max_new_tokens, num_workers=0)
        use_fused_text_attention(text_sdpa.runner.loaded.model)
        plain = Ours(model_dir, batch, max_new_tokens, num_workers=0)
        lever = interleaved_rounds(
            {"shipped": lambda: plain(sample), "text sdpa": lambda: text_sdpa(sample)}, 2
        )
        with environment(BLIP_PACKED_LINEAR="0"):
            unpacked = Ours(model_dir, batch, max_new_tokens, num_workers=0)
        packed_lever = interleaved_rounds(
            {"shipped": lambda: plain(sample), "unpacked": lambda: unpacked(sample)}, 2
        )

    notes = {
        "rounds": f"{rounds} x {per_round} questions (batch {batch}): each run in turn, then the matmul probes",
        "question token lengths": sorted(lengths),
        "decoding": f"greedy, at most {max_new_tokens} new tokens",
        "GFLOP per question": round(per_question / 1e9, 2),
        "matmul GFLOP/s in the rounds (torch MKL fp32 / oneDNN fp32 / oneDNN bf16)": " / ".join(
            f"{probes[n].flops / statistics.median(times[n]) / 1e9:.0f}" for n in probes
        ),
        "answers identical to the transformers loop (float32)": same,
        "lever: SDPA text attention, time vs shipped": round(
            statistics.median(lever["text sdpa"]) / statistics.median(lever["shipped"]), 3
        ),
        "lever: oneDNN-packed Linear, time without / with": round(
            statistics.median(packed_lever["unpacked"]) / statistics.median(packed_lever["shipped"]), 3
        ),
    }
    report(
        "vqa",
        rows,
        quick=quick,
        targets=[
            ratio_target(
                "blip vqa float32 vs the batched transformers loop (questions/s)",
                times["transformers loop float32 (equal-length batches)"],
                times["blip vqa float32"],
                f">= {TARGET}",
                lambda r: r >= TARGET,
            ),
            target("answers identical to the transformers loop (float32)", float(same), "1", same),
        ],
        notes=notes,
        tables={"where the time goes (one batch, seconds)": profile_rows},
    )


if __name__ == "__main__":
    main()
