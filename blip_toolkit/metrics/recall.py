"""Recall@K of image-text retrieval over precomputed embeddings, computed in blocks.

`retrieval_recall` scores every image against every text (cosine similarity by default) and reports,
for both directions and several K in one pass:

- **Image to text (i2t)**: an image is a hit at K when ANY of its positive texts is among the K
  best-scoring texts. Text to image (t2i) likewise with the text's positive images. This is the
  convention of CLIP_benchmark (`text_retrieval_recall@k` / `image_retrieval_recall@k`) and LAVIS,
  which the published COCO / Flickr30k numbers use. Pairs are many-to-many: an image has several
  captions, and a deduplicated caption can be the positive of several images.
- **Rank** of an item = the 1-based rank of its best positive = 1 + the number of NEGATIVES whose
  score is >= the best positive's score. Hit at K <=> rank <= K. K larger than the number of
  candidates is allowed (every item is then a hit).
- **Ties are pessimistic**: a negative tied with the best positive ranks before it. Tie order is
  otherwise arbitrary (torch.topk / argsort order by index), so a collapsed generator that emits the
  same features for every input would score anywhere from 0 to perfect depending on where the
  positives happen to sit in the index; counting ties against it gives such a model chance level or
  less, never credit.
- **"Tied" means equal up to float rounding**: a negative counts when its score is >= best positive
  - `tie_tolerance` (times the product of the row norms when `normalize=False`). Exact float
  comparison cannot be the rule: float32 matmuls of different shapes round the same dot product
  differently (MKL's tiles disagree with the full matrix in the last bits), and the best positive's
  score comes from a row-wise dot product, not from the tile; measured differences reach 4e-7 on
  cosines near 1, so identical embeddings would tie or not at random. The default 1e-6 (8 float32
  ulps at 1.0) absorbs that and nothing a float16-stored embedding can resolve. It also means that a
  negative within 1e-6 below the best positive counts as tied where topk would order the two (on
  5,000 x 25,000 random embeddings: 0 of 90,000 hits differ from a topk evaluation; 1 with 2e-6).
- Every image and every text must have at least one positive (an item without one has no defined
  rank): otherwise `InputError`. Duplicate pairs are counted once.

Computation (the [I, T] similarity matrix is never built; 50,000 x 250,000 would be 50 GB):

1. One chunked pass per side: row norms (float64) and the NaN/Inf check.
2. Each image's and each text's best positive score, straight from the pairs (gather both rows,
   row-wise dot product, scatter-max), in chunks.
3. One pass over [block x block] similarity tiles (float32 matmul; inputs upcast and normalised per
   block; thresholds = best positive - tolerance). From the same tile: for each image the number of
   texts scoring >= its threshold, for each text the number of images scoring >= its threshold, so
   the big matmul is done once. The tile score
   of each positive pair is picked out of the tile too (the pairs are bucketed by tile up front).
4. Subtract the positives that step 3 counted (from the pairs' tile scores, compared with the same
   thresholds, so the count of negatives is exact; no dense positive mask).

How the steps are cut into blocks within `max_memory_bytes`, and the measurements behind the tile
size: metrics/recall_blocks.py.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.metrics.recall_blocks import (
    MAX_CHUNK_ROWS,
    best_positive_scores,
    count_at_least,
    plan_blocks,
    prepare_rows,
    row_norms,
    warn_if_tolerance_too_small,
)

logger = logging.getLogger("blip")

DEFAULT_TIE_TOLERANCE = 1e-6


@dataclass
class RecallResult:
    """Recall@K in both directions. `i2t[k]` / `t2i[k]` are fractions in [0, 1].

    ranks_i2t: [I] int64, 1-based rank of each image's best positive text (pessimistic ties).
    ranks_t2i: [T] int64, 1-based rank of each text's best positive image.
    """

    i2t: dict[int, float]
    t2i: dict[int, float]
    num_images: int
    num_texts: int
    ranks_i2t: torch.Tensor
    ranks_t2i: torch.Tensor
    num_pairs: int = 0  # distinct positive pairs

    @property
    def median_rank_i2t(self) -> float:
        return _median(self.ranks_i2t)

    @property
    def median_rank_t2i(self) -> float:
        return _median(self.ranks_t2i)

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-item ranks): counts, `i2t` / `t2i` as {"R@k": fraction}, and the
        median and mean rank of each direction."""
        return {
            "num_images": self.num_images,
            "num_texts": self.num_texts,
            "num_pairs": self.num_pairs,
            "i2t": {f"R@{k}": v for k, v in self.i2t.items()},
            "t2i": {f"R@{k}": v for k, v in self.t2i.items()},
            "median_rank_i2t": self.median_rank_i2t,
            "median_rank_t2i": self.median_rank_t2i,
            "mean_rank_i2t": float(self.ranks_i2t.double().mean()),
            "mean_rank_t2i": float(self.ranks_t2i.double().mean()),
        }


