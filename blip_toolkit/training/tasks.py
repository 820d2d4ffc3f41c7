"""Per task and family: the dataset, the collate function (tokens, labels, pixels), the training
module (forward -> loss) and the validation metrics.

Every training module returns per-example loss *sums* and token (or row) *counts* rather than a
mean, so the trainer can normalise by the global count across processes and gradient-accumulation
micro-batches: a run on 2 processes then optimises exactly what 1 process with the same global batch
optimises (the per-process token mean would weight short and long captions differently).

What is trained, per family (following LAVIS / the BLIP and BLIP-2 papers):

- BLIP captioning (`blip-caption`): language-model loss on `prompt + caption` with the first token
  replaced by the decoder's bos `[DEC]` (LAVIS `blip_caption.py`: `input_ids[:, 0] = bos_token_id`;
  HF's `generate` does the same) and the trailing `[SEP]` kept as the target that teaches the model
  to stop (`generate` uses `[SEP]` as eos). Prompt tokens and padding are -100.
- BLIP VQA (`blip-vqa`): the question goes through the image-grounded text encoder; the answer
  decoder is trained on `[DEC] answer [SEP]` (LAVIS `blip_vqa.py`), padding -100.
- BLIP-2 with OPT: the processor builds `<image> x Q, bos, prefix, target, eos`; labels are -100 on
  the image tokens, bos, the prefix (prompt or `Question: ... Answer:`) and padding; the eos is
  appended because OPT's tokenizer adds only a bos, and without it greedy decoding never stops.
  The loss is taken on the last `labels.size(1)` logits (as `Blip2ForConditionalGeneration` does).
- BLIP-2 with Flan-T5: the encoder gets `<image> x Q, prefix, </s>`; the decoder is trained on
  `target </s>` (LAVIS `blip2_t5.py`).
- Retrieval (`blip-itm`, `blip2-itm`): image-text contrastive loss (symmetric cross-entropy of
  in-batch similarities divided by a temperature; HF's ITM models have no learnable temperature,
  so it is a config value, 0.07 by default as in BLIP/BLIP-2's initial value) plus the image-text
  matching loss on positives and in-batch hard negatives sampled with probability given by the ITC
  similarities (ALBEF/BLIP/BLIP-2: one negative text per image and one negative image per text).
  BLIP-2's ITC is the max over the query embeddings (LAVIS `blip2_qformer.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip_toolkit.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image
from blip_toolkit.errors import TaskNotSupportedError, UsageError

logger = logging.getLogger("blip")

IGNORE = -100

# Freezable parts per family: name -> attribute names of the HF model.
PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "blip-caption": {"vision": ("vision_model",), "text": ("text_decoder",)},
    "blip-vqa": {"vision": ("vision_model",), "text": ("text_encoder", "text_decoder")},
    "blip-itm": {"vision": ("vision_model",), "text": ("text_encoder",)},
    "blip2-opt": {
        "vision": ("vision_model",),
        "qformer": ("qformer", "query_tokens"),
        "language-model": ("language_model",),
        "projection": ("language_projection",),
    },
    "blip2-t5": {
        "vision": ("vision_model",),
        "qformer": ("qformer", "query_tokens"),
        "language-model": ("language_model",),
        "projection": ("language_projection",),
    },
    "blip2-itm": {
        "vision": ("vision_model",),
        "qformer": ("qformer", "query_tokens"),
        "text": ("embeddings",),
    },
}

# BLIP-2 keeps the image encoder and the LLM frozen and trains the Q-Former, its query tokens and
# the projection into the LLM (BLIP-2 paper, sec. 3; LAVIS freeze_vit=True, the OPT/T5 weights
# have requires_grad=False). BLIP fine-tunes everything (BLIP paper, sec. 5).
DEFAULT_FROZEN: dict[str, tuple[str, ...]] = {
    "blip-caption": (),
    "blip-vqa": (),
    "blip-itm": (),
    "blip2-opt": ("vision", "language-model"),
    "blip2-t5": ("vision", "language-model"),
    "blip2-itm": ("vision",),
}

TRAINABLE = {
    "caption": ("blip-caption", "blip2-opt", "blip2-t5"),
    "vqa": ("blip-vqa", "blip2-opt", "blip2-t5"),
    "retrieval": ("blip-itm", "blip2-itm"),
}


def check_trainable(family, task: str, source: str) -> None:
    """Raise a clear error when `family` cannot be fine-tuned for `task`."""
    if family.name in TRAINABLE[task]:
        return
    if task == "retrieval" and family.is_blip2:
        raise TaskNotSupportedError(
            f"{source} is a generative {family.label} checkpoint: it ranks texts by likelihood and has no "
            "ITC/ITM heads, so it cannot be fine-tuned for retrieval",
            hint="fine-tune it with --task caption, or use a retrieval checkpoint (BLIP ITM or BLIP-2 ITM)",
        )
    can = [t for t, families in TRAINABLE.items() if family.name in families]
    raise TaskNotSupportedError(
        f"{source} is a {family.label} checkpoint and cannot be fine-tuned for {task}"
        + (f"; it can be fine-tuned for: {', '.join(can)}" if can else "")
    )


def resolve_frozen(family, freeze: list[str] | None) -> list[str]:
    """The parts to freeze: the family default when `freeze` is None; `none` trains everything."""
    parts = PARTS[family.name]
    if freeze is None:
        return list(DEFAULT_FROZEN[family.name])
    names = [p.strip().lower() for p in freeze if p.strip()]
    if names == ["none"] or not names:
        return []
    unknown = [n for n in names if n not in parts]
    if unknown:
        raise UsageError(
            f"--freeze {', '.join(unknown)}: not a part of a {family.label} checkpoint",
            hint=f"its parts are: {', '.join(parts)} (or none)",
        )
    return list(dict.fromkeys(names))


def normalize_text(text: str) -> str:
    """For exact-match metrics: lower case, single spaces, no space before punctuation (BERT's decode
    writes `a cat .`), no trailing period."""
    import re

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
    from blip_toolkit.runtime.vqa import format_question

    ids: dict[str, int] = {}
    text_ids: dict[str, int] = {}
    out = []
    for i, row in enumerate(records):
        image_id = ids.setdefault(row["image"], len(ids))
        if task == "caption":
            prefix, target = prompt or "", row["caption"]
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
    `manifest:line: problem`."""

    def __init__(self, examples: list[Example], manifest: str, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.examples = examples
        self.manifest = manifest
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        try:
            image = open_image(example.image, max_pixels=self.max_pixels)
        except ImageLoadError as exc:
            return {"example": example, "image": None, "error": f"{self.manifest}:{example.line}: {exc}"}
        return {"example": example, "image": image, "error": None}


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
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
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

    # -- retrieval

    def _retrieval(self, images, examples) -> dict[str, Any]:
        # As runtime/retrieval.py scores: pixels from the processor, text from the (BERT) tokenizer
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
            "attention_mask": text["attention_mask"],
        }


