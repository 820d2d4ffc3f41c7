"""Caption throughput on CPU: `blip caption` on a folder versus the transformers pipeline
(`image-text-to-text`, the 5.x successor of `image-to-text`) called one image at a time, on the same
BLIP-base-sized model (transformers' default BlipConfig, random weights, ~224M parameters), the same
32 JPEG photos of 640x480 and the same decoding settings (greedy, 20 new tokens).

The photos go in 4 rounds of 8 (one batch of ours), each round captioning its 8 photos with ours,
then with the pipeline, then running a fixed amount of square matmuls (the probe of this machine's
float32 matmul rate), so load from other work on the machine falls on all three; the speed-up
compares the median round times, with the spread of the per-round ratio. Also reports the achieved
FLOP/s of our run against the matmul rate, and where the time goes (vision encoder, text decoder,
image decoding and preprocessing).

`--quick`: a 2-layer model at 96 px, 3 rounds of 2 photos, 8 new tokens.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import MatmulProbe, interleaved_rounds, parse_args, rate_range, ratio_target, report, target

REPO = Path(__file__).resolve().parent.parent


def make_photos(folder: Path, count: int) -> list[Path]:
    """640x480 JPEGs cut from the bundled sample photos (upscaled, varied crops)."""
    from PIL import Image

    sources = sorted((REPO / "data" / "samples").glob("*.jpg"))
    paths = []
    for i in range(count):
        image = Image.open(sources[i % len(sources)]).convert("RGB").resize((960, 720), Image.BICUBIC)
        left, top = (i * 37) % 320, (i * 53) % 240
        path = folder / f"photo-{i:02d}.jpg"
        image.crop((left, top, left + 640, top + 480)).save(path, quality=90)
        paths.append(path)
    return paths


def build_model(folder: Path, quick: bool) -> Path:
    """Default BlipConfig (ViT-B/16 at 384 px, BERT-base decoder) with a locally built tokenizer
    (quick: 2 layers of 128 at 96 px)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from blip_toolkit.log import quiet_transformers
    from blip_toolkit.scratch.tokenizers import wordpiece_tokenizer

    quiet_transformers()  # no "Writing model shards" bar on stderr
    tokenizer = wordpiece_tokenizer()
    text = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id, pad_token_id=0)
    vision = {"initializer_range": 0.02}
    image_processor = BlipImageProcessorPil()
    if quick:
        small = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        text.update(small, encoder_hidden_size=128)
        vision.update(small, image_size=96, patch_size=16)
        image_processor = BlipImageProcessorPil(size={"height": 96, "width": 96})
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    out = folder / "blip-base"
    model.save_pretrained(out)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoProcessor, BlipForConditionalGeneration, pipeline

    from blip_toolkit.data.images import collect_inputs, open_image
    from blip_toolkit.log import setup_logging
    from blip_toolkit.runtime.caption import CaptionOptions, caption_images
    from blip_toolkit.runtime.generation import GenerationOptions
    from blip_toolkit.runtime.loading import open_runner

    setup_logging(-1)
    rounds, per_round = (3, 2) if args.quick else (4, 8)
    count = rounds * per_round
    max_new_tokens = 8 if args.quick else 20
    probe = MatmulProbe(*((256, 0.1) if args.quick else (1024, 1.0)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos_dir = tmp / "photos"
        photos_dir.mkdir()
        make_photos(photos_dir, count)
        model_dir = build_model(tmp, args.quick)

        # Ours: exactly what `blip caption photos/` runs, model loading excluded on both sides.
        runner = open_runner(str(model_dir), "caption", device="cpu")
        options = CaptionOptions(batch_size=8, generation=GenerationOptions(max_new_tokens=max_new_tokens))
        items = collect_inputs([str(photos_dir)])
        chunks = [items[i * per_round : (i + 1) * per_round] for i in range(rounds)]
        # Reference: the pipeline, one image at a time, same model weights and decoding settings.
        processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
        model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
        captioner = pipeline("image-text-to-text", model=model, processor=processor)

        ours_captions, pipe_captions = {}, {}
        ours_chunks, pipe_chunks = iter(chunks), iter(chunks)

        def ours() -> None:
            for record in caption_images(runner, next(ours_chunks), options):
                ours_captions[record["image"]] = record["caption"]

        def theirs() -> None:
            for item in next(pipe_chunks):
                out = captioner(images=item.path, text="", max_new_tokens=max_new_tokens)
                pipe_captions[item.path] = out[0]["generated_text"].strip()

        list(caption_images(runner, items[:2], options))  # warm-up
        captioner(images=items[0].path, text="", max_new_tokens=max_new_tokens)  # warm-up
        times = interleaved_rounds({"ours": ours, "pipeline": theirs, "matmul": probe}, rounds, warmup=0)
        same = ours_captions == pipe_captions and len(ours_captions) == count

        # FLOPs of one image's caption (vision encoder + greedy decoding), counted by torch.
        inputs = processor(images=[open_image(items[0].path)], return_tensors="pt")
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            runner.loaded.model.generate(**inputs, max_new_tokens=max_new_tokens)
        flops_per_image = counter.get_total_flops()

        # Where the time goes in our run: decode+preprocess, vision encoder, text decoding.
        loaded = runner.loaded
        start = time.perf_counter()
        pixel_values = processor(images=[open_image(item.path) for item in chunks[0]], return_tensors="pt")[
            "pixel_values"
        ]
        preprocess = time.perf_counter() - start
        with torch.inference_mode():
            start = time.perf_counter()
            loaded.model.vision_model(pixel_values=pixel_values)
            vision = time.perf_counter() - start
            start = time.perf_counter()
            loaded.model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens)
            total = time.perf_counter() - start

    matmul = probe.flops / statistics.median(times["matmul"])
    rows = []
    for name, label in (("ours", "blip caption (batch 8)"), ("pipeline", "pipeline, one at a time")):
        ips = per_round / statistics.median(times[name])
        rows.append(
            {
                "run": label,
                "images/s": ips,
                "images/s (slowest-fastest round)": rate_range(times[name], per_round),
                "seconds (all rounds)": sum(times[name]),
                "GFLOP/image": flops_per_image / 1e9,
                "achieved GFLOP/s": flops_per_image * ips / 1e9,
                "of matmul rate": flops_per_image * ips / matmul,
            }
        )
    breakdown = {
        "rounds": f"{rounds} x {per_round} photos: ours, the pipeline, the matmul probe in turn",
        f"preprocess {per_round} images (s)": preprocess,
        f"vision encoder, batch {per_round} (s)": vision,
        f"text decoding, batch {per_round} (s)": total - vision,
        "matmul GFLOP/s (slowest-fastest round)": rate_range(times["matmul"], probe.flops / 1e9),
        "captions identical to the pipeline": same,
    }
    report(
        "caption",
        rows,
        quick=args.quick,
        targets=[
            ratio_target(
                "speed-up over the pipeline", times["pipeline"], times["ours"], ">= 1.1", lambda r: r >= 1.1
            ),
            target("captions identical to the pipeline", float(same), "1", same),
        ],
        notes=breakdown,
    )


if __name__ == "__main__":
    main()
