"""Generated features: the file `blip sample` writes and `eval-recall` reads (docs/formats.md,
"Generated features"): tensor `tokens [n, N, Dt]`, optionally `global [n, E]`, and metadata naming
the `n` sample keys and the `index.json` their conditions came from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from blip_toolkit.embeddings.format import GENERATED_FORMAT, GENERATED_VERSION
from blip_toolkit.engine.outputs import check_output_file
from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import atomic_write


def write_generated(
    path: str | Path,
    tokens: torch.Tensor,
    keys: Sequence[str],
    *,
    index_sha256: str,
    global_emb: torch.Tensor | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write generated target tokens for `eval-recall` (used by `blip sample`).

    tokens [n, N, Dt]; keys: the n sample keys (`EmbeddingShards.keys()`, any subset, no repeats);
    index_sha256: `EmbeddingShards.index_sha256` of the shards the samples were conditioned on;
    global_emb [n, E] optional (else eval-recall computes head(tokens)); metadata: extra str -> str
    (e.g. the DiT run and solver settings). Atomic; refuses to replace a file without `overwrite`."""
    path = check_output_file(path, overwrite=overwrite)
    keys = list(keys)
    if tokens.dim() != 3 or tokens.shape[0] != len(keys):
        raise ValueError(
            f"tokens must be [n, N, Dt] with n = len(keys) = {len(keys)}, got {list(tokens.shape)}"
        )
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique")
    tensors = {"tokens": tokens.contiguous()}
    if global_emb is not None:
        if global_emb.dim() != 2 or global_emb.shape[0] != len(keys):
            raise ValueError(f"global_emb must be [n, E] with n = {len(keys)}, got {list(global_emb.shape)}")
        tensors["global"] = global_emb.contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(
        format=GENERATED_FORMAT,
        version=str(GENERATED_VERSION),
        keys=json.dumps(keys, ensure_ascii=False),
        index_sha256=index_sha256,
    )
    with atomic_write(path, "wb") as handle:
        handle.write(save(tensors, metadata=meta))
    return path


class GeneratedFeatures:
    """A generated-features file opened lazily: `keys` (n), `num`, `tokens_shape` (N, Dt),
    `has_global`, `index_sha256`, `metadata`; read rows with `tokens(start, stop)` -> [k, N, Dt] and
    `global_emb(start, stop)` -> [k, E]."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self.metadata: dict[str, str] = dict(self._handle.metadata() or {})
            names = set(self._handle.keys())
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        if self.metadata.get("format") != GENERATED_FORMAT:
            raise InputError(
                f"{self.path}: not a generated-features file (format {self.metadata.get('format')!r}, "
                f"expected {GENERATED_FORMAT!r})"
            )
        if int(self.metadata.get("version", "0")) > GENERATED_VERSION:
            raise InputError(
                f"{self.path}: version {self.metadata['version']} is newer than this toolkit reads"
            )
        if "tokens" not in names:
            raise InputError(f"{self.path}: has no 'tokens' tensor")
        try:
            self.keys: list[str] = json.loads(self.metadata["keys"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise InputError(f"{self.path}: metadata 'keys' missing or not a JSON list") from exc
        shape = self._handle.get_slice("tokens").get_shape()
        if len(shape) != 3 or shape[0] != len(self.keys):
            raise InputError(f"{self.path}: tokens {shape} do not match {len(self.keys)} keys")
        self.num = len(self.keys)
        self.tokens_shape = (int(shape[1]), int(shape[2]))
        self.has_global = "global" in names
        self.global_shape = tuple(self._handle.get_slice("global").get_shape()) if self.has_global else None
        if self.has_global and (len(self.global_shape) != 2 or self.global_shape[0] != self.num):
            raise InputError(f"{self.path}: global {list(self.global_shape)} does not match {self.num} keys")
        self.index_sha256 = self.metadata.get("index_sha256", "")

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._handle.get_slice("tokens")[start : self.num if stop is None else stop]

    def global_emb(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._handle.get_slice("global")[start : self.num if stop is None else stop]


def read_generated(path: str | Path) -> GeneratedFeatures:
    """Open a generated-features file written by `write_generated`."""
    return GeneratedFeatures(path)
