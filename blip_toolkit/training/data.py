"""The data of fine-tuning: manifest rows -> examples -> decoded images -> model inputs (tokens,
labels, pixels) per task and family. How each family's inputs and labels are laid out (following
LAVIS and the BLIP / BLIP-2 papers) is described in training/modules.py."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image
from blip_toolkit.engine.seeding import mix_seed
from blip_toolkit.models.itm import itm_input_ids
from blip_toolkit.predictors.vqa import format_question

logger = logging.getLogger("blip")

IGNORE = -100
STREAM_AUGMENT = 7  # mixed into the augmentation seeds (mix_seed), apart from every other stream


def normalize_text(text: str) -> str:
    """For exact-match metrics: lower case, single spaces, no space before punctuation (BERT's decode
    writes `a cat .`), no trailing period."""
    text = " ".join(text.lower().split())
    text = re.sub(r"\s+([.,!?;:'])", r"\1", text)
    return text.rstrip(".").strip()


def join_prompt(prefix: str, target: str) -> str:
    """`prefix target`: the caption continues the prompt after one space (or none when the prompt
    ends with whitespace), the way `blip caption --prompt` continues it."""
    if not prefix:
        return target
    return prefix + target if prefix[-1].isspace() else f"{prefix} {target}"


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
    """One manifest row. `image_id` numbers distinct images and `text_id` distinct texts (after
    normalize_text). In retrieval, two rows are positives of each other when they share the image or
    the text: with few distinct captions (classes, templates) an identical caption of another image
    describes this image too, and treating it as a negative would teach ITC and ITM the opposite
    (LAVIS masks same-id pairs the same way)."""

    index: int
    image: str
    line: int
    image_id: int
    prefix: str  # prompt / formatted question (caption, BLIP-2 VQA), bare question (BLIP VQA), "" (retrieval)
    target: str  # caption / answer / retrieval text
    text_id: int = 0


def make_examples(
    records: list[dict], task: str, family, *, prompt: str | None, template: str
) -> list[Example]:
    ids: dict[str, int] = {}
    text_ids: dict[str, int] = {}
    out = []
    for i, row in enumerate(records):
        image_id = ids.setdefault(row["image"], len(ids))
        if task == "caption":
            # InstructBLIP without --prompt: its default instruction, as `blip caption` gives it.
            prefix, target = prompt or family.default_prompt or "", row["caption"]
        elif task == "vqa":
            prefix, target = format_question(family, row["question"], template), row["answer"]
        else:
            prefix, target = "", row["text"]
        text_id = text_ids.setdefault(normalize_text(target), len(text_ids))
        out.append(Example(i, row["image"], int(row["line"]), image_id, prefix, target, text_id))
    return out


class ManifestDataset(torch.utils.data.Dataset):
    """Decoded images with their texts. A bad image does not raise inside a DataLoader worker (where
    the message would be wrapped in a traceback): it comes back as `error` and the trainer stops with
    `manifest:line: problem`.

    augment_shift N > 0: each image is shifted by (dx, dy) drawn uniformly from [-N, N]^2 per
    (seed, epoch, example), so the augmentation of a run is the same whatever the number of
    DataLoader workers and a resumed run sees what the interrupted one would have (`set_epoch`)."""

    def __init__(
        self,
        examples: list[Example],
        manifest: str,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        augment_shift: int = 0,
        seed: int = 0,
    ):
        self.examples = examples
        self.manifest = manifest
        self.max_pixels = max_pixels
        self.augment_shift = augment_shift
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        try:
            image = open_image(example.image, max_pixels=self.max_pixels)
        except ImageLoadError as exc:
            return {"example": example, "image": None, "error": f"{self.manifest}:{example.line}: {exc}"}
        if self.augment_shift:
            image = shift_image(image, *self.shift_of(example.index))
        return {"example": example, "image": image, "error": None}

    def shift_of(self, index: int) -> tuple[int, int]:
        """(dx, dy) of example `index` in the current epoch."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, STREAM_AUGMENT, self.epoch, index))
        n = self.augment_shift
        dx, dy = torch.randint(-n, n + 1, (2,), generator=generator).tolist()
        return dx, dy


