"""DiT model exports: what `blip sample` (and `load_dit`) need to rebuild a trained DiT, undo the target
normalisation and pool the generated tokens, without the training code or the embeddings.

A DiT directory (the top level of a `train-dit` run, or one of its `checkpoints/step-N/`) holds:

    config.json                  {"format": "blip-dit", "version": 1, "dit": DiTConfig, "flow": FlowConfig,
                                  "normalizer": {...}, "data": {...}, "head": {...}, "sample": {...}, ...}
    model.safetensors            the DiT's weights (state_dict names of `DiT`)
    ema.safetensors              the EMA of the weights (float32), when the run kept one
    normalizer.safetensors       mean / std of `standardize` (no tensors for none / l2)
    target_head.safetensors      the head that pools and projects generated tokens (its config is in
                                 config.json): the target's own, or with flow.contrastive_head =
                                 "learned" the trained head (EMA weights; also inside model.safetensors
                                 as text_head.*, which is what load_dit uses)

Only safetensors and JSON: nothing is unpickled. In a step checkpoint the same record is also kept in
`trainer_state.json` (written inside the atomic checkpoint), so a checkpoint whose `config.json` was
not yet written when the run was killed still loads.

    model, normalizer, info = load_dit("runs/dit")          # EMA weights by default
    tokens = generate(model, cond, steps=30, cfg_scale=3.0, normalizer=normalizer)
    global_emb = info["head"](tokens)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from blip_toolkit.dit.config import DiTConfig, FlowConfig
from blip_toolkit.dit.model import DiT
from blip_toolkit.dit.normalize import TENSOR_PREFIX, TokenNormalizer
from blip_toolkit.embeddings.head import TargetHead
from blip_toolkit.engine.checkpoint import CheckpointManager
from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import atomic_path, write_json

logger = logging.getLogger("blip")

EXPORT_FORMAT = "blip-dit"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
NORMALIZER_FILE = "normalizer.safetensors"
HEAD_FILE = "target_head.safetensors"
TRAINER_STATE = "trainer_state.json"
EXPORT_KEY = "export"  # the record's key inside trainer_state.json


class TensorBundle(nn.Module):
    """Named tensors as buffers, so a checkpoint manager that saves modules can hold them
    (the normaliser's mean and std). Names may not contain dots; `tensors()` gives them back."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._names = sorted(tensors)
        for name in self._names:
            self.register_buffer(name, tensors[name].detach().clone().contiguous())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._names}


def normalizer_bundle(normalizer) -> TensorBundle:
    """The normaliser's tensors (`TokenNormalizer.export()`, prefix stripped) as a module."""
    tensors, _ = normalizer.export()
    return TensorBundle({name.removeprefix(TENSOR_PREFIX): value for name, value in tensors.items()})


def save_module(module: nn.Module, path: Path) -> None:
    """A module's state_dict as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_model(module, str(tmp), metadata={"format": "pt"}, force_contiguous=True)


def write_export(
    directory: Path,
    record: dict[str, Any],
    *,
    model: nn.Module,
    ema: nn.Module | None,
    normalizer,
    head: nn.Module,
) -> None:
    """Write a DiT directory (see the module docstring); config.json is written last, so a directory
    with a config.json is complete."""
    directory.mkdir(parents=True, exist_ok=True)
    save_module(model, directory / MODEL_FILE)
    if ema is not None:
        save_module(ema, directory / EMA_FILE)
    save_module(normalizer_bundle(normalizer), directory / NORMALIZER_FILE)
    save_module(head, directory / HEAD_FILE)
    write_json(directory / CONFIG_FILE, record)


def resolve_dit_dir(path: str | Path) -> Path:
    """The DiT directory to load for `path`: a directory with config.json (a finished run or a step
    checkpoint), a step checkpoint with only trainer_state.json, or a run directory without a final
    export (still training, or killed): its latest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise InputError(
            f"{path}: not a directory (a DiT checkpoint is a run directory or checkpoints/step-N)"
        )
    if (path / CONFIG_FILE).is_file() or (path / TRAINER_STATE).is_file():
        return path
    latest = CheckpointManager(path / "checkpoints").latest()
    if latest is not None:
        logger.info("%s has no final model yet; using its latest checkpoint %s", path, latest.name)
        return latest
    raise InputError(
        f"{path}: not a DiT run or checkpoint (no {CONFIG_FILE} and no complete checkpoint)",
        hint="pass the directory given to train-dit --out, or one of its checkpoints/step-N",
    )


