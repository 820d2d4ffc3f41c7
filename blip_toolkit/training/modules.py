"""Per task and family: the training module (forward -> loss), and which parts a run may freeze.

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
- InstructBLIP (Flan-T5 or Vicuna): as BLIP-2 with the same kind of language model, and the Q-Former
  also reads the prefix (the instruction; LAVIS `blip2_t5_instruct.py`, `blip2_vicuna_instruct.py`).
- Retrieval (`blip-itm`, `blip2-itm`): image-text contrastive loss (symmetric cross-entropy of
  in-batch similarities divided by a temperature; HF's ITM models have no learnable temperature,
  so it is a config value, 0.07 by default as in BLIP/BLIP-2's initial value) plus the image-text
  matching loss on positives and in-batch hard negatives sampled with probability given by the ITC
  similarities (ALBEF/BLIP/BLIP-2: one negative text per image and one negative image per text).
  BLIP-2's ITC is the max over the query embeddings (LAVIS `blip2_qformer.py`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from blip_toolkit.engine.distributed import distributed, gather_all
from blip_toolkit.errors import TaskNotSupportedError, UsageError
from blip_toolkit.models.itm import ITM_OPS
from blip_toolkit.training.data import IGNORE

logger = logging.getLogger("blip")

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
PARTS["instructblip-t5"] = PARTS["instructblip-vicuna"] = PARTS["blip2-opt"]

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
    # InstructBLIP as BLIP-2: frozen image encoder and LLM (InstructBLIP paper, sec. 2.3).
    "instructblip-t5": ("vision", "language-model"),
    "instructblip-vicuna": ("vision", "language-model"),
}

TRAINABLE = {
    "caption": ("blip-caption", "blip2-opt", "blip2-t5", "instructblip-t5", "instructblip-vicuna"),
    "vqa": ("blip-vqa", "blip2-opt", "blip2-t5", "instructblip-t5", "instructblip-vicuna"),
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


def _rank_offset(batch_size: int) -> int:
    if not distributed():
        return 0
    return dist.get_rank() * batch_size


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
                getattr(model, attr).requires_grad_(False)
        # Every part left without a trainable parameter (frozen above, or by LoRA, which freezes all
        # but its adapters) is kept in eval mode.
        for attrs in PARTS[family.name].values():
            for attr in attrs:
                target = getattr(model, attr)
                if isinstance(target, nn.Module) and not any(p.requires_grad for p in target.parameters()):
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
                **_qformer_text(batch),
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
                **_qformer_text(batch),
            ).logits
            total, count = token_loss(logits, labels, label_smoothing=self.label_smoothing, shift=False)
        return {"example_loss": total, "example_count": count}


def _qformer_text(batch: dict[str, Any]) -> dict[str, Any]:
    """InstructBLIP's Q-Former text inputs (the instruction), when the batch has them."""
    return {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}


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
            model, image_embeds[image_index], batch["itm_input_ids"][text_index], attention_mask[text_index]
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
