"""What `eval-recall` compares (jobs/eval_recall.py), read and checked: the texts with their
positive pairs (`evaluated_texts`), the reference image features `baseline` and `gt-pooled`
(`reference_features`), and generated-features files matched to the shards' images
(`open_generated`, `generated_features`) with their token cosines. Rows holding NaN or Inf are
refused, naming the first key.

Memory: per-image globals ([n, E], small) are gathered into one preallocated tensor each; tokens
are only ever read one shard at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from blip_toolkit.dit.normalize import LayoutStatistics, TokenNormalizer
from blip_toolkit.embeddings.generated import GeneratedFeatures, read_generated
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.errors import InputError
from blip_toolkit.metrics.recall import mean_cosine, merge_identical_captions

logger = logging.getLogger("blip")


@dataclass
class RecallTexts:
    """The texts recall is scored against: emb [T, E], positive pairs (pair_image [P] indexing the
    scored images, pair_text [P]), `scored` (positions in the selection of the images with a caption)."""

    emb: torch.Tensor
    pair_image: torch.Tensor
    pair_text: torch.Tensor
    scored: torch.Tensor
    num_captions: int
    without: int

    @property
    def num_pairs(self) -> int:
        return int(self.pair_image.shape[0])


def evaluated_texts(
    shards: EmbeddingShards, keys: list[str], selection: torch.Tensor, dedupe: bool
) -> RecallTexts:
    """The captions of the selected images (identical strings merged when `dedupe`) and their
    positive pairs; images without a caption are left out, with a warning."""
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
    return RecallTexts(text_emb, remap[pair_image], pair_text, scored, int(keep.sum()), without)


def reference_features(shards, keys, head, selection, features, generated, batch_size: int, budget: int):
    """({"baseline", "gt-pooled": [n, E] float32 for the selection, as needed}, the cosine report of
    those two, the standardiser of the selection's ground-truth tokens or None)."""
    root = shards.root
    selected_keys = [keys[i] for i in selection.tolist()]
    image_features: dict[str, torch.Tensor] = {}
    reference = None
    if "baseline" in features or generated:
        baseline = shards.column("target_global")[selection]
        _check_finite(baseline, f"{root}: baseline (target_global)", selected_keys)
        image_features["baseline"] = baseline
    if "gt-pooled" in features or generated:
        has_cls = shards.encoders.get("target", {}).get("tokens") == "cls+patch"
        stats = LayoutStatistics(shards.dims["target_dim"], has_cls) if generated else None
        gt = _pooled_targets(shards, head, selection, batch_size, stats)
        _check_finite(gt, f"{root}: gt-pooled (head of the target tokens)", selected_keys)
        image_features["gt-pooled"] = gt
        if stats is not None and len(selection) >= 2:  # one image has no spread to standardise by
            reference = TokenNormalizer.from_statistics("standardize", stats)
    cosine: dict[str, float] = {}
    if "baseline" in image_features and "gt-pooled" in image_features:
        cosine["gt_pooled_vs_baseline"] = mean_cosine(
            image_features["gt-pooled"], image_features["baseline"], max_memory_bytes=budget
        )
    return image_features, cosine, reference


@dataclass
class GeneratedFile:
    """A generated-features file matched to the images of the shards it was sampled from."""

    path: Path
    file: GeneratedFeatures
    indices: torch.Tensor  # [n] int64: global image index of each generated row

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata


def open_generated(path: str, shards, keys: list[str]) -> GeneratedFile:
    """Read a generated-features file and match its keys to the shards' images (`keys`); refuses one
    of other dims, of another embeddings index, empty, or with an unknown or repeated key."""
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
    return GeneratedFile(Path(path), gen, torch.tensor(indices, dtype=torch.int64))


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


def _pooled_targets(shards, head, selection, batch_size: int, stats: LayoutStatistics | None = None):
    """head(target tokens) [n, E] float32 for the selected images, one shard at a time (and their
    token statistics into `stats`, when given)."""
    out = torch.empty(len(selection), shards.dims["embed_dim"], dtype=torch.float32)
    for info, rows, where in _by_shard(shards, selection):
        tokens = shards.read_shard(info.index, ("target",))["target"][rows]  # [s, N, Dt]
        out[where] = head.embed(tokens, batch_size=batch_size)
        if stats is not None:
            stats.update(tokens)
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


def generated_features(gen: GeneratedFile, shards, head, reference, batch_size: int, budget: int):
    """(generated globals [n, E] float32, {"generated_tokens_vs_target": mean token cosine of generated
    vs ground-truth tokens standardised by `reference` (None without one), "..._raw": the raw one}).
    Reads the generated tokens and the target tokens one shard's worth at a time."""
    n = gen.file.num
    global_emb = torch.empty(n, shards.dims["embed_dim"], dtype=torch.float32)
    raw = standardised = 0.0
    count = 0
    for info, rows, where in _by_shard(shards, gen.indices):
        lo, hi = int(where.min()), int(where.max()) + 1
        tokens = gen.file.tokens(lo, hi)[where - lo]  # [s, N, Dt] generated rows of this shard
        _check_finite(tokens, f"{gen.path}: generated tokens", [gen.file.keys[i] for i in where.tolist()])
        target = shards.read_shard(info.index, ("target",))["target"][rows]  # [s, N, Dt]
        raw += mean_cosine(tokens, target, max_memory_bytes=budget) * len(rows)
        if reference is not None:
            standardised += mean_cosine(
                reference.encode(tokens.float()), reference.encode(target.float()), max_memory_bytes=budget
            ) * len(rows)
        count += len(rows)
        if not gen.file.has_global:
            global_emb[where] = head.embed(tokens, batch_size=batch_size)
    if gen.file.has_global:
        global_emb = gen.file.global_emb().float()
    _check_finite(global_emb, f"{gen.path}: generated global embeddings", gen.file.keys)
    count = max(count, 1)
    cosine = {
        "generated_tokens_vs_target": standardised / count if reference is not None else None,
        "generated_tokens_vs_target_raw": raw / count,
    }
    return global_emb, cosine
