"""The built-in encoder families: CLIP, SigLIP, BLIP (every head), BLIP-2 and the bare vision towers
(`CLIPVisionModel`, `SiglipVisionModel`, `BlipVisionModel`, `Blip2VisionModel`), and the target
adapters of the three families that can be a target (CLIP, SigLIP, BLIP ITM). A family's `load` reads
only what its role needs: a conditioning encoder loads the vision tower alone (from a full BLIP-2
checkpoint that is ~1B of 3.8B parameters: the OPT language model is never built), a target loads the
vision and text towers and the projections. models/adapters.py registers them."""

from __future__ import annotations

from blip_toolkit.errors import ModelLoadError
from blip_toolkit.models.adapter_base import AdapterSpec, EncoderAdapter, TargetAdapter
from blip_toolkit.models.adapter_loading import (
    load_full_model,
    load_image_processor,
    load_tokenizer,
    load_vision_tower,
    max_text_length,
)
from blip_toolkit.models.itm import BlipItmOps


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
    the ITC features of the one scorer (models/itm.py) before their normalisation."""

    def _global(self, tokens, outputs):
        return BlipItmOps.project_image(self.model, tokens)

    def _text(self, input_ids, attention_mask):
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return BlipItmOps.text_embeds(self.model, input_ids, mask)

    def _head_modules(self):
        return None, self.model.vision_proj, None, ""


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
        processor = load_image_processor(resolved, trust_remote_code)
        if role == "cond" or target is None:
            vision = load_vision_tower(
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
        model = load_full_model(
            class_name,
            resolved,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            quantize=quantize,
        )
        tokenizer = load_tokenizer(resolved, trust_remote_code)
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
            max_text_length=max_text_length(tokenizer, config.text_config),
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

# In the order they are tried: the first whose predicate accepts a config.json is its family.
BUILTIN_ADAPTERS: tuple[AdapterSpec, ...] = (
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
    # Bare vision towers: conditioning only (no text encoder to be a target).
    *(
        AdapterSpec(
            name,
            label,
            lambda c, wanted=model_type: _model_type(c) == wanted,
            _loader(class_name, has_cls=has_cls, key_mapping=None),
            target_refusal="a bare vision tower has no text encoder",
        )
        for name, label, model_type, class_name, has_cls in (
            ("clip-vision", "CLIP vision tower", "clip_vision_model", "CLIPVisionModel", True),
            ("siglip-vision", "SigLIP vision tower", "siglip_vision_model", "SiglipVisionModel", False),
            ("blip-vision", "BLIP vision tower", "blip_vision_model", "BlipVisionModel", True),
            ("blip2-vision", "BLIP-2 vision tower", "blip_2_vision_model", "Blip2VisionModel", True),
        )
    ),
)
