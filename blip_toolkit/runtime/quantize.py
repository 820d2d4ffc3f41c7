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
- CPU, `4bit`: bitsandbytes' CPU backend (NF4). Refused with one line when bitsandbytes is missing or
  its CPU backend cannot quantize here.

Which layers: every `nn.Linear` except the ones transformers keeps in full precision for
bitsandbytes too (the output layer / tied embeddings, and the model's `_keep_in_fp32_modules`, such
as BLIP-2's Q-Former), so the CPU and CUDA paths quantize the same layers.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.quantizers.base import HfQuantizer

from blip_toolkit.config import QUANTIZE_MODES
from blip_toolkit.errors import UsageError

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
    """Extra `from_pretrained` arguments: bitsandbytes quantizes while the weights load (CUDA, and
    4-bit on CPU); the CPU int8 path quantizes after loading (`quantize_model`). `skip`: module
    names kept in full precision instead of transformers' default list."""
    device = torch.device(device)
    if mode is None or (device.type == "cpu" and mode == "int8"):
        return {}
    skip_modules = list(skip) or None
    if mode == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip_modules,
        )
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        index = "cpu"
    return {"quantization_config": config, "device_map": {"": index}}


def quantize_model(model: nn.Module, mode: str | None, device, *, skip: tuple[str, ...] = ()) -> nn.Module:
    """Quantize a loaded model in place where the loading did not (CPU int8); returns the model.
    `skip`: module names kept in full precision instead of transformers' default list."""
    if mode != "int8" or torch.device(device).type != "cpu":
        return model
    names = linear_layers(model, skip=skip)
    with warnings.catch_warnings():
        # torch marks its eager quantization API deprecated in favour of torchao (see module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        torch.ao.quantization.quantize_dynamic(
            model, {name: qconfig for name in names}, dtype=torch.qint8, inplace=True
        )
    logger.debug("quantized %d linear layers to int8 (dynamic, per channel)", len(names))
    return model


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


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False)) or any(
        type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()
    )


def empty_output_error(mode: str) -> str:
    """The message for an empty caption / answer of a quantized model (transformers #30383)."""
    return (
        f"the {mode}-quantized model generated nothing (a known failure of quantized generation, "
        "transformers #30383); not written as a result; run it without --quantize"
    )
