"""EmbeddingShards: map-style vs streaming, splits, integrity; the generated-features file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from blip_toolkit.data.shards import EmbeddingShards, read_generated, write_generated
from blip_toolkit.errors import InputError, OutputExistsError


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[name]), name
        else:
            assert value == b[name], name


def test_map_style_and_streaming_agree(reference_run):
    shards = EmbeddingShards(reference_run)
    assert len(shards) == 8 and repr(shards).startswith("EmbeddingShards(")
    streamed = list(shards.iter_samples())
    assert [s["index"] for s in streamed] == list(range(8))
    for i, sample in enumerate(streamed):
        _same(sample, shards[i])
        assert sample["cond"].shape == (17, 32) and sample["target_global"].shape == (16,)
        assert sample["text_emb"].shape == (len(sample["captions"]), 16)
    assert shards[-1]["index"] == 7
    with pytest.raises(IndexError):
        shards[8]
    whole = list(shards.iter_shards())
    assert [len(s["rows"]) for s in whole] == [3, 3, 2]
    assert whole[1]["offset"] == 3 and whole[1]["cond"].shape == (3, 17, 32)


def test_shuffled_streaming_is_a_seeded_permutation(reference_run):
    shards = EmbeddingShards(reference_run, fields=("index", "key"))
    order = [s["index"] for s in shards.iter_samples(shuffle_buffer=4, seed=1)]
    assert sorted(order) == list(range(8)) and order != list(range(8))
    assert order == [s["index"] for s in shards.iter_samples(shuffle_buffer=4, seed=1)]
    assert order != [s["index"] for s in shards.iter_samples(shuffle_buffer=4, seed=1, epoch=1)]


def test_split_by_rank_and_worker_partitions_the_data(reference_run):
    seen = []
    for rank in range(2):
        shards = EmbeddingShards(reference_run, fields=("index",), rank=rank, world_size=2)
        seen.append([s["index"] for s in shards.iter_samples()])
    assert sorted(seen[0] + seen[1]) == list(range(8)) and not set(seen[0]) & set(seen[1])
    assert seen[0] == [0, 1, 2, 6, 7]  # shards 0 and 2 to rank 0, shard 1 to rank 1

    # DataLoader workers: each worker reads its own shards; together every sample exactly once
    shards = EmbeddingShards(reference_run, fields=("index", "cond"))
    loader = torch.utils.data.DataLoader(
        shards.as_iterable(shuffle_buffer=2, seed=3), batch_size=None, num_workers=2
    )
    indices = [int(s["index"]) for s in loader]
    assert sorted(indices) == list(range(8))
    # map-style through a DataLoader with the default collate (fixed-shape fields only)
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                EmbeddingShards(reference_run, fields=("cond", "target", "key")), batch_size=4
            )
        )
    )
    assert batch["cond"].shape == (4, 17, 32) and len(batch["key"]) == 4
    full = EmbeddingShards(reference_run)
    collated = EmbeddingShards.collate([full[0], full[1]])
    assert collated["target"].shape == (2, 17, 32) and isinstance(collated["text_emb"], list)


def test_reading_one_shard_does_not_touch_the_others(reference_run, tmp_path):
    copy = tmp_path / "emb"
    shutil.copytree(reference_run, copy)
    last = copy / "shard-00002.safetensors"
    data = bytearray(last.read_bytes())
    data[-5] ^= 0xFF
    last.write_bytes(bytes(data))
    shards = EmbeddingShards(copy)  # lazy: opening checks nothing but the index
    assert shards[0]["key"] == "astronaut.jpg"
    with pytest.raises(InputError, match="shard-00002.safetensors: checksum mismatch"):
        shards[7]
    with pytest.raises(InputError, match="shard-00002.safetensors: checksum mismatch"):
        EmbeddingShards(copy, verify="open")
    assert EmbeddingShards(copy, verify="none")[7]["key"]  # unchecked reading still works


def test_missing_shard_and_bad_index_are_clear(reference_run, tmp_path):
    copy = tmp_path / "emb"
    shutil.copytree(reference_run, copy)
    (copy / "shard-00001.jsonl").unlink()
    with pytest.raises(InputError, match="shard-00001.jsonl: shard file missing"):
        EmbeddingShards(copy, verify="open")
    index = json.loads((copy / "index.json").read_text())
    index["version"] = 99
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="version 99 is not supported"):
        EmbeddingShards(copy)
    with pytest.raises(InputError, match="no index.json"):
        EmbeddingShards(tmp_path)


def test_text_embeddings_and_gather(reference_run):
    shards = EmbeddingShards(reference_run)
    texts = shards.text_embeddings()
    assert texts.text_emb.shape == (shards.num_captions, 16) and texts.text_emb.dtype == torch.float32
    for i in range(len(shards)):
        mine = texts.text_emb[texts.caption_image == i]
        assert torch.equal(mine, shards[i]["text_emb"].float())
        assert [c for c, owner in zip(texts.captions, texts.caption_image.tolist()) if owner == i] == shards[
            i
        ]["captions"]
    globals_ = shards.gather("target_global")
    assert globals_.shape == (8, 16) and torch.equal(globals_[5], shards[5]["target_global"].float())


def test_generated_file_round_trip(reference_run, tmp_path):
    shards = EmbeddingShards(reference_run)
    keys = shards.keys()[2:6]
    tokens = torch.randn(4, 17, 32)
    path = write_generated(
        tmp_path / "gen.safetensors",
        tokens.half(),
        keys,
        index_sha256=shards.index_sha256,
        metadata={"steps": 30},
    )
    gen = read_generated(path)
    assert gen.keys == keys and gen.num == 4 and gen.tokens_shape == (17, 32) and not gen.has_global
    assert gen.index_sha256 == shards.index_sha256 and gen.metadata["steps"] == "30"
    assert torch.equal(gen.tokens(1, 3), tokens.half()[1:3])
    with pytest.raises(OutputExistsError):
        write_generated(path, tokens, keys, index_sha256="x")
    write_generated(path, tokens, keys, index_sha256="x", global_emb=torch.zeros(4, 16), overwrite=True)
    assert read_generated(path).has_global and read_generated(path).global_emb().shape == (4, 16)
    with pytest.raises(ValueError):
        write_generated(tmp_path / "g2.safetensors", tokens, keys[:3], index_sha256="x")
    (tmp_path / "other.safetensors").write_bytes((reference_run / "shard-00000.safetensors").read_bytes())
    with pytest.raises(InputError, match="not a generated-features file"):
        read_generated(tmp_path / "other.safetensors")
