"""Image-text retrieval scored as LAVIS publishes it (BLIP / BLIP-2 COCO and Flickr30k numbers).

The protocol of LAVIS's `compute_sim_matrix` (`lavis/tasks/retrieval.py`, `blip_models/blip.py`,
`blip2_models/blip2_qformer.py`) and `itm_eval` / `_report_metrics`:

1. ITC similarity of every image with every text (BLIP: cosine of the projected [CLS] features;
   BLIP-2: the best of the 32 query features).
2. Image to text: for every image, the `k_test` texts of highest ITC are re-scored with the ITM head;
   its score is the ITM "match" logit (`itm_head(...)[:, 1]`; BLIP-2 averages that logit over the
   query outputs) plus the ITC similarity. Every other entry of the image's row is -100.
3. Text to image likewise, from every text's `k_test` images of highest ITC (a separate shortlist:
   a pair can be re-ranked in one direction and be -100 in the other).
4. Ranks: an image's rank is the best rank of any of its captions; a text's rank is the rank of its
   image. R@K = % of items with rank <= K; `txt_r_mean`, `img_r_mean` and `r_mean` as LAVIS.

What we do differently, and why it gives the same numbers:

- The [I, T] ITC matrix is never built whole: rows are computed in blocks of at most
  `max_memory_bytes` and reduced to the shortlist (top-k) or to the rank at once. Each direction
  computes its own blocks (image rows for i2t, text rows for t2i), so a row's scores all come from
  one block.
- A pair on both shortlists is scored by ITM once (LAVIS scores it twice, with identical results).
  ITM forward passes therefore number at most (I + T) * k_test, whatever I * T is.
- Ties are pessimistic (equal scores rank ahead of the positive), like `metrics/recall.py`; LAVIS's
  `np.argsort` breaks ties in an arbitrary order. Only exact float ties differ; in the re-ranked
  protocol every positive outside the shortlist ties at -100 with the other non-shortlisted texts,
  so with k_test >= 10 such an item misses R@1/5/10 either way.
- A text normally belongs to one image (Karpathy test files: 5 captions per image), so t2i has one
  positive, as in LAVIS's `txt2img`. Positives may also be many-to-many (`positives=`: identical
  caption strings of several images merged into one text, positive for each of them): a text's rank
  is then that of its best positive image, the same rule as an image's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.metrics.recall import RecallResult

logger = logging.getLogger("blip")

FILL = -100.0  # LAVIS's score for entries outside the re-ranked shortlist
SCORES = ("itm+itc", "itc")
KS = (1, 5, 10)

# similarity(image_feat [i, ...], text_feat [t, E]) -> [i, t] ITC scores
Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# itm(image_index [n], text_index [n]) -> [n] ITM "match" logits; pairs come sorted by image
ItmScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Shortlists:
    """The top-k ITC candidates of every image (i2t, [I, k_i2t]) and of every text (t2i, [T, k_t2i])."""

    i2t_index: torch.Tensor  # [I, k] int64 text indices
    i2t_itc: torch.Tensor  # [I, k] float32
    t2i_index: torch.Tensor  # [T, k] int64 image indices
    t2i_itc: torch.Tensor  # [T, k] float32


@dataclass
class ProtocolResult:
    recall: RecallResult  # fractions; ranks_i2t [I], ranks_t2i [T]
    score: str
    k_i2t: int  # shortlist sizes used (k_test clamped to the number of candidates); 0 for itc
    k_t2i: int
    itm_pairs: int  # distinct (image, text) pairs scored by the ITM head
    shortlist_entries: int  # (I * k_i2t + T * k_t2i): what LAVIS scores with ITM


def group_positives(keys: torch.Tensor, values: torch.Tensor, num_keys: int, what: str) -> torch.Tensor:
    """Positive pairs (keys [P], values [P]) -> [num_keys, W] padded (-1) values of each key. Every
    key needs at least one value."""
    keys, values = torch.as_tensor(keys, dtype=torch.int64), torch.as_tensor(values, dtype=torch.int64)
    if keys.ndim != 1 or keys.numel() == 0 or keys.shape != values.shape:
        raise InputError("retrieval needs at least one (image, text) pair")
    if int(keys.min()) < 0 or int(keys.max()) >= num_keys:
        raise InputError(f"a pair points at an {what} index out of range")
    counts = torch.bincount(keys, minlength=num_keys)
    if bool((counts == 0).any()):
        first = int((counts == 0).nonzero()[0, 0])
        other = "caption" if what == "image" else "image"
        raise InputError(f"{what} {first} has no {other}; every {what} needs at least one")
    order = torch.argsort(keys, stable=True)
    width = int(counts.max())
    padded = torch.full((num_keys, width), -1, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order)) - starts[keys[order]]
    padded[keys[order], slot] = values[order]
    return padded


def check_text_image(text_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """[T] image index of each text -> [I, P] padded (-1) text indices of each image. Every image
    needs at least one text."""
    text_image = torch.as_tensor(text_image, dtype=torch.int64)
    if text_image.ndim != 1 or text_image.numel() == 0:
        raise InputError("retrieval needs at least one text")
    return group_positives(text_image, torch.arange(text_image.numel()), num_images, "image")


def _best_rank(tile: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """1 + negatives scoring >= the best positive (pessimistic ties); tile [b, C], positives [b, W]
    padded with -1."""
    valid = positives >= 0
    pos_scores = tile.gather(1, positives.clamp(min=0)).masked_fill(~valid, float("-inf"))
    best = pos_scores.max(dim=1).values  # [b]
    at_least = (tile >= best[:, None]).sum(dim=1)
    positives_at_least = ((pos_scores >= best[:, None]) & valid).sum(dim=1)
    return 1 + at_least - positives_at_least


def rows_per_block(num_cols: int, scores_per_pair: int, max_memory_bytes: int) -> int:
    """Rows of a similarity block: [rows, num_cols] float32 scores plus what computing them needs
    (`scores_per_pair` floats per score, e.g. BLIP-2's [rows, cols, Q] query scores)."""
    per_row = max(1, num_cols) * 4 * max(1, scores_per_pair)
    return max(1, int(max_memory_bytes // per_row))


def _i2t_blocks(image_feat, text_feat, similarity: Similarity, block: int):
    for start in range(0, image_feat.shape[0], block):
        stop = min(image_feat.shape[0], start + block)
        yield start, stop, similarity(image_feat[start:stop], text_feat).float()  # [b, T]


def _t2i_blocks(image_feat, text_feat, similarity: Similarity, block: int):
    for start in range(0, text_feat.shape[0], block):
        stop = min(text_feat.shape[0], start + block)
        yield start, stop, similarity(image_feat, text_feat[start:stop]).float().t()  # [b, I]


def itc_shortlists(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    similarity: Similarity,
    k_test: int,
    *,
    scores_per_pair: int = 1,
    max_memory_bytes: int = 1 << 28,
) -> Shortlists:
    """Top-`k_test` ITC candidates of every image and of every text, in memory-bounded blocks.
    image_feat: [I, ...] (whatever `similarity` takes), text_feat: [T, E]."""
    num_images, num_texts = image_feat.shape[0], text_feat.shape[0]
    k_i2t, k_t2i = min(k_test, num_texts), min(k_test, num_images)
    device = text_feat.device
    i2t_index = torch.empty(num_images, k_i2t, dtype=torch.int64, device=device)
    i2t_itc = torch.empty(num_images, k_i2t, device=device)
    t2i_index = torch.empty(num_texts, k_t2i, dtype=torch.int64, device=device)
    t2i_itc = torch.empty(num_texts, k_t2i, device=device)
    block = rows_per_block(num_texts, scores_per_pair + 1, max_memory_bytes)
    for start, stop, tile in _i2t_blocks(image_feat, text_feat, similarity, block):
        top = tile.topk(k_i2t, dim=1)
        i2t_itc[start:stop], i2t_index[start:stop] = top.values, top.indices
    block = rows_per_block(num_images, scores_per_pair + 1, max_memory_bytes)
    for start, stop, tile in _t2i_blocks(image_feat, text_feat, similarity, block):
        top = tile.topk(k_t2i, dim=1)
        t2i_itc[start:stop], t2i_index[start:stop] = top.values, top.indices
    return Shortlists(i2t_index, i2t_itc, t2i_index, t2i_itc)


def itc_ranks(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    similarity: Similarity,
    image_texts: torch.Tensor,
    text_images: torch.Tensor,
    *,
    scores_per_pair: int = 1,
    max_memory_bytes: int = 1 << 28,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks by ITC alone over all candidates (LAVIS with k_test <= 0), pessimistic ties.
    image_texts [I, P] / text_images [T, Q]: padded (-1) positives of each image / text.
    Returns (ranks_i2t [I], ranks_t2i [T]), 1-based, int64, on the CPU."""
    num_images, num_texts = image_feat.shape[0], text_feat.shape[0]
    device = text_feat.device
    image_texts, text_images = image_texts.to(device), text_images.to(device)
    ranks_i2t = torch.empty(num_images, dtype=torch.int64)
    ranks_t2i = torch.empty(num_texts, dtype=torch.int64)
    block = rows_per_block(num_texts, scores_per_pair + 1, max_memory_bytes)
    for start, stop, tile in _i2t_blocks(image_feat, text_feat, similarity, block):
        ranks_i2t[start:stop] = _best_rank(tile, image_texts[start:stop]).cpu()
    block = rows_per_block(num_images, scores_per_pair + 1, max_memory_bytes)
    for start, stop, tile in _t2i_blocks(image_feat, text_feat, similarity, block):
        ranks_t2i[start:stop] = _best_rank(tile, text_images[start:stop]).cpu()
    return ranks_i2t, ranks_t2i


def rerank(shortlists: Shortlists, num_texts: int, itm: ItmScorer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ITM + ITC for the shortlisted pairs, each distinct pair scored once.
    Returns (final_i2t [I, k_i2t], final_t2i [T, k_t2i], number of distinct pairs)."""
    num_images, k_i2t = shortlists.i2t_index.shape
    k_t2i = shortlists.t2i_index.shape[1]
    device = shortlists.i2t_index.device
    i2t_keys = torch.arange(num_images, device=device)[:, None] * num_texts + shortlists.i2t_index
    t2i_keys = shortlists.t2i_index * num_texts + torch.arange(num_texts, device=device)[:, None]
    keys = torch.cat([i2t_keys.flatten(), t2i_keys.flatten()])
    distinct, inverse = torch.unique(keys, sorted=True, return_inverse=True)  # sorted: grouped by image
    logits = itm(distinct // num_texts, distinct % num_texts).float().to(device)  # [n]
    if logits.shape != distinct.shape:
        raise RuntimeError(f"ITM scorer returned {tuple(logits.shape)} scores for {distinct.numel()} pairs")
    final_i2t = logits[inverse[: num_images * k_i2t]].view(num_images, k_i2t) + shortlists.i2t_itc
    final_t2i = logits[inverse[num_images * k_i2t :]].view(num_texts, k_t2i) + shortlists.t2i_itc
    return final_i2t, final_t2i, int(distinct.numel())


def shortlist_ranks(
    final: torch.Tensor, positive: torch.Tensor, num_positives: torch.Tensor, num_candidates: int
) -> torch.Tensor:
    """Ranks from re-ranked shortlists, every other candidate scoring FILL (-100) as in LAVIS.

    final: [N, k] scores of the shortlisted candidates; positive: [N, k] bool; num_positives: [N]
    positives of each row among all `num_candidates`. rank = 1 + number of negatives scoring >= the
    best positive (pessimistic ties), counting the non-shortlisted negatives at FILL."""
    outside_positives = num_positives - positive.sum(dim=1)
    best = final.masked_fill(~positive, float("-inf")).max(dim=1).values
    best = torch.where(outside_positives > 0, best.clamp(min=FILL), best)
    negatives_in = (~positive & (final >= best[:, None])).sum(dim=1)
    negatives_out = (num_candidates - num_positives) - (~positive).sum(dim=1)
    return (1 + negatives_in + torch.where(best <= FILL, negatives_out, 0)).cpu()


def recall_from_ranks(
    ranks_i2t: torch.Tensor, ranks_t2i: torch.Tensor, num_pairs: int | None = None, ks: Sequence[int] = KS
) -> RecallResult:
    return RecallResult(
        i2t={k: float((ranks_i2t <= k).double().mean()) for k in ks},
        t2i={k: float((ranks_t2i <= k).double().mean()) for k in ks},
        num_images=int(ranks_i2t.numel()),
        num_texts=int(ranks_t2i.numel()),
        ranks_i2t=ranks_i2t,
        ranks_t2i=ranks_t2i,
        num_pairs=int(ranks_t2i.numel()) if num_pairs is None else num_pairs,
    )


def lavis_metrics(recall: RecallResult) -> dict[str, float]:
    """LAVIS's `_report_metrics` keys, in % (txt = image-to-text, img = text-to-image)."""
    tr = [100.0 * recall.i2t[k] for k in KS]
    ir = [100.0 * recall.t2i[k] for k in KS]
    txt_mean, img_mean = sum(tr) / 3, sum(ir) / 3
    return {
        "txt_r1": tr[0],
        "txt_r5": tr[1],
        "txt_r10": tr[2],
        "txt_r_mean": txt_mean,
        "img_r1": ir[0],
        "img_r5": ir[1],
        "img_r10": ir[2],
        "img_r_mean": img_mean,
        "r_mean": (txt_mean + img_mean) / 2,
        "agg_metrics": txt_mean,
    }


def run_protocol(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    text_image: torch.Tensor | None,
    similarity: Similarity,
    itm: ItmScorer | None,
    *,
    score: str = "itm+itc",
    k_test: int = 256,
    scores_per_pair: int = 1,
    max_memory_bytes: int = 1 << 28,
    positives: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ProtocolResult:
    """The whole protocol over precomputed features (see the module docstring).

    image_feat: [I, ...], text_feat: [T, E] (same device), text_image: [T] image index of each text,
    or `positives` = (pair_image [P], pair_text [P]) for many-to-many positives (text_image None).
    itm: scores (image index, text index) pairs; needed for score "itm+itc"."""
    if score not in SCORES:
        raise UsageError(f"--score {score!r}: use one of {', '.join(SCORES)}")
    if k_test < 1:
        raise UsageError(f"--k-test must be at least 1, got {k_test}")
    num_images, num_texts = image_feat.shape[0], text_feat.shape[0]
    if positives is None:
        text_image_cpu = torch.as_tensor(text_image, dtype=torch.int64).cpu()
        if text_image_cpu.numel() != num_texts:
            raise InputError(f"{num_texts} text features but {text_image_cpu.numel()} text-to-image entries")
        positives = (text_image_cpu, torch.arange(num_texts))
    pair_image, pair_text = (torch.as_tensor(x, dtype=torch.int64).cpu() for x in positives)
    image_texts = group_positives(pair_image, pair_text, num_images, "image")  # [I, P]
    text_images = group_positives(pair_text, pair_image, num_texts, "text")  # [T, Q]
    with torch.inference_mode():
        if score == "itc":
            ranks_i2t, ranks_t2i = itc_ranks(
                image_feat,
                text_feat,
                similarity,
                image_texts,
                text_images,
                scores_per_pair=scores_per_pair,
                max_memory_bytes=max_memory_bytes,
            )
            return ProtocolResult(recall_from_ranks(ranks_i2t, ranks_t2i, len(pair_image)), score, 0, 0, 0, 0)
        if itm is None:
            raise UsageError("score itm+itc needs an ITM scorer")
        lists = itc_shortlists(
            image_feat,
            text_feat,
            similarity,
            k_test,
            scores_per_pair=scores_per_pair,
            max_memory_bytes=max_memory_bytes,
        )
        k_i2t, k_t2i = lists.i2t_index.shape[1], lists.t2i_index.shape[1]
        logger.info(
            "re-ranking with ITM: %d images x top %d texts and %d texts x top %d images",
            num_images,
            k_i2t,
            num_texts,
            k_t2i,
        )
        final_i2t, final_t2i, pairs = rerank(lists, num_texts, itm)
        # [N, k, W] -> [N, k]: is the shortlisted candidate one of the row's positives
        positive_i2t = (image_texts[:, None, :] == lists.i2t_index.cpu()[:, :, None]).any(dim=-1)
        positive_t2i = (text_images[:, None, :] == lists.t2i_index.cpu()[:, :, None]).any(dim=-1)
        ranks_i2t = shortlist_ranks(final_i2t.cpu(), positive_i2t, (image_texts >= 0).sum(dim=1), num_texts)
        ranks_t2i = shortlist_ranks(final_t2i.cpu(), positive_t2i, (text_images >= 0).sum(dim=1), num_images)
    return ProtocolResult(
        recall=recall_from_ranks(ranks_i2t, ranks_t2i, len(pair_image)),
        score=score,
        k_i2t=k_i2t,
        k_t2i=k_t2i,
        itm_pairs=pairs,
        shortlist_entries=num_images * k_i2t + num_texts * k_t2i,
    )
