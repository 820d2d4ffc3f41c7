"""LoRA fine-tuning with peft: `get_peft_model` with a `LoraConfig` on the family's attention
projections, everything else frozen; the export merges the adapter into a plain checkpoint and can
keep the adapter alone.

Default targets (module-name suffixes, peft's `target_modules`), per family:
- BLIP-2 and InstructBLIP: the language model's attention projections (OPT `q_proj k_proj v_proj
  out_proj`, LLaMA / Vicuna `q_proj k_proj v_proj o_proj`, T5 `q k v o` of its self- and cross-attention)
  and the Q-Former's (`query key value` and the output projection of its self- and cross-attention).
  The vision tower is frozen, as in BLIP-2 / InstructBLIP training.
- BLIP captioning / VQA / ITM: the BERT text model's self- and cross-attention projections.
- BLIP-2 ITM: the Q-Former's.

Memory on one GPU: with `--mixed-precision fp16|bf16` the frozen language model is stored in that
precision (LAVIS keeps BLIP-2's frozen OPT in float16 the same way) while the vision tower and the
Q-Former stay in float32 (BLIP-2 with a float16 vision tower gives NaN losses: LAVIS #409) and peft
keeps the LoRA weights in float32 (`autocast_adapter_dtype`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip_toolkit.errors import UsageError
from blip_toolkit.models.loading import require_extra

logger = logging.getLogger("blip")

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"

_QFORMER = tuple(
    f"{block}.{name}"
    for block in ("attention", "crossattention")
    for name in ("attention.query", "attention.key", "attention.value", "output.dense")
)
_BERT_TEXT = tuple(
    f"{block}.{name}"
    for block in ("attention", "crossattention")
    for name in ("self.query", "self.key", "self.value", "output.dense")
)
_OPT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_T5 = tuple(f"{block}.{p}" for block in ("SelfAttention", "EncDecAttention") for p in "qkvo")

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "blip-caption": _BERT_TEXT,
    "blip-vqa": _BERT_TEXT,
    "blip-itm": _BERT_TEXT,
    "blip2-opt": _OPT + _QFORMER,
    "blip2-t5": _T5 + _QFORMER,
    "blip2-itm": _QFORMER,
    "instructblip-t5": _T5 + _QFORMER,
    "instructblip-vicuna": _LLAMA + _QFORMER,
}


def resolve_targets(family, targets: list[str] | None) -> list[str]:
    """The module-name suffixes LoRA wraps: the family default, or the user's."""
    if targets:
        return list(dict.fromkeys(t.strip() for t in targets if t.strip()))
    return list(DEFAULT_TARGETS[family.name])


def apply_lora(model: nn.Module, family, *, r: int, alpha: float, dropout: float, targets: list[str]):
    """Wrap `model` with LoRA adapters on `targets` (peft `get_peft_model`); every other weight is
    frozen. Returns the PeftModel (it holds `model`, changed in place)."""
    peft = require_extra("peft", "lora", "--lora")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        with warnings.catch_warnings():
            # peft asks transformers' deprecated `is_gradient_checkpointing`: not the user's concern.
            warnings.simplefilter("ignore", FutureWarning)
            return peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(
            f"--lora-targets {','.join(targets)}: {first}",
            hint=f"{family.label} defaults: {','.join(DEFAULT_TARGETS[family.name])}",
        ) from exc


def store_frozen_language_model(model: nn.Module, family, mixed_precision: str) -> None:
    """With fp16 / bf16 mixed precision, keep the frozen language model of BLIP-2 / InstructBLIP in
    that precision (half its memory); call before `apply_lora`. Nothing else changes dtype."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    if dtype is not None and family.is_blip2 and hasattr(model, "language_model"):
        model.language_model.to(dtype)


def lora_layers(peft_model) -> dict[str, Any]:
    """name -> LoRA layer, for every layer peft wrapped (names as in the plain model)."""
    tuners = require_extra("peft.tuners.lora", "lora", "--lora")
    base = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, tuners.LoraLayer)}


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The plain model's state_dict with every adapter merged (W + B A * alpha / r, what peft's
    `merge_and_unload()` computes), float32 on CPU. Computed layer by layer from the live model, so
    exporting during training neither changes the model nor needs a second copy of it on the device."""
    layers = lora_layers(peft_model)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in peft_model.get_base_model().state_dict().items():
            if ".lora_" in key:
                continue
            if ".base_layer." in key:
                owner, _, leaf = key.partition(".base_layer.")
                key = f"{owner}.{leaf}"
                if leaf == "weight":
                    value = value.float() + layers[owner].get_delta_weight(ADAPTER_NAME).float()
            out[key] = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype)
    return out


def export_lora(peft_model, directory: Path, *, keep_adapter: bool, base_model: str) -> None:
    """Write the merged model (`save_pretrained`, float32) into `directory` and, with `keep_adapter`,
    the adapter alone into `directory/adapter/` (adapter_config.json + adapter_model.safetensors),
    naming `base_model` as its base so `--model directory/adapter` finds it."""
    state = merged_state_dict(peft_model)
    peft_model.get_base_model().save_pretrained(directory, state_dict=state)
    if keep_adapter:
        config = peft_model.peft_config[ADAPTER_NAME]
        previous = config.base_model_name_or_path
        config.base_model_name_or_path = base_model
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                peft_model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
        finally:
            config.base_model_name_or_path = previous


def base_reference(source: str) -> str:
    """What an adapter names as its base: the absolute path of a local directory, else the hub id."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source
