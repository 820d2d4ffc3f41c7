"""Caption throughput on CPU: `blip caption` on a folder versus the transformers pipeline
(`image-text-to-text`, the 5.x successor of `image-to-text`) called one image at a time, on the same
BLIP-base-sized model (transformers' default BlipConfig, random weights, ~224M parameters), the same
32 JPEG photos of 640x480 and the same decoding settings (greedy, 20 new tokens).

Also reports the achieved FLOP/s of our run against this machine's measured float32 matmul rate,
and where the time goes (vision encoder, text decoder, image decoding and preprocessing).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import matmul_rate, parse_args, report, target

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
    """Default BlipConfig (ViT-B/16 at 384 px, BERT-base decoder) with a locally built tokenizer."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from blip_toolkit.scratch.tokenizers import wordpiece_tokenizer

    tokenizer = wordpiece_tokenizer()
    text = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id, pad_token_id=0)
    vision = {"initializer_range": 0.02}
    if quick:
        text.update(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
        vision.update(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    out = folder / "blip-base"
    model.save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessorPil(), tokenizer=tokenizer).save_pretrained(out)
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
    count = 8 if args.quick else 32
    max_new_tokens = 20
    rate = matmul_rate()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos_dir = tmp / "photos"
        photos_dir.mkdir()
        photos = make_photos(photos_dir, count)
        model_dir = build_model(tmp, args.quick)

        # Ours: exactly what `blip caption photos/` runs, model loading excluded on both sides.
        runner = open_runner(str(model_dir), "caption", device="cpu")
        options = CaptionOptions(batch_size=8, generation=GenerationOptions(max_new_tokens=max_new_tokens))
        items = collect_inputs([str(photos_dir)])
        list(caption_images(runner, items[:2], options))  # warm-up
        start = time.perf_counter()
        ours = list(caption_images(runner, items, options))
        ours_time = time.perf_counter() - start

        # Reference: the pipeline, one image at a time, same model weights and decoding settings.
        processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
        model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
        captioner = pipeline("image-text-to-text", model=model, processor=processor)
        captioner(images=str(photos[0]), text="", max_new_tokens=max_new_tokens)  # warm-up
        start = time.perf_counter()
        theirs = [
            captioner(images=str(p), text="", max_new_tokens=max_new_tokens)[0]["generated_text"]
            for p in photos
        ]
        pipe_time = time.perf_counter() - start
        same = [r["caption"] for r in ours] == [t.strip() for t in theirs]

        # FLOPs of one image's caption (vision encoder + greedy decoding), counted by torch.
        image = open_image(photos[0])
        inputs = processor(images=[image], return_tensors="pt")
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            runner.loaded.model.generate(**inputs, max_new_tokens=max_new_tokens)
        flops_per_image = counter.get_total_flops()

        # Where the time goes in our run: decode+preprocess, vision encoder, text decoding.
        batch_images = [open_image(p) for p in photos[:8]]
        loaded = runner.loaded
        start = time.perf_counter()
        pixel_values = processor(images=[open_image(p) for p in photos[:8]], return_tensors="pt")[
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
        del batch_images

    ours_ips, pipe_ips = count / ours_time, count / pipe_time
    achieved = flops_per_image * ours_ips
    rows = [
        {
            "run": "blip caption (batch 8)",
            "images/s": ours_ips,
            "seconds": ours_time,
            "GFLOP/image": flops_per_image / 1e9,
            "achieved GFLOP/s": achieved / 1e9,
            "of matmul rate": achieved / rate,
        },
        {
            "run": "pipeline, one at a time",
            "images/s": pipe_ips,
            "seconds": pipe_time,
            "GFLOP/image": flops_per_image / 1e9,
            "achieved GFLOP/s": flops_per_image * pipe_ips / 1e9,
            "of matmul rate": flops_per_image * pipe_ips / rate,
        },
    ]
    breakdown = {
        "preprocess 8 images (s)": preprocess,
        "vision encoder, batch 8 (s)": vision,
        "text decoding, batch 8 (s)": total - vision,
        "matmul GFLOP/s": rate / 1e9,
        "captions identical to the pipeline": same,
    }
    report(
        "caption",
        rows,
        targets=[
            target("speed-up over the pipeline", ours_ips / pipe_ips, ">= 1.1", ours_ips / pipe_ips >= 1.1),
            target("captions identical to the pipeline", float(same), "1", same),
        ],
        notes=breakdown,
    )
    for key, value in breakdown.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
