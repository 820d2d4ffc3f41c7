"""Synthetic embedding directories in the documented format (docs/formats.md, "Embedding shards"),
written with shards.py's own writer: the target tokens are a fixed function of the conditioning tokens
(so a DiT can learn them), the global embedding is the target head of the target tokens, and each image
has one caption whose text embedding is its global embedding plus a little noise (so recall of the
ground truth is high, and recall of a model's samples measures the model). Used by the DiT tests and
benchmarks, which need shards of known structure without running encoders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blip_toolkit.embeddings.format import HEAD_FILE, INDEX_FILE
from blip_toolkit.embeddings.head import TargetHead
from blip_toolkit.embeddings.shards import build_index, write_shard
from blip_toolkit.fsutil import sha256_file

# Tiny dims: 16 conditioning tokens of 24, 16 target tokens (a 4x4 grid) of 16, embeddings of 12.
DIMS = {"cond_tokens": 16, "cond_dim": 24, "target_tokens": 16, "target_dim": 16, "embed_dim": 12}
# A tiny DiT for these dims (hidden 64, 2 layers, 4 heads).
TINY = {
    "model.preset": "tiny",
    "model.hidden_size": 64,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
}


def write_embeddings(
    root: Path,
    *,
    samples: int = 24,
    shard_size: int = 8,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    captions: int = 1,
    caption_text=None,
    cls: bool = False,
) -> Path:
    """Write an embeddings directory of `samples` images in shards of `shard_size`; returns `root`.

    caption_text(image, c) -> str names caption c of an image (default "caption {image} {c}": all
    distinct). cls: the target tokens are laid out `cls+patch` (dims["target_tokens"] patches plus a
    CLS token first, whose distribution differs from the patches': another mean and scale, as CLIP's
    does) and the head pools the CLS token."""
    caption_text = caption_text or (lambda image, c: f"caption {image} {c}")
    dims = dict(DIMS, **(dims or {}))
    patches = dims["target_tokens"]
    if cls:
        dims["target_tokens"] = patches + 1
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    m, dc, n, dt, e = (
        dims[k] for k in ("cond_tokens", "cond_dim", "target_tokens", "target_dim", "embed_dim")
    )
    # Fixed maps (seed 1234, the same for every directory of these dims, so a model trained on one
    # directory fits another one of the same "encoders").
    fixed = torch.Generator().manual_seed(1234)
    w_1 = torch.randn(dc, 32, generator=fixed) / dc**0.5
    w_2 = torch.randn(32, dt, generator=fixed) / 32**0.5
    mix = torch.randn(patches, m, generator=fixed) / m**0.5
    head = TargetHead(
        hidden_size=dt,
        embed_dim=e,
        pooling="cls" if cls else "mean",
        has_cls=cls,
        projection=True,
        info={"source": "synthetic-target"},
    )
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(e, dt, generator=fixed) / dt**0.5)
    head.save(root / HEAD_FILE)

    storage = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    records = []
    for number, lo in enumerate(range(0, samples, shard_size)):
        count = min(shard_size, samples - lo)
        cond = torch.randn(count, m, dc, generator=gen)  # [n, M, Dc]
        # target token i = mix of the conditioning tokens -> tanh MLP, scaled to unit RMS, plus an offset
        target = torch.tanh(torch.einsum("nm,bmd->bnd", mix, cond) @ w_1) @ w_2  # [n, N, Dt]
        target = target / target.square().mean(-1, keepdim=True).sqrt() * 2.0 + 0.5
        if cls:  # a summary of the patches, on its own scale and offset
            target = torch.cat(
                [3.0 * target.mean(dim=1, keepdim=True) - 4.0, target], dim=1
            )  # [n, 1 + P, Dt]
        target_global = head(target).detach()  # [n, E]
        text = target_global.repeat_interleave(captions, 0)
        text = text + 0.05 * text.norm(dim=-1, keepdim=True) * torch.randn(text.shape, generator=gen) / e**0.5
        rows = [
            {
                "key": f"img-{lo + i:05d}",
                "image": f"img-{lo + i:05d}.jpg",
                "captions": [caption_text(lo + i, c) for c in range(captions)],
            }
            for i in range(count)
        ]
        tensors = {
            "cond": cond.to(dtype),
            "target": target.to(dtype),
            "target_global": target_global.to(dtype),
            "text_emb": text.to(dtype),
            "caption_image": torch.arange(count).repeat_interleave(captions).to(torch.int64),
        }
        records.append(write_shard(root, f"shard-{number:05d}", tensors, rows))
    encoder = {"family": "synthetic", "tokens": "patch", "pool": None}
    target_encoder = {**encoder, "tokens": "cls+patch" if cls else "patch"}
    info = {
        "toolkit_version": "test",
        "source": {"kind": "synthetic", "spec": [], "items": samples},
        "encoders": {
            "cond": {"source": "synthetic-cond", **encoder, "num_tokens": m},
            "target": {"source": "synthetic-target", **target_encoder, "num_tokens": n},
        },
        "dims": dims,
        "dtype": storage,
        "shard_size": shard_size,
        "head": {
            "file": HEAD_FILE,
            "sha256": sha256_file(root / HEAD_FILE),
            "pooling": head.pooling,
            "has_cls": cls,
        },
    }
    index = build_index(records=records, info=info)
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return root
