"""The training data stream: split, global order (a permutation per epoch, the same whatever the number
of processes or workers), resume positions, rank-invariant noise, and the streaming normaliser fit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from blip_toolkit.dit.config import FlowConfig
from blip_toolkit.dit.data import (
    DEFAULT_EVAL_FRACTION,
    STREAM_SPLIT,
    STREAM_TEXT,
    CaptionIndex,
    IndexStream,
    TrainStream,
    batch_iterator,
    fit_normalizer,
    global_noise,
    load_eval_set,
    split_indices,
)
from blip_toolkit.dit.normalize import TokenNormalizer
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.errors import ConfigError

from .helpers import write_embeddings


def groups(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(lo, min(lo + size, n)) for lo in range(0, n, size)]


@pytest.mark.parametrize("buffer", [0, 5, 1000])
def test_each_epoch_is_a_seeded_permutation(buffer):
    stream = IndexStream(groups(37, 8), seed=3, buffer=buffer)
    first = list(itertools.islice(stream.iterate(0), 37 * 3))
    for e in range(3):
        assert sorted(first[37 * e : 37 * (e + 1)]) == list(range(37))
    assert first[:37] != first[37:74]  # epochs differ
    assert first == list(itertools.islice(IndexStream(groups(37, 8), seed=3, buffer=buffer).iterate(0), 111))
    other = list(itertools.islice(IndexStream(groups(37, 8), seed=4, buffer=buffer).iterate(0), 37))
    assert other != first[:37]
    # any position can be resumed from without replaying what was loaded
    assert list(itertools.islice(stream.iterate(50), 30)) == first[50:80]
    batches = stream.batches(10, start=3)
    assert next(batches).tolist() == first[30:40] and next(batches).tolist() == first[40:50]


def test_shuffle_buffer_mixes_shards():
    stream = IndexStream(groups(400, 100), seed=0, buffer=150)
    order = list(itertools.islice(stream.iterate(0), 400))
    shard_of = [i // 100 for i in order[:100]]
    assert len(set(shard_of)) >= 2  # the first 100 draws come from more than one shard


def test_split(emb):
    shards = EmbeddingShards(emb)
    held = split_indices(shards, eval_shards=1)
    assert (
        held.kind == "held-out"
        and held.train.tolist() == list(range(16))
        and held.eval.tolist() == list(range(16, 24))
    )
    frac = split_indices(shards, eval_fraction=0.25, split_seed=1)
    assert sorted(frac.train.tolist() + frac.eval.tolist()) == list(range(24)) and 1 <= len(frac.eval) < 24
    assert frac.eval.tolist() == split_indices(shards, eval_fraction=0.25, split_seed=1).eval.tolist()
    # No split configured: DEFAULT_EVAL_FRACTION of the images is held out, seeded, never evaluated on
    # training images; the recorded settings give the same split again.
    default = split_indices(shards)
    assert default.kind == "held-out" and default.default and len(default.eval) >= 1
    assert not set(default.eval.tolist()) & set(default.train.tolist())
    assert sorted(default.train.tolist() + default.eval.tolist()) == list(range(24))
    assert default.settings == {
        "eval_shards": 0,
        "eval_fraction": DEFAULT_EVAL_FRACTION,
        "split_seed": 0,
        "overfit": 0,
    }
    again = split_indices(shards, **default.settings)
    assert again.eval.tolist() == default.eval.tolist() and not again.default
    # The same draw as an explicit fraction: each image held out with probability f from (seed, split).
    rng = np.random.default_rng([0, STREAM_SPLIT])
    mask = rng.random(24) < DEFAULT_EVAL_FRACTION
    if not mask.any():
        mask[rng.integers(24)] = True
    assert default.eval.tolist() == np.flatnonzero(mask).tolist()
    other_seed = split_indices(shards, split_seed=3)
    assert other_seed.settings["split_seed"] == 3
    nothing = split_indices(shards, eval_fraction=0.0)
    assert nothing.kind == "none" and nothing.train.tolist() == list(range(24)) and len(nothing.eval) == 0
    over = split_indices(shards, eval_shards=1, overfit=5)
    assert over.kind == "overfit" and over.train.tolist() == over.eval.tolist() == list(range(5))
    # --overfit alone holds nothing out: any image may be memorised, and only those are evaluated.
    over_all = split_indices(shards, overfit=24)
    assert over_all.kind == "overfit" and over_all.eval.tolist() == list(range(24))
    assert over_all.settings["eval_fraction"] == 0.0
    with pytest.raises(ConfigError, match="not both"):
        split_indices(shards, eval_shards=1, eval_fraction=0.1)
    with pytest.raises(ConfigError, match="no training shard"):
        split_indices(shards, eval_shards=3)
    with pytest.raises(ConfigError, match="only 16"):
        split_indices(shards, eval_shards=1, overfit=17)


def _stream(emb, rank, world, start=0, buffer=4):
    shards = EmbeddingShards(emb)
    order = IndexStream(groups(24, 8), seed=5, buffer=buffer)
    norm = TokenNormalizer("none")
    return TrainStream(
        shards,
        order,
        flow=FlowConfig(cond_dropout=0.3),
        normalizer=norm,
        global_batch=6,
        rank=rank,
        world_size=world,
        seed=5,
        start=start,
    )


def test_two_ranks_together_load_exactly_the_global_batch(emb):
    one = list(itertools.islice(iter(_stream(emb, 0, 1)), 9))
    r0 = list(itertools.islice(iter(_stream(emb, 0, 2)), 9))
    r1 = list(itertools.islice(iter(_stream(emb, 1, 2)), 9))
    for whole, a, b in zip(one, r0, r1):
        assert a["batch"] == b["batch"] == whole["batch"]
        for key in ("cond", "x_1", "x_0", "t", "drop", "index"):
            assert torch.equal(torch.cat([a[key], b[key]]), whole[key]), key
    # resuming at batch 4 gives batches 4.. exactly
    resumed = list(itertools.islice(iter(_stream(emb, 0, 1, start=4)), 3))
    for a, b in zip(resumed, one[4:7]):
        assert (
            a["batch"] == b["batch"] and torch.equal(a["x_0"], b["x_0"]) and torch.equal(a["cond"], b["cond"])
        )
    with pytest.raises(ConfigError, match="not divisible"):
        _stream(emb, 0, 4)


def test_dataloader_workers_give_the_same_batches_in_order(emb):
    plain = list(itertools.islice(batch_iterator(_stream(emb, 0, 1), num_workers=0), 6))
    workers = list(itertools.islice(batch_iterator(_stream(emb, 0, 1), num_workers=2), 6))
    assert [b["batch"] for b in workers] == list(range(6))
    for a, b in zip(plain, workers):
        assert torch.equal(a["cond"], b["cond"]) and torch.equal(a["x_0"], b["x_0"])


def test_noise_is_per_global_batch():
    flow = FlowConfig(cond_dropout=0.5, t_sampling="logit-normal")
    t, drop, x_0 = global_noise(7, 8, (4, 3), flow, seed=1)
    again = global_noise(7, 8, (4, 3), flow, seed=1)
    assert torch.equal(t, again[0]) and torch.equal(drop, again[1]) and torch.equal(x_0, again[2])
    assert not torch.equal(x_0, global_noise(8, 8, (4, 3), flow, seed=1)[2])
    assert not torch.equal(x_0, global_noise(7, 8, (4, 3), flow, seed=2)[2])
    assert global_noise(7, 8, (4, 3), FlowConfig(cond_dropout=0.0), seed=1)[1] is None
    assert ((t > 0) & (t < 1)).all()


def test_normaliser_fit_streams_and_matches_a_direct_computation(tmp_path):
    emb = write_embeddings(tmp_path / "emb", samples=40, shard_size=6, dtype=torch.float32)
    shards = EmbeddingShards(emb, max_open=2)
    train = np.arange(3, 40, 2)
    fitted = fit_normalizer(shards, train, "standardize", chunk=5)
    tokens = torch.stack([shards[int(i)]["target"] for i in train]).reshape(-1, 16).double()
    torch.testing.assert_close(fitted.mean.double(), tokens.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fitted.std.double(), tokens.std(0), rtol=1e-5, atol=1e-6)
    assert fitted.count == len(train) * 16 and len(shards._maps) <= 2
    assert fit_normalizer(shards, train, "standardize", max_samples=4).count == 4 * 16
    assert fit_normalizer(shards, train, "none").method == "none"


def test_eval_set_holds_its_images_and_their_captions(tmp_path):
    emb = write_embeddings(tmp_path / "emb", samples=12, shard_size=5, captions=2)
    shards = EmbeddingShards(emb)
    eval_set = load_eval_set(shards, np.array([11, 4, 5, 2]), max_samples=3)
    assert eval_set.index.tolist() == [2, 4, 5] and eval_set.keys == ["img-00002", "img-00004", "img-00005"]
    assert torch.equal(eval_set.cond[1], shards[4]["cond"].float())
    assert eval_set.caption_image.tolist() == [0, 0, 1, 1, 2, 2]
    texts = shards.text_embeddings()
    expected = torch.cat([texts.text_emb[texts.caption_image == i] for i in (2, 4, 5)])
    assert torch.equal(eval_set.text_emb, expected)


@pytest.mark.parametrize("cls", [False, True])
def test_normaliser_fit_split_across_processes_merges_to_the_whole(tmp_path, cls):
    from blip_toolkit.dit.data import merge_statistics, pack_statistics, token_statistics

    emb = write_embeddings(tmp_path / "emb", samples=30, shard_size=7, dtype=torch.float32, cls=cls)
    shards = EmbeddingShards(emb)
    train = np.arange(30)
    whole = token_statistics(shards, train, has_cls=cls)
    parts = torch.stack(
        [pack_statistics(token_statistics(shards, train, has_cls=cls, part=p, parts=3)) for p in range(3)]
    )
    merged = merge_statistics(parts, has_cls=cls)
    assert merged.count == whole.count == 30 * (17 if cls else 16)
    for got, want in zip(merged.classes(), whole.classes(), strict=True):
        assert got.count == want.count
        torch.testing.assert_close(got.mean, want.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.variance(), want.variance(), rtol=1e-10, atol=1e-12)
        assert got.mean_norm == pytest.approx(want.mean_norm, rel=1e-12)
    single = merge_statistics(pack_statistics(whole)[None], has_cls=cls)  # one process: its own statistics
    for got, want in zip(single.classes(), whole.classes(), strict=True):
        assert torch.equal(got.mean, want.mean) and torch.equal(got.m2, want.m2)


def test_cls_token_statistics_are_its_own(tmp_path):
    """With cls+patch targets the normaliser's CLS statistics are those of position 0 alone and the
    patch statistics those of the other positions (torch.mean / torch.std over the stored tokens)."""
    emb = write_embeddings(tmp_path / "emb", samples=20, shard_size=6, dtype=torch.float32, cls=True)
    shards = EmbeddingShards(emb)
    train = np.arange(0, 20, 2)
    fitted = fit_normalizer(shards, train, "standardize", has_cls=True, chunk=4)
    tokens = torch.stack([shards[int(i)]["target"] for i in train]).double()  # [n, 17, 16]
    torch.testing.assert_close(fitted.cls_mean.double(), tokens[:, 0].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fitted.cls_std.double(), tokens[:, 0].std(0), rtol=1e-5, atol=1e-6)
    patches = tokens[:, 1:].reshape(-1, 16)
    torch.testing.assert_close(fitted.mean.double(), patches.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fitted.std.double(), patches.std(0), rtol=1e-5, atol=1e-6)
    assert fitted.count == 10 * 16 and fitted.cls_count == 10
    # The synthetic CLS sits far from the patches: one set of statistics would leave it off N(0, I).
    encoded = fitted.encode(tokens.float())
    assert float(encoded[:, 0].mean().abs()) < 1e-4 and float(encoded[:, 1:].mean().abs()) < 1e-4
    shared = fit_normalizer(shards, train, "standardize")
    assert float(shared.encode(tokens.float())[:, 0].mean().abs()) > 1.0


def test_text_draws_are_one_of_each_images_own_captions(tmp_path):
    """CaptionIndex.draw picks, per image, one of its own captions (uniformly, from the generator);
    the stream's draws for global batch k come from (seed, k) and are sliced per process."""
    from blip_toolkit.engine.seeding import mix_seed

    root = write_embeddings(tmp_path / "emb", samples=20, shard_size=6, captions=3, dtype=torch.float32)
    shards = EmbeddingShards(root)
    index = CaptionIndex(shards)
    assert index.count.tolist() == [3] * 20
    own = {i: shards[i]["text_emb"] for i in range(20)}  # [3, E] each
    indices = np.array([19, 0, 7, 6, 5, 12, 7])
    picked = set()
    for seed in range(40):
        text, has_text = index.draw(indices, torch.Generator().manual_seed(seed))
        assert bool(has_text.all())
        for row, i in enumerate(indices.tolist()):
            matches = [k for k in range(3) if torch.equal(text[row], own[i][k])]
            assert len(matches) == 1
            picked.add((i, matches[0]))
    assert {k for i, k in picked if i == 7} == {0, 1, 2}  # every caption gets drawn
    order = IndexStream(groups(20, 6), seed=0, buffer=0)
    normalizer = TokenNormalizer("none")
    ranks = [
        TrainStream(
            shards,
            order,
            flow=FlowConfig(),
            normalizer=normalizer,
            global_batch=8,
            rank=r,
            world_size=2,
            seed=4,
            with_text=True,
        )
        for r in range(2)
    ]
    first = [next(iter(stream)) for stream in ranks]
    whole, _ = index.draw(
        order.batches(8).__next__(), torch.Generator().manual_seed(mix_seed(4, STREAM_TEXT, 0))
    )
    torch.testing.assert_close(torch.cat([b["text"] for b in first]), whole)


def test_text_positive_needs_captions(tmp_path):
    from blip_toolkit.errors import InputError

    root = write_embeddings(tmp_path / "emb", samples=4, shard_size=4, captions=0, dtype=torch.float32)
    with pytest.raises(InputError, match="no captions"):
        CaptionIndex(EmbeddingShards(root))
