"""Caption throughput on CPU against the strongest plain baseline and against the machine's limit.

`blip caption` (the library call it makes: `caption_images` through `open_runner`, with the CLI's
default worker setting) on a BLIP-base-sized captioner (transformers' default BlipConfig: ViT-B/16 at
384 px, BERT-base decoder, 224M parameters, random weights, built with the real class; its
tokenizer has BLIP's 30,524 tokens, so the captions are real strings to compare), 64 JPEG photos of
640x480, batch 8, greedy, 20 new tokens, against, in the same rounds:

(a) a hand-written batched transformers loop: the same checkpoint, batch size, dtype and `generate`
    options, images opened with PIL in the main process, `processor(images=batch)` then
    `model.generate(**inputs)` then `batch_decode`: what an engineer who knows transformers writes;
(b) the matmul roofline: the model's FLOPs per image, counted from its shapes (vision tower + the
    decoding steps actually taken; bench/_flops.py, checked against torch's FlopCounterMode), over
    this machine's float32 matmul rate measured in the same rounds (the faster of torch's own
    `a @ b` and oneDNN with a packed operand), so every figure also reads as a fraction of the limit.

Also in the same rounds: `--quantize int8` and `--dtype bfloat16` (with the transformers loop in
bfloat16 beside it), each with its caption agreement with float32; then BLIP-2 (OPT of 353M, as
bench_quantize.py builds it) in float32, int8 and bfloat16 against the same kind of loop. Then where
the time goes (a profile of one batch: preprocessing, vision tower, the decoder's first pass,
the decoding steps, `generate`'s own Python, the pipeline around it) and each lever's measured gain
(each turned off, or on, alone; one batch, interleaved rounds).

Rounds: every round gives each run its own share of the photos (so all runs caption all 64) in
turn, then runs the matmul probes; medians over rounds, with the spread of the per-round ratio.

`--quick`: a 2-layer model at 96 px, 2 rounds of 4 photos, 8 new tokens; tiny BLIP-2.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import contextmanager
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
    shares,
    target,
    timed_calls,
)
from _flops import caption_flops

BLIP2_350M = dict(
    image_size=224,
    patch_size=32,
    hidden=384,
    layers=6,
    heads=16,
    intermediate=1536,
    text_hidden=1024,
    text_layers=28,
    lm_intermediate=4096,
    qformer_hidden=768,
    qformer_layers=6,
    num_query_tokens=32,
)  # fmt: skip  (the same BLIP-2 as bench_quantize.py / bench_lora.py)
QUICK_BLIP2 = dict(image_size=64, patch_size=16, hidden=64, layers=2, heads=4, intermediate=128)
TARGET = 1.3


# ----------------------------------------------------------------------------- the runs


class Ours:
    """`blip caption` through the library: open_runner + caption_images with the CLI's defaults."""

    def __init__(self, model_dir, options, *, dtype="float32", quantize=None, num_workers=None):
        from blip_toolkit.models.loading import open_runner

        self.runner = open_runner(str(model_dir), "caption", device="cpu", dtype=dtype, quantize=quantize)
        self.options = options
        self.num_workers = num_workers
        self.captions: dict[str, str] = {}

    def __call__(self, paths: list[str]) -> None:
        from dataclasses import replace

        from blip_toolkit.data.images import InputItem
        from blip_toolkit.jobs.predict import caption_images

        options = replace(self.options, num_workers=self.num_workers)
        for record in caption_images(self.runner, [InputItem(p) for p in paths], options):
            self.captions[record["image"]] = record.get("caption", record.get("error"))