# ----------------------------------------------------------------------------- losses


def token_loss(logits, labels, *, label_smoothing: float = 0.0, shift: bool = True):
    """Per-example sum of token cross-entropies and token counts.

    logits [B, T, V], labels [B, T] (-100 = ignored). With `shift`, position t predicts label t+1
    (decoder-only / BLIP decoders); without, logits and labels are already aligned (T5 decoder).
    Returns (sum [B], count [B])."""
    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    batch, length, vocab = logits.shape
    losses = F.cross_entropy(
        logits.reshape(-1, vocab).float(),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(batch, length)
    valid = labels != IGNORE
    return (losses * valid).sum(dim=1), valid.sum(dim=1)


class GatherWithGrad(torch.autograd.Function):
    """all_gather that passes gradients back to each rank's own slice (LAVIS `GatherLayer`; uses
    all_reduce, which gloo supports, unlike reduce_scatter)."""

    @staticmethod
    def forward(ctx, tensor):
        import torch.distributed as dist

        out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        import torch.distributed as dist

        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_all(tensor, *, grad: bool):
    """Concatenate `tensor` [B, ...] from every process (in rank order); identity on one process."""
    if not _distributed():
        return tensor
    import torch.distributed as dist

    if grad and tensor.requires_grad:
        return torch.cat(GatherWithGrad.apply(tensor), dim=0)
    out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def _rank_offset(batch_size: int) -> int:
    if not _distributed():
        return 0
    import torch.distributed as dist

    return dist.get_rank() * batch_size


# ----------------------------------------------------------------------------- ITC / ITM pieces


class BlipItmOps:
    """BlipForImageTextRetrieval, used piecewise as runtime/retrieval.py does (shared by the loss and
    the validation recall, so what is trained is what is scored)."""

    @staticmethod
    def image(model, pixel_values):
        """-> (image_embeds [B, P, D] for ITM, image_feat [B, E] normalised for ITC)."""
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        return image_embeds, F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)

    @staticmethod
    def text(model, input_ids, attention_mask):
        """-> text_feat [B, E] normalised (the unimodal text encoder's [CLS])."""
        hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(model.text_proj(hidden[:, 0, :]), dim=-1)

    @staticmethod
    def similarity(image_feat, text_feat):
        """[I, E] x [T, E] -> [I, T] cosine similarities."""
        return image_feat @ text_feat.t()

    @staticmethod
    def itm(model, image_embeds, input_ids, attention_mask):
        """Paired inputs (row i with row i) -> ITM logits [N, 2] (the image-grounded text encoder's [CLS])."""
        hidden = model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(
                image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
            ),
        ).last_hidden_state
        return model.itm_head(hidden[:, 0, :])


