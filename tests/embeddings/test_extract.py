"""extract-embeddings: stored tensors against direct transformers calls, sources, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from blip_toolkit.data.images import open_image
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.jobs.extract import extract_embeddings
from blip_toolkit.jobs.extract_config import ExtractConfig

from .conftest import CAPTIONS, wds_expected_captions, write_tar


def _config(enc, source, out, **kwargs) -> ExtractConfig:
    defaults = dict(
        cond_encoder=str(enc["blip2-opt"]),
        target_encoder=str(enc["clip"]),
        shard_size=3,
        batch_size=2,
        num_workers=0,
    )
    defaults.update(kwargs)
    return ExtractConfig(
        source=[str(s) for s in (source if isinstance(source, list) else [source])], out=str(out), **defaults
    )


def _centre_squares(images):
    """Each image's centred square, cut by transformers' own `center_crop` (what --crop center, the
    default, gives both encoders)."""
    import numpy as np
    from PIL import Image
    from transformers.image_transforms import center_crop

    out = []
    for image in images:
        side = min(image.size)
        array = center_crop(np.asarray(image), (side, side), input_data_format="channels_last")
        out.append(Image.fromarray(array))
    return out


def _references(enc, image_paths, captions):
    """Direct transformers calls on the centre-cropped images: CLIP tokens / baseline / text, BLIP-2
    vision tokens."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration, CLIPModel

    images = _centre_squares([open_image(p) for p in image_paths])
    assert any(open_image(p).size[0] != open_image(p).size[1] for p in image_paths)  # the crop matters
    clip = CLIPModel.from_pretrained(enc["clip"]).eval()
    clip_proc = AutoProcessor.from_pretrained(enc["clip"], backend="pil")
    blip2 = Blip2ForConditionalGeneration.from_pretrained(enc["blip2-opt"]).eval()
    blip2_proc = AutoProcessor.from_pretrained(enc["blip2-opt"], backend="pil")
    with torch.no_grad():
        pixels = clip_proc(images=images, return_tensors="pt").pixel_values
        ref = {
            "target": clip.vision_model(pixel_values=pixels).last_hidden_state,
            "target_global": clip.get_image_features(pixel_values=pixels).pooler_output,
            "cond": blip2.vision_model(
                pixel_values=blip2_proc(images=images, return_tensors="pt").pixel_values
            ).last_hidden_state,
        }
        text = clip_proc.tokenizer(captions, padding=True, return_tensors="pt")
        ref["text_emb"] = clip.get_text_features(**text).pooler_output
    ref["head"] = (clip.vision_model.post_layernorm, clip.visual_projection)
    return ref


def _all(shards: EmbeddingShards, name: str) -> torch.Tensor:
    return torch.cat([shards.read_shard(j, (name,))[name] for j in range(len(shards.shards))])


def test_help_has_examples(cli):
    for command in ("extract-embeddings", "eval-recall"):
        result = cli(command, "--help")
        assert result.code == 0 and "Examples" in result.stdout and f"blip {command}" in result.stdout


def test_stored_tensors_equal_transformers(reference_run, enc, photo_tsv):
    shards = EmbeddingShards(reference_run, verify="open")
    base = photo_tsv.parent
    keys = sorted(CAPTIONS)  # TSV items are sorted by key (the image path relative to the manifest)
    assert shards.keys() == keys
    assert [s.samples for s in shards.shards] == [3, 3, 2]
    # captions in manifest row order per image, images in key order
    captions = [c for key in keys for c in CAPTIONS[key]]
    ref = _references(enc, [base / k for k in keys], captions)
    for name in ("cond", "target", "target_global"):
        torch.testing.assert_close(_all(shards, name), ref[name], rtol=1e-5, atol=1e-5)
    texts = shards.text_embeddings()
    assert texts.captions == captions
    torch.testing.assert_close(texts.text_emb, ref["text_emb"], rtol=1e-5, atol=1e-5)
    expected_owner = [i for i, key in enumerate(keys) for _ in CAPTIONS[key]]
    assert texts.caption_image.tolist() == expected_owner
    # the head's consistency check: cls pooling of stored cls+patch tokens gives the stored baseline
    head = shards.head()
    assert head.pooling == "cls"
    torch.testing.assert_close(
        head(_all(shards, "target")), _all(shards, "target_global"), rtol=1e-5, atol=1e-5
    )
    index = json.loads((reference_run / "index.json").read_text())
    assert index["format"] == "blip-embeddings" and index["counts"] == {
        "samples": 8,
        "captions": len(captions),
        "shards": 3,
        "errors": 0,
    }
    assert index["encoders"]["cond"]["family"] == "blip2" and index["encoders"]["target"]["family"] == "clip"
    assert index["dims"] == {
        "cond_tokens": 17,
        "cond_dim": 32,
        "target_tokens": 17,
        "target_dim": 32,
        "embed_dim": 16,
    }