class Reference:
    """The hand-written batched transformers loop (reference (a))."""

    def __init__(self, model_dir, kind: str, batch: int, generate_kwargs: dict, dtype=None):
        import torch
        import transformers

        self.torch = torch
        self.processor = transformers.AutoProcessor.from_pretrained(model_dir, backend="pil")
        cls = getattr(transformers, kind)
        self.model = cls.from_pretrained(model_dir, dtype=dtype or torch.float32).eval()
        self.dtype = dtype or torch.float32
        self.batch, self.kwargs = batch, generate_kwargs
        self.captions: dict[str, str] = {}
        self.steps: dict[str, int] = {}  # new tokens decoded for the image's batch

    def __call__(self, paths: list[str]) -> None:
        from PIL import Image

        for start in range(0, len(paths), self.batch):
            chunk = paths[start : start + self.batch]
            images = [Image.open(p).convert("RGB") for p in chunk]
            inputs = self.processor(images=images, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with self.torch.inference_mode():
                out = self.model.generate(**inputs, **self.kwargs)
            texts = self.processor.batch_decode(out, skip_special_tokens=True)
            for path, text in zip(chunk, texts):
                self.captions[path] = text.strip()
                self.steps[path] = out.shape[1] - 1  # BLIP: [DEC] + the new tokens


# ----------------------------------------------------------------------------- profile


@contextmanager
def timed_generate(model, sink: list):
    original = model.generate

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    model.generate = wrapper
    try:
        yield
    finally:
        del model.generate


def profile_run(run, model, paths: list[str]) -> dict:
    """Seconds of one call of `run` on `paths`, split: vision tower, the decoder's first pass
    (prefill: the prompt and the image keys / values), the later decoding passes, `generate`'s own
    Python (its loop, logits processing, stopping), and what is around `generate` (preprocessing
    not overlapped, batching, the pipeline)."""
    vision, text, generate = [], [], []
    start = time.perf_counter()
    with timed_calls(model.vision_model, vision), timed_calls(model.text_decoder, text):
        with timed_generate(model, generate):
            run(paths)
    wall = time.perf_counter() - start
    return {
        "vision tower": sum(vision),
        "decoder first pass (prefill)": text[0] if text else 0.0,
        "decoding steps": sum(text[1:]),
        "generate's own Python": sum(generate) - sum(vision) - sum(text),
        "outside generate (preprocessing, pipeline)": wall - sum(generate),
        "total": wall,
        "decoder passes": len(text),
    }


def preprocessing_seconds(model_dir, paths: list[str]) -> float:
    """Opening and preprocessing `paths` as our workers do (GenerationEncoder), in this thread."""
    from blip_toolkit.data.images import open_image
    from blip_toolkit.models.loading import inspect_source, load_processor
    from blip_toolkit.predictors.generation import GenerationEncoder

    resolved, family = inspect_source(str(model_dir))
    encoder = GenerationEncoder(load_processor(resolved), family, [])
    start = time.perf_counter()
    for path in paths:
        encoder(open_image(path), None)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- levers


def measure_levers(model_dir, options, paths: list[str], rounds: int) -> list[dict]:
    """Each lever's gain on one batch: `blip caption` as shipped against the same with the lever
    flipped alone (a fresh model per variant), interleaved rounds."""
    import torch

    from blip_toolkit.models.fast_attention import use_fused_text_attention

    def variant(name, **env):
        with environment(**env):
            return Ours(model_dir, options, num_workers=0)

    shipped = Ours(model_dir, options, num_workers=0)
    rows = []
    threads = torch.get_num_threads()

    def single_thread(paths):
        torch.set_num_threads(1)
        try:
            shipped(paths)
        finally:
            torch.set_num_threads(threads)

    text_sdpa = variant("text sdpa")
    use_fused_text_attention(text_sdpa.runner.loaded.model)
    workers = Ours(model_dir, options, num_workers=1)
    levers = [
        ("oneDNN-packed Linear layers (models/fast_linear.py)", "kept", variant("unpacked", BLIP_PACKED_LINEAR="0"),
         "off: torch's Linear (MKL sgemm)"),
        ("SDPA vision attention (models/fast_attention.py)", "kept", variant("eager", BLIP_EAGER_ATTENTION="1"),
         "off: transformers' eager attention"),
        ("SDPA text attention (decoder self- and cross-attention)", "not kept unless it helps", text_sdpa,
         "on, against shipped (off)"),
        ("image decoding in a background thread (--num-workers 0)", "measured", workers,
         "1 DataLoader worker process instead"),
        (f"{threads} torch threads", "measured", single_thread, "1 thread instead"),
    ]  # fmt: skip
    batch = paths[: options.batch_size]
    for name, status, other, what in levers:
        times = interleaved_rounds(
            {"shipped": lambda: shipped(batch), "other": lambda other=other: other(batch)}, rounds
        )
        ratio = statistics.median(times["other"]) / statistics.median(times["shipped"])
        per_round = [o / s for o, s in zip(times["other"], times["shipped"])]
        rows.append(
            {
                "lever": name,
                "compared with": what,
                "shipped s / batch": statistics.median(times["shipped"]),
                "other s / batch": statistics.median(times["other"]),
                "gain (other time / shipped time)": ratio,
                "per-round": f"{min(per_round):.3g}-{max(per_round):.3g}",
                "status": status,
                "captions equal": all(other.captions.get(p) == shipped.captions.get(p) for p in batch)
                if hasattr(other, "captions")
                else True,
            }
        )
    return rows


def omp_child(model_dir: str, max_new_tokens: int, batch: int, paths: list[str]) -> None:
    """In a child process: `blip caption` (API) on `paths`, one untimed batch then each batch timed;
    prints RESULT {"seconds": [...]}."""
    import json

    from blip_toolkit.log import setup_logging
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    setup_logging(-1)
    options = CaptionOptions(batch_size=batch, generation=GenerationOptions(max_new_tokens=max_new_tokens))
    ours = Ours(model_dir, options, num_workers=0)
    ours(paths[:batch])
    seconds = []
    for start in range(0, len(paths), batch):
        begun = time.perf_counter()
        ours(paths[start : start + batch])
        seconds.append(time.perf_counter() - begun)
    print("RESULT " + json.dumps({"seconds": seconds}))


def omp_lever(model_dir, paths: list[str], batch: int, max_new_tokens: int, rounds: int) -> dict:
    """OMP_WAIT_POLICY=PASSIVE (what the CLI sets) against OpenMP's default, each in its own process
    (it must be set before torch loads), alternating for `rounds` rounds; seconds per batch."""
    import json
    import os
    import subprocess
    import sys

    times: dict[str, list[float]] = {"PASSIVE": [], "default": []}
    for _ in range(rounds):
        for policy in times:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy == "PASSIVE":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            else:
                env["BLIP_BENCH_OMP_DEFAULT"] = "1"
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--omp-child",
                    str(model_dir),
                    str(max_new_tokens),
                    str(batch),
                    *paths,
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-2000:])
                raise SystemExit("the OMP_WAIT_POLICY child failed")
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            times[policy] += json.loads(line[7:])["seconds"]
    shipped, other = statistics.median(times["PASSIVE"]), statistics.median(times["default"])
    return {
        "lever": "OMP_WAIT_POLICY=PASSIVE, set by the CLI (cli/main.py)",
        "compared with": "OpenMP's default wait policy (spin, then sleep); own processes",
        "shipped s / batch": shipped,
        "other s / batch": other,
        "gain (other time / shipped time)": other / shipped,
        "per-round": f"batches: {len(times['PASSIVE'])} each",
        "status": "kept (the CLI's default; the benchmarks set it for both sides)",
        "captions equal": True,
    }


