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

import torch

from blip_toolkit.data.batching import check_text
from blip_toolkit.errors import InputError
from blip_toolkit.models.quantize import empty_output_error
from blip_toolkit.pipeline.outputs import item_name
from blip_toolkit.predictors.options import GenerationOptions


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


def generation_inputs(processor, family, images: list, prompts: list[str] | None) -> dict[str, torch.Tensor]:
    """The processor's model inputs for `images` (and `prompts`, all of one token length, or None).

    Unprompted BLIP-2 with a decoder-only LM gets pixel values only: its `generate` then starts from
    the image tokens and the LM's BOS, as `model.generate(pixel_values=...)` does, whether or not
    the tokenizer adds a BOS to text by itself (an empty prompt through the processor gets one only
    if it does). Flan-T5 has no BOS (transformers' `generate(pixel_values=...)` raises on it), so
    its encoder gets the image tokens and the tokenized empty prompt (`</s>`), as LAVIS does.
    InstructBLIP gets its family's default instruction (its Q-Former reads text too)."""
    if not prompts and family.instruct:
        prompts = [family.default_prompt] * len(images)
    elif not prompts and family.is_blip2 and not family.decoder_only:
        prompts = [""] * len(images)
    if prompts:
        return dict(processor(images=images, text=prompts, return_tensors="pt"))
    return dict(processor(images=images, return_tensors="pt"))


def generate_from_inputs(loaded, inputs: dict[str, torch.Tensor], options: GenerationOptions) -> list[str]:
    """Run `generate` on one batch of processor outputs (see `generation_inputs`) and return the new
    text of each item (the echoed prefix removed by token count)."""
    family = loaded.family
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, **options.generate_kwargs())
    prompted = "input_ids" in inputs
    if family.name == "blip-caption":
        prefix = inputs["input_ids"].shape[1] - 1 if prompted else 1
    elif family.name == "blip-vqa":
        prefix = 1
    elif family.decoder_only:  # every input id; unprompted: <image> x Q and the BOS generate added
        prefix = inputs["input_ids"].shape[1] if prompted else loaded.model.config.num_query_tokens + 1
    else:  # encoder-decoder LM: the decoder start token
        prefix = 1
    new_tokens = output[:, prefix:]
    return [text.strip() for text in loaded.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def generate(loaded, images: list, prompts: list[str] | None, options: GenerationOptions) -> list[str]:
    """Run `generate` for one batch of PIL images and return the new text of each item.

    `prompts` must all have the same token length (see batching.equal_key_batches) or be None; for
    BLIP VQA checkpoints the prompt is the question."""
    inputs = generation_inputs(loaded.processor, loaded.family, images, prompts or None)
    return generate_from_inputs(loaded, inputs, options)


def prompt_length(loaded, text: str | None) -> int | tuple[int, int]:
    """Token length of a prompt as the processor will encode it (for grouping equal lengths)."""
    if not text:
        return 0
    length = len(loaded.tokenizer(text)["input_ids"])
    if loaded.family.instruct:
        # The Q-Former reads the text too: equal lengths there as well, so nothing is padded.
        return (length, len(loaded.processor.qformer_tokenizer(text)["input_ids"]))
    return length


class GenerationEncoder:
    """The DataLoader-worker half of captioning and VQA: one decoded image (and its text) -> the
    processor's inputs for it. `prompt` is the caption prompt (the same for every image);
    `template` formats an item's question into its prompt (None: the bare question, BLIP VQA)."""

    def __init__(
        self, processor, family, forbidden: list[str], *, prompt=None, template=None, task="caption"
    ):
        self.processor, self.family, self.forbidden = processor, family, forbidden
        self.prompt, self.template, self.task = prompt, template, task

    def prompt_for(self, text: str | None) -> str | None:
        if self.task == "caption":
            return self.prompt or None
        return self.template.format(text) if self.template else text

    def __call__(self, image, text: str | None) -> dict[str, torch.Tensor]:
        if self.task == "vqa" and not (text and text.strip()):
            # A table row may hold no question: that item fails, not the run.
            raise InputError("no question (empty or null)")
        prompt = self.prompt_for(text)
        if prompt:
            check_text(prompt, self.forbidden, what="text")
        return generation_inputs(self.processor, self.family, [image], [prompt] if prompt else None)


class GenerationTask:
    """Captioning or VQA over prepared items (see pipeline/stream.py for the protocol): batches of
    equal prompt length, so batched results equal one-at-a-time ones."""

    def __init__(self, runner, options: GenerationOptions, *, task: str, prompt=None, template=None):
        loaded = runner.loaded
        self.name = task
        self.options = options
        self.result_key = "caption" if task == "caption" else "answer"
        self.varying_lengths = task == "vqa"  # one caption prompt has one length; questions vary
        self.encoder = GenerationEncoder(
            loaded.processor,
            loaded.family,
            forbidden_tokens(loaded),
            prompt=prompt,
            template=template,
            task=task,
        )

    def start(self) -> None:
        if self.options.seed is not None:
            torch.manual_seed(self.options.seed)

    def group(self, item) -> tuple[int, int]:
        # Equal token lengths (InstructBLIP: in the Q-Former too), so nothing is padded.
        ids, qformer_ids = item.inputs.get("input_ids"), item.inputs.get("qformer_input_ids")
        return tuple(0 if t is None else int(t.shape[1]) for t in (ids, qformer_ids))

    def run(self, runner, items: list) -> list[dict]:
        inputs = {k: torch.cat([item.inputs[k] for item in items]) for k in items[0].inputs}
        texts = runner.run(lambda loaded: generate_from_inputs(loaded, inputs, self.options))
        quantize = runner.loaded.quantize
        return [
            self._fields(item)
            | (
                {"error": f"{item_name(item.fields)}: {empty_output_error(quantize)}"}
                if quantize and not text
                else {self.result_key: text}
            )
            for item, text in zip(items, texts)
        ]

    def error_fields(self, item) -> dict:
        return self._fields(item)

    def _fields(self, item) -> dict:
        return {"question": item.text} if self.name == "vqa" else {}
