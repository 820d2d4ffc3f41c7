"""Training state other than model weights (optimizer, scheduler, gradient scaler, RNG streams) as
JSON plus safetensors: nothing in a checkpoint can run code when it is loaded (no pickle, no
`torch.save`, so not Accelerate's `save_state`).

`write_state(directory, name, value)` writes `<name>.json` (the structure) and `<name>.safetensors`
(its tensors); `read_state` gives the value back. JSON has no tuple and no integer keys: such values
are written as `{"__tuple__": [...]}` (AdamW's betas) and `{"__int_keys__": {"0": ...}}` (optimizer
state by parameter id) and come back as they were."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blip_toolkit.errors import TrainingError
from blip_toolkit.fsutil import fsync_path, write_json

logger = logging.getLogger("blip")

# Markers of the JSON encoding of values that JSON has no type for (see `_encode`).
_TENSOR, _TUPLE, _INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"


def write_state(directory: Path, name: str, value: Any) -> None:
    """`value` (a state_dict: nested dicts, lists, tuples, scalars, tensors) as `<name>.json`, with
    its tensors in `<name>.safetensors` (only written when there are some)."""
    tensors: dict[str, Any] = {}
    encoded = _encode(value, "", tensors)
    if tensors:
        file = directory / f"{name}.safetensors"
        save_file(_unshared(tensors), str(file), metadata={"format": "pt"})
        fsync_path(file)
    write_json(directory / f"{name}.json", encoded)


def read_state(directory: Path, name: str) -> Any:
    """The value `_write_state(directory, name, value)` wrote."""
    file = directory / f"{name}.json"
    try:
        encoded = json.loads(file.read_text(encoding="utf-8"))
        tensor_file = directory / f"{name}.safetensors"
        tensors = load_file(str(tensor_file), device="cpu") if tensor_file.is_file() else {}
    except FileNotFoundError as exc:
        raise TrainingError(f"{directory}: {Path(exc.filename or file).name} is missing") from exc
    except (OSError, ValueError, SafetensorError) as exc:
        raise TrainingError(f"{directory}: unreadable {name} state ({exc})") from exc
    return _decode(encoded, tensors, file)


def _encode(value: Any, path: str, tensors: dict[str, Any]) -> Any:
    """A JSON-able copy of `value`; tensors go to `tensors[path]` (path: dotted keys, e.g.
    `state.3.exp_avg`) and leave `{"__tensor__": path}`. Tuples (AdamW's betas) and dicts with int
    keys (optimizer state by parameter id) get markers so they come back as they were."""

    def child(key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise TrainingError(f"two state values map to the tensor name {path!r}")
        tensors[path] = value.detach().to("cpu").contiguous()
        return {_TENSOR: path}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, child(i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, child(i), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if value and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {_INT_KEYS: {str(k): _encode(v, child(k), tensors) for k, v in value.items()}}
        for key in value:
            if not isinstance(key, str) or key.startswith("__"):
                raise TrainingError(
                    f"cannot store the key {key!r} at {path or 'the top'} of a checkpoint state"
                )
        return {k: _encode(v, child(k), tensors) for k, v in value.items()}
    raise TrainingError(
        f"cannot store a {type(value).__name__} at {path or 'the top'} of a checkpoint state "
        "(JSON values and tensors only)"
    )


def _decode(value: Any, tensors: dict[str, Any], file: Path) -> Any:
    """Inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors, file) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        if _TENSOR in value:
            try:
                return tensors[value[_TENSOR]]
            except KeyError:
                raise TrainingError(
                    f"{file}: tensor {value[_TENSOR]!r} is missing from its safetensors file"
                ) from None
        if _TUPLE in value:
            return tuple(_decode(v, tensors, file) for v in value[_TUPLE])
        if _INT_KEYS in value:
            return {int(k): _decode(v, tensors, file) for k, v in value[_INT_KEYS].items()}
    return {k: _decode(v, tensors, file) for k, v in value.items()}


def _unshared(tensors: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors that share memory; copy the second and later users of a storage."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


def load_into(obj, state: Any, file: Path) -> None:
    """`obj.load_state_dict(state)` (optimizer, scheduler, scaler; Accelerate's wrappers delegate)."""
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise TrainingError(f"{file} does not fit this {type(obj).__name__}: {exc}") from exc


# -- random number generators


def rng_state(generators: dict[str, Any]) -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device, the given generators)."""
    version, internal, gauss_next = random.getstate()
    algorithm, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        # The MT19937 key is uint32: int64 holds it exactly and every safetensors reader knows it.
        "numpy": {
            "algorithm": algorithm,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: generator.get_state() for name, generator in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, Any], file: Path) -> None:
    try:
        python, numpy_state = state["python"], state["numpy"]
        internal = tuple(int(x) for x in python["state"].tolist())
        random.setstate((python["version"], internal, python["gauss_next"]))
        np.random.set_state(
            (
                numpy_state["algorithm"],
                numpy_state["key"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TrainingError(f"{file}: unusable RNG state ({type(exc).__name__}: {exc})") from exc
    if torch.cuda.is_available():
        saved = state.get("cuda") or []
        count = torch.cuda.device_count()
        if len(saved) != count:
            logger.warning(
                "%s: saved CUDA RNG states for %d device(s), this process sees %d; restoring %d",
                file,
                len(saved),
                count,
                min(len(saved), count),
            )
        for device, device_state in enumerate(saved[:count]):
            torch.cuda.set_rng_state(device_state, device)