def merge_identical_captions(captions: Sequence[str], caption_image):
    """Identical caption strings as one text, positive for every image that has it.

    captions: [C] strings, caption_image: [C] image index of each. Returns (first [T] row of each
    distinct string, in order of first appearance; pair_image [P]; pair_text [P]), with identical
    (image, text) pairs counted once."""
    ids: dict[str, int] = {}
    first: list[int] = []
    text_of = []
    for row, caption in enumerate(captions):
        if caption not in ids:
            ids[caption] = len(first)
            first.append(row)
        text_of.append(ids[caption])
    texts = max(len(first), 1)
    key = torch.unique(
        torch.as_tensor(caption_image, dtype=torch.int64) * texts + torch.tensor(text_of, dtype=torch.int64)
    )
    return first, key // texts, key % texts


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    pair_image: torch.Tensor,
    pair_text: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    normalize: bool = True,
    max_memory_bytes: int = 1 << 30,
    device: str | torch.device = "cpu",
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> RecallResult:
    """Image-to-text and text-to-image recall@K (semantics in the module docstring).

    image_emb: [I, D] any float dtype, need not be normalised. text_emb: [T, D].
    pair_image, pair_text: [P] integer, positive pair p is (pair_image[p], pair_text[p]).
    ks: the K to report (deduplicated, sorted). normalize: L2-normalise rows first (cosine scores).
    max_memory_bytes: budget for the similarity tiles, the cached normalised rows and the chunked
    temporaries (vectors of length I + T + P come on top, about 50 bytes per item).
    device: where the blocks are computed; inputs may live elsewhere and are moved block by block.
    tie_tolerance: scores within this of the best positive count as ties (relative to the product of
    the row norms when normalize=False). 0 compares the computed float32 scores exactly.

    Raises InputError for empty or malformed inputs, NaN/Inf embeddings, out-of-range pair indices,
    and images or texts without a positive; UsageError for bad `ks` or budget.
    """
    ks = _check_ks(ks)
    max_memory_bytes = _positive_int(max_memory_bytes, "max_memory_bytes")
    if not (tie_tolerance >= 0 and math.isfinite(tie_tolerance)):
        raise UsageError(f"tie_tolerance must be a finite number >= 0, got {tie_tolerance!r}")
    num_images, num_texts, dim = _check_embeddings(image_emb, text_emb)
    device = torch.device(device)

    with torch.inference_mode():
        pair_i, pair_t = _check_pairs(pair_image, pair_text, num_images, num_texts, device)
        num_pairs = int(pair_i.numel())
        # The smaller side is the one whose normalised rows get cached (B in count_at_least).
        images_cached = num_images <= num_texts
        plan = plan_blocks(
            num_texts if images_cached else num_images,
            num_images if images_cached else num_texts,
            dim,
            max_memory_bytes,
        )
        logger.debug(
            "recall: %d images x %d texts x %d dims, %d pairs; tiles %d x %d, %d super-block(s) of %d rows",
            num_images,
            num_texts,
            dim,
            num_pairs,
            plan.tile_rows,
            plan.tile_cols,
            len(plan.cache_bounds) - 1,
            plan.cache_rows,
        )

        norm_img = row_norms(image_emb, "image embeddings", plan.chunk_rows, device)  # [I] float64
        norm_txt = row_norms(text_emb, "text embeddings", plan.chunk_rows, device)  # [T] float64
        if normalize:
            inv_img = (1.0 / norm_img.clamp_min(1e-12)).float()  # zero rows stay zero (F.normalize's eps)
            inv_txt = (1.0 / norm_txt.clamp_min(1e-12)).float()
            tol_img = torch.full((num_images,), tie_tolerance, device=device)
            tol_txt = torch.full((num_texts,), tie_tolerance, device=device)
        else:
            inv_img = inv_txt = None
            # Rounding error of a dot product scales with |a| |b|; bound |b| by the largest norm.
            tol_img = (tie_tolerance * norm_img * norm_txt.max()).float()
            tol_txt = (tie_tolerance * norm_txt * norm_img.max()).float()

        best_img, best_txt = best_positive_scores(
            image_emb, text_emb, inv_img, inv_txt, pair_i, pair_t, plan.chunk_rows, device
        )
        thr_img = best_img - tol_img  # [I] float32
        thr_txt = best_txt - tol_txt  # [T] float32

        if images_cached:
            cnt_txt, cnt_img, pair_score = count_at_least(
                text_emb, inv_txt, thr_txt, image_emb, inv_img, thr_img, pair_t, pair_i, plan, device
            )
        else:
            cnt_img, cnt_txt, pair_score = count_at_least(
                image_emb, inv_img, thr_img, text_emb, inv_txt, thr_txt, pair_i, pair_t, plan, device
            )

        # Step 4: the positives counted above, from their tile scores (bitwise the values compared in
        # the tiles), so what remains is exactly the number of negatives at or above the threshold.
        pos_img = torch.zeros(num_images, dtype=torch.int64, device=device)
        pos_img.index_add_(0, pair_i, (pair_score >= thr_img[pair_i]).long())
        pos_txt = torch.zeros(num_texts, dtype=torch.int64, device=device)
        pos_txt.index_add_(0, pair_t, (pair_score >= thr_txt[pair_t]).long())
        ranks_img = 1 + cnt_img - pos_img
        ranks_txt = 1 + cnt_txt - pos_txt

        if tie_tolerance > 0:  # with 0 the caller asked for exact float comparisons
            warn_if_tolerance_too_small(pair_score, pair_i, best_img, tol_img, "image")
            warn_if_tolerance_too_small(pair_score, pair_t, best_txt, tol_txt, "text")

        i2t = {k: float((ranks_img <= k).double().mean()) for k in ks}
        t2i = {k: float((ranks_txt <= k).double().mean()) for k in ks}

    # Cloned outside inference mode: callers get ordinary tensors they may modify in place.
    return RecallResult(
        i2t=i2t,
        t2i=t2i,
        num_images=num_images,
        num_texts=num_texts,
        ranks_i2t=ranks_img.cpu().clone(),
        ranks_t2i=ranks_txt.cpu().clone(),
        num_pairs=num_pairs,
    )