class Blip2ItmOps:
    """Blip2ForImageTextRetrieval: ITC is the max over query embeddings; ITM runs the Q-Former on
    queries + text and averages the head over the query outputs (as runtime/retrieval.py)."""

    @staticmethod
    def image(model, pixel_values):
        """-> (image_embeds [B, P, D] for ITM, image_feat [B, Q, E] normalised for ITC)."""
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_out = model.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask
        ).last_hidden_state
        feat = model.vision_projection(query_out.to(model.vision_projection.weight.dtype))
        return image_embeds, F.normalize(feat, dim=-1)

    @staticmethod
    def text(model, input_ids, attention_mask):
        """-> text_feat [B, E] normalised (the Q-Former's text-only [CLS])."""
        hidden = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        return F.normalize(
            model.text_projection(hidden[:, 0, :].to(model.text_projection.weight.dtype)), dim=-1
        )

    @staticmethod
    def similarity(image_feat, text_feat):
        """[I, Q, E] x [T, E] -> [I, T]: the best query per pair (BLIP-2 ITC)."""
        return torch.einsum("iqe,te->itq", image_feat, text_feat).amax(dim=-1)

    @staticmethod
    def itm(model, image_embeds, input_ids, attention_mask):
        """Paired inputs -> ITM logits [N, 2]."""
        num_queries = model.query_tokens.shape[1]
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = torch.cat(
            [
                torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device),
                attention_mask,
            ],
            dim=1,
        )
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=num_queries,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return model.itm_head(hidden[:, :num_queries, :].to(model.itm_head.weight.dtype)).mean(dim=1)


ITM_OPS = {"blip-itm": BlipItmOps, "blip2-itm": Blip2ItmOps}


# ----------------------------------------------------------------------------- training modules


class TaskModule(nn.Module):
    """Wraps the HF model so `forward(batch)` is the whole training objective. Accelerate prepares
    this wrapper, so under DDP every submodule call goes through one DDP forward.

    forward returns {"example_loss": [B] loss sums, "example_count": [B] counts}."""

    def __init__(
        self,
        model,
        family,
        *,
        frozen_parts: list[str],
        label_smoothing: float = 0.0,
        temperature: float = 0.07,
    ):
        super().__init__()
        self.model = model
        self.family = family
        self.frozen_parts = list(frozen_parts)
        self.label_smoothing = label_smoothing
        self.temperature = temperature
        self._frozen_modules: list[nn.Module] = []
        for part in self.frozen_parts:
            for attr in PARTS[family.name][part]:
                target = getattr(model, attr)
                if isinstance(target, nn.Parameter):
                    target.requires_grad_(False)
                else:
                    target.requires_grad_(False)
                    self._frozen_modules.append(target)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts stay in eval mode (no dropout): a fixed function of the input, as LAVIS does
        # for the frozen ViT (`disabled_train`).
        for module in self._frozen_modules:
            module.eval()
        return self


