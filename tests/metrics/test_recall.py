"""Blocked recall@K against a brute-force reference (full matrix, explicit loops), hand-built cases
with known answers (pessimistic ties, K beyond the candidates, the second caption as the hit, collapsed
features), and the input errors. Also mean_cosine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.metrics.recall import (
    DEFAULT_TIE_TOLERANCE,
    RecallResult,
    mean_cosine,
    retrieval_recall,
)
from blip_toolkit.metrics.recall_blocks import plan_blocks

# --- reference -------------------------------------------------------------------------------------------


def reference_ranks(image, text, pairs, *, normalize=True, tol=DEFAULT_TIE_TOLERANCE, band=1e-6):
    """Brute force in float64 over the full [I, T] matrix. For each image (text): rank = 1 + the
    number of negatives scoring >= best positive - tol (tol times the norms product when not
    normalised). Returns ((low, high) for images, (low, high) for texts): the counts with the
    threshold moved up / down by `band`, so an item whose float32 score sits within rounding of the
    threshold is not decided by rounding; everywhere else low == high."""
    a, b = image.double(), text.double()
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    if normalize:
        a = a / norm_a.clamp_min(1e-12)[:, None]
        b = b / norm_b.clamp_min(1e-12)[:, None]
        scale_a, scale_b = torch.ones(len(a)), torch.ones(len(b))
    else:
        scale_a, scale_b = norm_a * norm_b.max(), norm_b * norm_a.max()
    sim = a @ b.T  # [I, T]
    texts_of = [set() for _ in range(len(a))]
    images_of = [set() for _ in range(len(b))]
    for i, j in pairs:
        texts_of[i].add(j)
        images_of[j].add(i)

    def ranks(rows, positives_of, scale):
        low, high = [], []
        for item, row in enumerate(rows):
            best = max(float(row[p]) for p in positives_of[item])
            negatives = row[[c for c in range(len(row)) if c not in positives_of[item]]]
            margin = float(scale[item])
            low.append(1 + int((negatives >= best - (tol - band) * margin).sum()))
            high.append(1 + int((negatives >= best - (tol + band) * margin).sum()))
        return torch.tensor(low), torch.tensor(high)

    return ranks(sim, texts_of, scale_a), ranks(sim.T, images_of, scale_b)


def assert_matches_reference(result: RecallResult, image, text, pairs, ks, **ref_kwargs):
    (lo_i, hi_i), (lo_t, hi_t) = reference_ranks(image, text, pairs, **ref_kwargs)
    for got, lo, hi in ((result.ranks_i2t, lo_i, hi_i), (result.ranks_t2i, lo_t, hi_t)):
        assert got.dtype == torch.int64
        assert ((got >= lo) & (got <= hi)).all(), (got, lo, hi)
        decided = lo == hi
        assert decided.float().mean() > 0.95  # the band leaves almost everything decided
        assert torch.equal(got[decided], lo[decided])
    for k in ks:
        assert result.i2t[k] == pytest.approx(float((result.ranks_i2t <= k).double().mean()))
        assert result.t2i[k] == pytest.approx(float((result.ranks_t2i <= k).double().mean()))
        if torch.equal(lo_i, hi_i) and torch.equal(lo_t, hi_t):
            assert result.i2t[k] == pytest.approx(float((lo_i <= k).double().mean()))
            assert result.t2i[k] == pytest.approx(float((lo_t <= k).double().mean()))


def random_case(num_images, num_texts, dim, seed, *, shared=0.3, max_extra_captions=3):
    """Texts correlated with an owner image (so ranks spread over the whole range); every image gets
    one to several captions, and a fraction of the texts is also the positive of other images
    (deduplicated captions)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(num_images, dim, generator=g)
    owner = torch.randint(0, num_images, (num_texts,), generator=g)
    owner[: min(num_images, num_texts)] = torch.randperm(num_images, generator=g)[
        : min(num_images, num_texts)
    ]
    text = 0.8 * image[owner] + torch.randn(num_texts, dim, generator=g)
    pairs = {(int(owner[j]), j) for j in range(num_texts)}
    for i in range(num_images):  # images left without a caption when I > T
        if not any(p[0] == i for p in pairs):
            pairs.add((i, int(torch.randint(0, num_texts, (1,), generator=g))))
    for _ in range(int(shared * num_texts)):
        pairs.add(
            (
                int(torch.randint(0, num_images, (1,), generator=g)),
                int(torch.randint(0, num_texts, (1,), generator=g)),
            )
        )
    for i in range(num_images):
        for _ in range(int(torch.randint(0, max_extra_captions + 1, (1,), generator=g)) // 2):
            pairs.add((i, int(torch.randint(0, num_texts, (1,), generator=g))))
    pairs = sorted(pairs)
    return image, text, pairs


def pair_tensors(pairs):
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


# --- against the reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_images,num_texts,dim,budget,dtype",
    [
        (37, 111, 16, 1_500, torch.float16),  # many ragged tiles, two cached super-blocks
        (150, 400, 8, 3_000, torch.float16),  # three super-blocks of two blocks each
        (120, 45, 8, 2_000, torch.float32),  # more images than texts: the other side is cached
        (64, 200, 32, 1 << 30, torch.bfloat16),  # one tile
        (50, 50, 24, 12_000, torch.float16),
        (1, 1, 4, 1 << 20, torch.float32),
    ],
)
def test_matches_brute_force(num_images, num_texts, dim, budget, dtype):
    image, text, pairs = random_case(num_images, num_texts, dim, seed=num_images * 7 + dim)
    if num_images > 1:  # several captions per image, and captions shared by several images
        assert max(sum(1 for p in pairs if p[0] == i) for i in range(num_images)) >= 2
        assert max(sum(1 for p in pairs if p[1] == j) for j in range(num_texts)) >= 2
    image, text = image.to(dtype), text.to(dtype)
    pi, pt = pair_tensors(pairs)
    ks = (1, 5, 10)
    result = retrieval_recall(image, text, pi, pt, ks, max_memory_bytes=budget)
    assert (
        result.num_images == num_images and result.num_texts == num_texts and result.num_pairs == len(pairs)
    )
    assert_matches_reference(result, image.float(), text.float(), pairs, ks)


