"""Encoder adapters: any supported Hugging Face vision tower -> patch tokens; targets also give their
own global image embedding, text embeddings, and a `TargetHead`.

One registry covers CLIP, SigLIP, BLIP (every head) and BLIP-2 checkpoints, and bare vision towers
(`CLIPVisionModel`, `SiglipVisionModel`, `BlipVisionModel`, `Blip2VisionModel`). An adapter loads
only what its role needs: a conditioning encoder loads the vision tower alone (from a full BLIP-2
checkpoint that is ~1B of 3.8B parameters: the OPT language model is never built), a target loads the
vision and text towers and the projections.

    from blip_toolkit.embeddings.adapters import load_encoder
    cond = load_encoder("Salesforce/blip2-opt-2.7b", role="cond")
    target = load_encoder("openai/clip-vit-large-patch14", role="target")
    tokens = cond.tokens(pixel_values)                   # [B, 1 + g*g, D] (or [B, g*g, D] without CLS)
    tokens, global_emb = target.encode_image(pixel_values)  # [B, T, D], [B, E]
    text = target.encode_text(["a cat"])                 # [C, E]
    head = target.head("cls", has_cls=True)               # TargetHead: tokens -> global

Tokens are the tower's `last_hidden_state`, unchanged: for CLIP that is *before* `post_layernorm`;
for BLIP, BLIP-2 and SigLIP it is after (transformers 5 conventions). The head accounts for it.

New families: `register_adapter(AdapterSpec(...))` with a `matches(config)` predicate and a `load`
function returning an `EncoderAdapter` (or `TargetAdapter`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoImageProcessor, AutoTokenizer

from blip_toolkit.embeddings.head import head_from_modules
from blip_toolkit.errors import ModelLoadError, UsageError
from blip_toolkit.log import quiet_transformers
from blip_toolkit.runtime.itm import BlipItmOps
from blip_toolkit.runtime.loading import resolve_source
from blip_toolkit.runtime.quantize import check_quantize, loading_kwargs, quantize_model

logger = logging.getLogger("blip")

ROLES = ("cond", "target")
TARGET_FAMILIES_TEXT = (
    "CLIP (e.g. openai/clip-vit-large-patch14), SigLIP (google/siglip-*), BLIP ITM (Salesforce/blip-itm-*)"
)


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


_REGISTRY: list[AdapterSpec] = []


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


# ----------------------------------------------------------------------------- adapters


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


class ClipTarget(TargetAdapter):
    """CLIP: global = visual_projection(post_layernorm(CLS)) (= get_image_features().pooler_output);
    text = get_text_features().pooler_output."""

    def _global(self, tokens, outputs):
        return self.model.visual_projection(self.model.vision_model.post_layernorm(tokens[:, 0]))

    def _text(self, input_ids, attention_mask):
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return self.model.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output

    def _head_modules(self):
        return self.model.vision_model.post_layernorm, self.model.visual_projection, None, ""


class SiglipTarget(TargetAdapter):
    """SigLIP: no CLS; global = the vision tower's attention-pooling head (pooler_output); text =
    get_text_features().pooler_output with max_length padding (how SigLIP was trained)."""

    text_padding = "max_length"

    def _global(self, tokens, outputs):
        return outputs.pooler_output

    def _text(self, input_ids, attention_mask):
        # SigLIP's text tower was trained without an attention mask on max_length-padded text.
        return self.model.get_text_features(input_ids=input_ids).pooler_output

    def _head_modules(self):
        vision = self.model.vision_model
        return None, None, vision.head, vision.config.hidden_act

    def default_pooling(self, has_cls: bool) -> str:
        return "map"


class BlipItmTarget(TargetAdapter):
    """BLIP ITM: global = vision_proj(last_hidden_state[:, 0]) (BLIP's last_hidden_state is already
    post-layernormed); text = text_proj(text_encoder(ids).last_hidden_state[:, 0]), both unnormalised:
    the ITC features of the one scorer (runtime/itm.py) before their normalisation."""

    def _global(self, tokens, outputs):
        return BlipItmOps.project_image(self.model, tokens)

    def _text(self, input_ids, attention_mask):
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return BlipItmOps.text_embeds(self.model, input_ids, mask)

    def _head_modules(self):
        return None, self.model.vision_proj, None, ""


# ----------------------------------------------------------------------------- loading


def _vision_only(
    class_name: str,
    resolved,
    *,
    device,
    dtype,
    trust_remote_code: bool,
    key_mapping: dict | None,
    quantize: str | None = None,
):
    """Load just the vision tower class from a full or vision-only checkpoint. The config class picks
    `vision_config` out of a full config; `key_mapping` strips the full model's `vision_model.` prefix
    where the tower class has none (BLIP, BLIP-2). Missing weights are an error: transformers would
    otherwise initialise them randomly with only a log line. `quantize`: runtime/quantize.py."""
    model_class = getattr(transformers, class_name)
    kwargs = {"key_mapping": key_mapping} if key_mapping else {}
    kwargs.update(loading_kwargs(quantize, device, dtype))
    try:
        model, info = model_class.from_pretrained(
            resolved.path,
            dtype=dtype,
            local_files_only=resolved.local_only,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{resolved.name}: cannot load the vision tower ({_first_line(exc)})") from exc
    _check_loading(resolved.name, class_name, info)
    return _placed(model, device, quantize, "quantization_config" in kwargs)


def _full_model(
    class_name: str, resolved, *, device, dtype, trust_remote_code: bool, quantize: str | None = None
):
    """The whole model (targets). Quantized, its projections and pooling heads stay in full
    precision: the target head saved beside the shards is built from them."""
    model_class = getattr(transformers, class_name)
    kwargs = loading_kwargs(quantize, device, dtype, skip=_HEAD_MODULES)
    try:
        model, info = model_class.from_pretrained(
            resolved.path,
            dtype=dtype,
            local_files_only=resolved.local_only,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{resolved.name}: cannot load {class_name} ({_first_line(exc)})") from exc
    _check_loading(resolved.name, class_name, info)
    return _placed(model, device, quantize, bool(kwargs), skip=_HEAD_MODULES)


# Projections and pooling heads of the target families (CLIP, SigLIP, BLIP ITM): never quantized.
_HEAD_MODULES = ("visual_projection", "text_projection", "head", "vision_proj", "text_proj", "itm_head")


def _placed(model, device, quantize: str | None, quantized_at_load: bool, *, skip: tuple[str, ...] = ()):
    """On `device` (bitsandbytes has placed a model it quantized), CPU int8 applied, in eval mode."""
    if not quantized_at_load:
        model.to(device)
    return quantize_model(model, quantize, device, skip=skip).eval()


def _check_loading(source: str, class_name: str, info: dict) -> None:
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        shown = ", ".join(sorted(missing)[:3])
        raise ModelLoadError(
            f"{source}: {len(missing)} weight(s) of {class_name} are not in the checkpoint "
            f"(e.g. {shown}); refusing to use randomly initialised weights"
        )


def _image_processor(resolved, trust_remote_code: bool):
    """The checkpoint's image processor on the PIL backend (see runtime.loading.load_processor)."""
    try:
        return AutoImageProcessor.from_pretrained(
            resolved.path,
            backend="pil",
            local_files_only=resolved.local_only,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"{resolved.name}: cannot load the image processor ({_first_line(exc)})"
        ) from exc