class CaptionLikeModule(TaskModule):
    """Captioning and VQA (generative losses), every family."""

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        model, name = self.model, self.family.name
        if name == "blip-caption":
            logits = model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
            ).logits
            total, count = token_loss(logits, batch["labels"], label_smoothing=self.label_smoothing)
        elif name == "blip-vqa":
            # BlipForQuestionAnswering.forward drops the decoder logits, so its three parts are called here.
            image_embeds = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            question = model.text_encoder(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
            ).last_hidden_state
            logits = model.text_decoder(
                input_ids=batch["decoder_input_ids"],
                attention_mask=batch["decoder_attention_mask"],
                encoder_hidden_states=question,
                encoder_attention_mask=batch["attention_mask"],
            ).logits
            total, count = token_loss(logits, batch["labels"], label_smoothing=self.label_smoothing)
        elif self.family.decoder_only:
            labels = batch["labels"]
            logits = model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
            ).logits
            logits = logits[:, -labels.size(1) :, :]  # the LM output aligned with the labels
            total, count = token_loss(logits, labels, label_smoothing=self.label_smoothing)
        else:  # encoder-decoder (T5)
            labels = batch["labels"]
            decoder_input_ids = model.language_model._shift_right(labels)
            logits = model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=decoder_input_ids,
            ).logits
            total, count = token_loss(logits, labels, label_smoothing=self.label_smoothing, shift=False)
        return {"example_loss": total, "example_count": count}


def retrieval_positives(image_ids, text_ids, other_image_ids, other_text_ids):
    """[B, B'] bool: row i and column j are a positive pair when they share the image (several
    captions of one image) or the text (one caption, several images)."""
    return (image_ids[:, None] == other_image_ids[None, :]) | (text_ids[:, None] == other_text_ids[None, :])


class RetrievalModule(TaskModule):
    """ITC + ITM with in-batch hard negatives (BLIP ITM and BLIP-2 ITM checkpoints)."""

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        ops = ITM_OPS[self.family.name]
        model = self.model
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        image_ids, text_ids = batch["image_id"], batch["text_id"]
        size = input_ids.shape[0]

        image_embeds, image_feat = ops.image(model, batch["pixel_values"])
        text_feat = ops.text(model, input_ids, attention_mask)

        # --- ITC: local rows against every process's batch (features gathered with gradients, as
        # LAVIS does), so several processes optimise the same objective as one with the global batch.
        image_all = gather_all(image_feat, grad=True)
        text_all = gather_all(text_feat, grad=True)
        ids_all = gather_all(image_ids, grad=False)
        text_ids_all = gather_all(text_ids, grad=False)
        sim_i2t = ops.similarity(image_feat, text_all) / self.temperature  # [B, B_all]
        sim_t2i = ops.similarity(image_all, text_feat).t() / self.temperature  # [B, B_all]
        positives = retrieval_positives(image_ids, text_ids, ids_all, text_ids_all).float()
        targets = positives / positives.sum(dim=1, keepdim=True)
        loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets).sum(dim=1)
        loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets).sum(dim=1)
        itc = (loss_i2t + loss_t2i) / 2  # [B]

        # --- ITM: positives plus one hard negative text per image and one hard negative image per
        # text, drawn within the local batch with probability softmax(ITC similarity) (ALBEF/BLIP).
        offset = _rank_offset(size)
        with torch.no_grad():
            local = slice(offset, offset + size) if sim_i2t.shape[1] != size else slice(0, size)
            same = retrieval_positives(image_ids, text_ids, image_ids, text_ids)
            weights_i2t = (F.softmax(sim_i2t[:, local].float(), dim=1) + 1e-5).masked_fill(same, 0)
            weights_t2i = (F.softmax(sim_t2i[:, local].float(), dim=1) + 1e-5).masked_fill(same, 0)
            has_neg = weights_i2t.sum(dim=1) > 0  # a batch of one image has no negative
        rows = torch.arange(size, device=input_ids.device)[has_neg]
        image_index = [torch.arange(size, device=input_ids.device)]
        text_index = [torch.arange(size, device=input_ids.device)]
        if len(rows):
            neg_text = torch.multinomial(weights_i2t[has_neg], 1, generator=generator).squeeze(1)
            neg_image = torch.multinomial(weights_t2i[has_neg], 1, generator=generator).squeeze(1)
            image_index += [rows, neg_image]
            text_index += [neg_text, rows]
        image_index = torch.cat(image_index)
        text_index = torch.cat(text_index)
        itm_logits = ops.itm(
            model, image_embeds[image_index], input_ids[text_index], attention_mask[text_index]
        )
        itm_labels = torch.zeros(len(image_index), dtype=torch.long, device=input_ids.device)
        itm_labels[:size] = 1
        itm = F.cross_entropy(itm_logits.float(), itm_labels)

        # Per example: its ITC row plus the batch's ITM mean, so the mean over examples is ITC + ITM.
        return {"example_loss": itc + itm, "example_count": torch.ones_like(itc, dtype=torch.long)}


