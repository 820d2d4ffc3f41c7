"""What an encoder adapter is: `AdapterSpec` (one family of checkpoints in the registry of
models/adapters.py), `EncoderAdapter` (a loaded vision tower -> tokens) and `TargetAdapter` (a
target encoder: tokens plus its own global image embedding, text embeddings and a `TargetHead`).
The built-in families are in models/adapter_families.py.

Tokens are the tower's `last_hidden_state`, unchanged: for CLIP that is *before* `post_layernorm`;
for BLIP, BLIP-2 and SigLIP it is after (transformers 5 conventions). The head accounts for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from blip_toolkit.embeddings.head import head_from_modules
from blip_toolkit.errors import ModelLoadError, UsageError


@dataclass(frozen=True)
class AdapterSpec:
    """One family of checkpoints. `matches(config_dict)` recognises its config.json; `load(resolved,
    role, device, dtype, trust_remote_code, quantize)` returns an adapter; `target_refusal`, when set,
    is why this family cannot be a target."""

    name: str
    label: str
    matches: Callable[[dict[str, Any]], bool]
    load: Callable[..., EncoderAdapter]
    can_target: bool = False
    target_refusal: str | None = None


class EncoderAdapter:
    """A loaded vision tower. `tokens(pixel_values)` gives all its output tokens, float32.

    Attributes: `source`, `spec` (family), `model` (the vision module), `image_processor` (a
    picklable callable: DataLoader workers preprocess with it), `hidden_size` D, `image_size`,
    `patch_size`, `grid` g (patches per side), `has_cls` (token 0 is CLS), `device`, `dtype`."""

    def __init__(
        self,
        *,
        source: str,
        spec: AdapterSpec,
        vision,
        image_processor,
        vision_config,
        has_cls: bool,
        device,
        dtype,
    ):
        self.source = source
        self.spec = spec
        self.vision = vision
        self.image_processor = image_processor
        self.hidden_size = int(vision_config.hidden_size)
        self.image_size = int(vision_config.image_size)
        self.patch_size = int(vision_config.patch_size)
        self.grid = self.image_size // self.patch_size
        self.has_cls = has_cls
        self.device = device
        self.dtype = dtype

    @property
    def num_tokens(self) -> int:
        """Tokens per image out of the tower: g*g (+1 with CLS)."""
        return self.grid * self.grid + (1 if self.has_cls else 0)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "family": self.spec.name,
            "label": self.spec.label,
            "hidden_size": self.hidden_size,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "grid": self.grid,
            "has_cls": self.has_cls,
        }

    def _vision_outputs(self, pixel_values):
        with torch.no_grad():
            return self.vision(pixel_values=pixel_values.to(self.device, self.dtype), return_dict=True)

    def tokens(self, pixel_values):
        """pixel_values [B, 3, H, W] -> tokens [B, T, D] float32 on CPU (T = 1 + g*g with CLS, else g*g)."""
        out = self._vision_outputs(pixel_values).last_hidden_state  # [B, T, D]
        self._check_tokens(out)
        return out.float().cpu()

    def _check_tokens(self, tokens) -> None:
        if tokens.shape[1] != self.num_tokens:
            raise ModelLoadError(
                f"{self.source}: the vision tower gave {tokens.shape[1]} tokens, expected "
                f"{self.num_tokens} ({self.grid}x{self.grid}{' + CLS' if self.has_cls else ''}); "
                "is the image processor's size the model's image_size?"
            )


class TargetAdapter(EncoderAdapter):
    """A target encoder: tokens plus the encoder's own global image embedding, text embeddings and a
    head. Subclasses implement `_global(last_hidden_state, outputs)`, `_text(input_ids, mask)` and
    `_head_modules()`. `embed_dim` is E."""

    text_padding: str | bool = True

    def __init__(self, *, model, tokenizer, embed_dim: int, max_text_length: int, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.embed_dim = int(embed_dim)
        self.max_text_length = int(max_text_length)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "embed_dim": self.embed_dim}

    def encode_image(self, pixel_values):
        """pixel_values [B, 3, H, W] -> (tokens [B, T, D], global [B, E]), float32 on CPU, one forward."""
        outputs = self._vision_outputs(pixel_values)
        tokens = outputs.last_hidden_state  # [B, T, D]
        self._check_tokens(tokens)
        with torch.no_grad():
            global_emb = self._global(tokens, outputs)  # [B, E]
        return tokens.float().cpu(), global_emb.float().cpu()

    def encode_text(self, texts: list[str], *, batch_size: int = 64):
        """texts (C strings) -> text embeddings [C, E] float32 on CPU, unnormalised."""
        out = torch.empty(len(texts), self.embed_dim, dtype=torch.float32)
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            encoded = self.tokenizer(
                chunk,
                padding=self.text_padding,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            with torch.no_grad():
                emb = self._text(encoded["input_ids"].to(self.device), encoded.get("attention_mask"))
            out[start : start + len(chunk)] = emb.float().cpu()
        return out

    def head(self, pooling: str, *, has_cls: bool, info: dict[str, Any] | None = None):
        """A TargetHead mapping stored tokens (layout: CLS first iff `has_cls`) to this encoder's space."""
        if pooling == "cls" and not has_cls:
            raise UsageError("--head-pool cls needs --tokens cls+patch (the CLS token must be stored)")
        norm, proj, map_head, act = self._head_modules()
        if pooling == "map" and map_head is None:
            raise UsageError(
                f"--head-pool map is SigLIP's attention pooling; {self.spec.label} has none (use cls or mean)"
            )
        return head_from_modules(
            hidden_size=self.hidden_size,
            embed_dim=self.embed_dim,
            pooling=pooling,
            has_cls=has_cls,
            norm=norm,
            proj=proj,
            map_head=map_head if pooling == "map" else None,
            map_activation=act,
            info=info,
        )

    def default_pooling(self, has_cls: bool) -> str:
        """cls for cls+patch tokens (the head then reproduces the encoder's embedding), else mean
        (BLIP3-o pools patches); SigLIP uses its own attention pooling."""
        return "cls" if has_cls else "mean"

    # subclass hooks
    def _global(self, tokens, outputs):  # pragma: no cover - abstract
        raise NotImplementedError

    def _text(self, input_ids, attention_mask):  # pragma: no cover - abstract
        raise NotImplementedError

    def _head_modules(self):  # pragma: no cover - abstract
        raise NotImplementedError
