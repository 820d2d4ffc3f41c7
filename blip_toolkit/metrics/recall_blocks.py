"""The blocked computation behind `eval.recall.retrieval_recall` (its docstring gives the steps): the
[I, T] similarity matrix is never built, only [block x block] tiles within a memory budget.

Tiles hold up to 8M scores (32 MB, plus an 8 MB mask). Measured on this 2-core CPU at 5,000 x 25,000
x 768: one thread runs 2M- and 8M-score tiles alike and 16M or more 15% slower (the two comparisons
re-read the tile, which must stay in the 32 MB L3); with two threads on a busy machine, 2M-score
tiles ran 1.6x slower than 8M ones, as every tile costs a few fork-joins of the thread pool. The rest
of `max_memory_bytes` caches the normalised float32 rows of the smaller side, so each row is upcast
and normalised once (or once per super-block when the cache cannot hold the whole side).
Vectors of length I, T and P (norms, thresholds, counts, pairs: about 50 bytes per item) come on
top of the budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from blip_toolkit.errors import InputError

logger = logging.getLogger("blip")

# Scores per tile (float32) and the widest tile: see the module docstring for the measurements.
_TILE_SCORES = 1 << 23
_TILE_COLS = 8192
MAX_CHUNK_ROWS = 4096  # rows per chunk in the norm and pair passes; larger gains nothing


@dataclass(frozen=True)
class BlockPlan:
    a_bounds: tuple[int, ...]  # block starts of the streamed side A, then NA: tiles are [A block, B block]
    b_bounds: tuple[int, ...]  # block starts of the cached side B, then NB
    cache_bounds: tuple[int, ...]  # B super-blocks (normalised and cached at once); each is a run of B blocks
    chunk_rows: int  # rows (or pairs) per chunk in the norm and best-positive passes

    @property
    def tile_rows(self) -> int:
        return max(b - a for a, b in zip(self.a_bounds, self.a_bounds[1:]))

    @property
    def tile_cols(self) -> int:
        return max(b - a for a, b in zip(self.b_bounds, self.b_bounds[1:]))

    @property
    def cache_rows(self) -> int:
        return max(b - a for a, b in zip(self.cache_bounds, self.cache_bounds[1:]))


def _split(start: int, stop: int, size: int) -> list[int]:
    """Starts of ceil(n / size) near-equal blocks covering [start, stop) (no tiny ragged last block)."""
    n = stop - start
    parts = max(1, -(-n // size))
    return [start + (i * n) // parts for i in range(parts)]


def plan_blocks(num_a: int, num_b: int, dim: int, budget: int) -> BlockPlan:
    """Block sizes from the memory budget. A is streamed block by block, B (the smaller side) is
    normalised and cached a super-block at a time, tiles are [A block, B block] float32 plus a bool mask."""
    # At most a quarter of the budget for the tile and its mask (5 bytes per score), capped where the
    # comparisons still find it in cache.
    tile = max(1, min(_TILE_SCORES, budget // 20))
    cols = max(1, min(num_b, _TILE_COLS, math.isqrt(tile * 8)))
    rows = max(1, min(num_a, tile // cols))
    # The cached float32 rows of B get what the tile and the A block (float32) leave.
    cache = max(cols, (budget - 5 * rows * cols - 4 * rows * dim) // (4 * dim))
    cache_starts = _split(0, num_b, cache)
    cache_bounds = (*cache_starts, num_b)
    b_starts = [s for lo, hi in zip(cache_bounds, cache_bounds[1:]) for s in _split(lo, hi, cols)]
    # Norm and best-positive passes, per row: the gathered input rows of both sides (up to float32)
    # and their float32 copies.
    chunk_rows = max(1, min(MAX_CHUNK_ROWS, budget // (16 * dim)))
    return BlockPlan(
        a_bounds=(*_split(0, num_a, rows), num_a),
        b_bounds=(*b_starts, num_b),
        cache_bounds=cache_bounds,
        chunk_rows=chunk_rows,
    )


def prepare_rows(rows: torch.Tensor, inv_norm: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Copy rows [n, D] (any float dtype, any device) into out[:n] (float32 on the compute device),
    scaled by inv_norm [n] when given, and return that view. The pair pass and the tile pass both go
    through here, so they see bitwise the same normalised rows. Reusing `out` avoids page-faulting a
    fresh allocation per block (measured: the upcast then costs more than the comparisons)."""
    x = out[: rows.shape[0]]
    x.copy_(rows)
    if inv_norm is not None:
        x.mul_(inv_norm[:, None])
    return x