# ----------------------------------------------------------------------------- BLIP-2


def blip2_rows(
    root: Path, photos: list[str], quick: bool, max_new_tokens: int, batch: int
) -> tuple[list, dict]:

    from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    model_dir = build_checkpoint(
        "blip2-opt", root / "blip2", size=ModelSize(**(QUICK_BLIP2 if quick else BLIP2_350M))
    )
    options = CaptionOptions(batch_size=batch, generation=GenerationOptions(max_new_tokens=max_new_tokens))
    runs = {
        "blip caption float32": Ours(model_dir, options),
        "transformers loop float32": Reference(
            str(model_dir), "Blip2ForConditionalGeneration", batch, options.generation.generate_kwargs()
        ),
        "blip caption --quantize int8": Ours(model_dir, options, quantize="int8"),
        "blip caption --dtype bfloat16": Ours(model_dir, options, dtype="bfloat16"),
    }
    rounds = 2
    count = (len(photos) // rounds) * rounds
    iterators = {name: shares(photos[:count], rounds) for name in runs}
    for run in runs.values():
        run(photos[:1])  # warm-up
    times = interleaved_rounds(
        {name: (lambda n=name: runs[n](next(iterators[n]))) for name in runs}, rounds, warmup=0
    )
    base = runs["blip caption float32"].captions
    reference = runs["transformers loop float32"].captions
    per_round = count // rounds
    rows = []
    for name, run in runs.items():
        rows.append(
            {
                "model": "BLIP-2, OPT 353M (405M)" if not quick else "BLIP-2 (tiny)",
                "run": name,
                "images/s (slowest-fastest round)": rate_range(times[name], per_round),
                "vs transformers loop float32": statistics.median(times["transformers loop float32"])
                / statistics.median(times[name]),
                "captions = blip float32": agreement(run.captions, base),
                "captions = transformers float32": agreement(run.captions, reference),
            }
        )
    notes = {
        "BLIP-2 images": count,
        "BLIP-2 speed-up over the transformers loop (float32)": round(
            statistics.median(times["transformers loop float32"])
            / statistics.median(times["blip caption float32"]),
            3,
        ),
    }
    runs.clear()
    return rows, notes


# ----------------------------------------------------------------------------- main


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--omp-child":
        omp_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
        return
    args = parse_args(__doc__.splitlines()[0])
    import torch
    from transformers import BlipConfig

    from blip_toolkit.log import setup_logging
    from blip_toolkit.predictors.options import CaptionOptions, GenerationOptions

    setup_logging(-1)
    quick = args.quick
    rounds, count, batch = (2, 8, 4) if quick else (4, 64, 8)
    max_new_tokens = 8 if quick else 20
    probe_size, probe_seconds = (256, 0.1) if quick else (1024, 1.0)
    probes = {
        "matmul float32 (torch: MKL)": MatmulProbe(probe_size, probe_seconds),
        "matmul float32 (oneDNN, packed)": MatmulProbe(probe_size, probe_seconds, kernel="onednn"),
        "matmul bfloat16 (oneDNN, packed)": MatmulProbe(
            probe_size, probe_seconds, kernel="onednn", dtype=torch.bfloat16
        ),
    }
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        photos = [str(p) for p in make_photos(tmp / "photos", count)]
        model_dir = build_blip(tmp, "BlipForConditionalGeneration", quick)
        config = BlipConfig.from_pretrained(model_dir)
        generation = GenerationOptions(max_new_tokens=max_new_tokens)
        options = CaptionOptions(batch_size=batch, generation=generation)
        kwargs = generation.generate_kwargs()
        kind = "BlipForConditionalGeneration"
        runs = {
            "blip caption float32": Ours(model_dir, options),
            "transformers loop float32": Reference(str(model_dir), kind, batch, kwargs),
            "blip caption --quantize int8": Ours(model_dir, options, quantize="int8"),
            "blip caption --dtype bfloat16": Ours(model_dir, options, dtype="bfloat16"),
            "transformers loop bfloat16": Reference(
                str(model_dir), kind, batch, kwargs, dtype=torch.bfloat16
            ),
        }
        for run in runs.values():
            run(photos[:2])  # warm-up (also starts and stops the worker machinery once)
        iterators = {name: shares(photos, rounds) for name in runs}
        functions = {name: (lambda n=name: runs[n](next(iterators[n]))) for name in runs}
        times = interleaved_rounds({**functions, **probes}, rounds, warmup=0)
        per_round = count // rounds

        ours, ref = runs["blip caption float32"], runs["transformers loop float32"]
        same = ours.captions == ref.captions and len(ours.captions) == count
        # FLOPs per image from the shapes and the decoding steps each batch took (bench/_flops.py).
        flops = {p: caption_flops(config, ref.steps[p]) for p in photos}
        per_image = {k: statistics.mean(f[k] for f in flops.values()) for k in ("vision", "decode", "total")}
        fp32_rate = max(
            probes[name].flops / statistics.median(times[name])
            for name in ("matmul float32 (torch: MKL)", "matmul float32 (oneDNN, packed)")
        )
        bf16_rate = probes["matmul bfloat16 (oneDNN, packed)"].flops / statistics.median(
            times["matmul bfloat16 (oneDNN, packed)"]
        )
        rows = []
        for name, run in runs.items():
            seconds = statistics.median(times[name])
            ips = per_round / seconds
            rate = bf16_rate if "bfloat16" in name else fp32_rate
            rows.append(
                {
                    "model": "BLIP-base (224M)" if not quick else "BLIP (tiny)",
                    "run": name,
                    "images/s (slowest-fastest round)": rate_range(times[name], per_round),
                    "vs transformers loop float32": statistics.median(times["transformers loop float32"])
                    / seconds,
                    "achieved GFLOP/s": per_image["total"] * ips / 1e9,
                    "of the matmul roofline": None
                    if "int8" in name
                    else per_image["total"] * ips / rate,  # int8: not a float roofline
                    "captions = blip float32": agreement(run.captions, ours.captions),
                    "captions = transformers float32": agreement(run.captions, ref.captions),
                }
            )
        rows.append(
            {
                "model": rows[0]["model"],
                "run": "roofline float32 (FLOPs / the best float32 matmul rate)",
                "images/s (slowest-fastest round)": fp32_rate / per_image["total"],
                "of the matmul roofline": 1.0,
            }
        )
        rows.append(
            {
                "model": rows[0]["model"],
                "run": "roofline bfloat16 (FLOPs / the bfloat16 matmul rate)",
                "images/s (slowest-fastest round)": bf16_rate / per_image["total"],
                "of the matmul roofline": 1.0,
            }
        )

        # Where the time goes: one batch, ours and the reference.
        sample = photos[:batch]
        profile = {
            "blip caption float32": profile_run(ours, ours.runner.loaded.model, sample),
            "transformers loop float32": profile_run(ref, ref.model, sample),
        }
        profile_rows = [
            {"run": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in parts.items()}}
            for name, parts in profile.items()
        ]
        preprocess = preprocessing_seconds(model_dir, sample)
        runs.clear()  # free the models before the levers load theirs
        ours = ref = None
        levers = measure_levers(model_dir, options, photos, 3)
        levers.append(omp_lever(model_dir, photos[: 2 * batch], batch, max_new_tokens, 2))
        blip2, blip2_notes = blip2_rows(tmp, photos[: 8 if quick else 16], quick, max_new_tokens, batch)

    matmul = {name: probes[name].flops / statistics.median(times[name]) / 1e9 for name in probes}
    notes = {
        "rounds": f"{rounds} x {per_round} photos (batch {batch}): each run in turn, then the matmul probes",
        "decoding": f"greedy, at most {max_new_tokens} new tokens; FLOPs count the steps each batch took",
        "GFLOP per image (vision / decoding / total)": f"{per_image['vision'] / 1e9:.1f} / "
        f"{per_image['decode'] / 1e9:.2f} / {per_image['total'] / 1e9:.1f}",
        "matmul GFLOP/s in the rounds (torch MKL fp32 / oneDNN fp32 / oneDNN bf16)": " / ".join(
            f"{v:.0f}" for v in matmul.values()
        ),
        "roofline rate used (fp32, bf16 GFLOP/s)": f"{fp32_rate / 1e9:.0f}, {bf16_rate / 1e9:.0f}",
        f"preprocessing of {batch} photos in one thread (s)": round(preprocess, 3),
        "captions identical to the transformers loop (float32)": same,
        **blip2_notes,
    }
    result_rows = rows + blip2
    report(
        "caption",
        result_rows,
        quick=quick,
        targets=[
            ratio_target(
                "blip caption float32 vs the batched transformers loop (images/s)",
                times["transformers loop float32"],
                times["blip caption float32"],
                f">= {TARGET}",
                lambda r: r >= TARGET,
            ),
            target("captions identical to the transformers loop (float32)", float(same), "1", same),
        ],
        notes=notes,
        tables={"where the time goes (one batch, seconds)": profile_rows, "levers (one batch each)": levers},
    )


if __name__ == "__main__":
    main()