def mean_cosine(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    max_memory_bytes: int = 1 << 30,
    device: str | torch.device = "cpu",
    eps: float = 1e-8,
) -> float:
    """Mean row-wise cosine similarity of `a` and `b` over the last dimension.

    a, b: [N, D] (globals) or [B, N, D] (tokens; every token weighs the same, which is the mean over
    tokens then over samples), any float dtype, same shape (non-contiguous inputs are copied once to
    flatten them). Computed in float32 in chunks of rows within `max_memory_bytes`, summed in float64.
    A zero row has cosine 0 (torch.nn.functional.cosine_similarity clamps the norms' product at `eps`).
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"mean_cosine: {name} must be a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise InputError(f"mean_cosine: {name} must be a float tensor, got {x.dtype}")
    if a.shape != b.shape:
        raise InputError(f"mean_cosine: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 1 or a.numel() == 0:
        raise InputError(f"mean_cosine: empty input of shape {tuple(a.shape)}")
    max_memory_bytes = _positive_int(max_memory_bytes, "max_memory_bytes")
    dim = a.shape[-1]
    rows_a = a.reshape(-1, dim)  # [N, D] (a view when contiguous)
    rows_b = b.reshape(-1, dim)
    num_rows = rows_a.shape[0]
    # Per row: both float32 copies, the product and the finite masks.
    chunk = max(1, min(MAX_CHUNK_ROWS, max_memory_bytes // (dim * 16)))
    device = torch.device(device)
    total = 0.0
    with torch.inference_mode():
        buf_a = torch.empty(min(chunk, num_rows), dim, device=device)
        buf_b = torch.empty(min(chunk, num_rows), dim, device=device)
        for start in range(0, num_rows, chunk):
            x = prepare_rows(rows_a[start : start + chunk], None, buf_a)  # [chunk, D] float32
            y = prepare_rows(rows_b[start : start + chunk], None, buf_b)
            for name, z in (("a", x), ("b", y)):
                if not bool(torch.isfinite(z).all()):
                    raise InputError(f"mean_cosine: {name} contains NaN or Inf")
            cos = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=eps)  # [chunk]
            total += float(cos.double().sum())
    return total / num_rows


# --- validation -----------------------------------------------------------------------------------------


def _check_ks(ks: Sequence[int]) -> list[int]:
    try:
        values = list(ks)
    except TypeError:
        raise UsageError(f"ks must be a sequence of positive integers, got {ks!r}") from None
    if not values:
        raise UsageError("ks is empty: give at least one K (e.g. 1 5 10)")
    return sorted({_positive_int(k, "every K") for k in values})


def _positive_int(value, what: str) -> int:
    """`value` as an int (numpy and torch integers accepted, bools and floats not) or UsageError."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < 1:
        raise UsageError(f"{what} must be a positive integer, got {value!r}")
    return number


