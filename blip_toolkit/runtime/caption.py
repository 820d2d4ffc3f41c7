"""Captioning with BLIP or BLIP-2 checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, InputItem
from blip_toolkit.pipeline.sources import Source, list_source
from blip_toolkit.pipeline.stream import RunSettings
from blip_toolkit.runtime.generation import GenerationOptions, GenerationTask
from blip_toolkit.runtime.inference import infer_records


@dataclass
class CaptionOptions:
    prompt: str | None = None
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    num_workers: int | None = 0  # DataLoader workers decoding images (None: per the machine)

    def settings(self) -> RunSettings:
        return RunSettings(self.batch_size, self.num_workers, self.max_pixels)

    def fingerprint(self) -> dict:
        """The options that change the captions (a resumed run must keep them)."""
        return {"task": "caption", "prompt": self.prompt or None, **self.generation.fingerprint()}


def caption_task(runner, options: CaptionOptions) -> GenerationTask:
    return GenerationTask(runner, options.generation, task="caption", prompt=options.prompt)


def caption_source(runner, source: Source, options: CaptionOptions) -> Iterator[dict]:
    """Yield `{"image", "caption"}` (or `{"shard", "key", ...}` for webdataset; `{..., "error"}` for an
    item that failed) per input, in input order."""
    return infer_records(runner, caption_task(runner, options), source, options.settings())


def caption_images(runner, items: list[InputItem], options: CaptionOptions) -> Iterator[dict]:
    """Yield `{"image", "caption"}` (or `{"image", "error"}`) per input, in input order.

    With a prompt, the caption continues it and the prompt itself is removed at token level, so the
    same `--prompt` used in `blip finetune` gives the fine-tuned continuation."""
    source = list_source([i.path for i in items], errors=[i.error for i in items])
    return caption_source(runner, source, options)