def test_small_budgets_really_tile():
    """The budgets above do force many ragged tiles and several cached super-blocks."""
    plan = plan_blocks(111, 37, 16, 1_500)  # (streamed side, cached side, dim, budget)
    assert len(plan.a_bounds) - 1 > 10 and len(plan.cache_bounds) - 1 == 2
    sizes = {b - a for a, b in zip(plan.b_bounds, plan.b_bounds[1:])}
    assert sizes == {18, 19}  # 37 rows do not split evenly: ragged blocks
    plan = plan_blocks(400, 150, 8, 3_000)
    assert len(plan.cache_bounds) - 1 == 3 and len(plan.b_bounds) - 1 == 6
    plan = plan_blocks(120, 45, 8, 2_000)
    assert len(plan.a_bounds) - 1 > 10 and len(plan.b_bounds) - 1 == 2


def test_budgets_and_devices_agree():
    image, text, pairs = random_case(80, 160, 16, seed=3)
    pi, pt = pair_tensors(pairs)
    results = [retrieval_recall(image, text, pi, pt, max_memory_bytes=b) for b in (1_500, 9_000, 1 << 30)]
    results.append(retrieval_recall(image, text, pi, pt, device=torch.device("cpu")))
    for r in results[1:]:
        assert torch.equal(r.ranks_i2t, results[0].ranks_i2t) and torch.equal(
            r.ranks_t2i, results[0].ranks_t2i
        )


def test_unnormalized_scores():
    image, text, pairs = random_case(40, 90, 16, seed=5)
    g = torch.Generator().manual_seed(1)
    image = image * torch.rand(40, 1, generator=g) * 4  # norms now matter
    text = text * torch.rand(90, 1, generator=g) * 4
    pi, pt = pair_tensors(pairs)
    result = retrieval_recall(image, text, pi, pt, normalize=False, max_memory_bytes=3_000)
    assert_matches_reference(result, image, text, pairs, (1, 5, 10), normalize=False)
    normalized = retrieval_recall(image, text, pi, pt)
    assert not torch.equal(result.ranks_i2t, normalized.ranks_i2t)


