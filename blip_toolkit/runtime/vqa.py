"""Visual question answering with BLIP VQA or BLIP-2 checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, InputItem
from blip_toolkit.errors import UsageError
from blip_toolkit.runtime.batching import jobs_from_items
from blip_toolkit.runtime.generation import GenerationOptions, run_jobs

DEFAULT_TEMPLATE = "Question: {} Answer:"


@dataclass
class VqaOptions:
    template: str = DEFAULT_TEMPLATE  # BLIP-2 only: BLIP VQA checkpoints take the bare question
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    generation: GenerationOptions = field(default_factory=lambda: GenerationOptions(max_new_tokens=10))

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise UsageError(f"--template {self.template!r} must contain exactly one {{}} for the question")


def format_question(family, question: str, template: str) -> str:
    return template.format(question) if family.is_blip2 else question


def answer_questions(
    runner, items: list[InputItem], questions: list[str], options: VqaOptions
) -> Iterator[dict]:
    """Yield `{"image", "question", "answer"}` (or `{"image", "question", "error"}`) per pair, in order."""
    family = runner.loaded.family
    jobs = jobs_from_items(items, questions)

    return run_jobs(
        runner,
        jobs,
        prompt_of=lambda job: format_question(family, job.text, options.template),
        options=options.generation,
        batch_size=options.batch_size,
        max_pixels=options.max_pixels,
        record_of=lambda job, text: {"image": job.image_path, "question": job.text, "answer": text},
        error_of=lambda job: {"image": job.image_path, "question": job.text, "error": job.error},
    )