def test_pooling_equals_avg_pool(enc, photo_tsv, tmp_path):
    out = tmp_path / "pooled"
    extract_embeddings(
        _config(
            enc,
            photo_tsv,
            out,
            tokens="patch",
            pool=2,
            dtype="float32",
            cond_tokens="cls+patch",
            shard_size=8,
            batch_size=8,
        )
    )
    shards = EmbeddingShards(out)
    keys = shards.keys()
    ref = _references(enc, [photo_tsv.parent / k for k in keys], ["x"])

    def pool(tokens, side):  # [B, 1 + 16, D] -> avg_pool2d of the 4x4 grid -> [B, side*side, D]
        grid = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, 4, 4)
        return F.avg_pool2d(grid, 4 // side).flatten(2).transpose(1, 2)

    target = _all(shards, "target")
    assert target.shape == (8, 4, 32) and shards.dims["target_tokens"] == 4
    torch.testing.assert_close(target, pool(ref["target"], 2), rtol=1e-5, atol=1e-5)
    cond = _all(shards, "cond")  # cls+patch: the CLS token is kept and not pooled
    assert cond.shape == (8, 5, 32)
    torch.testing.assert_close(cond[:, 0], ref["cond"][:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond[:, 1:], pool(ref["cond"], 2), rtol=1e-5, atol=1e-5)
    # patch tokens: the head mean-pools (BLIP3-o), then post_layernorm and projection like CLIP's CLS path
    head = shards.head()
    assert head.pooling == "mean"
    norm, proj = ref["head"]
    with torch.no_grad():
        expected = proj(
            norm(ref["target"][:, 1:].mean(1))
        )  # mean of the 2x2 pooled grid = mean of the 4x4 one
    torch.testing.assert_close(head(target), expected, rtol=1e-5, atol=1e-5)


def test_non_dividing_pool_is_adaptive(enc, photo_tsv, tmp_path):
    out = tmp_path / "adaptive"
    extract_embeddings(
        _config(enc, photo_tsv, out, pool=3, cond_pool=0, dtype="float32", shard_size=8, batch_size=8)
    )
    shards = EmbeddingShards(out)
    ref = _references(enc, [photo_tsv.parent / k for k in shards.keys()], ["x"])
    grid = ref["target"][:, 1:].transpose(1, 2).reshape(8, -1, 4, 4)
    expected = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(_all(shards, "target"), expected, rtol=1e-5, atol=1e-5)
    assert shards.dims["cond_tokens"] == 16  # --cond-pool 0: the conditioning grid is not pooled


def test_float16_storage_and_workers_give_the_same_data(enc, photo_tsv, reference_run, tmp_path):
    out = tmp_path / "fp16"
    extract_embeddings(_config(enc, photo_tsv, out, tokens="cls+patch", num_workers=2))
    half, full = EmbeddingShards(out), EmbeddingShards(reference_run)
    assert half.dtype == torch.float16
    for name in ("cond", "target", "target_global"):
        torch.testing.assert_close(_all(half, name), _all(full, name).half())
    torch.testing.assert_close(
        half.head()(_all(half, "target")), _all(full, "target_global"), rtol=2e-2, atol=2e-2
    )


def test_folder_source_captions_from_txt(cli, enc, photo_folder, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "extract-embeddings",
        photo_folder,
        "--out",
        out,
        "--cond-encoder",
        enc["clip"],
        "--target-encoder",
        enc["blip-itm"],
        "--shard-size",
        "4",
        "--num-workers",
        "1",
        "--format",
        "json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["samples"] == 8 and summary["errors"] == 0 and summary["shards"] == 2
    shards = EmbeddingShards(out)
    rows = {shards[i]["key"]: shards[i] for i in range(len(shards))}
    assert "sub/cat.jpg" in rows and rows["sub/cat.jpg"]["captions"] == CAPTIONS["cat.jpg"]
    assert rows["grass.jpg"]["captions"] == [] and rows["grass.jpg"]["text_emb"].shape == (0, 16)
    assert rows["rocket.jpg"]["text_emb"].shape == (3, 16)
    assert shards.num_captions == sum(len(v) for k, v in CAPTIONS.items() if k != "grass.jpg")
    import pandas as pd

    frame = pd.read_json(out / "shard-00000.jsonl", lines=True)  # the metadata is pandas-readable
    assert list(frame.columns) == ["key", "image", "captions"] and len(frame) == 4


def test_tsv_several_captions_per_image(reference_run):
    shards = EmbeddingShards(reference_run)
    by_key = {shards[i]["key"]: shards[i] for i in range(len(shards))}
    assert by_key["rocket.jpg"]["captions"] == CAPTIONS["rocket.jpg"]
    assert by_key["rocket.jpg"]["text_emb"].shape == (3, 16)


def test_webdataset_tars_and_brace_patterns(cli, enc, wds_dir, sample_images, tmp_path):
    out = tmp_path / "wds-out"
    pattern = str(wds_dir / "part-{000..002}.tar")
    result = cli(
        "extract-embeddings",
        pattern,
        "--out",
        out,
        "--cond-encoder",
        enc["blip2-opt"],
        "--target-encoder",
        enc["clip"],
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--num-workers",
        "2",
    )
    assert result.code == 0, result.stderr
    shards = EmbeddingShards(out)
    # output shards are named after the input tar and the part (shard size 2: tars of 3 give 2 parts)
    assert [s.name for s in shards.shards] == [
        "part-000-00000",
        "part-000-00001",
        "part-001-00000",
        "part-001-00001",
        "part-002-00000",
    ]
    assert shards.keys() == [f"part-00{i // 3}/{i:04d}" for i in range(8)]
    assert [shards[i]["captions"] for i in range(8)] == wds_expected_captions(sample_images)
    assert shards[4]["image"].endswith("#0004.png")
    # the same tars given one by one give identical shards
    out2 = tmp_path / "wds-out2"
    paths = [str(p) for p in sorted(wds_dir.glob("*.tar"))]
    assert (
        cli(
            "extract-embeddings",
            *paths,
            "--out",
            out2,
            "--cond-encoder",
            enc["blip2-opt"],
            "--target-encoder",
            enc["clip"],
            "--shard-size",
            "2",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
        ).code
        == 0
    )
    for info in shards.shards:
        assert (out / info.path.name).read_bytes() == (out2 / info.path.name).read_bytes()


def test_pipe_sources_need_opt_in(cli, enc, wds_dir, tmp_path):
    url = f"pipe:cat {wds_dir / 'part-000.tar'}"
    refused = cli(
        "extract-embeddings",
        url,
        "--out",
        tmp_path / "a",
        "--cond-encoder",
        enc["clip"],
        "--target-encoder",
        enc["clip"],
    )
    assert refused.code == 2 and "--allow-pipe" in refused.stderr
    assert not (tmp_path / "a").exists()
    allowed = cli(
        "extract-embeddings",
        url,
        "--allow-pipe",
        "--out",
        tmp_path / "b",
        "--cond-encoder",
        enc["clip"],
        "--target-encoder",
        enc["clip"],
        "--num-workers",
        "0",
    )
    assert allowed.code == 0, allowed.stderr
    assert len(EmbeddingShards(tmp_path / "b")) == 3


def test_bad_images_are_listed_and_exit_3(cli, enc, wds_dir, photo_folder, tmp_path):
    (photo_folder / "broken.jpg").write_bytes(b"not a jpeg")
    (photo_folder / "truncated.jpg").write_bytes((photo_folder / "coffee.jpg").read_bytes()[:300])
    out = tmp_path / "out"
    result = cli(
        "extract-embeddings",
        photo_folder,
        "--out",
        out,
        "--cond-encoder",
        enc["clip"],
        "--target-encoder",
        enc["clip"],
        "--shard-size",
        "4",
        "--num-workers",
        "0",
    )
    assert result.code == 3
    assert "broken.jpg" in result.stderr and "truncated.jpg" in result.stderr
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in errors) == ["broken.jpg", "truncated.jpg"]
    assert all(e["error"] and e["shard"].startswith("shard-") for e in errors)
    index = json.loads((out / "index.json").read_text())
    assert index["counts"]["errors"] == 2 and index["counts"]["samples"] == 8
    assert sum(s["samples"] for s in index["shards"]) == 8  # shards hold fewer than shard_size

    # webdataset: a sample without an image, bad JSON, and a truncated tar are reported, the rest goes on
    jpg = next(wds_dir.glob("*.tar")).parent
    good = (photo_folder / "coffee.jpg").read_bytes()
    write_tar(
        jpg / "bad.tar",
        [
            {"__key__": "a", "txt": "no image"},
            {"__key__": "b", "jpg": good, "json": "{bad"},
            {"__key__": "c", "jpg": good, "txt": "a photo of a cat"},
        ],
    )
    data = (jpg / "part-001.tar").read_bytes()
    (jpg / "cut.tar").write_bytes(data[: len(data) // 2])
    out2 = tmp_path / "out2"
    result = cli(
        "extract-embeddings",
        jpg / "bad.tar",
        jpg / "cut.tar",
        "--out",
        out2,
        "--cond-encoder",
        enc["clip"],
        "--target-encoder",
        enc["clip"],
        "--num-workers",
        "0",
    )
    assert result.code == 3, result.stderr
    errors = [json.loads(line) for line in (out2 / "errors.jsonl").read_text().splitlines()]
    messages = " ".join(e["error"] for e in errors)
    assert "no image member" in messages and "not valid JSON" in messages and "cut.tar" in messages
    assert len(EmbeddingShards(out2)) >= 2  # bad.tar's "c" and what cut.tar still held


def _files(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.suffix in (".safetensors", ".jsonl", ".json") and p.name != "blip_run.json"
    }


@pytest.mark.parametrize("kind", ["tsv", "wds"])
def test_resume_after_a_kill_gives_the_same_result(enc, photo_tsv, wds_dir, tmp_path, kind):
    source = photo_tsv if kind == "tsv" else [str(wds_dir / "part-{000..002}.tar")]
    kwargs = dict(shard_size=2, tokens="cls+patch", num_workers=0)
    full = tmp_path / "full"
    extract_embeddings(_config(enc, source, full, **kwargs))

    class Killed(Exception):
        pass

    written = []

    def kill_after_two(record):
        written.append(record["name"])
        if len(written) == 2:
            raise Killed

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        extract_embeddings(_config(enc, source, killed, **kwargs), after_shard=kill_after_two)
    assert not (killed / "index.json").exists()
    # also lose the last finished shard's done record (a kill between its files and the record)
    (killed / f"{written[-1]}.done.json").unlink()
    # without --resume the directory is refused
    from blip_toolkit.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="--resume"):
        extract_embeddings(_config(enc, source, killed, **kwargs))
    redone = []
    summary = extract_embeddings(
        _config(enc, source, killed, resume=True, **kwargs), after_shard=lambda r: redone.append(r["name"])
    )
    assert written[0] not in redone and written[1] in redone
    assert summary.skipped_shards >= 1
    assert _files(killed) == _files(full)


def test_output_directory_policy(cli, enc, photo_tsv, tmp_path):
    out = tmp_path / "out"
    args = [
        "extract-embeddings",
        photo_tsv,
        "--out",
        out,
        "--cond-encoder",
        enc["clip"],
        "--target-encoder",
        enc["clip"],
        "--num-workers",
        "0",
        "--shard-size",
        "4",
    ]
    assert cli(*args).code == 0
    refused = cli(*args)
    assert refused.code == 1 and "already exists" in refused.stderr and "--resume" in refused.stderr
    assert cli(*args, "--overwrite").code == 0
    changed = cli(*args[:-2], "--shard-size", "5", "--resume")
    assert changed.code == 2 and "shard_size" in changed.stderr
    resumed = cli(*args, "--resume")  # nothing left to do: the index is rewritten identically
    assert resumed.code == 0, resumed.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli(*args[:3], foreign, *args[4:], "--overwrite").code == 1
    assert (foreign / "notes.txt").exists()


def test_bad_encoders_and_options(cli, enc, photo_tsv, tmp_path):
    base = ["extract-embeddings", photo_tsv, "--out", tmp_path / "o"]
    blip2 = cli(*base, "--cond-encoder", enc["clip"], "--target-encoder", enc["blip2-opt"])
    assert blip2.code == 2 and "BLIP-2 cannot be the target" in blip2.stderr and "BLIP ITM" in blip2.stderr
    siglip = cli(
        *base, "--cond-encoder", enc["clip"], "--target-encoder", enc["siglip"], "--tokens", "cls+patch"
    )
    assert siglip.code == 2 and "no CLS token" in siglip.stderr
    head = cli(*base, "--cond-encoder", enc["clip"], "--target-encoder", enc["clip"], "--head-pool", "cls")
    assert head.code == 2 and "cls+patch" in head.stderr
    missing = cli("extract-embeddings", tmp_path / "nope", "--out", tmp_path / "o2")
    assert missing.code == 1 and "nope: no such file or directory" in missing.stderr
    too_big = cli(*base, "--cond-encoder", enc["clip"], "--target-encoder", enc["clip"], "--pool", "5")
    assert too_big.code == 2 and "larger than" in too_big.stderr


def test_siglip_target_head_reproduces_its_embedding(enc, photo_tsv, tmp_path):
    out = tmp_path / "siglip"
    extract_embeddings(
        _config(
            enc,
            photo_tsv,
            out,
            target_encoder=str(enc["siglip"]),
            dtype="float32",
            shard_size=8,
            batch_size=8,
        )
    )
    shards = EmbeddingShards(out)
    assert shards.head().pooling == "map" and shards.dims["target_tokens"] == 16
    torch.testing.assert_close(
        shards.head()(_all(shards, "target")), _all(shards, "target_global"), rtol=1e-5, atol=1e-5
    )
