"""Visual question answering with BLIP VQA or BLIP-2 checkpoints."""

from __future__ import annotations

from blip_toolkit.predictors.generation import GenerationTask
from blip_toolkit.predictors.options import VqaOptions


def format_question(family, question: str, template: str) -> str:
    return template.format(question) if family.is_blip2 else question


def vqa_task(runner, options: VqaOptions) -> GenerationTask:
    template = options.template if runner.loaded.family.is_blip2 else None
    return GenerationTask(runner, options.generation, task="vqa", template=template)