def test_duplicate_pairs_count_once_and_inputs_untouched():
    image, text, pairs = random_case(30, 60, 8, seed=9)
    pi, pt = pair_tensors(pairs)
    image_before, text_before = image.clone(), text.clone()
    once = retrieval_recall(image, text, pi, pt)
    twice = retrieval_recall(image, text, torch.cat([pi, pi]), torch.cat([pt, pt]))
    assert torch.equal(once.ranks_i2t, twice.ranks_i2t) and torch.equal(once.ranks_t2i, twice.ranks_t2i)
    assert once.num_pairs == len(pairs)
    assert torch.equal(image, image_before) and torch.equal(text, text_before)


def test_huge_finite_values_are_not_nan():
    """Squares of 1e25 overflow float32; the norms fall back to float64 instead of calling them Inf."""
    image, text, pairs = random_case(20, 40, 8, seed=11)
    pi, pt = pair_tensors(pairs)
    base = retrieval_recall(image, text, pi, pt)
    scaled = retrieval_recall(image * 1e25, text, pi, pt)
    assert torch.equal(base.ranks_i2t, scaled.ranks_i2t) and torch.equal(base.ranks_t2i, scaled.ranks_t2i)


# --- hand-built cases with known answers ------------------------------------------------------------------


def test_exact_tie_is_pessimistic():
    # Image 0's positive (text 0) and a negative (text 1) have identical embeddings: tie at the top.
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    text = torch.tensor([[1.0, 0.2, 0.0], [1.0, 0.2, 0.0], [0.0, 1.0, 0.3]])
    pi, pt = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])
    result = retrieval_recall(image, text, pi, pt, ks=(1, 2))
    # Image 0: best positive ties with negative text 1 -> rank 2 (topk by index would say 1).
    # Image 1: positives texts 1 and 2; text 2 is best (cos 0.96), no negative above it -> rank 1.
    assert result.ranks_i2t.tolist() == [2, 1]
    assert result.i2t == {1: 0.5, 2: 1.0}
    # Text 0: image 0 (0.98) beats image 1. Text 1: its positive is image 1 (0.2), image 0 above -> 2.
    assert result.ranks_t2i.tolist() == [1, 2, 1]


def test_exact_tie_across_tiles_and_blocks():
    """Identical embeddings of a positive and a negative placed in different tiles (different matmul
    shapes, ragged edges): the tie is still pessimistic, whatever the rounding of each tile."""
    g = torch.Generator().manual_seed(0)
    num_texts, dim = 103, 64
    text = torch.randn(num_texts, dim, generator=g)
    image = torch.randn(40, dim, generator=g)
    image[0] = text[0] + 0.01 * torch.randn(dim, generator=g)  # text 0 is image 0's clear best match
    text[num_texts - 1] = text[0]  # a negative identical to image 0's positive, far away in index
    pi = torch.cat(
        [torch.tensor([0]), torch.arange(1, 40), torch.randint(0, 40, (num_texts - 1,), generator=g)]
    )
    pt = torch.cat(
        [torch.tensor([0]), torch.randint(1, num_texts - 1, (39,), generator=g), torch.arange(1, num_texts)]
    )
    keep = ~((pi == 0) & (pt == num_texts - 1))  # text 102 must stay a negative of image 0
    pi, pt = pi[keep], pt[keep]
    for budget in (2_000, 7_000, 1 << 30):
        result = retrieval_recall(image, text, pi, pt, ks=(1,), max_memory_bytes=budget)
        assert int(result.ranks_i2t[0]) == 2, budget


def test_k_larger_than_candidates():
    image, text, pairs = random_case(3, 4, 8, seed=2)
    pi, pt = pair_tensors(pairs)
    result = retrieval_recall(image, text, pi, pt, ks=(1, 4, 10, 1000))
    assert result.i2t[10] == result.i2t[1000] == 1.0
    assert result.t2i[10] == result.t2i[1000] == 1.0
    assert result.i2t[4] == 1.0  # 4 texts: every rank is <= 4
    assert list(result.i2t) == [1, 4, 10, 1000]