def row_norms(emb: torch.Tensor, what: str, chunk_rows: int, device: torch.device) -> torch.Tensor:
    """[N] float64 L2 norms of the rows of `emb` [N, D]; InputError when a row holds NaN or Inf."""
    norms = torch.empty(emb.shape[0], dtype=torch.float64, device=device)
    buf = torch.empty(min(chunk_rows, emb.shape[0]), emb.shape[1], device=device)
    for start in range(0, emb.shape[0], chunk_rows):
        block = prepare_rows(emb[start : start + chunk_rows], None, buf)
        norm = torch.linalg.vector_norm(block, dim=1)
        if not bool(torch.isfinite(norm).all()):
            # Either a NaN/Inf in the input or squares of huge values overflowing float32; in float64
            # no finite float32 overflows, so a non-finite norm there means a bad row.
            norm = torch.linalg.vector_norm(block, dim=1, dtype=torch.float64)
        norms[start : start + block.shape[0]] = norm
    bad = ~torch.isfinite(norms)
    num_bad = int(bad.sum())
    if num_bad:
        first = int(bad.nonzero()[0, 0])
        raise InputError(f"{what}: {num_bad} row(s) contain NaN or Inf (first: row {first})")
    return norms


def best_positive_scores(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    inv_img: torch.Tensor | None,
    inv_txt: torch.Tensor | None,
    pair_i: torch.Tensor,
    pair_t: torch.Tensor,
    chunk: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best positive score of each image [I] and each text [T] (float32), from the pairs only."""
    chunk = min(chunk, pair_i.numel())
    dim = image_emb.shape[1]
    gathered_img = torch.empty(chunk, dim, dtype=image_emb.dtype, device=image_emb.device)
    gathered_txt = torch.empty(chunk, dim, dtype=text_emb.dtype, device=text_emb.device)
    buf_img = torch.empty(chunk, dim, device=device)
    buf_txt = torch.empty(chunk, dim, device=device)
    best_img = torch.full((image_emb.shape[0],), -math.inf, device=device)
    best_txt = torch.full((text_emb.shape[0],), -math.inf, device=device)
    for start in range(0, pair_i.numel(), chunk):
        pi = pair_i[start : start + chunk]
        pt = pair_t[start : start + chunk]
        n = pi.numel()
        rows_img = torch.index_select(image_emb, 0, pi.to(image_emb.device), out=gathered_img[:n])
        rows_txt = torch.index_select(text_emb, 0, pt.to(text_emb.device), out=gathered_txt[:n])
        a = prepare_rows(rows_img, None if inv_img is None else inv_img[pi], buf_img)  # [n, D]
        b = prepare_rows(rows_txt, None if inv_txt is None else inv_txt[pt], buf_txt)  # [n, D]
        score = a.mul_(b).sum(dim=1)  # [n] row-wise dot products
        best_img.scatter_reduce_(0, pi, score, reduce="amax")
        best_txt.scatter_reduce_(0, pt, score, reduce="amax")
    return best_img, best_txt


def count_at_least(
    a_emb: torch.Tensor,
    a_inv: torch.Tensor | None,
    a_thr: torch.Tensor,
    b_emb: torch.Tensor,
    b_inv: torch.Tensor | None,
    b_thr: torch.Tensor,
    pair_a: torch.Tensor,
    pair_b: torch.Tensor,
    plan: BlockPlan,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile pass. a_emb [NA, D] is streamed, b_emb [NB, D] cached; a_thr [NA], b_thr [NB].

    Returns (count_a [NA], count_b [NB], pair_score [P]): count_a[i] = #{j : s(i, j) >= a_thr[i]},
    count_b[j] = #{i : s(i, j) >= b_thr[j]} (positives included), and the tile score of each pair.
    """
    num_a, num_b, dim = a_emb.shape[0], b_emb.shape[0], a_emb.shape[1]
    a_bounds, b_bounds = plan.a_bounds, plan.b_bounds
    blocks_b = len(b_bounds) - 1

    # Bucket the pairs by tile, so each tile reads its positives' scores with one gather.
    a_block = torch.searchsorted(torch.tensor(a_bounds[:-1], device=device), pair_a, right=True) - 1
    b_block = torch.searchsorted(torch.tensor(b_bounds[:-1], device=device), pair_b, right=True) - 1
    tile_key = a_block * blocks_b + b_block
    order = torch.argsort(tile_key)
    pa, pb = pair_a[order], pair_b[order]
    bounds = [0, *torch.bincount(tile_key, minlength=(len(a_bounds) - 1) * blocks_b).cumsum(0).tolist()]
    pair_score_sorted = torch.empty(pa.numel(), device=device)

    # int32 counts (a count never exceeds the other side's size): the int32 reduction of a bool tile is
    # 3-4x faster than the default int64 one, and adding int32 to int32 needs no cast per tile.
    count_a = torch.zeros(num_a, dtype=torch.int32, device=device)
    count_b = torch.zeros(num_b, dtype=torch.int32, device=device)
    # Buffers reused by every block and tile; ragged blocks use a prefix.
    rows, cols = plan.tile_rows, plan.tile_cols
    scores_buf = torch.empty(rows * cols, device=device)
    mask_buf = torch.empty(rows * cols, dtype=torch.bool, device=device)
    block_buf = torch.empty(rows, dim, device=device)
    cache_buf = torch.empty(plan.cache_rows, dim, device=device)
    first_b_block = 0
    for c0, c1 in zip(plan.cache_bounds, plan.cache_bounds[1:]):
        cached = prepare_rows(
            b_emb[c0:c1], None if b_inv is None else b_inv[c0:c1], cache_buf
        )  # [c1 - c0, D]
        sub = [(s, e) for s, e in zip(b_bounds, b_bounds[1:]) if c0 <= s < c1]  # the B blocks of this cache
        for ia, (a0, a1) in enumerate(zip(a_bounds, a_bounds[1:])):
            block = prepare_rows(
                a_emb[a0:a1], None if a_inv is None else a_inv[a0:a1], block_buf
            )  # [a1 - a0, D]
            thr_rows = a_thr[a0:a1, None]  # [a1 - a0, 1]
            acc_a = count_a[a0:a1]  # a view: += below updates count_a
            for ib, (b0, b1) in enumerate(sub, start=first_b_block):
                shape = (a1 - a0, b1 - b0)
                n = shape[0] * shape[1]
                scores = torch.mm(block, cached[b0 - c0 : b1 - c0].T, out=scores_buf[:n].view(shape))
                mask = mask_buf[:n].view(shape)
                acc_a += torch.ge(scores, thr_rows, out=mask).sum(dim=1, dtype=torch.int32)
                count_b[b0:b1] += torch.ge(scores, b_thr[None, b0:b1], out=mask).sum(dim=0, dtype=torch.int32)
                key = ia * blocks_b + ib
                lo, hi = bounds[key], bounds[key + 1]
                if hi > lo:
                    pair_score_sorted[lo:hi] = scores[pa[lo:hi] - a0, pb[lo:hi] - b0]
        first_b_block += len(sub)
    pair_score = torch.empty_like(pair_score_sorted)
    pair_score[order] = pair_score_sorted
    return count_a.long(), count_b.long(), pair_score


def warn_if_tolerance_too_small(
    pair_score: torch.Tensor, owner: torch.Tensor, best: torch.Tensor, tol: torch.Tensor, what: str
) -> None:
    """The thresholds come from the pair pass; if the tile pass rounded a best positive differently by
    more than the tolerance, a tie with an identical negative could have been missed."""
    best_tile = torch.full_like(best, -math.inf).scatter_reduce_(0, owner, pair_score, reduce="amax")
    off = int(((best_tile - best).abs() > tol).sum())
    if off:
        logger.warning(
            "recall: for %d %s(s) the blocked and pairwise scores differ by more than the tie "
            "tolerance; ties there may be resolved optimistically (raise tie_tolerance)",
            off,
            what,
        )
