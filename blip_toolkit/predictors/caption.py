"""Captioning with BLIP or BLIP-2 checkpoints."""

from __future__ import annotations

from blip_toolkit.predictors.generation import GenerationTask
from blip_toolkit.predictors.options import CaptionOptions


def caption_task(runner, options: CaptionOptions) -> GenerationTask:
    return GenerationTask(runner, options.generation, task="caption", prompt=options.prompt)
