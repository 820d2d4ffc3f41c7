"""From a `--model` source (hub id or local directory) to a family, a model and a processor.

The family is detected from the checkpoint's `config.json` (model_type and architectures), so a
fine-tuned directory works exactly like the hub checkpoint it came from. A LoRA adapter directory
(`adapter_config.json` + `adapter_model.safetensors`, as `blip finetune --lora --keep-adapter` writes
it) is resolved to its base model, named in the adapter's config, and merged into it when loaded.
Offline, an uncached hub id fails in well under 10 seconds with a message that says how to pass a
local directory (the hub client would otherwise spend ~25 s retrying).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor, TimeoutError
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
from transformers import AutoProcessor

from blip_toolkit.errors import ModelLoadError, TaskNotSupportedError, UsageError
from blip_toolkit.log import quiet_transformers
from blip_toolkit.models.device import FallbackRunner, model_width, resolve_device, resolve_dtype
from blip_toolkit.models.fast_attention import use_fused_text_attention, use_fused_vision_attention
from blip_toolkit.models.fast_linear import pack_linear_layers
from blip_toolkit.models.quantize import check_quantize, loading_kwargs, quantize_model
from blip_toolkit.models.spec import LoadSpec

logger = logging.getLogger("blip")

TASKS = ("caption", "vqa", "retrieval")

# InstructBLIP's captioning instruction when `--prompt` is not given: LAVIS's COCO captioning
# evaluation of InstructBLIP (lavis/projects/instructblip/caption_coco_*_eval_*.yaml, `prompt:`).
DEFAULT_INSTRUCTION = "A short image caption."

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Family:
    """A kind of checkpoint: what it is called, which transformers class loads it, what it can do."""

    name: str
    label: str
    class_name: str
    tasks: tuple[str, ...]
    is_blip2: bool = False  # a Q-Former and a language model: BLIP-2 and InstructBLIP
    decoder_only: bool = False  # the language model is decoder-only (OPT, Vicuna / LLaMA)
    instruct: bool = False  # InstructBLIP: the Q-Former reads the instruction too
    default_prompt: str | None = None  # captioning without --prompt uses this instruction

    def model_class(self):
        return getattr(transformers, self.class_name)


FAMILIES = {
    f.name: f
    for f in (
        Family("blip-caption", "BLIP captioning", "BlipForConditionalGeneration", ("caption",)),
        Family("blip-vqa", "BLIP VQA", "BlipForQuestionAnswering", ("vqa",)),
        Family("blip-itm", "BLIP image-text matching", "BlipForImageTextRetrieval", ("retrieval",)),
        Family(
            "blip2-opt",
            "BLIP-2 (OPT)",
            "Blip2ForConditionalGeneration",
            ("caption", "vqa", "retrieval"),
            is_blip2=True,
            decoder_only=True,
        ),
        Family(
            "blip2-t5",
            "BLIP-2 (Flan-T5)",
            "Blip2ForConditionalGeneration",
            ("caption", "vqa", "retrieval"),
            is_blip2=True,
        ),
        Family(
            "blip2-itm",
            "BLIP-2 image-text retrieval",
            "Blip2ForImageTextRetrieval",
            ("retrieval",),
            is_blip2=True,
        ),
        Family(
            "instructblip-t5",
            "InstructBLIP (Flan-T5)",
            "InstructBlipForConditionalGeneration",
            ("caption", "vqa", "retrieval"),
            is_blip2=True,
            instruct=True,
            default_prompt=DEFAULT_INSTRUCTION,
        ),
        Family(
            "instructblip-vicuna",
            "InstructBLIP (Vicuna / LLaMA)",
            "InstructBlipForConditionalGeneration",
            ("caption", "vqa", "retrieval"),
            is_blip2=True,
            decoder_only=True,
            instruct=True,
            default_prompt=DEFAULT_INSTRUCTION,
        ),
        Family("clip", "CLIP", "CLIPModel", ()),
        Family("siglip", "SigLIP", "SiglipModel", ()),
    )
}


_T5_TYPES = ("t5", "mt5", "umt5")


def detect_family(config: dict[str, Any], source: str = "checkpoint") -> Family:
    """Pick the family from a config.json dict."""
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else ""
    if model_type == "blip":
        by_arch = {
            "BlipForConditionalGeneration": "blip-caption",
            "BlipForQuestionAnswering": "blip-vqa",
            "BlipForImageTextRetrieval": "blip-itm",
        }
        if arch in by_arch:
            return FAMILIES[by_arch[arch]]
    elif model_type == "blip-2":
        if arch == "Blip2ForImageTextRetrieval":
            return FAMILIES["blip2-itm"]
        if arch in ("Blip2ForConditionalGeneration", "Blip2Model", ""):
            text_type = (config.get("text_config") or {}).get("model_type", "opt")
            return FAMILIES["blip2-t5" if text_type in _T5_TYPES else "blip2-opt"]
    elif model_type == "instructblip":
        if arch in ("InstructBlipForConditionalGeneration", ""):
            text_type = (config.get("text_config") or {}).get("model_type", "opt")
            return FAMILIES["instructblip-t5" if text_type in _T5_TYPES else "instructblip-vicuna"]
    elif model_type in ("clip", "siglip", "siglip2"):
        return FAMILIES["siglip" if model_type.startswith("siglip") else "clip"]
    what = f"model_type={model_type!r}" + (f", architecture {arch}" if arch else "")
    supported = ", ".join(f.label for f in FAMILIES.values())
    raise ModelLoadError(f"{source}: unsupported checkpoint ({what})", hint=f"supported: {supported}")


def require_task(family: Family, task: str, source: str) -> None:
    if task not in family.tasks:
        can = ", ".join(family.tasks) if family.tasks else "none of caption/vqa/retrieval (it is an encoder)"
        raise TaskNotSupportedError(
            f"{source} is a {family.label} checkpoint and cannot do {task}; it can do: {can}"
        )


# ----------------------------------------------------------------------------- source resolution

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ResolvedSource:
    """Where a checkpoint lives: `path` is what from_pretrained gets; `local_only` forbids network.
    For a LoRA adapter directory, `path` and `config` are its base model's and `adapter` is the
    adapter directory (merged into the base when loaded)."""

    name: str
    path: str
    config: dict[str, Any]
    local_only: bool
    adapter: str | None = None


def resolve_source(source: str) -> ResolvedSource:
    """A local directory, else a hub id (cache first, then the network if it is reachable)."""
    path = Path(source).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            if (path / ADAPTER_CONFIG).is_file():
                return _resolve_adapter(source, path)
            raise ModelLoadError(
                f"{source}: no config.json here; not a checkpoint directory "
                "(point --model at the folder written by save_pretrained)"
            )
        return ResolvedSource(source, str(path), _read_config(config_file), local_only=True)
    if path.exists():
        raise ModelLoadError(f"{source}: is a file; --model takes a checkpoint directory or a hub id")
    if not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"{source}: no such directory",
            hint="--model takes a local checkpoint directory or a hub id such as Salesforce/blip-image-captioning-base",
        )

    cached = try_to_load_from_cache(source, "config.json")
    offline = _hub_offline()
    if isinstance(cached, str):
        return ResolvedSource(
            source, source, _read_config(Path(cached)), local_only=offline or not _hub_reachable()
        )
    hint = f"download it where there is network (`hf download {source} --local-dir DIR`) and pass --model DIR"
    if offline:
        raise ModelLoadError(
            f"{source}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set", hint=hint
        )
    if not _hub_reachable():
        raise ModelLoadError(
            f"{source}: cannot reach the Hugging Face Hub and the model is not cached", hint=hint
        )

    try:
        config_path = hf_hub_download(source, "config.json", etag_timeout=5)
    except GatedRepoError as exc:
        raise ModelLoadError(f"{source}: gated on the Hub; log in with `hf auth login` first") from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"{source}: no such model on the Hugging Face Hub", hint=hint) from exc
    except EntryNotFoundError as exc:
        raise ModelLoadError(f"{source}: has no config.json; not a transformers checkpoint") from exc
    except Exception as exc:  # noqa: BLE001 - network trouble of any kind
        raise ModelLoadError(f"{source}: cannot download ({type(exc).__name__})", hint=hint) from exc
    return ResolvedSource(source, source, _read_config(Path(config_path)), local_only=False)


def _resolve_adapter(source: str, path: Path) -> ResolvedSource:
    """A LoRA adapter directory: its base model comes from `base_model_name_or_path` of its
    adapter_config.json (a hub id or a directory, resolved like any --model)."""
    adapter = _read_config(path / ADAPTER_CONFIG)
    base = adapter.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise ModelLoadError(f"{path / ADAPTER_CONFIG}: names no base model (base_model_name_or_path)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(
            f"{source}: an adapter directory without {ADAPTER_WEIGHTS} "
            "(only safetensors adapters are loaded: no pickle)"
        )
    if (Path(base).expanduser() / ADAPTER_CONFIG).is_file() and not (
        Path(base).expanduser() / "config.json"
    ).is_file():
        raise ModelLoadError(f"{source}: its base model {base} is itself an adapter; merge that one first")
    try:
        resolved = resolve_source(base)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{source}: the adapter's base model: {exc.message}", hint=exc.hint) from exc
    return ResolvedSource(source, resolved.path, resolved.config, resolved.local_only, adapter=str(path))


def require_extra(module: str, extra: str, what: str):
    """Import an optional dependency, or say which extra installs it (UsageError, exit 2)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(
            f"{what} needs {module.split('.')[0]}, which is not installed",
            hint=f"pip install 'blip-toolkit[{extra}]'",
        ) from exc


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable config.json ({exc})") from exc


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (or the HTTPS proxy), instead of the hub client's retries."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else endpoint)
    host = target.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return False

    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    # The connect timeout does not cover the DNS lookup, which can hang for longer: bound both.

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(probe).result(timeout=timeout + 2)
    except TimeoutError:
        return False
    finally:
        pool.shutdown(wait=False)


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model ready to run, with everything the task code needs."""

    source: str
    family: Family
    model: Any
    processor: Any
    device: Any
    dtype: Any
    quantize: str | None = None  # "int8" / "4bit" when the weights are quantized

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def inspect_source(source: str) -> tuple[ResolvedSource, Family]:
    resolved = resolve_source(source)
    return resolved, detect_family(resolved.config, source)


def load_processor(resolved: ResolvedSource, *, trust_remote_code: bool = False):
    """The checkpoint's processor, on the PIL image backend (torchvision is optional and does not
    import beside every torch build; PIL gives the same preprocessing everywhere)."""
    quiet_transformers()
    try:
        return AutoProcessor.from_pretrained(
            resolved.path,
            backend="pil",
            local_files_only=resolved.local_only,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{resolved.name}: cannot load the processor ({_first_line(exc)})") from exc


def load_model(
    source: str,
    task: str | None,
    *,
    device=None,
    dtype=None,
    trust_remote_code: bool = False,
    resolved: ResolvedSource | None = None,
    family: Family | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load `source` for `task` (None: any task) on `device` in `dtype` (default: CPU, float32),
    `quantize`d ("int8" / "4bit", see models/quantize.py) when asked. A LoRA adapter directory is
    merged into its base model (peft's `merge_and_unload`)."""
    if resolved is None or family is None:
        resolved, family = inspect_source(source)
    if task is not None:
        require_task(family, task, source)
    device = device or torch.device("cpu")
    dtype = dtype or torch.float32
    check_quantize(quantize, device)
    quiet_transformers()
    processor = load_processor(resolved, trust_remote_code=trust_remote_code)
    # On CUDA bitsandbytes quantizes while the weights load; on CPU quantize_model does afterwards.
    at_load = loading_kwargs(quantize, device, dtype)
    if at_load and resolved.adapter is not None:
        raise UsageError(
            f"--quantize {quantize} on {device.type} quantizes while loading, before a LoRA adapter "
            "could be merged; pass the merged model (the output directory of blip finetune)"
        )
    try:
        model = family.model_class().from_pretrained(
            resolved.path,
            dtype=dtype,
            local_files_only=resolved.local_only,
            trust_remote_code=trust_remote_code,
            **at_load,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{source}: cannot load the model ({_first_line(exc)})") from exc
    if resolved.adapter is not None:
        model = merge_adapter(model, resolved.adapter, source)
    if not family.is_blip2:
        use_fused_vision_attention(model)
    if not at_load:  # bitsandbytes has placed the weights already
        model.to(device)
    quantize_model(model, quantize, device, dtype=dtype)
    model.eval()
    return LoadedModel(source, family, model, processor, device, dtype, quantize)


def merge_adapter(model, adapter_dir: str, source: str):
    """`model` with the LoRA adapter of `adapter_dir` merged into its weights (a plain model again)."""
    peft = require_extra("peft", "lora", f"{source} (a LoRA adapter)")
    try:
        return peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{source}: cannot apply the adapter ({_first_line(exc)})") from exc


def open_spec(spec: LoadSpec, task: str, *, device: str | None = None):
    """`open_runner` for a LoadSpec: its checkpoint (the task's default without --model) for `task`,
    on `device` (default: the spec's)."""
    return open_runner(
        spec.source(task),
        task,
        device=device or spec.device,
        dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        quantize=spec.quantize,
    )


def open_runner(
    source: str,
    task: str | None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantize: str | None = None,
):
    """Resolve and load `source` for `task` behind a FallbackRunner (CUDA faults fall back to CPU,
    quantized the same way when `quantize` is set)."""
    torch_device = resolve_device(device)
    resolve_dtype(dtype, torch_device)  # a bad --dtype is refused before anything is read
    check_quantize(quantize, torch_device)  # refused before anything loads
    resolved, family = inspect_source(source)
    # `auto` on CPU depends on the model's width too (models/device.py auto_cpu_dtype)
    torch_dtype = resolve_dtype(dtype, torch_device, width=model_width(resolved.config))
    if task is not None:
        require_task(family, task, source)

    def load(dev, dt):
        loaded = load_model(
            source,
            task,
            device=dev,
            dtype=dt,
            trust_remote_code=trust_remote_code,
            resolved=resolved,
            family=family,
            quantize=quantize,
        )
        # A runner only runs inference: its Linear layers can take oneDNN-packed weights (CPU), and
        # BLIP ITM scores each image's texts with its keys / values projected once (fused text
        # attention; the caption and VQA decoders measured no gain from it: fast_attention.py).
        pack_linear_layers(loaded.model, dev, quantize=quantize)
        if family.name == "blip-itm":
            use_fused_text_attention(loaded.model)
        return loaded

    return FallbackRunner(load, torch_device, torch_dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
