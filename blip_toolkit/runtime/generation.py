"""Text generation shared by captioning and VQA: decoding options and prompt stripping by token count.

What each family's `generate` returns before the new tokens (the prefix we strip):
- BLIP captioning: the [DEC] start token, then the prompt tokens (BLIP echoes the prompt);
- BLIP VQA: the [DEC] start token;
- BLIP-2 with a decoder-only LM (OPT): every input id (the <image> placeholders, bos, the prompt);
- BLIP-2 with an encoder-decoder LM (T5): the decoder start token.
InstructBLIP returns what BLIP-2 with the same kind of language model returns; its Q-Former also reads
the prompt (the instruction), and without `--prompt` it is given its family's default instruction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.runtime.batching import InOrder, check_text, length_buckets, load_images, prefetched
from blip_toolkit.runtime.quantize import empty_output_error


@dataclass
class GenerationOptions:
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UsageError("--min-new-tokens must be between 0 and --max-new-tokens")
        if self.num_beams < 1:
            raise UsageError("--num-beams must be at least 1")
        if not 0 < self.top_p <= 1:
            raise UsageError("--top-p must be in (0, 1]")
        if self.temperature <= 0:
            raise UsageError("--temperature must be positive")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.sample:
            kwargs.update(do_sample=True, top_p=self.top_p, temperature=self.temperature)
        else:
            kwargs["do_sample"] = False
        return kwargs


def forbidden_tokens(loaded) -> list[str]:
    """Special-token strings that must not appear in user text (BLIP-2's <image>, [DEC], </s>, ...)."""
    tokenizer = loaded.tokenizer
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    # InstructBLIP: the Q-Former's own tokenizer reads the same text ([DEC], [SEP], ...).
    tokens |= set(
        getattr(getattr(loaded.processor, "qformer_tokenizer", None), "all_special_tokens", []) or []
    )
    image_token = getattr(loaded.processor, "image_token", None)
    if image_token is not None:
        tokens.add(str(getattr(image_token, "content", image_token)))
    return sorted(t for t in tokens if t)


def generate(loaded, images: list, prompts: list[str] | None, options: GenerationOptions) -> list[str]:
    """Run `generate` for one batch and return the new text of each item.

    `prompts` must all have the same token length (see batching.length_buckets) or be None; for
    BLIP VQA checkpoints the prompt is the question."""
    family = loaded.family
    processor = loaded.processor
    kwargs = options.generate_kwargs()
    if family.is_blip2 and not prompts:
        # BLIP-2's generate cannot build its own start tokens for T5 (no bos); an empty prompt through
        # the processor gives the <image> placeholders plus the LM's own special tokens, as LAVIS does.
        # InstructBLIP gets its default instruction (its Q-Former needs text too).
        prompts = [family.default_prompt or ""] * len(images)
    if prompts:
        inputs = processor(images=images, text=prompts, return_tensors="pt")
    else:
        inputs = processor(images=images, return_tensors="pt")
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, **kwargs)
    if family.name == "blip-caption":
        prefix = inputs["input_ids"].shape[1] - 1 if prompts else 1
    elif family.name == "blip-vqa":
        prefix = 1
    elif family.decoder_only:
        prefix = inputs["input_ids"].shape[1]
    else:  # encoder-decoder LM: the decoder start token
        prefix = 1
    new_tokens = output[:, prefix:]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def prompt_length(loaded, text: str | None) -> int | tuple[int, int]:
    """Token length of a prompt as the processor will encode it (for grouping equal lengths)."""
    if not text:
        return 0
    length = len(loaded.tokenizer(text)["input_ids"])
    if loaded.family.instruct:
        # The Q-Former reads the text too: equal lengths there as well, so nothing is padded.
        return (length, len(loaded.processor.qformer_tokenizer(text)["input_ids"]))
    return length


def run_jobs(
    runner,
    jobs,
    *,
    prompt_of,
    options: GenerationOptions,
    batch_size: int,
    max_pixels: int,
    record_of,
    error_of=None,
) -> Iterator[dict]:
    """Generate for every job, in batches of equal prompt length, and yield one record per job in
    input order: `record_of(job, text)` on success, `error_of(job)` (default `{"image", "error"}`)
    on failure."""
    error_of = error_of or (lambda job: {"image": job.image_path, "error": job.error})

    if options.seed is not None:
        torch.manual_seed(options.seed)
    loaded = runner.loaded
    forbidden = forbidden_tokens(loaded)
    for job in jobs:
        if job.error:
            continue
        try:
            check_text(prompt_of(job) or "", forbidden, what="text")
        except InputError as exc:
            job.error = f"{job.image_path}: {exc}"
    ordered = InOrder()
    batches = length_buckets(jobs, lambda job: prompt_length(loaded, prompt_of(job)), batch_size)
    for batch, failed in prefetched(batches, lambda b: load_images(b, max_pixels)):
        for job in failed:
            yield from ordered.add(job.index, error_of(job))
        if not batch.jobs:
            continue
        prompts = [prompt_of(job) for job in batch.jobs]
        prompts = prompts if prompts[0] else None
        texts = runner.run(
            lambda model, images=batch.images, prompts=prompts: generate(model, images, prompts, options)
        )
        for job, text in zip(batch.jobs, texts):
            if not text and loaded.quantize:
                job.error = f"{job.image_path}: {empty_output_error(loaded.quantize)}"
                yield from ordered.add(job.index, error_of(job))
                continue
            yield from ordered.add(job.index, record_of(job, text))
