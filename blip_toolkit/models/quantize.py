"""Quantized inference: `--quantize int8|4bit` for caption, vqa, retrieval and the encoders of
extract-embeddings.

Which library does the work depends on the device (each the one that really runs there; measured
in bench/bench_quantize.py):

- CUDA: bitsandbytes through transformers' `BitsAndBytesConfig`, applied while the weights load:
  `int8` is LLM.int8() (`load_in_8bit`), `4bit` is NF4 (`load_in_4bit`, `bnb_4bit_quant_type="nf4"`)
  computing in the run's dtype.
- CPU, `int8`: torch's dynamic int8 quantization of `nn.Linear` (`torch.ao.quantization.quantize_dynamic`
  with per-channel weight scales): int8 weights, activations quantized per batch, fbgemm / oneDNN int8
  GEMMs. Nothing to install. bitsandbytes' CPU LLM.int8() casts activations to float16 (emulated on
  most CPUs) and was slower and larger here; torchao was left out (see bench/bench_quantize.py).
- CPU, `4bit`: bitsandbytes' NF4 (`Linear4bit` / `Params4bit`, with the settings of the same
  `BitsAndBytesConfig`). Refused with one line when bitsandbytes is missing or its CPU backend cannot
  quantize here. On CPUs with AVX512-BF16 bitsandbytes repacks each weight at its first forward for a
  fused bf16 kernel, which only takes layers with out_features % 32 == 0 and in_features a multiple of
  the block size (64); any other layer crashed inside bitsandbytes (`shape '[96, 0]' is invalid`).
  Such layers keep bitsandbytes' generic path (dequantize, then a matmul in the compute dtype), with
  one log line saying which and why. `BLIP_4BIT_CPU_PACKED=0` keeps every layer on the generic path
  (the tests compare both paths on CPUs that have the fused one).

How, on CPU: the model loads lazily (its weights are views of the memory-mapped checkpoint, read
only when used), then its Linear layers are quantized a parent module at a time, and the checkpoint
pages of each float weight just quantized are given back (models/mapped_pages.py). The float model
is never resident as a whole, so quantized runs peak below float32 ones. (Quantizing inside
transformers' loading, as on CUDA, leaves every float page resident: the quantized model then ended
up larger than the float one.)

Which layers: every `nn.Linear` except the ones transformers keeps in full precision for
bitsandbytes too (the output layer / tied embeddings, and the model's `_keep_in_fp32_modules`, such
as BLIP-2's Q-Former), so the CPU and CUDA paths quantize the same layers.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.quantizers.base import HfQuantizer

from blip_toolkit.config import QUANTIZE_MODES
from blip_toolkit.errors import UsageError
from blip_toolkit.models.mapped_pages import CheckpointMappings, release, shared_storages

logger = logging.getLogger("blip")

EXTRA_HINT = "pip install 'blip-toolkit[quantize]'"


def check_quantize(mode: str | None, device) -> None:
    """Refuse a quantization mode this device cannot run (UsageError, exit 2), before any loading."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise UsageError(f"--quantize {mode!r}: use one of {', '.join(QUANTIZE_MODES)}")
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and mode == "4bit"):
        _bitsandbytes(mode, device)
    elif device.type == "cpu":
        if not hasattr(getattr(torch, "ao", None), "quantization"):
            raise UsageError("--quantize int8 on CPU needs torch.ao.quantization, which this torch lacks")
    else:
        raise UsageError(f"--quantize {mode} runs on CPU or CUDA, not on {device.type}")


def _bitsandbytes(mode: str, device):
    """The bitsandbytes module, after checking that it can quantize on `device` (one tiny 4-bit
    round trip on CPU: its CPU backend differs between builds and machines)."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as exc:
        where = "CUDA" if device.type == "cuda" else "CPU"
        raise UsageError(
            f"--quantize {mode} on {where} needs bitsandbytes, which is not installed", hint=EXTRA_HINT
        ) from exc
    if device.type == "cpu":
        try:
            with torch.no_grad():
                weight = torch.linspace(-1, 1, 64 * 64).reshape(64, 64)
                packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
                restored = bnb.functional.dequantize_4bit(packed, state)
            ok = bool(torch.isfinite(restored).all()) and float((restored - weight).abs().max()) < 0.2
        except Exception as exc:  # noqa: BLE001 - any failure of the backend means: not supported here
            raise UsageError(
                f"--quantize 4bit: this CPU has no bitsandbytes 4-bit support ({type(exc).__name__}); "
                "use --quantize int8 or a CUDA device"
            ) from exc
        if not ok:
            raise UsageError("--quantize 4bit: bitsandbytes' CPU backend gives wrong 4-bit weights here")
    return bnb


def loading_kwargs(mode: str | None, device, dtype, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Extra `from_pretrained` arguments: on CUDA bitsandbytes quantizes while the weights load; on
    CPU nothing (`quantize_model` quantizes after the lazy load). `skip`: module names kept in full
    precision instead of transformers' default list."""
    device = torch.device(device)
    if mode is None or device.type == "cpu":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": bitsandbytes_config(mode, dtype, skip), "device_map": {"": index}}


def bitsandbytes_config(mode: str, dtype, skip: tuple[str, ...] = ()) -> BitsAndBytesConfig:
    """The transformers config of bitsandbytes' `int8` (LLM.int8()) or `4bit` (NF4) in `dtype`."""
    skip_modules = list(skip) or None
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip_modules,
    )


