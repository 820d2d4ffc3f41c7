"""Encoder adapters: any supported Hugging Face vision tower -> patch tokens; targets also give their
own global image embedding, text embeddings, and a `TargetHead`.

One registry covers CLIP, SigLIP, BLIP (every head) and BLIP-2 checkpoints, and bare vision towers
(the built-in families: models/adapter_families.py; the adapter classes: models/adapter_base.py).
An adapter loads only what its role needs (a conditioning encoder the vision tower alone, a target its
vision and text towers and the projections).

    from blip_toolkit.models.adapters import load_encoder
    cond = load_encoder("Salesforce/blip2-opt-2.7b", role="cond")
    target = load_encoder("openai/clip-vit-large-patch14", role="target")
    tokens = cond.tokens(pixel_values)                   # [B, 1 + g*g, D] (or [B, g*g, D] without CLS)
    tokens, global_emb = target.encode_image(pixel_values)  # [B, T, D], [B, E]
    text = target.encode_text(["a cat"])                 # [C, E]
    head = target.head("cls", has_cls=True)               # TargetHead: tokens -> global

Tokens are the tower's `last_hidden_state`, unchanged: for CLIP that is *before* `post_layernorm`;
for BLIP, BLIP-2 and SigLIP it is after (transformers 5 conventions). The head accounts for it.

New families: `register_adapter(AdapterSpec(...))` (`AdapterSpec` from models/adapter_base.py)
with a `matches(config)` predicate and a `load` function returning an `EncoderAdapter` (or
`TargetAdapter`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from blip_toolkit.errors import ModelLoadError, UsageError
from blip_toolkit.log import quiet_transformers
from blip_toolkit.models.adapter_base import AdapterSpec, EncoderAdapter
from blip_toolkit.models.adapter_families import BUILTIN_ADAPTERS
from blip_toolkit.models.loading import resolve_source
from blip_toolkit.models.quantize import check_quantize

logger = logging.getLogger("blip")

ROLES = ("cond", "target")
TARGET_FAMILIES_TEXT = (
    "CLIP (e.g. openai/clip-vit-large-patch14), SigLIP (google/siglip-*), BLIP ITM (Salesforce/blip-itm-*)"
)

_REGISTRY: list[AdapterSpec] = list(BUILTIN_ADAPTERS)


def register_adapter(spec: AdapterSpec, *, first: bool = False) -> None:
    """Add a family to the registry (`first`: check it before the built-in ones)."""
    if first:
        _REGISTRY.insert(0, spec)
    else:
        _REGISTRY.append(spec)


def adapters() -> list[AdapterSpec]:
    return list(_REGISTRY)


def find_adapter(config: dict[str, Any], source: str = "checkpoint") -> AdapterSpec:
    """The registered family whose predicate accepts this config.json, or a clear error."""
    for spec in _REGISTRY:
        if spec.matches(config):
            return spec
    model_type = config.get("model_type", "")
    arch = (config.get("architectures") or [""])[0]
    what = f"model_type={model_type!r}" + (f", architecture {arch}" if arch else "")
    supported = ", ".join(spec.label for spec in _REGISTRY)
    raise ModelLoadError(f"{source}: unsupported encoder ({what})", hint=f"supported: {supported}")


def inspect_encoder(source: str) -> tuple[Any, AdapterSpec]:
    """Resolve `source` (hub id or local directory) and find its family, without loading weights."""
    resolved = resolve_source(source)
    return resolved, find_adapter(resolved.config, source)


def check_role(spec: AdapterSpec, role: str, source: str) -> None:
    """Refuse a family that cannot play `role`, saying what can."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    if role == "target" and not spec.can_target:
        reason = spec.target_refusal or f"{spec.label} has no text tower"
        raise UsageError(
            f"--target-encoder {source}: {reason}", hint=f"a target can be: {TARGET_FAMILIES_TEXT}"
        )


def load_encoder(
    source: str,
    role: str,
    *,
    device=None,
    dtype=None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> EncoderAdapter:
    """Load `source` as a conditioning (`role="cond"`) or target (`role="target"`) encoder on `device`
    in `dtype` (default CPU float32), `quantize`d ("int8" / "4bit", models/quantize.py) when asked:
    the towers' layers are, a target's projections and heads are not. Targets are `TargetAdapter`s."""
    resolved, spec = inspect_encoder(source)
    check_role(spec, role, source)
    if resolved.adapter is not None:
        raise UsageError(
            f"{source}: a LoRA adapter directory; pass the merged model (the output directory of "
            "blip finetune that holds the adapter) as an encoder"
        )
    device = device or torch.device("cpu")
    check_quantize(quantize, device)
    quiet_transformers()
    return spec.load(
        spec,
        resolved,
        role,
        device=device,
        dtype=dtype or torch.float32,
        trust_remote_code=trust_remote_code,
        quantize=quantize,
    )