def shift_image(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """`image` moved right by dx and down by dy pixels (negative: left / up), same size, the
    uncovered border black."""
    shifted = Image.new(image.mode, image.size)
    shifted.paste(image, (dx, dy))
    return shifted


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), not on any global RNG state: a resumed run
    sees exactly the order the interrupted one saw, and `skip_first_batches` can skip into it."""

    def __init__(self, size: int, seed: int, *, shuffle: bool = True):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(mix_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ----------------------------------------------------------------------------- collate


class Collator:
    """Turns examples into model inputs for one (task, family). Picklable (DataLoader workers)."""

    def __init__(self, task: str, family, processor, *, max_length: int):
        self.task = task
        self.family = family
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self._prefix_cache: dict[str, list[int]] = {}
        self._warned = False

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        errors = [item["error"] for item in items if item["error"]]
        if errors:
            return {"errors": errors}
        examples = [item["example"] for item in items]
        images = [item["image"] for item in items]
        name = self.family.name
        if self.task == "retrieval":
            batch = self._retrieval(images, examples)
        elif name == "blip-caption":
            batch = self._blip_caption(images, examples)
        elif name == "blip-vqa":
            batch = self._blip_vqa(images, examples)
        elif self.family.decoder_only:
            batch = self._blip2_decoder_only(images, examples)
        else:
            batch = self._blip2_seq2seq(images, examples)
        if self.family.instruct and self.task != "retrieval":
            batch.update(self._qformer_inputs(examples))
        batch["index"] = torch.tensor([e.index for e in examples])
        batch["image_id"] = torch.tensor([e.image_id for e in examples])
        batch["text_id"] = torch.tensor([e.text_id for e in examples])
        return batch

    # -- helpers

    def _prefix_ids(self, prefix: str) -> list[int]:
        """Token ids of the prefix as the tokenizer encodes it alone (with its special tokens)."""
        if prefix not in self._prefix_cache:
            self._prefix_cache[prefix] = self.tokenizer(prefix)["input_ids"] if prefix else []
        return self._prefix_cache[prefix]

    def _check_prefix(self, ids: list[int], expected: list[int], prefix: str) -> None:
        if ids[: len(expected)] != expected and not self._warned:
            self._warned = True
            logger.warning(
                "the prompt %r tokenizes differently when followed by the text; the prompt mask may be "
                "off by a token (end the prompt with a complete word)",
                prefix,
            )

    # -- BLIP

    def _blip_caption(self, images, examples) -> dict[str, Any]:
        texts = [join_prompt(e.prefix, e.target) for e in examples]
        enc = self.processor(
            images=images,
            text=texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].clone()
        attention_mask = enc["attention_mask"]
        # [CLS] -> [DEC]: the decoder's start token (LAVIS; BlipForConditionalGeneration.generate).
        input_ids[:, 0] = self.tokenizer.bos_token_id
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        for row, e in enumerate(examples):
            if e.prefix:
                # LAVIS: prompt_length = len(tokenizer(prompt).input_ids) - 1 ([CLS] + prompt, not its [SEP])
                prefix_ids = self._prefix_ids(e.prefix)[:-1]
                self._check_prefix(enc["input_ids"][row].tolist(), prefix_ids, e.prefix)
                labels[row, : len(prefix_ids)] = IGNORE
        return {
            "pixel_values": enc["pixel_values"],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }

    def _blip_vqa(self, images, examples) -> dict[str, Any]:
        enc = self.processor(
            images=images,
            text=[e.prefix for e in examples],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        answers = self.tokenizer(
            [e.target for e in examples],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        decoder_input_ids = answers["input_ids"].clone()
        decoder_input_ids[:, 0] = self.tokenizer.bos_token_id  # [DEC] answer [SEP] (LAVIS blip_vqa.py)
        labels = decoder_input_ids.masked_fill(answers["attention_mask"] == 0, IGNORE)
        return {
            "pixel_values": enc["pixel_values"],
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": answers["attention_mask"],
            "labels": labels,
        }

    # -- BLIP-2

    def _num_queries(self) -> int:
        return int(self.processor.num_query_tokens)

    def _image_token_id(self) -> int:
        token = self.processor.image_token
        return self.tokenizer.convert_tokens_to_ids(str(getattr(token, "content", token)))

    def _blip2_decoder_only(self, images, examples) -> dict[str, Any]:
        eos = self.tokenizer.eos_token
        texts = [join_prompt(e.prefix, e.target) + eos for e in examples]
        queries = self._num_queries()
        # Only through the processor: it prepends the <image> placeholders the model fills.
        # Right padding: the labels below assume the text starts right after the image tokens.
        enc = self.processor(
            images=images,
            text=texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length + queries,
            padding_side="right",
            return_tensors="pt",
        )
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        labels[input_ids == self._image_token_id()] = IGNORE
        for row, e in enumerate(examples):
            # bos (+ prefix) is not predicted: the caption starts where `blip caption` starts generating.
            prefix_ids = self._prefix_ids(e.prefix) if e.prefix else self.tokenizer("")["input_ids"]
            self._check_prefix(input_ids[row, queries:].tolist(), prefix_ids, e.prefix)
            labels[row, : queries + len(prefix_ids)] = IGNORE
        return {
            "pixel_values": enc["pixel_values"],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }

    def _blip2_seq2seq(self, images, examples) -> dict[str, Any]:
        queries = self._num_queries()
        # Encoder: <image> x Q + prefix + </s> (an empty prefix gives what `blip caption` feeds it).
        enc = self.processor(
            images=images,
            text=[e.prefix for e in examples],
            padding="longest",
            truncation=True,
            max_length=self.max_length + queries,
            return_tensors="pt",
        )
        # Decoder targets: the text + </s> (T5's tokenizer appends it).
        targets = self.tokenizer(
            [e.target for e in examples],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE)
        return {
            "pixel_values": enc["pixel_values"],
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
        }

    def _qformer_inputs(self, examples) -> dict[str, Any]:
        """InstructBLIP: the Q-Former reads the instruction (prompt / formatted question) only, as at
        inference, where the processor gives it the same text the language model continues
        (LAVIS blip2_t5_instruct / blip2_vicuna_instruct: `text_input` to the Q-Former)."""
        enc = self.processor.qformer_tokenizer(
            [e.prefix for e in examples],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"qformer_input_ids": enc["input_ids"], "qformer_attention_mask": enc["attention_mask"]}

    # -- retrieval

    def _retrieval(self, images, examples) -> dict[str, Any]:
        # As predictors/retrieval.py scores: pixels from the processor, text from the (BERT) tokenizer
        # without <image> placeholders (the Q-Former text path takes plain text).
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(
            [e.target for e in examples],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "pixel_values": pixel_values,
            "input_ids": text["input_ids"],
            "itm_input_ids": itm_input_ids(self.family.name, self.tokenizer, text["input_ids"]),
            "attention_mask": text["attention_mask"],
        }