def _check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[int, int, int]:
    for name, x in (("image", image_emb), ("text", text_emb)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} embeddings must be a tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise InputError(f"{name} embeddings must be 2-D [N, D], got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise InputError(f"{name} embeddings must be a float tensor, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise InputError(f"{name} embeddings are empty (shape {tuple(x.shape)})")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise InputError(
            f"embedding dims differ: images have {image_emb.shape[1]}, texts have {text_emb.shape[1]}"
        )
    return image_emb.shape[0], text_emb.shape[0], image_emb.shape[1]


def _check_pairs(
    pair_image: torch.Tensor, pair_text: torch.Tensor, num_images: int, num_texts: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated, deduplicated pairs as int64 on `device`: ([P'], [P']), sorted by (image, text)."""
    for name, x in (("pair_image", pair_image), ("pair_text", pair_text)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.ndim != 1:
            raise InputError(f"{name} must be 1-D [P], got shape {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise InputError(f"{name} must hold integer indices, got {x.dtype}")
    if pair_image.shape[0] != pair_text.shape[0]:
        raise InputError(
            f"pair_image has {pair_image.shape[0]} entries but pair_text has {pair_text.shape[0]}"
        )
    if pair_image.shape[0] == 0:
        raise InputError("no positive pairs given")
    pair_i = pair_image.to(device=device, dtype=torch.int64)
    pair_t = pair_text.to(device=device, dtype=torch.int64)
    for name, x, n, what in (
        ("pair_image", pair_i, num_images, "images"),
        ("pair_text", pair_t, num_texts, "texts"),
    ):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise InputError(f"{name} holds index {bad}, outside 0..{n - 1} (there are {n} {what})")
    key = torch.unique(pair_i * num_texts + pair_t)  # sorted, duplicates dropped
    pair_i, pair_t = key // num_texts, key % num_texts
    for name, x, n, other in (("images", pair_i, num_images, "text"), ("texts", pair_t, num_texts, "image")):
        missing = torch.bincount(x, minlength=n) == 0
        num_missing = int(missing.sum())
        if num_missing:
            first = int(missing.nonzero()[0, 0])
            raise InputError(
                f"{num_missing} of {n} {name} have no positive {other} in the pairs (first: index {first}); "
                "recall is undefined for them"
            )
    return pair_i, pair_t


def _median(ranks: torch.Tensor) -> float:
    values = ranks.sort().values
    n = values.numel()
    return float((values[(n - 1) // 2] + values[n // 2]).double() / 2)