def test_second_caption_is_the_hit():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Image 0 has captions 0 (pointing away) and 1 (close); text 2 is image 1's caption.
    text = torch.tensor([[-1.0, 0.1], [1.0, 0.05], [0.1, 1.0]])
    pi, pt = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    result = retrieval_recall(image, text, pi, pt, ks=(1,))
    assert result.ranks_i2t.tolist() == [1, 1]
    assert result.i2t[1] == 1.0
    # Text 0 scores -0.99 with image 0 but 0.1 with image 1 (a negative): rank 2.
    assert result.ranks_t2i.tolist() == [2, 1, 1]
    assert result.t2i[1] == pytest.approx(2 / 3)


def test_collapsed_image_features_get_no_credit():
    """A generator that outputs the same features for every image: each text sees all images tied, so
    text-to-image ranks are all I (its one positive after the I - 1 tied negatives)."""
    g = torch.Generator().manual_seed(4)
    num_images, dim = 12, 16
    image = torch.randn(1, dim, generator=g).repeat(num_images, 1)
    text = torch.randn(2 * num_images, dim, generator=g)
    pi = torch.arange(num_images).repeat_interleave(2)
    pt = torch.arange(2 * num_images)
    result = retrieval_recall(image, text, pi, pt, ks=(1, 5, num_images), max_memory_bytes=3_000)
    assert result.ranks_t2i.tolist() == [num_images] * (2 * num_images)
    assert result.t2i == {1: 0.0, 5: 0.0, num_images: 1.0}
    # Image to text: all images share one ranking of the texts; each image's rank is where its better
    # caption sits in it.
    order = (
        torch.nn.functional.normalize(text, dim=1) @ torch.nn.functional.normalize(image[0], dim=0)
    ).argsort(descending=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    expected = []
    for i in range(num_images):
        best = min(int(position[2 * i]), int(position[2 * i + 1]))
        expected.append(1 + sum(1 for j in range(2 * num_images) if j // 2 != i and int(position[j]) < best))
    assert result.ranks_i2t.tolist() == expected


def test_zero_embedding_ties_with_everything():
    image = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    pi, pt = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])
    result = retrieval_recall(image, text, pi, pt, ks=(1,))
    # Image 0 scores 0 with every text: its positive ties with both negatives -> rank 3.
    assert result.ranks_i2t.tolist() == [3, 2]


def test_result_to_dict_and_ordinary_tensors():
    image, text, pairs = random_case(10, 20, 8, seed=1)
    pi, pt = pair_tensors(pairs)
    result = retrieval_recall(image, text, pi, pt, ks=[10, 1, 5, 5])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["num_images"] == 10 and data["num_texts"] == 20 and data["num_pairs"] == len(pairs)
    assert list(data["i2t"]) == ["R@1", "R@5", "R@10"]
    assert all(0.0 <= v <= 1.0 for v in [*data["i2t"].values(), *data["t2i"].values()])
    assert data["median_rank_i2t"] == pytest.approx(float(result.ranks_i2t.double().quantile(0.5)))
    assert data["mean_rank_t2i"] == pytest.approx(float(result.ranks_t2i.double().mean()))
    assert result.ranks_i2t.shape == (10,) and result.ranks_t2i.shape == (20,)
    assert not result.ranks_i2t.is_inference()
    result.ranks_i2t += 0  # callers may modify them


# --- errors -------------------------------------------------------------------------------------------------


def _ok():
    image = torch.randn(4, 8)
    text = torch.randn(6, 8)
    pi = torch.tensor([0, 1, 2, 3, 0, 1])
    pt = torch.tensor([0, 1, 2, 3, 4, 5])
    return image, text, pi, pt


def _with_nan(x, value):
    x = x.clone()
    x[2, 3] = value
    return x


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda i, t, a, b: (i[:0], t, a, b), "image embeddings are empty"),
        (lambda i, t, a, b: (i, t[:0], a, b), "text embeddings are empty"),
        (lambda i, t, a, b: (i[:, :0], t[:, :0], a, b), "image embeddings are empty"),
        (lambda i, t, a, b: (i, t[:, :5], a, b), "embedding dims differ: images have 8, texts have 5"),
        (lambda i, t, a, b: (i[0], t, a, b), "image embeddings must be 2-D"),
        (lambda i, t, a, b: (i.long(), t, a, b), "image embeddings must be a float tensor"),
        (lambda i, t, a, b: (i, t, a[:5], b), "pair_image has 5 entries but pair_text has 6"),
        (lambda i, t, a, b: (i, t, a[:0], b[:0]), "no positive pairs"),
        (lambda i, t, a, b: (i, t, a.float(), b), "pair_image must hold integer indices"),
        (lambda i, t, a, b: (i, t, a.view(2, 3), b.view(2, 3)), "pair_image must be 1-D"),
        (
            lambda i, t, a, b: (i, t, a + 1, b),
            r"pair_image holds index 4, outside 0..3 \(there are 4 images\)",
        ),
        (lambda i, t, a, b: (i, t, a, b - 1), r"pair_text holds index -1, outside 0..5"),
        (
            lambda i, t, a, b: (_with_nan(i, math.nan), t, a, b),
            r"image embeddings: 1 row\(s\) contain NaN or Inf",
        ),
        (
            lambda i, t, a, b: (i, _with_nan(t, math.inf), a, b),
            r"text embeddings: 1 row\(s\) contain NaN or Inf",
        ),
        (
            lambda i, t, a, b: (i, t, a[1:], b[1:]),
            r"1 of 6 texts have no positive image in the pairs \(first: index 0\)",
        ),
        (
            lambda i, t, a, b: (torch.randn(7, 8), t, a, b),
            r"3 of 7 images have no positive text in the pairs \(first: index 4\)",
        ),
    ],
)
def test_input_errors(change, match):
    with pytest.raises(InputError, match=match) as info:
        retrieval_recall(*change(*_ok()))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ks": []}, "ks is empty"),
        ({"ks": (1, 0)}, "every K must be a positive integer, got 0"),
        ({"ks": (1.5,)}, "every K must be a positive integer"),
        ({"max_memory_bytes": 0}, "max_memory_bytes must be a positive integer"),
        ({"tie_tolerance": -1.0}, "tie_tolerance"),
    ],
)
def test_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        retrieval_recall(*_ok(), **kwargs)


