"""Visual question answering with BLIP VQA or BLIP-2 checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS
from blip_toolkit.errors import UsageError
from blip_toolkit.pipeline.stream import RunSettings
from blip_toolkit.predictors.generation import GenerationOptions, GenerationTask

DEFAULT_TEMPLATE = "Question: {} Answer:"


@dataclass
class VqaOptions:
    template: str = DEFAULT_TEMPLATE  # BLIP-2 only: BLIP VQA checkpoints take the bare question
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    generation: GenerationOptions = field(default_factory=lambda: GenerationOptions(max_new_tokens=10))
    num_workers: int | None = 0

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise UsageError(f"--template {self.template!r} must contain exactly one {{}} for the question")

    def settings(self) -> RunSettings:
        return RunSettings(self.batch_size, self.num_workers, self.max_pixels)

    def fingerprint(self) -> dict:
        return {"task": "vqa", "template": self.template, **self.generation.fingerprint()}


def format_question(family, question: str, template: str) -> str:
    return template.format(question) if family.is_blip2 else question


def vqa_task(runner, options: VqaOptions) -> GenerationTask:
    template = options.template if runner.loaded.family.is_blip2 else None
    return GenerationTask(runner, options.generation, task="vqa", template=template)