def read_record(directory: Path) -> dict[str, Any]:
    """The export record of a DiT directory (config.json, else trainer_state.json's copy)."""
    try:
        if (directory / CONFIG_FILE).is_file():
            record = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        else:
            state = json.loads((directory / TRAINER_STATE).read_text(encoding="utf-8"))
            record = state.get(EXPORT_KEY)
            if record is None:
                raise InputError(f"{directory}: the checkpoint holds no DiT description")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{directory}: unreadable DiT config ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise InputError(
            f"{directory}: not a DiT checkpoint (format {record.get('format') if isinstance(record, dict) else None!r})"
        )
    if int(record.get("version", 0)) > EXPORT_VERSION:
        raise InputError(
            f"{directory}: DiT checkpoint version {record['version']} is newer than this toolkit reads"
        )
    return record


def _load_weights(module: nn.Module, file: Path) -> None:
    if not file.is_file():
        raise InputError(f"{file}: missing from the DiT checkpoint")
    try:
        load_model(module, str(file), strict=True, device="cpu")
    except (RuntimeError, SafetensorError, OSError) as exc:
        raise InputError(
            f"{file}: does not fit the model described by its config ({str(exc).splitlines()[0]})"
        ) from exc


def load_dit(path: str | Path, ema: bool = True, *, device: str | torch.device = "cpu"):
    """Rebuild a trained DiT for sampling.

    Returns (model, normalizer, info): the DiT in eval mode on `device` (EMA weights when `ema` and
    the run kept them), its `TokenNormalizer` (decode the generated tokens with it, or pass it to
    `solver.generate(..., normalizer=)`), and info: {"path", "record" (the config.json record),
    "ema" (whether EMA weights were loaded), "step", "head" (the TargetHead: tokens [B, N, Dt] ->
    global [B, E]), "dims" (the training data's dims), "sample" (the run's sampling defaults)}."""
    directory = resolve_dit_dir(path)
    record = read_record(directory)
    try:
        config = DiTConfig.from_dict(record["dit"], source=f"{directory / CONFIG_FILE}: dit")
        head_config = record["head"]["config"]
        normalizer_meta = record["normalizer"]
    except KeyError as exc:
        raise InputError(f"{directory}: the DiT config lacks {exc.args[0]!r}") from exc
    model = DiT(config)
    learned_head = FlowConfig.from_dict(
        record.get("flow", {}), source=f"{directory / CONFIG_FILE}: flow"
    ).learned_head
    if learned_head:
        model.attach_text_head(TargetHead(**head_config))
    use_ema = ema
    if ema and not (directory / EMA_FILE).is_file():
        logger.warning(
            "%s has no EMA weights (the run used train.ema_decay = 0); using the trained weights", directory
        )
        use_ema = False
    _load_weights(model, directory / (EMA_FILE if use_ema else MODEL_FILE))
    bundle_file = directory / NORMALIZER_FILE
    tensors: dict[str, torch.Tensor] = {}
    if bundle_file.is_file():
        tensors = {TENSOR_PREFIX + k: v for k, v in load_file(str(bundle_file)).items()}
    normalizer = TokenNormalizer.from_export(tensors, normalizer_meta)
    model = model.to(device).eval().requires_grad_(False)
    if learned_head:  # the head trained with these weights (EMA or not), not the target's
        head = model.text_head.float()
    else:
        head = TargetHead(**head_config)
        _load_weights(head, directory / HEAD_FILE)
        head = head.float().eval().requires_grad_(False).to(device)
    info = {
        "path": str(directory),
        "record": record,
        "ema": use_ema,
        "step": record.get("step"),
        "head": head,
        "dims": record.get("data", {}).get("dims", {}),
        "sample": record.get("sample", {}),
    }
    return model, normalizer, info


def check_dims(record: dict[str, Any], dims: dict[str, int], *, checkpoint: str, data: str) -> None:
    """Refuse embeddings whose dims differ from those the DiT was trained on."""
    trained = record.get("data", {}).get("dims", {})
    keys = ("cond_tokens", "cond_dim", "target_tokens", "target_dim", "embed_dim")
    different = [k for k in keys if k in trained and int(trained[k]) != int(dims.get(k, -1))]
    if different:

        def show(d: dict) -> str:
            return (
                f"cond [{d.get('cond_tokens')}, {d.get('cond_dim')}] -> target [{d.get('target_tokens')}, "
                f"{d.get('target_dim')}], E={d.get('embed_dim')}"
            )

        raise InputError(
            f"{checkpoint} was trained on {show(trained)}; {data} holds {show(dims)} "
            f"(different {', '.join(different)})",
            hint="sample from embeddings extracted with the same encoders and token layout",
        )
