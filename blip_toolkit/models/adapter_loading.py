"""Loading the parts of an encoder checkpoint for the adapters (models/adapter_families.py): the
vision tower alone (from a full or vision-only checkpoint), the whole model of a target, its image
processor (PIL backend) and tokenizer. Missing weights are an error, never a random initialisation;
`quantize` follows models/quantize.py, with a target's projections and pooling heads kept in full
precision."""

from __future__ import annotations

import transformers
from transformers import AutoImageProcessor, AutoTokenizer

from blip_toolkit.errors import ModelLoadError
from blip_toolkit.models.quantize import loading_kwargs, quantize_model


def load_vision_tower(
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
    otherwise initialise them randomly with only a log line. `quantize`: models/quantize.py."""
    kwargs = {"key_mapping": key_mapping} if key_mapping else {}
    kwargs.update(loading_kwargs(quantize, device, dtype))
    model = _from_pretrained(class_name, resolved, "the vision tower", dtype, trust_remote_code, kwargs)
    return _placed(model, device, dtype, quantize, "quantization_config" in kwargs)


def load_full_model(
    class_name: str, resolved, *, device, dtype, trust_remote_code: bool, quantize: str | None = None
):
    """The whole model (targets). Quantized, its projections and pooling heads stay in full
    precision: the target head saved beside the shards is built from them."""
    kwargs = loading_kwargs(quantize, device, dtype, skip=_HEAD_MODULES)
    model = _from_pretrained(class_name, resolved, class_name, dtype, trust_remote_code, kwargs)
    return _placed(model, device, dtype, quantize, bool(kwargs), skip=_HEAD_MODULES)


def _from_pretrained(class_name: str, resolved, what: str, dtype, trust_remote_code: bool, kwargs: dict):
    """`from_pretrained` of a transformers class; a failure or missing weights name `what`."""
    try:
        model, info = getattr(transformers, class_name).from_pretrained(
            resolved.path,
            dtype=dtype,
            local_files_only=resolved.local_only,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{resolved.name}: cannot load {what} ({_first_line(exc)})") from exc
    _check_loading(resolved.name, class_name, info)
    return model


# Projections and pooling heads of the target families (CLIP, SigLIP, BLIP ITM): never quantized.
_HEAD_MODULES = ("visual_projection", "text_projection", "head", "vision_proj", "text_proj", "itm_head")


def _placed(
    model, device, dtype, quantize: str | None, quantized_at_load: bool, *, skip: tuple[str, ...] = ()
):
    """On `device` (bitsandbytes has placed a model it quantized on CUDA), CPU quantization applied,
    in eval mode."""
    if not quantized_at_load:
        model.to(device)
    return quantize_model(model, quantize, device, dtype=dtype, skip=skip).eval()


def _check_loading(source: str, class_name: str, info: dict) -> None:
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        shown = ", ".join(sorted(missing)[:3])
        raise ModelLoadError(
            f"{source}: {len(missing)} weight(s) of {class_name} are not in the checkpoint "
            f"(e.g. {shown}); refusing to use randomly initialised weights"
        )


def load_image_processor(resolved, trust_remote_code: bool):
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


def load_tokenizer(resolved, trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(
            resolved.path, local_files_only=resolved.local_only, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{resolved.name}: cannot load the tokenizer ({_first_line(exc)})") from exc


def max_text_length(tokenizer, text_config) -> int:
    positions = int(getattr(text_config, "max_position_embeddings", 512) or 512)
    model_max = getattr(tokenizer, "model_max_length", positions) or positions
    return int(min(positions, model_max))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
