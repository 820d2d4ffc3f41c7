"""The target head: from (generated or stored) target tokens to the target encoder's global embedding.

A DiT generates target-encoder tokens; recall is measured in the encoder's joint image-text space, so
the tokens have to be pooled and projected the way the encoder itself does it. `TargetHead` holds the
few weights that do this (a layer norm, a projection, and for SigLIP its attention-pooling head), so
`eval-recall` and `sample` never load the encoder. `extract-embeddings` writes it once per run to
`DIR/target_head.safetensors`.

    head = TargetHead.load("emb/target_head.safetensors")
    global_emb = head(tokens)            # tokens [B, N, D] -> [B, E]

Per family (transformers 5 hidden-state conventions):

- CLIP: `last_hidden_state` is *before* `post_layernorm`; the image embedding is
  `visual_projection(post_layernorm(CLS))`. Head: norm = post_layernorm, projection = visual_projection.
- BLIP ITM: `last_hidden_state` already went through `post_layernorm`; the ITC image embedding is
  `vision_proj(last_hidden_state[:, 0])`. Head: no norm, projection = vision_proj (with bias).
- SigLIP: `last_hidden_state` is post-layernormed and has no CLS token; the image embedding is its
  multi-head attention pooling ("MAP") head. Head: pooling 'map' with those weights, no projection.

Pooling: 'cls' takes the CLS token (tokens must be laid out `cls+patch`); 'mean' averages the patch
tokens (the CLS token, if present, is left out: BLIP3-o pools patches); 'map' is SigLIP's head.
With 'cls' on unpooled `cls+patch` tokens the head reproduces the encoder's own embedding exactly
(up to the storage dtype); with 'mean' it is a pooled approximation in the same space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from blip_toolkit.embeddings.format import HEAD_POOLINGS
from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import atomic_write

HEAD_FORMAT = "blip-target-head"
HEAD_VERSION = 1
POOLINGS = HEAD_POOLINGS


def _activation(name: str):
    """The MAP head's MLP activation (the common ones written out; others from transformers)."""
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu
    return ACT2FN[name]


class _MapPool(nn.Module):
    """SigLIP's multi-head attention pooling (`SiglipMultiheadAttentionPoolingHead`): one learned probe
    attends over the tokens, then a residual MLP. Parameter names match transformers' module."""

    def __init__(self, dim: int, heads: int, intermediate: int, eps: float, activation: str):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, intermediate), "fc2": nn.Linear(intermediate, dim)})
        self.activation = activation
        self._act = _activation(activation)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, D]
        probe = self.probe.expand(tokens.shape[0], -1, -1)  # [B, 1, D]
        hidden = self.attention(probe, tokens, tokens, need_weights=False)[0]  # [B, 1, D]
        residual = hidden
        hidden = self.layernorm(hidden)
        hidden = residual + self.mlp["fc2"](self._act(self.mlp["fc1"](hidden)))  # [B, 1, D]
        return hidden[:, 0]


