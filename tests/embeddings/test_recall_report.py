"""eval-recall: numbers against retrieval_recall on arrays assembled by hand; bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from blip_toolkit.config import parse_bytes
from blip_toolkit.embeddings.generated import write_generated
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.embeddings.shards import write_shard
from blip_toolkit.jobs.eval_recall import RecallConfig, evaluate_recall
from blip_toolkit.metrics.recall import mean_cosine, retrieval_recall


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same(report_part: dict, expected: dict) -> None:
    assert _flat(report_part) == pytest.approx(_flat(expected))


def _by_hand(shards: EmbeddingShards):
    texts = shards.text_embeddings()
    tokens = torch.cat([shards.read_shard(j, ("target",))["target"] for j in range(len(shards.shards))])
    return texts, tokens


def test_numbers_equal_retrieval_recall(cli, reference_run):
    result = cli("eval-recall", reference_run, "--format", "json", "--k", "1,2", "--k", "5")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    shards = EmbeddingShards(reference_run)
    texts, tokens = _by_hand(shards)
    baseline = shards.column("target_global")
    expected = retrieval_recall(
        baseline, texts.text_emb, texts.caption_image, torch.arange(len(texts.captions)), (1, 2, 5)
    ).to_dict()
    _same(report["features"]["baseline"], expected)
    pooled = shards.head()(tokens)
    expected = retrieval_recall(
        pooled, texts.text_emb, texts.caption_image, torch.arange(len(texts.captions)), (1, 2, 5)
    ).to_dict()
    _same(report["features"]["gt-pooled"], expected)
    assert (
        report["ks"] == [1, 2, 5] and report["num_images"] == 8 and report["num_texts"] == len(texts.captions)
    )
    # cls pooling of unpooled cls+patch tokens: gt-pooled is the baseline
    assert report["cosine"]["gt_pooled_vs_baseline"] == pytest.approx(1.0, abs=1e-6)
    text = cli("eval-recall", reference_run)
    assert text.code == 0 and "baseline" in text.stdout and "gt-pooled" in text.stdout
    # The documented spelling `--k 1 2 5` (values after one flag) gives the same report.
    spaced = cli("eval-recall", reference_run, "--k", "1", "2", "5", "--format", "json")
    assert spaced.code == 0, spaced.stderr
    assert json.loads(spaced.stdout) == report


def test_features_comma_separated_or_repeated_equal_the_library_call(cli, reference_run):
    """--features takes "a,b" (the old spelling) and, derived from RecallConfig.features, repeats."""
    expected = evaluate_recall(RecallConfig(dir=str(reference_run), features=["baseline", "gt-pooled"]))
    for spelling in (
        ["--features", "baseline,gt-pooled"],
        ["--features", "baseline", "--features", "gt-pooled"],
    ):
        result = cli("eval-recall", reference_run, *spelling, "--format", "json")
        assert result.code == 0, result.stderr
        report = json.loads(result.stdout)
        assert list(report["features"]) == ["baseline", "gt-pooled"]
        _same(report["features"], expected["features"])
    unknown = cli("eval-recall", reference_run, "--features", "baseline,nope")
    assert unknown.code == 2 and "--features nope: unknown" in unknown.stderr


def test_dedupe_captions(reference_run):
    report = evaluate_recall(
        RecallConfig(dir=str(reference_run), features=["baseline"], dedupe_captions=True)
    )
    shards = EmbeddingShards(reference_run)
    texts = shards.text_embeddings()
    unique = list(dict.fromkeys(texts.captions))
    assert len(unique) < len(texts.captions)  # "a photo of a cat" and "a photo of a dog" are shared
    text_emb = torch.stack([texts.text_emb[texts.captions.index(c)] for c in unique])
    pair_text = torch.tensor([unique.index(c) for c in texts.captions])
    expected = retrieval_recall(
        shards.column("target_global"), text_emb, texts.caption_image, pair_text
    ).to_dict()
    assert report["num_texts"] == len(unique)
    _same(report["features"]["baseline"], expected)


def test_generated_features_and_cosines(cli, reference_run, tmp_path):
    shards = EmbeddingShards(reference_run)
    texts, tokens = _by_hand(shards)
    torch.manual_seed(0)
    generated = tokens + 0.5 * torch.randn_like(tokens)
    path = write_generated(
        tmp_path / "gen.safetensors", generated, shards.keys(), index_sha256=shards.index_sha256
    )
    result = cli(
        "eval-recall", reference_run, "--generated", path, "--format", "json", "--out", tmp_path / "r.json"
    )
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert json.loads((tmp_path / "r.json").read_text()) == report
    head = shards.head()
    gen_global = head(generated)
    pairs = (texts.caption_image, torch.arange(len(texts.captions)))
    _same(report["features"]["generated"], retrieval_recall(gen_global, texts.text_emb, *pairs).to_dict())
    cosine = report["cosine"]
    assert cosine["generated_tokens_vs_target_raw"] == pytest.approx(mean_cosine(generated, tokens), abs=1e-6)
    # standardised by the ground truth's per-dimension mean and std, the CLS token (cls+patch) by its own

    def standardise(x):
        cls, patches = tokens[:, 0], tokens[:, 1:].reshape(-1, tokens.shape[-1])
        first = (x[:, :1] - cls.mean(0)) / cls.std(0)
        return torch.cat([first, (x[:, 1:] - patches.mean(0)) / patches.std(0)], dim=1)

    assert cosine["generated_tokens_vs_target"] == pytest.approx(
        mean_cosine(standardise(generated), standardise(tokens)), abs=1e-5
    )
    assert report["generated_training_images"] is None  # a file without blip sample's metadata
    assert cosine["generated_global_vs_baseline"] == pytest.approx(
        mean_cosine(gen_global, shards.column("target_global")), abs=1e-6
    )
    assert cosine["generated_global_vs_gt_pooled"] == pytest.approx(
        mean_cosine(gen_global, head(tokens)), abs=1e-6
    )
    # --out refuses to replace a file
    again = cli("eval-recall", reference_run, "--generated", path, "--out", tmp_path / "r.json")
    assert again.code == 1 and "--overwrite" in again.stderr


def test_generated_subset_scores_every_feature_on_the_subset(reference_run, tmp_path):
    shards = EmbeddingShards(reference_run)
    keys = shards.keys()
    chosen = [6, 1, 3, 4]  # any order
    _, tokens = _by_hand(shards)
    gen = tokens[chosen]
    path = write_generated(
        tmp_path / "sub.safetensors",
        gen,
        [keys[i] for i in chosen],
        index_sha256=shards.index_sha256,
        global_emb=torch.randn(4, 16),
    )
    report = evaluate_recall(RecallConfig(dir=str(reference_run), generated=str(path)))
    texts = shards.text_embeddings()
    keep = torch.isin(texts.caption_image, torch.tensor(chosen))
    position = {image: n for n, image in enumerate(chosen)}
    pair_image = torch.tensor([position[int(i)] for i in texts.caption_image[keep]])
    pairs = (pair_image, torch.arange(int(keep.sum())))
    baseline = shards.column("target_global")[chosen]
    assert report["num_images"] == 4
    _same(report["features"]["baseline"], retrieval_recall(baseline, texts.text_emb[keep], *pairs).to_dict())
    from blip_toolkit.embeddings.generated import read_generated

    own_global = read_generated(path).global_emb().float()  # the file's own globals are used when present
    _same(
        report["features"]["generated"], retrieval_recall(own_global, texts.text_emb[keep], *pairs).to_dict()
    )
    assert report["cosine"]["generated_tokens_vs_target"] == pytest.approx(1.0, abs=1e-6)
    assert report["cosine"]["generated_tokens_vs_target_raw"] == pytest.approx(1.0, abs=1e-6)


def test_mismatched_generated_files_are_rejected(cli, reference_run, tmp_path):
    shards = EmbeddingShards(reference_run)
    keys = shards.keys()
    cases = {
        "dims": (torch.zeros(8, 16, 32), keys, shards.index_sha256, "generated tokens are \\[16, 32\\]"),
        "keys": (
            torch.zeros(2, 17, 32),
            ["astronaut.jpg", "nope.jpg"],
            shards.index_sha256,
            "'nope.jpg' is not in",
        ),
        "index": (torch.zeros(8, 17, 32), keys, "0" * 64, "different embeddings index"),
        "nan": (torch.full((8, 17, 32), float("nan")), keys, shards.index_sha256, "NaN or Inf"),
    }
    for name, (tokens, names, sha, message) in cases.items():
        path = write_generated(tmp_path / f"{name}.safetensors", tokens, names, index_sha256=sha)
        result = cli("eval-recall", reference_run, "--generated", path)
        assert result.code == 1, (name, result.stderr)
        assert result.stderr.count("\n") == 1 and str(path) in result.stderr
        assert __import__("re").search(message, result.stderr), (name, result.stderr)
    usage = cli("eval-recall", reference_run, "--features", "generated")
    assert usage.code == 2 and "--generated" in usage.stderr
    assert cli("eval-recall", reference_run, "--k", "0").code == 2
    assert cli("eval-recall", reference_run, "--max-memory", "lots").code == 2


def test_nan_corrupt_and_captionless_inputs(cli, reference_run, enc, photo_folder, tmp_path):
    # NaN in a stored embedding (written consistently, so the checksums pass)
    copy = tmp_path / "nan"
    shutil.copytree(reference_run, copy)
    shards = EmbeddingShards(copy)
    shard = shards.read_shard(1)
    shard["target_global"][0, 0] = float("nan")
    record = write_shard(
        copy,
        "shard-00001",
        {k: shard[k] for k in ("cond", "target", "target_global", "text_emb", "caption_image")},
        shard["rows"],
    )
    index = json.loads((copy / "index.json").read_text())
    index["shards"][1].update(sha256=record["sha256"], bytes=record["bytes"])
    (copy / "index.json").write_text(json.dumps(index))
    result = cli("eval-recall", copy, "--features", "baseline")
    assert result.code == 1 and "NaN or Inf" in result.stderr and "cat.jpg" in result.stderr

    # a corrupt shard is named
    data = bytearray((copy / "shard-00000.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "shard-00000.safetensors").write_bytes(bytes(data))
    result = cli("eval-recall", copy)
    assert result.code == 1 and "shard-00000.safetensors: checksum mismatch" in result.stderr

    # no captions at all
    for txt in photo_folder.rglob("*.txt"):
        txt.unlink()
    out = tmp_path / "nocap"
    assert (
        cli(
            "extract-embeddings",
            photo_folder,
            "--out",
            out,
            "--cond-encoder",
            enc["clip"],
            "--target-encoder",
            enc["clip"],
            "--num-workers",
            "0",
        ).code
        == 0
    )
    result = cli("eval-recall", out)
    assert result.code == 1 and "no captions" in result.stderr


def test_parse_bytes():
    assert (
        parse_bytes("2GB") == 2 * 10**9
        and parse_bytes("512MiB") == 512 * 2**20
        and parse_bytes("1e6") == 10**6
    )


def test_files_from_before_the_training_image_count_are_checked_against_the_run(cli, reference_run, tmp_path):
    """A generated file without `training_images` (older blip sample): eval-recall reads the run's
    config.json named in its metadata; on the run's own embeddings it warns unless the file is the
    held-out split of a run that held images out."""
    shards = EmbeddingShards(reference_run)
    _, tokens = _by_hand(shards)
    run = tmp_path / "run"
    run.mkdir()

    def check(split: str, index_sha256: str, eval_kind: str):
        record = {"format": "blip-dit", "data": {"index_sha256": index_sha256, "eval_kind": eval_kind}}
        (run / "config.json").write_text(json.dumps(record))
        path = write_generated(
            tmp_path / f"{split}-{eval_kind}-{index_sha256[:4]}.safetensors",
            tokens,
            shards.keys(),
            index_sha256=shards.index_sha256,
            metadata={"checkpoint": str(run), "split": split},
        )
        result = cli("eval-recall", reference_run, "--generated", path, "--format", "json")
        assert result.code == 0, result.stderr
        return json.loads(result.stdout)[
            "generated_training_images"
        ], "may hold training images" in result.stderr

    assert check("all", shards.index_sha256, "held-out") == (None, True)
    assert check("eval", shards.index_sha256, "train") == (None, True)  # an old run that held nothing out
    assert check("eval", shards.index_sha256, "held-out") == (0, False)
    assert check("all", "f" * 64, "held-out") == (0, False)  # trained on other embeddings
