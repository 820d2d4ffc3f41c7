"""`blip eval-recall`: recall@K of image features against the target encoder's text embeddings.

Image features that can be scored (each against the same texts and positive pairs):

- `baseline`: the target encoder's own global image embedding (`target_global` in the shards).
- `gt-pooled`: the stored ground-truth target tokens through the run's TargetHead, i.e. pooled and
  projected exactly like generated tokens are. Compared with `baseline` it shows what the token
  layout and pooling cost before any generator is involved.
- `generated`: tokens written by `blip sample` (a generated-features file), through the same head,
  or the file's own `global` embeddings when it has them.

Recall uses `eval.recall.retrieval_recall` (CLIP_benchmark / LAVIS convention: image-to-text is a
hit when any of the image's captions is in the top K; pessimistic ties). With a generated file
covering a subset of the images, every feature is scored on that subset and its captions. Images
without captions are left out (recall is undefined for them). `dedupe_captions` merges identical
caption strings into one text, positive for every image that has it.

Also reported: mean cosine of generated vs ground-truth tokens, and of generated globals vs
`baseline` and vs `gt-pooled` (and `gt-pooled` vs `baseline`).

Memory: per-image globals ([n, E], small) are gathered into one preallocated tensor each; tokens
are only ever read one shard at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip_toolkit.config import parse_bytes
from blip_toolkit.embeddings.generated import GeneratedFeatures, read_generated
from blip_toolkit.embeddings.shards import EmbeddingShards
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.eval.recall import mean_cosine, merge_identical_captions, retrieval_recall

logger = logging.getLogger("blip")

FEATURES = ("baseline", "gt-pooled", "generated")


@dataclass
class RecallConfig:
    """Options of `eval-recall`."""

    dir: str
    features: list[str] | None = None  # None: every feature available
    generated: str | None = None
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    dedupe_captions: bool = False
    max_memory: str | int = "2GB"
    device: str = "cpu"
    batch_size: int = 1024  # rows per head pass

    def __post_init__(self) -> None:
        if self.features is not None:
            unknown = [f for f in self.features if f not in FEATURES]
            if unknown:
                raise UsageError(f"--features {','.join(unknown)}: unknown (use {', '.join(FEATURES)})")
            if not self.features:
                raise UsageError("--features is empty")
            if "generated" in self.features and not self.generated:
                raise UsageError("--features generated needs --generated FILE")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UsageError("--k takes positive integers (e.g. --k 1,5,10)")


def evaluate_recall(config: RecallConfig) -> dict[str, Any]:
    """Score the requested features; returns the report dict (every number; JSON-ready)."""
    budget = parse_bytes(config.max_memory)
    features = (
        list(config.features)
        if config.features
        else [f for f in FEATURES if f != "generated" or config.generated]
    )
    root = Path(config.dir)
    shards = EmbeddingShards(root, verify="open")  # a corrupt shard fails here, naming the file
    if shards.num_samples == 0:
        raise InputError(f"{root}: the embeddings hold no images")
    head = shards.head() if ("gt-pooled" in features or config.generated) else None
    keys = shards.keys()
    generated = _open_generated(config.generated, shards, keys) if config.generated else None
    # The evaluated images: every image, or the generated file's subset (in its order).
    selection = generated.indices if generated is not None else torch.arange(shards.num_samples)
    texts = _evaluated_texts(shards, keys, selection, config.dedupe_captions)
    image_features, cosine = _image_features(
        shards, keys, head, selection, generated, features, config, budget
    )
    results = {}
    for name in features:
        emb = image_features[name][texts.scored]
        logger.info("recall of %s: %d images x %d texts", name, emb.shape[0], texts.emb.shape[0])
        result = retrieval_recall(
            emb,
            texts.emb,
            texts.pair_image,
            texts.pair_text,
            config.ks,
            normalize=True,
            max_memory_bytes=budget,
            device=config.device,
        )
        results[name] = result.to_dict()
    return {
        "dir": str(root),
        "index_sha256": shards.index_sha256,
        "generated": str(config.generated) if config.generated else None,
        "target_encoder": shards.encoders["target"].get("source"),
        "head_pooling": head.pooling if head is not None else shards.index.get("head", {}).get("pooling"),
        "ks": sorted(set(config.ks)),
        "dedupe_captions": config.dedupe_captions,
        "num_images": int(len(texts.scored)),
        "num_texts": int(texts.emb.shape[0]),
        "num_captions": texts.num_captions,
        "num_pairs": next(iter(results.values()))["num_pairs"] if results else 0,
        "images_without_captions": texts.without,
        "features": results,
        "cosine": cosine,
    }


@dataclass
class _Texts:
    """The texts recall is scored against: emb [T, E], positive pairs (pair_image [P] indexing the
    scored images, pair_text [P]), `scored` (positions in the selection of the images with a caption)."""

    emb: torch.Tensor
    pair_image: torch.Tensor
    pair_text: torch.Tensor
    scored: torch.Tensor
    num_captions: int
    without: int


def _evaluated_texts(
    shards: EmbeddingShards, keys: list[str], selection: torch.Tensor, dedupe: bool
) -> _Texts:
    root = shards.root
    texts = shards.text_embeddings()
    if texts.text_emb.shape[0] == 0:
        raise InputError(f"{root}: the embeddings hold no captions; recall needs captions")
    _check_finite(texts.text_emb, f"{root}: text embeddings", [keys[i] for i in texts.caption_image.tolist()])
    position = torch.full((shards.num_samples,), -1, dtype=torch.int64)
    position[selection] = torch.arange(len(selection))
    caption_pos = position[texts.caption_image]  # [C] evaluated position of each caption's image, -1: not
    keep = caption_pos >= 0
    if not bool(keep.any()):
        raise InputError(f"{root}: no captions for the evaluated images; recall needs captions")
    text_emb, pair_image, pair_text, _ = _texts(texts, keep, caption_pos, dedupe)
    has_caption = torch.zeros(len(selection), dtype=torch.bool)
    has_caption[pair_image] = True
    without = int((~has_caption).sum())
    if without:
        logger.warning(
            "%d of %d image(s) have no caption and are left out of recall", without, len(selection)
        )
    # Re-index the images that have captions: retrieval_recall wants a positive for every image.
    scored = has_caption.nonzero().flatten()
    remap = torch.full((len(selection),), -1, dtype=torch.int64)
    remap[scored] = torch.arange(len(scored))
    return _Texts(text_emb, remap[pair_image], pair_text, scored, int(keep.sum()), without)


def _image_features(shards, keys, head, selection, generated, features, config: RecallConfig, budget: int):
    """({feature name: [n, E] float32 for the selection}, the cosine report)."""
    root = shards.root
    selected_keys = [keys[i] for i in selection.tolist()]
    image_features: dict[str, torch.Tensor] = {}
    if "baseline" in features or generated is not None:
        baseline = shards.column("target_global")[selection]
        _check_finite(baseline, f"{root}: baseline (target_global)", selected_keys)
        image_features["baseline"] = baseline
    if "gt-pooled" in features or generated is not None:
        gt = _pooled_targets(shards, head, selection, config.batch_size)
        _check_finite(gt, f"{root}: gt-pooled (head of the target tokens)", selected_keys)
        image_features["gt-pooled"] = gt
    cosine: dict[str, float] = {}
    if generated is not None:
        gen_global, token_cosine = _generated_features(generated, shards, head, config.batch_size, budget)
        image_features["generated"] = gen_global
        cosine["generated_tokens_vs_target"] = token_cosine
        cosine["generated_global_vs_baseline"] = mean_cosine(
            gen_global, image_features["baseline"], max_memory_bytes=budget
        )
        cosine["generated_global_vs_gt_pooled"] = mean_cosine(
            gen_global, image_features["gt-pooled"], max_memory_bytes=budget
        )
    if "baseline" in image_features and "gt-pooled" in image_features:
        cosine["gt_pooled_vs_baseline"] = mean_cosine(
            image_features["gt-pooled"], image_features["baseline"], max_memory_bytes=budget
        )
    return image_features, cosine


# ----------------------------------------------------------------------------- pieces


@dataclass
class _Generated:
    path: Path
    file: GeneratedFeatures
    indices: torch.Tensor  # [n] int64: global image index of each generated row


def _open_generated(path: str, shards, keys: list[str]) -> _Generated:
    gen = read_generated(path)
    dims = shards.dims
    expected = (dims["target_tokens"], dims["target_dim"])
    if gen.tokens_shape != expected:
        raise InputError(
            f"{path}: generated tokens are {list(gen.tokens_shape)} per image but the embeddings "
            f"hold target tokens {list(expected)}"
        )
    if gen.has_global and gen.global_shape[1] != dims["embed_dim"]:
        raise InputError(
            f"{path}: generated global embeddings have {gen.global_shape[1]} dims, the target "
            f"encoder's have {dims['embed_dim']}"
        )
    if gen.index_sha256 and gen.index_sha256 != shards.index_sha256:
        raise InputError(
            f"{path}: made from a different embeddings index (index_sha256 {gen.index_sha256[:12]}..., "
            f"{shards.root}/index.json is {shards.index_sha256[:12]}...)",
            hint="sample again from these shards, or point eval-recall at the directory it came from",
        )
    if gen.num == 0:
        raise InputError(f"{path}: holds no samples")
    lookup = {key: i for i, key in enumerate(keys)}
    indices = []
    for key in gen.keys:
        if key not in lookup:
            raise InputError(f"{path}: sample key {key!r} is not in {shards.root}/index.json")
        indices.append(lookup[key])
    if len(set(indices)) != len(indices):
        raise InputError(f"{path}: a sample key appears twice")
    return _Generated(Path(path), gen, torch.tensor(indices, dtype=torch.int64))


def _check_finite(x, what: str, keys: list[str]) -> None:
    if x.numel() == 0:
        return
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise InputError(f"{what}: {int(bad.sum())} row(s) have NaN or Inf values (first: {keys[first]!r})")


def _texts(texts, keep, caption_pos, dedupe: bool):
    """(text_emb [T, E], pair_image [P], pair_text [P], caption strings [T]) for the kept captions."""
    kept = keep.nonzero().flatten()
    emb = texts.text_emb[kept]
    images = caption_pos[kept]
    strings = [texts.captions[i] for i in kept.tolist()]
    if not dedupe:
        return emb, images, torch.arange(len(kept)), strings
    first, pair_image, pair_text = merge_identical_captions(strings, images)
    return emb[first], pair_image, pair_text, [strings[i] for i in first]


def _pooled_targets(shards, head, selection, batch_size: int):
    """head(target tokens) [n, E] float32 for the selected images, one shard at a time."""
    out = torch.empty(len(selection), shards.dims["embed_dim"], dtype=torch.float32)
    for info, rows, where in _by_shard(shards, selection):
        tokens = shards.read_shard(info.index, ("target",))["target"]  # [s, N, Dt]
        out[where] = head.embed(tokens[rows], batch_size=batch_size)
    return out


def _by_shard(shards, selection):
    """(shard info, local rows, positions in `selection`) for each shard holding selected images."""
    order = torch.argsort(selection)
    sorted_idx = selection[order]
    for info in shards.shards:
        lo = int(torch.searchsorted(sorted_idx, info.offset))
        hi = int(torch.searchsorted(sorted_idx, info.offset + info.samples))
        if hi > lo:
            yield info, sorted_idx[lo:hi] - info.offset, order[lo:hi]


def _generated_features(gen: _Generated, shards, head, batch_size: int, budget: int):
    """(generated globals [n, E] float32, mean cosine of generated vs ground-truth tokens).
    Reads the generated tokens and the target tokens one shard's worth at a time."""
    n = gen.file.num
    global_emb = torch.empty(n, shards.dims["embed_dim"], dtype=torch.float32)
    total, count = 0.0, 0
    for info, rows, where in _by_shard(shards, gen.indices):
        lo, hi = int(where.min()), int(where.max()) + 1
        tokens = gen.file.tokens(lo, hi)[where - lo]  # [s, N, Dt] generated rows of this shard
        _check_finite(tokens, f"{gen.path}: generated tokens", [gen.file.keys[i] for i in where.tolist()])
        target = shards.read_shard(info.index, ("target",))["target"][rows]  # [s, N, Dt]
        total += mean_cosine(tokens, target, max_memory_bytes=budget) * len(rows)
        count += len(rows)
        if not gen.file.has_global:
            global_emb[where] = head.embed(tokens, batch_size=batch_size)
    if gen.file.has_global:
        global_emb = gen.file.global_emb().float()
    _check_finite(global_emb, f"{gen.path}: generated global embeddings", gen.file.keys)
    return global_emb, total / max(count, 1)