class TargetHead(nn.Module):
    """Pool target tokens and project them into the encoder's joint embedding space.

    Args:
        hidden_size: D, the token width.
        embed_dim: E, the global embedding width (= D when there is no projection).
        pooling: 'cls', 'mean' or 'map' (see the module docstring).
        has_cls: whether token 0 of the tokens this head receives is the CLS token.
        norm: apply a LayerNorm (eps `eps`) to the pooled vector (CLIP's post_layernorm).
        projection: apply a Linear D -> E (`proj_bias` says whether it has a bias).
        map_heads, map_intermediate, map_activation: SigLIP's MAP head shape ('map' pooling only).
        info: free-form metadata kept in the file (encoder source, family, token layout).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        embed_dim: int,
        pooling: str,
        has_cls: bool,
        norm: bool = False,
        eps: float = 1e-5,
        projection: bool = True,
        proj_bias: bool = False,
        map_heads: int = 0,
        map_intermediate: int = 0,
        map_activation: str = "gelu_pytorch_tanh",
        info: dict[str, Any] | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if pooling == "cls" and not has_cls:
            raise ValueError("pooling 'cls' needs tokens laid out cls+patch")
        if not projection and embed_dim != hidden_size:
            raise ValueError("without a projection, embed_dim must equal hidden_size")
        self.hidden_size = hidden_size
        self.embed_dim = embed_dim
        self.pooling = pooling
        self.has_cls = has_cls
        self.eps = eps
        self.info = dict(info or {})
        self.norm = nn.LayerNorm(hidden_size, eps=eps) if norm else None
        self.proj = nn.Linear(hidden_size, embed_dim, bias=proj_bias) if projection else None
        self.map = (
            _MapPool(hidden_size, map_heads, map_intermediate, eps, map_activation)
            if pooling == "map"
            else None
        )

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the module (stored as JSON in the file's metadata)."""
        return {
            "hidden_size": self.hidden_size,
            "embed_dim": self.embed_dim,
            "pooling": self.pooling,
            "has_cls": self.has_cls,
            "norm": self.norm is not None,
            "eps": self.eps,
            "projection": self.proj is not None,
            "proj_bias": self.proj is not None and self.proj.bias is not None,
            "map_heads": self.map.attention.num_heads if self.map is not None else 0,
            "map_intermediate": self.map.mlp["fc1"].out_features if self.map is not None else 0,
            "map_activation": self.map.activation if self.map is not None else "gelu_pytorch_tanh",
            "info": self.info,
        }

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] -> pooled [B, D] (before norm and projection)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.hidden_size:
            raise ValueError(f"expected tokens [B, N, {self.hidden_size}], got {list(tokens.shape)}")
        if self.pooling == "cls":
            return tokens[:, 0]
        patches = tokens[:, 1:] if self.has_cls else tokens  # [B, P, D]
        if self.pooling == "mean":
            return patches.mean(dim=1)
        return self.map(patches)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] (any float dtype) -> global embedding [B, E] in the head's dtype."""
        weight = next(self.parameters(), None)
        if weight is not None:
            tokens = tokens.to(weight.dtype)
        pooled = self.pool(tokens)  # [B, D]
        if self.norm is not None:
            pooled = self.norm(pooled)  # [B, D]
        if self.proj is not None:
            pooled = self.proj(pooled)  # [B, E]
        return pooled

    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """`forward` in float32 chunks without autograd: tokens [B, N, D] -> [B, E] float32."""
        self.float().eval()
        out = torch.empty(tokens.shape[0], self.embed_dim, dtype=torch.float32)
        for start in range(0, tokens.shape[0], batch_size):
            out[start : start + batch_size] = self(tokens[start : start + batch_size].float())
        return out

    def save(self, path: str | Path) -> None:
        """Write the head to a safetensors file (atomically), config in its metadata."""
        tensors = {
            name: value.detach().float().contiguous().cpu() for name, value in self.state_dict().items()
        }
        # One metadata key holding sorted JSON: safetensors writes a metadata map in random order, and
        # the file's checksum (recorded in index.json) must not change between identical runs.
        metadata = {
            "blip": json.dumps(
                {"format": HEAD_FORMAT, "version": HEAD_VERSION, "config": self.config()}, sort_keys=True
            )
        }
        with atomic_write(path, "wb") as handle:
            handle.write(save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> TargetHead:
        """Read a head written by `save` (or by extract-embeddings)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: target head not found")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
        try:
            meta = json.loads(metadata.get("blip", "{}"))
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format") != HEAD_FORMAT:
            raise InputError(f"{path}: not a target head (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > HEAD_VERSION:
            raise InputError(
                f"{path}: target head version {meta['version']} is newer than this toolkit reads"
            )
        config = meta["config"]
        head = cls(**config)
        try:
            head.load_state_dict(tensors)
        except RuntimeError as exc:
            raise InputError(
                f"{path}: weights do not match the head's config ({str(exc).splitlines()[0]})"
            ) from exc
        # Frozen like the encoder it comes from; gradients still flow to the tokens.
        return head.to(device).eval().requires_grad_(False)


def head_from_modules(
    *,
    hidden_size: int,
    embed_dim: int,
    pooling: str,
    has_cls: bool,
    norm: nn.LayerNorm | None,
    proj: nn.Linear | None,
    map_head: nn.Module | None = None,
    map_activation: str = "",
    info: dict[str, Any] | None = None,
) -> TargetHead:
    """Build a TargetHead holding copies of an encoder's own modules (used by the encoder adapters).
    `map_head` is a transformers `SiglipMultiheadAttentionPoolingHead` (probe, attention, layernorm, mlp)."""
    kwargs: dict[str, Any] = {}
    if pooling == "map":
        if map_head is None:
            raise ValueError("pooling 'map' needs the encoder's attention-pooling head")
        kwargs = dict(
            map_heads=map_head.attention.num_heads,
            map_intermediate=map_head.mlp.fc1.out_features,
            map_activation=map_activation,
        )
    eps = norm.eps if norm is not None else (map_head.layernorm.eps if map_head is not None else 1e-5)
    head = TargetHead(
        hidden_size=hidden_size,
        embed_dim=embed_dim,
        pooling=pooling,
        has_cls=has_cls,
        norm=norm is not None,
        eps=eps,
        projection=proj is not None,
        proj_bias=proj is not None and proj.bias is not None,
        info=info,
        **kwargs,
    )
    with torch.no_grad():
        if norm is not None:
            head.norm.load_state_dict(norm.state_dict())
        if proj is not None:
            head.proj.load_state_dict(proj.state_dict())
        if pooling == "map":
            head.map.probe.copy_(map_head.probe)
            head.map.attention.load_state_dict(map_head.attention.state_dict())
            head.map.layernorm.load_state_dict(map_head.layernorm.state_dict())
            head.map.mlp["fc1"].load_state_dict(map_head.mlp.fc1.state_dict())
            head.map.mlp["fc2"].load_state_dict(map_head.mlp.fc2.state_dict())
    return head.float().eval().requires_grad_(False)
