"""blip sample: the file it writes is what eval-recall reads, EMA and trained weights differ, noise is
per image (batch size and split do not change an image's tokens), bad inputs are refused, and the
Python API (load_dit + solver.generate) gives the command's tokens."""

from __future__ import annotations

import json

import pytest
import torch

from blip_toolkit.dit.train import run_train_dit
from blip_toolkit.embeddings.generated import read_generated
from blip_toolkit.embeddings.shard_reader import EmbeddingShards

from .conftest import tiny_config


@pytest.fixture(scope="module")
def run(emb, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sample-run") / "run"
    run_train_dit(
        tiny_config(
            emb,
            out,
            **{
                "train.steps": 25,
                "train.ema_decay": 0.9,
                "data.eval_shards": 1,
                "sample.steps": 5,
                "sample.cfg_scale": 2.0,
            },
        )
    )
    return out


def test_sample_file_is_read_by_eval_recall(cli, run, emb, tmp_path):
    out = tmp_path / "samples.safetensors"
    result = cli("sample", "--checkpoint", run, "--data", emb, "--out", out, "--format", "json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    # the run's own sampling defaults apply, and on its own embeddings its held-out images (the last shard)
    assert (
        summary["samples"] == 8 and summary["steps"] == 5 and summary["cfg_scale"] == 2.0 and summary["ema"]
    )
    assert summary["split"] == "eval" and summary["training_images"] == 0
    generated = read_generated(out)
    shards = EmbeddingShards(emb)
    assert (
        generated.keys == shards.keys()[16:]
        and generated.has_global
        and generated.index_sha256 == shards.index_sha256
    )
    assert generated.tokens().dtype == torch.float16  # the embeddings' storage dtype
    assert generated.metadata["ema"] == "true" and generated.metadata["step"] == "25"
    assert generated.metadata["split"] == "eval" and generated.metadata["training_images"] == "0"
    report = cli("eval-recall", emb, "--generated", out, "--format", "json")
    assert report.code == 0, report.stderr
    parsed = json.loads(report.stdout)
    assert parsed["features"]["generated"]["num_images"] == 8 and parsed["generated_training_images"] == 0
    assert "training images" not in report.stderr

    # Training images only on request, and then every consumer says so.
    everything = tmp_path / "all.safetensors"
    result = cli("sample", "--checkpoint", run, "--data", emb, "--out", everything, "--split", "all")
    assert result.code == 0 and "16 of the 24 sampled image(s) are training images" in result.stderr
    assert read_generated(everything).metadata["training_images"] == "16"
    report = cli("eval-recall", emb, "--generated", everything, "--format", "json")
    assert report.code == 0 and json.loads(report.stdout)["generated_training_images"] == 16
    assert "16 of its 24 image(s) are training images of the DiT" in report.stderr

    trained = tmp_path / "trained.safetensors"
    assert cli("sample", "--checkpoint", run, "--data", emb, "--out", trained, "--no-ema").code == 0
    assert read_generated(trained).metadata["ema"] == "false"
    assert not torch.equal(read_generated(trained).tokens(), generated.tokens())

    again = cli("sample", "--checkpoint", run, "--data", emb, "--out", out)
    assert again.code == 1 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert cli("sample", "--checkpoint", run, "--data", emb, "--out", out, "--overwrite").code == 0


def test_noise_is_per_image(cli, run, emb, tmp_path):
    """An image's tokens depend on the seed and the image, not on the batch size or the split."""
    whole, part, other_seed = (tmp_path / f"{n}.safetensors" for n in ("whole", "part", "seed"))
    assert (
        cli(
            "sample",
            "--checkpoint",
            run,
            "--data",
            emb,
            "--out",
            whole,
            "--batch-size",
            "7",
            "--split",
            "all",
        ).code
        == 0
    )
    assert (
        cli(
            "sample",
            "--checkpoint",
            run,
            "--data",
            emb,
            "--out",
            part,
            "--split",
            "eval",
            "--batch-size",
            "3",
        ).code
        == 0
    )
    assert (
        cli(
            "sample",
            "--checkpoint",
            run,
            "--data",
            emb,
            "--out",
            other_seed,
            "--seed",
            "1",
            "--limit",
            "4",
            "--split",
            "all",
        ).code
        == 0
    )
    a, b = read_generated(whole), read_generated(part)
    assert b.keys == a.keys[16:]  # eval split = the held-out last shard
    torch.testing.assert_close(b.tokens().float(), a.tokens()[16:].float(), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(read_generated(other_seed).tokens().float(), a.tokens()[:4].float())


def test_python_api_matches_the_command(run, emb, tmp_path, cli):
    from blip_toolkit.dit.checkpoint import load_dit
    from blip_toolkit.dit.data import sample_noise
    from blip_toolkit.dit.solver import generate

    model, normalizer, info = load_dit(run)
    shards = EmbeddingShards(emb)
    cond = torch.stack([shards[i]["cond"] for i in range(3)]).float()
    out = generate(
        model, cond, steps=5, cfg_scale=2.0, normalizer=normalizer, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()
    # with the command's per-image noise, the solver's integrate gives the command's tokens
    from blip_toolkit.dit.solver import guided_velocity, integrate

    x_0 = sample_noise(torch.arange(3), 0, (16, 16))
    tokens = normalizer.decode(integrate(guided_velocity(model, cond, cfg_scale=2.0), x_0, steps=5))
    path = tmp_path / "s.safetensors"
    assert (
        cli(
            "sample", "--checkpoint", run, "--data", emb, "--out", path, "--limit", "3", "--split", "train"
        ).code
        == 0
    )
    torch.testing.assert_close(read_generated(path).tokens().float(), tokens, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(
        read_generated(path).global_emb(),
        info["head"](read_generated(path).tokens().float()),
        rtol=2e-3,
        atol=2e-3,
    )


def test_mismatched_dims_and_bad_inputs_are_refused(cli, run, emb, emb_other_dims, tmp_path):
    result = cli("sample", "--checkpoint", run, "--data", emb_other_dims, "--out", tmp_path / "x.safetensors")
    assert result.code == 1 and "was trained on" in result.stderr and "target_dim" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
    other = cli(
        "sample",
        "--checkpoint",
        run,
        "--data",
        emb_other_dims,
        "--out",
        tmp_path / "y.safetensors",
        "--split",
        "eval",
    )
    assert other.code != 0
    missing = cli(
        "sample", "--checkpoint", tmp_path / "nope", "--data", emb, "--out", tmp_path / "z.safetensors"
    )
    assert missing.code == 1 and "no such checkpoint" in missing.stderr
    not_a_run = cli("sample", "--checkpoint", emb, "--data", emb, "--out", tmp_path / "z.safetensors")
    assert not_a_run.code == 1 and "not a DiT run" in not_a_run.stderr
    assert (
        cli(
            "sample", "--checkpoint", run, "--data", emb, "--out", tmp_path / "z.safetensors", "--steps", "0"
        ).code
        == 2
    )


def test_split_needs_the_training_embeddings(cli, run, tmp_path):
    from .helpers import write_embeddings

    copy = write_embeddings(tmp_path / "other", samples=8, shard_size=4, seed=3)
    ok = cli("sample", "--checkpoint", run, "--data", copy, "--out", tmp_path / "a.safetensors")
    assert ok.code == 0, ok.stderr  # same dims: any embeddings can be sampled from
    refused = cli(
        "sample", "--checkpoint", run, "--data", copy, "--out", tmp_path / "b.safetensors", "--split", "eval"
    )
    assert refused.code == 2 and "--split eval needs the embeddings the DiT was trained on" in refused.stderr


def test_a_run_without_a_final_model_samples_from_its_latest_checkpoint(emb, tmp_path, cli):
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(record):
        if record["type"] == "checkpoint" and record["step"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_train_dit(tiny_config(emb, out, **{"train.steps": 4, "train.save_every": 2}), callback=stop)
    result = cli(
        "sample",
        "--checkpoint",
        out,
        "--data",
        emb,
        "--out",
        tmp_path / "s.safetensors",
        "--limit",
        "2",
        "--format",
        "json",
    )
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["step"] == 2 and "latest checkpoint step-2" in result.stderr


def test_sweep_writes_one_file_per_setting_equal_to_single_runs(cli, run, emb, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(
        "sample",
        "--checkpoint",
        run,
        "--data",
        emb,
        "--out",
        sweep,
        "--cfg-scale",
        "1",
        "2.5",
        "--steps",
        "2",
        "3",
        "--format",
        "json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    settings = [(s["steps"], s["cfg_scale"]) for s in summary["sweep"]]
    assert settings == [(2, 1.0), (2, 2.5), (3, 1.0), (3, 2.5)]  # steps-major
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["format"] == "blip-generated-sweep" and manifest["split"] == "eval"
    assert [s["file"] for s in manifest["settings"]] == [
        "steps-2_cfg-1.safetensors",
        "steps-2_cfg-2.5.safetensors",
        "steps-3_cfg-1.safetensors",
        "steps-3_cfg-2.5.safetensors",
    ]
    single = tmp_path / "single.safetensors"
    assert (
        cli(
            "sample",
            "--checkpoint",
            run,
            "--data",
            emb,
            "--out",
            single,
            "--cfg-scale",
            "2.5",
            "--steps",
            "3",
        ).code
        == 0
    )
    swept = read_generated(sweep / "steps-3_cfg-2.5.safetensors")
    assert (
        torch.equal(swept.tokens(), read_generated(single).tokens())
        and swept.keys == read_generated(single).keys
    )
    assert swept.metadata["steps"] == "3" and float(swept.metadata["cfg_scale"]) == 2.5
    again = cli("sample", "--checkpoint", run, "--data", emb, "--out", sweep, "--cfg-scale", "1", "2")
    assert again.code == 1 and "--overwrite" in again.stderr
    twice = cli(
        "sample", "--checkpoint", run, "--data", emb, "--out", tmp_path / "x", "--cfg-scale", "1", "1"
    )
    assert twice.code == 2 and "twice" in twice.stderr


def test_eval_recall_scores_a_sweep_and_sets_the_run_default(cli, run, emb, tmp_path):
    """One row per setting, each equal to eval-recall on that file alone; the best row by the
    documented rule; --update-run makes it the run's sampling default, which blip sample then uses."""
    import shutil

    from blip_toolkit.jobs.eval_recall import best_setting

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    sweep = tmp_path / "sweep"
    args = [
        "--checkpoint",
        copy,
        "--data",
        emb,
        "--out",
        sweep,
        "--cfg-scale",
        "0",
        "1",
        "3",
        "--steps",
        "1",
        "4",
    ]
    assert cli("sample", *args).code == 0
    result = cli("eval-recall", emb, "--generated", sweep, "--k", "1", "5", "--format", "json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["sweep"]) == 6 and report["generated_training_images"] == 0
    for row in report["sweep"]:
        alone = json.loads(
            cli("eval-recall", emb, "--generated", row["file"], "--k", "1", "5", "--format", "json").stdout
        )
        assert (
            row["i2t"] == alone["features"]["generated"]["i2t"]
            and row["t2i"] == alone["features"]["generated"]["t2i"]
        )
        assert row["cosine"]["generated_tokens_vs_target"] == pytest.approx(
            alone["cosine"]["generated_tokens_vs_target"]
        )

    # the rule by hand: highest (i2t R@1, R@5, t2i R@1, R@5), then fewest evaluations, then cfg nearest 1
    def key(row):
        cost = row["steps"] * (1 if row["cfg_scale"] == 1 else 2)
        return (
            row["i2t"]["R@1"],
            row["i2t"]["R@5"],
            row["t2i"]["R@1"],
            row["t2i"]["R@5"],
            -cost,
            -abs(row["cfg_scale"] - 1),
        )

    expected = max(report["sweep"], key=key)
    assert best_setting(report["sweep"], [1, 5]) == expected
    assert (report["best"]["steps"], report["best"]["cfg_scale"]) == (
        expected["steps"],
        expected["cfg_scale"],
    )
    assert report["features"]["generated"]["i2t"] == expected["i2t"]
    text = cli("eval-recall", emb, "--generated", sweep, "--k", "1", "5")
    assert text.code == 0 and "guidance / steps sweep" in text.stdout and "best: steps" in text.stdout

    updated = cli(
        "eval-recall", emb, "--generated", sweep, "--k", "1", "5", "--update-run", "--format", "json"
    )
    assert updated.code == 0, updated.stderr
    record = json.loads((copy / "config.json").read_text())
    assert (
        record["sample"]["steps"] == expected["steps"]
        and record["sample"]["cfg_scale"] == expected["cfg_scale"]
    )
    assert record["sample_tuning"]["by"] == "eval-recall" and len(record["sample_tuning"]["table"]) == 6
    now = cli(
        "sample", "--checkpoint", copy, "--data", emb, "--out", tmp_path / "d.safetensors", "--format", "json"
    )
    summary = json.loads(now.stdout)
    assert (summary["steps"], summary["cfg_scale"]) == (expected["steps"], expected["cfg_scale"])


def test_update_run_refuses_training_images_and_single_files(cli, run, emb, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "--checkpoint",
        run,
        "--data",
        emb,
        "--out",
        sweep,
        "--cfg-scale",
        "1",
        "2",
        "--steps",
        "1",
        "--split",
        "all",
    ]
    assert cli("sample", *args).code == 0
    refused = cli("eval-recall", emb, "--generated", sweep, "--update-run")
    assert refused.code == 2 and "training images" in refused.stderr
    single = sweep / "steps-1_cfg-1.safetensors"
    refused = cli("eval-recall", emb, "--generated", single, "--update-run")
    assert refused.code == 2 and "needs a sweep" in refused.stderr
    (sweep / "sweep.json").unlink()  # an interrupted sweep
    broken = cli("eval-recall", emb, "--generated", sweep)
    assert broken.code == 1 and "not a blip sample sweep" in broken.stderr


def test_multi_value_options_spread_only_where_they_are_lists():
    from blip_toolkit.cli.main import expand_multi_value_options

    assert expand_multi_value_options(
        ["sample", "--cfg-scale", "1", "1.5", ".5", "--steps", "10", "30", "-o", "x"]
    ) == [
        "sample",
        "--cfg-scale",
        "1",
        "--cfg-scale",
        "1.5",
        "--cfg-scale",
        ".5",
        "--steps",
        "10",
        "--steps",
        "30",
        "-o",
        "x",
    ]
    # train-dit's --steps takes one value: a stray number stays a (refused) extra argument
    assert expand_multi_value_options(["train-dit", "--steps", "10", "30"]) == [
        "train-dit",
        "--steps",
        "10",
        "30",
    ]
    assert expand_multi_value_options(["-v", "eval-recall", "d", "--k", "1", "5"]) == [
        "-v",
        "eval-recall",
        "d",
        "--k",
        "1",
        "--k",
        "5",
    ]