def quantize_model(
    model: nn.Module, mode: str | None, device, *, dtype=torch.float32, skip: tuple[str, ...] = ()
) -> nn.Module:
    """Quantize a lazily loaded model in place where the loading did not (CPU); returns the model.
    Layer by layer, each float weight's checkpoint pages given back once it is quantized (module
    docstring). `skip`: module names kept in full precision instead of transformers' default list."""
    if mode is None or torch.device(device).type != "cpu":
        return model
    names = linear_layers(model, skip=skip)
    convert = _int8_layers if mode == "int8" else _nf4_layers(bitsandbytes_config(mode, dtype))
    mappings = CheckpointMappings.current()
    tied = shared_storages(model)
    released = 0
    for parent_name, children in _by_parent(names).items():
        parent = model.get_submodule(parent_name)
        weights = [getattr(parent, child).weight for child in children]
        convert(parent, children)
        unused = [w for w in weights if w.untyped_storage().data_ptr() not in tied]
        released += release(unused, mappings)
    if mode == "4bit":
        guard_cpu_packing(model)
    logger.debug("quantized %d linear layers to %s; %.0f MB of float weights released", len(names), mode,
                 released / 2**20)  # fmt: skip
    return model


def _by_parent(names: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        groups.setdefault(parent, []).append(child)
    return groups


def _int8_layers(parent: nn.Module, children: list[str]) -> None:
    """torch's dynamic int8 quantization (per-channel weight scales) of `parent`'s Linear `children`."""
    with warnings.catch_warnings():
        # torch marks its eager quantization API deprecated in favour of torchao (see module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        torch.ao.quantization.quantize_dynamic(
            parent, dict.fromkeys(children, qconfig), dtype=torch.qint8, inplace=True
        )


# bitsandbytes' fused CPU kernel (functional._convert_weight_packed_for_cpu) packs weights in blocks of
# 32 output rows and reshapes the block scales to [out_features, in_features // blocksize].
CPU_PACK_ROWS = 32


def cpu_packing_problem(out_features: int, in_features: int, blocksize: int) -> str | None:
    """Why bitsandbytes' AVX512-BF16 packed path cannot take a [out_features, in_features] NF4 weight
    quantized in blocks of `blocksize`, or None when it can."""
    if out_features % CPU_PACK_ROWS:
        return f"out_features {out_features} is not a multiple of {CPU_PACK_ROWS}"
    if in_features % blocksize:
        return f"in_features {in_features} is not a multiple of the block size {blocksize}"
    return None


def cpu_packing_enabled() -> bool:
    """Whether bitsandbytes may use its fused CPU path at all (`BLIP_4BIT_CPU_PACKED=0` turns it off)."""
    return os.environ.get("BLIP_4BIT_CPU_PACKED", "").strip() not in ("0", "false", "no")


def guard_cpu_packing(model: nn.Module) -> list[str]:
    """Keep every bitsandbytes `Linear4bit` of `model` that the fused AVX512-BF16 CPU path cannot take
    (or all of them, with BLIP_4BIT_CPU_PACKED=0) on bitsandbytes' generic path; returns their names.
    A no-op on CPUs without that path (the flag is already off there)."""
    enabled = cpu_packing_enabled()
    kept: dict[str, str] = {}
    for name, module in model.named_modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        blocksize = getattr(state, "blocksize", 64)
        problem = cpu_packing_problem(module.out_features, module.in_features, blocksize)
        if problem or not enabled:
            module.support_avx512bf16_for_cpu = False
            kept[name] = problem or "BLIP_4BIT_CPU_PACKED=0"
    if kept:
        first = next(iter(kept.items()))
        logger.info(
            "4bit on CPU: %d layer(s) use bitsandbytes' generic path instead of its AVX512-BF16 packed "
            "one (e.g. %s: %s)",
            len(kept),
            *first,
        )
    return list(kept)


def _nf4_layers(config: BitsAndBytesConfig):
    """A converter replacing Linear children by bitsandbytes' `Linear4bit`, quantized the way
    transformers' bitsandbytes integration does it (its `replace_with_bnb_linear` module, then
    `Params4bit(weight, **module.weight.__dict__).to(device)`), with `config`'s settings."""
    bnb = importlib.import_module("bitsandbytes")

    def convert(parent: nn.Module, children: list[str]) -> None:
        for child in children:
            linear = getattr(parent, child)
            with torch.device("meta"):
                layer = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    linear.bias is not None,
                    config.bnb_4bit_compute_dtype,
                    compress_statistics=config.bnb_4bit_use_double_quant,
                    quant_type=config.bnb_4bit_quant_type,
                    quant_storage=config.bnb_4bit_quant_storage,
                )
            weight = linear.weight.detach()
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **layer.weight.__dict__).to(
                weight.device
            )
            layer.bias = linear.bias
            layer.requires_grad_(False)
            setattr(parent, child, layer)

    return convert


def linear_layers(model: nn.Module, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Qualified names of the `nn.Linear` layers to quantize: all but those transformers keeps in
    full precision for bitsandbytes (output layer, tied weights, `_keep_in_fp32_modules`), or all
    but `skip` when given (as bitsandbytes' `llm_int8_skip_modules`)."""
    skip = set(_kept_in_full_precision(model, skip))
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        parts = name.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if prefixes & skip or any(p in skip for p in parts):
            continue
        out.append(name)
    return out


def _kept_in_full_precision(model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    """What transformers' bitsandbytes quantizers leave unquantized (the same rule, so CPU and CUDA
    quantize the same layers)."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    try:
        return HfQuantizer.get_modules_to_not_convert(model, list(skip) or None, keep)
    except Exception:  # noqa: BLE001 - a bare vision tower has no output embeddings
        return keep + list(skip)


def empty_output_error(mode: str) -> str:
    """The message for an empty caption / answer of a quantized model (transformers #30383)."""
    return (
        f"the {mode}-quantized model generated nothing (a known failure of quantized generation, "
        "transformers #30383); not written as a result; run it without --quantize"
    )