def _tokenizer(resolved, trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(
            resolved.path, local_files_only=resolved.local_only, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{resolved.name}: cannot load the tokenizer ({_first_line(exc)})") from exc


def _max_text_length(tokenizer, text_config) -> int:
    positions = int(getattr(text_config, "max_position_embeddings", 512) or 512)
    model_max = getattr(tokenizer, "model_max_length", positions) or positions
    return int(min(positions, model_max))


_PREFIX = {r"^vision_model\.": ""}


def _loader(
    vision_class: str, *, has_cls: bool, key_mapping: dict | None, target: tuple[str, type] | None = None
):
    """Build the `load` function of a family: vision tower only for cond, (class, adapter) for target."""

    def load(
        spec: AdapterSpec,
        resolved,
        role: str,
        *,
        device,
        dtype,
        trust_remote_code: bool = False,
        quantize: str | None = None,
    ):
        processor = _image_processor(resolved, trust_remote_code)
        if role == "cond" or target is None:
            vision = _vision_only(
                vision_class,
                resolved,
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                key_mapping=key_mapping,
                quantize=quantize,
            )
            return EncoderAdapter(
                source=resolved.name,
                spec=spec,
                vision=vision,
                image_processor=processor,
                vision_config=vision.config,
                has_cls=has_cls,
                device=device,
                dtype=dtype,
            )
        class_name, adapter_class = target
        model = _full_model(
            class_name,
            resolved,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            quantize=quantize,
        )
        tokenizer = _tokenizer(resolved, trust_remote_code)
        config = model.config
        embed_dim = _embed_dim(spec.name, model)
        return adapter_class(
            source=resolved.name,
            spec=spec,
            vision=model.vision_model,
            image_processor=processor,
            vision_config=config.vision_config,
            has_cls=has_cls,
            device=device,
            dtype=dtype,
            model=model,
            tokenizer=tokenizer,
            embed_dim=embed_dim,
            max_text_length=_max_text_length(tokenizer, config.text_config),
        )

    return load


def _embed_dim(family: str, model) -> int:
    if family == "clip":
        return model.visual_projection.out_features
    if family == "blip-itm":
        return model.vision_proj.out_features
    if family == "siglip":
        if not getattr(model.vision_model.config, "vision_use_head", True):
            raise ModelLoadError(
                "this SigLIP checkpoint has no vision pooling head, so it has no image embedding; "
                "it cannot be a target"
            )
        return model.vision_model.config.hidden_size
    raise ModelLoadError(f"no embedding size known for {family}")


def _model_type(config: dict) -> str:
    return config.get("model_type", "")


def _arch(config: dict) -> str:
    return (config.get("architectures") or [""])[0]


_BLIP2_REFUSAL = (
    "BLIP-2 cannot be the target encoder: its global image embedding needs the Q-Former, and only "
    "Blip2ForImageTextRetrieval has text embeddings. Use it as --cond-encoder"
)

for _spec in (
    AdapterSpec(
        "clip",
        "CLIP",
        lambda c: _model_type(c) == "clip",
        _loader("CLIPVisionModel", has_cls=True, key_mapping=None, target=("CLIPModel", ClipTarget)),
        can_target=True,
    ),
    AdapterSpec(
        "siglip",
        "SigLIP",
        lambda c: _model_type(c) == "siglip",
        _loader("SiglipVisionModel", has_cls=False, key_mapping=None, target=("SiglipModel", SiglipTarget)),
        can_target=True,
    ),
    AdapterSpec(
        "blip-itm",
        "BLIP ITM",
        lambda c: _model_type(c) == "blip" and _arch(c) == "BlipForImageTextRetrieval",
        _loader(
            "BlipVisionModel",
            has_cls=True,
            key_mapping=_PREFIX,
            target=("BlipForImageTextRetrieval", BlipItmTarget),
        ),
        can_target=True,
    ),
    AdapterSpec(
        "blip",
        "BLIP (captioning / VQA / base)",
        lambda c: _model_type(c) == "blip",
        _loader("BlipVisionModel", has_cls=True, key_mapping=_PREFIX),
        target_refusal="only BLIP image-text matching checkpoints (BlipForImageTextRetrieval) have the "
        "projections and text encoder a target needs",
    ),
    AdapterSpec(
        "blip2",
        "BLIP-2",
        lambda c: _model_type(c) == "blip-2",
        _loader("Blip2VisionModel", has_cls=True, key_mapping=_PREFIX),
        target_refusal=_BLIP2_REFUSAL,
    ),
):
    register_adapter(_spec)

# Bare vision towers: conditioning only (no text encoder to be a target).
for _name, _label, _type, _class, _has_cls in (
    ("clip-vision", "CLIP vision tower", "clip_vision_model", "CLIPVisionModel", True),
    ("siglip-vision", "SigLIP vision tower", "siglip_vision_model", "SiglipVisionModel", False),
    ("blip-vision", "BLIP vision tower", "blip_vision_model", "BlipVisionModel", True),
    ("blip2-vision", "BLIP-2 vision tower", "blip_2_vision_model", "Blip2VisionModel", True),
):
    register_adapter(
        AdapterSpec(
            _name,
            _label,
            lambda c, wanted=_type: _model_type(c) == wanted,
            _loader(_class, has_cls=_has_cls, key_mapping=None),
            target_refusal="a bare vision tower has no text encoder",
        )
    )


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
    in `dtype` (default CPU float32), `quantize`d ("int8" / "4bit", runtime/quantize.py) when asked:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