# --- mean_cosine --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(50, 16), (3, 17, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mean_cosine_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g).to(dtype)
    b = (a.float() + 0.7 * torch.randn(shape, generator=g)).to(dtype)
    rows_a, rows_b = a.double().reshape(-1, shape[-1]), b.double().reshape(-1, shape[-1])
    expected = (
        sum(
            float(rows_a[r] @ rows_b[r] / (rows_a[r].norm() * rows_b[r].norm()))
            for r in range(rows_a.shape[0])
        )
        / rows_a.shape[0]
    )
    for budget in (200, 1 << 30):  # 200 bytes: one row per chunk
        assert mean_cosine(a, b, max_memory_bytes=budget) == pytest.approx(expected, abs=1e-5)


def test_mean_cosine_known_values():
    x = torch.randn(6, 4, 5)
    assert mean_cosine(x, x) == pytest.approx(1.0, abs=1e-6)
    assert mean_cosine(x, -x) == pytest.approx(-1.0, abs=1e-6)
    assert mean_cosine(x, 3 * x) == pytest.approx(1.0, abs=1e-6)
    assert mean_cosine(torch.zeros(2, 3), torch.ones(2, 3)) == 0.0


@pytest.mark.parametrize(
    "a,b,match",
    [
        (torch.zeros(2, 3), torch.zeros(3, 3), "shapes differ"),
        (torch.zeros(0, 3), torch.zeros(0, 3), "empty"),
        (torch.tensor([[1.0, math.nan]]), torch.ones(1, 2), "a contains NaN or Inf"),
        (torch.ones(1, 2), torch.tensor([[1.0, math.inf]]), "b contains NaN or Inf"),
        (torch.ones(2, 2, dtype=torch.int64), torch.ones(2, 2), "float tensor"),
    ],
)
def test_mean_cosine_errors(a, b, match):
    with pytest.raises(InputError, match=match):
        mean_cosine(a, b)
