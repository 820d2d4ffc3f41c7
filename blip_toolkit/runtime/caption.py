"""Captioning with BLIP or BLIP-2 checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, InputItem
from blip_toolkit.runtime.batching import jobs_from_items
from blip_toolkit.runtime.generation import GenerationOptions, run_jobs


@dataclass
class CaptionOptions:
    prompt: str | None = None
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    generation: GenerationOptions = field(default_factory=GenerationOptions)


def caption_images(runner, items: list[InputItem], options: CaptionOptions) -> Iterator[dict]:
    """Yield `{"image", "caption"}` (or `{"image", "error"}`) per input, in input order.

    With a prompt, the caption continues it and the prompt itself is removed at token level, so the
    same `--prompt` used in `blip finetune` gives the fine-tuned continuation."""
    jobs = jobs_from_items(items, [options.prompt] * len(items))
    return run_jobs(
        runner,
        jobs,
        prompt_of=lambda job: job.text,
        options=options.generation,
        batch_size=options.batch_size,
        max_pixels=options.max_pixels,
        record_of=lambda job, text: {"image": job.image_path, "caption": text},
    )