def build_module(
    task: str, model, family, *, frozen_parts: list[str], label_smoothing: float, temperature: float
) -> TaskModule:
    cls = RetrievalModule if task == "retrieval" else CaptionLikeModule
    return cls(
        model, family, frozen_parts=frozen_parts, label_smoothing=label_smoothing, temperature=temperature
    )


# ----------------------------------------------------------------------------- validation metrics


def _loaded(model, processor, family, device):
    from blip_toolkit.runtime.loading import LoadedModel

    return LoadedModel(
        source="<training>",
        family=family,
        model=model,
        processor=processor,
        device=device,
        dtype=next(model.parameters()).dtype,
    )


def generated_texts(
    model,
    processor,
    family,
    examples: list[Example],
    images: Callable[[Example], Any],
    *,
    prompt_of: Callable[[Example], str | None],
    max_new_tokens: int,
    batch_size: int,
    device,
) -> list[str]:
    """Greedy generation with the same code as `blip caption` / `blip vqa` (runtime/generation.py),
    in batches of equal prompt token length (so no prompt padding changes the output)."""
    from collections import defaultdict

    from blip_toolkit.runtime.generation import GenerationOptions, generate, prompt_length

    loaded = _loaded(model, processor, family, device)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[prompt_length(loaded, prompt_of(e))].append(i)
    out: list[str] = [""] * len(examples)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts = [prompt_of(examples[i]) for i in chunk]
            texts = generate(
                loaded, [images(examples[i]) for i in chunk], prompts if prompts[0] else None, options
            )
            for i, text in zip(chunk, texts):
                out[i] = text
    return out


def exact_match(
    model,
    processor,
    family,
    task: str,
    examples: list[Example],
    images,
    *,
    max_new_tokens: int,
    batch_size: int,
    device,
) -> float:
    """Fraction of examples whose greedy caption / answer equals the target (after normalize_text).
    BLIP VQA checkpoints take the bare question (already in `prefix`)."""
    texts = generated_texts(
        model,
        processor,
        family,
        examples,
        images,
        prompt_of=lambda e: e.prefix or None,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
    )
    hits = sum(normalize_text(t) == normalize_text(e.target) for t, e in zip(texts, examples))
    return hits / max(len(examples), 1)


def recall_at_1(
    model, processor, family, examples: list[Example], images, *, batch_size: int, device, rerank: int = 16
) -> float:
    """Image-to-text recall@1 among all validation texts: ITC ranks every text, the top `rerank` are
    re-scored with ITM + ITC (LAVIS's protocol; `blip retrieval`'s default itm+itc score). A hit when
    the best text belongs to the image (any of its rows) or is identical to one of its texts."""
    ops = ITM_OPS[family.name]
    tokenizer = processor.tokenizer
    first_of_image: dict[int, Example] = {}
    for e in examples:
        first_of_image.setdefault(e.image_id, e)
    distinct = list(first_of_image.values())
    texts_of_image: dict[int, set[int]] = {}
    for e in examples:
        texts_of_image.setdefault(e.image_id, set()).add(e.text_id)
    with torch.no_grad():
        encoded = tokenizer(
            [e.target for e in examples], padding="longest", truncation=True, return_tensors="pt"
        )
        all_ids, all_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        chunk = batch_size * 4
        text_feat = torch.cat(
            [
                ops.text(model, all_ids[i : i + chunk], all_mask[i : i + chunk])
                for i in range(0, len(examples), chunk)
            ]
        )  # [T, E]
        hits = 0
        k = min(rerank, len(examples))
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            pixels = processor(images=[images(e) for e in chunk], return_tensors="pt")["pixel_values"].to(
                device
            )
            image_embeds, image_feat = ops.image(model, pixels)
            itc = ops.similarity(image_feat, text_feat).float()  # [b, T]
            top = itc.topk(k, dim=1).indices  # [b, k]
            for row, e in enumerate(chunk):
                candidates = top[row]
                embeds = image_embeds[row : row + 1].expand(k, *image_embeds.shape[1:])
                itm = ops.itm(model, embeds, all_ids[candidates], all_mask[candidates]).float()[:, 1]
                best = candidates[int(torch.argmax(itm + itc[row, candidates]))]
                hits += int(examples[int(best)].text_id in texts_of_image[e.image_id])
    return hits / max(len(distinct), 1)
