"""EmbeddingShards against safetensors' own reader: map-style, rows (the memory-mapped fast path),
whole shards, integrity; the generated-features file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blip_toolkit.embeddings.generated import read_generated, write_generated
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.errors import InputError, OutputExistsError


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[name]), name
        else:
            assert value == b[name], name


def _reference(root) -> dict[str, torch.Tensor]:
    """Every shard's tensors read with safetensors' own loader, concatenated in dataset order."""
    index = json.loads((root / "index.json").read_text())
    parts = [load_file(str(root / entry["file"])) for entry in index["shards"]]
    return {name: torch.cat([p[name] for p in parts]) for name in ("cond", "target", "target_global")}


def test_map_style_and_whole_shards_equal_safetensors_own_reader(reference_run):
    shards = EmbeddingShards(reference_run)
    assert len(shards) == 8 and repr(shards).startswith("EmbeddingShards(")
    reference = _reference(reference_run)
    for i in range(len(shards)):
        sample = shards[i]
        assert (
            sample["index"] == i
            and sample["cond"].shape == (17, 32)
            and sample["target_global"].shape == (16,)
        )
        for name in ("cond", "target", "target_global"):
            assert torch.equal(sample[name], reference[name][i]), name
        assert sample["text_emb"].shape == (len(sample["captions"]), 16)
    assert shards[-1]["index"] == 7
    with pytest.raises(IndexError):
        shards[8]
    whole = list(shards.iter_shards())
    assert [len(s["rows"]) for s in whole] == [3, 3, 2]
    assert whole[1]["offset"] == 3 and torch.equal(whole[1]["cond"], reference["cond"][3:6])


def test_rows_read_any_order_from_bounded_memory_maps(reference_run):
    shards = EmbeddingShards(reference_run, max_open=1)
    reference = _reference(reference_run)
    indices = np.array([7, 0, 4, 3, 6, 1])
    for name in ("cond", "target", "target_global"):
        got = shards.rows(indices, name)
        assert got.dtype == torch.float32 and torch.equal(got, reference[name][indices].float())
        assert len(shards._maps) == 1  # never more maps than max_open
    assert shards.rows(np.array([], dtype=np.int64), "cond").shape == (0, 17, 32)


def test_map_style_through_dataloader_workers(reference_run):
    # workers get a pickled reader (its memory maps are reopened in each worker)
    loader = torch.utils.data.DataLoader(
        EmbeddingShards(reference_run, fields=("cond", "target", "key", "index")), batch_size=4, num_workers=2
    )
    batches = list(loader)
    assert [int(i) for b in batches for i in b["index"]] == list(range(8))
    assert batches[0]["cond"].shape == (4, 17, 32) and len(batches[0]["key"]) == 4


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


def test_text_embeddings_and_column(reference_run):
    shards = EmbeddingShards(reference_run)
    texts = shards.text_embeddings()
    assert texts.text_emb.shape == (shards.num_captions, 16) and texts.text_emb.dtype == torch.float32
    for i in range(len(shards)):
        mine = texts.text_emb[texts.caption_image == i]
        assert torch.equal(mine, shards[i]["text_emb"].float())
        assert [c for c, owner in zip(texts.captions, texts.caption_image.tolist()) if owner == i] == shards[
            i
        ]["captions"]
    globals_ = shards.column("target_global")
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
