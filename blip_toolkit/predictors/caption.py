"""Captioning with BLIP or BLIP-2 checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS
from blip_toolkit.pipeline.stream import RunSettings
from blip_toolkit.predictors.generation import GenerationOptions, GenerationTask


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
