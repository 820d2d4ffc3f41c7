"""train-dit end to end on the tiny DiT: resume gives exactly the uninterrupted weights, a NaN stops the
run and keeps the last checkpoint, run directories are protected, 16 samples are overfitted through the
command, and the eval metrics equal a direct recomputation from the exported model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blip_toolkit.dit.train import run_train_dit
from blip_toolkit.embeddings.generated import read_generated
from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.errors import OutputExistsError, UsageError
from blip_toolkit.metrics.recall import mean_cosine, retrieval_recall

from .conftest import cli_args, tiny_config


class Killed(Exception):
    pass


def weights(path, name="model.safetensors"):
    return load_file(str(path / name))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


RESUME = {
    "train.steps": 6,
    "train.save_every": 3,
    "train.grad_accum": 2,
    "train.batch_size": 4,
    "train.ema_decay": 0.9,
    "flow.cond_dropout": 0.25,
    "data.shuffle_buffer": 5,
    "data.eval_shards": 1,
    "eval.every": 3,
    "train.seed": 7,
}


@pytest.fixture(scope="module")
def straight(emb, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, run_train_dit(tiny_config(emb, out, **RESUME))


def test_resumed_run_equals_uninterrupted_run(straight, emb, tmp_path):
    straight_out, straight_result = straight
    out = tmp_path / "run"

    def kill_after_step_3_checkpoint(record):
        if record["type"] == "checkpoint" and record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_train_dit(tiny_config(emb, out, **RESUME), callback=kill_after_step_3_checkpoint)
    assert (out / "checkpoints" / "step-3" / "COMPLETE").is_file() and not (out / "config.json").exists()
    assert json.loads((out / "blip_run.json").read_text())["status"] == "failed"
    # what a kill during later work leaves: a half-written checkpoint, metrics past step 3
    (out / "checkpoints" / ".step-4.tmp").mkdir()
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"type": "train", "step": 4, "loss": 9.9}) + "\n")

    resumed = run_train_dit(tiny_config(emb, out, resume=True, **RESUME))
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    for name in ("model.safetensors", "ema.safetensors", "normalizer.safetensors"):
        assert_same(weights(out, name), weights(straight_out, name))
    assert not torch.equal(
        weights(out)["output_proj.weight"], weights(out, "ema.safetensors")["output_proj.weight"]
    )
    assert not (out / "checkpoints" / ".step-4.tmp").exists()

    def losses(records):
        return [(r["step"], r["loss"]) for r in records if r["type"] == "train"]

    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses(history) == losses(straight_result.history)  # each step once, the same losses
    evals = [r for r in history if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["val_loss"] == resumed.eval["val_loss"] == straight_result.eval["val_loss"]
    assert json.loads((out / "blip_run.json").read_text())["status"] == "finished"

    # a resume with a setting that changes what is trained is refused; a free one is allowed
    with pytest.raises(UsageError, match="train.learning_rate"):
        run_train_dit(tiny_config(emb, out, resume=True, **{**RESUME, "train.lr": 1e-2}))
    again = run_train_dit(tiny_config(emb, out, resume=True, **{**RESUME, "eval.every": 0}))
    assert again.steps == 6 and again.resumed_from_step == 6


def test_checkpoint_directories_are_dit_exports(straight):
    from blip_toolkit.dit.checkpoint import load_dit

    out, _ = straight
    step = out / "checkpoints" / "step-6"
    assert sorted(p.name for p in step.iterdir()) == [
        "COMPLETE",
        "config.json",
        "ema.safetensors",
        "model.safetensors",
        "normalizer.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng-0.json",
        "rng-0.safetensors",
        "scheduler.json",
        "target_head.safetensors",
        "trainer_state.json",
    ]
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "blip-dit" and config["step"] == 6
    assert config["data"]["index_sha256"] == EmbeddingShards(config["data"]["dir"]).index_sha256
    assert config["normalizer"]["method"] == "standardize" and config["dit"]["num_tokens"] == 16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-6"]
    model, normalizer, info = load_dit(out)
    assert info["ema"] and info["step"] == 6 and normalizer.method == "standardize"
    step_model, _, _ = load_dit(step)
    for a, b in zip(model.parameters(), step_model.parameters()):
        assert torch.equal(a, b)
    # config.json is a copy: a checkpoint killed before it was written still loads from trainer_state.json
    (step / "config.json").unlink()
    assert load_dit(step)[2]["step"] == 6


def test_nan_loss_stops_with_the_last_checkpoint_intact(emb, tmp_path, cli):
    out = tmp_path / "nan"
    result = cli(
        *cli_args(
            emb,
            out,
            "--steps",
            "20",
            "--batch-size",
            "8",
            "--lr",
            "1e30",
            "--save-every",
            "1",
            "--eval-every",
            "0",
            "--set",
            "train.grad_clip=0",
            "--set",
            "train.warmup_steps=0",
            "--set",
            "train.log_every=5",
        )
    )
    assert result.code == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "the loss became" in error[0] and "training stopped" in error[0]
    bad_step = int(error[0].split(" at step ")[1].split(";")[0])
    complete = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert complete and max(complete) == bad_step - 1  # the last good step was saved, nothing after
    assert not (out / "config.json").exists()
    last = out / "checkpoints" / f"step-{bad_step - 1}"
    assert (last / "COMPLETE").is_file()
    record = json.loads((out / "blip_run.json").read_text())
    assert record["status"] == "failed" and "loss became" in record["error"]


def test_run_directory_policy(emb, tmp_path):
    out = tmp_path / "run"
    run_train_dit(tiny_config(emb, out, **{"train.steps": 1}))
    with pytest.raises(OutputExistsError, match="already exists"):
        run_train_dit(tiny_config(emb, out, **{"train.steps": 1}))
    run_train_dit(tiny_config(emb, out, overwrite=True, **{"train.steps": 1}))  # ours: replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not written by blip"):
        run_train_dit(tiny_config(emb, foreign, overwrite=True))
    with pytest.raises(OutputExistsError, match="not a train-dit run"):
        run_train_dit(tiny_config(emb, foreign, resume=True))
    assert (foreign / "notes.txt").read_text() == "mine"


def test_trackers_must_be_installed(emb, tmp_path):
    with pytest.raises(UsageError, match="unknown tracker"):
        run_train_dit(tiny_config(emb, tmp_path / "a", **{"train.log_with": ["nonsense"]}))
    from accelerate.tracking import get_available_trackers

    if "wandb" not in {str(getattr(t, "value", t)) for t in get_available_trackers()}:
        with pytest.raises(UsageError, match="wandb is not installed"):
            run_train_dit(tiny_config(emb, tmp_path / "b", **{"train.log_with": ["wandb"]}))
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_overfit_16_samples_through_the_command(cli, emb, tmp_path):
    out = tmp_path / "overfit"
    result = cli(
        *cli_args(
            emb,
            out,
            "--overfit",
            "16",
            "--steps",
            "500",
            "--batch-size",
            "16",
            "--lr",
            "3e-3",
            "--eval-every",
            "250",
            "--save-every",
            "0",
            "--set",
            "train.warmup_steps=20",
            "--set",
            "train.log_every=100",
            "--set",
            "eval.steps=20",
            "--set",
            "eval.max_samples=16",
            "--set",
            "flow.target_norm=standardize",
            # Memorising the tokens is the flow objective's job; the default contrastive term pulls the
            # pooled embedding towards the caption's instead, at some cost in token cosine.
            "--set",
            "flow.contrastive_weight=0",
            "--format",
            "json",
        )
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (
        summary["eval_kind"] == "overfit" and summary["train_samples"] == 16 and summary["eval_samples"] == 16
    )
    assert summary["eval"]["patch_cos"] > 0.95, summary["eval"]
    assert summary["eval"]["global_cos"] > 0.95 and summary["eval"]["est_r@1"] == 1.0
    assert "eval step 500/500" in result.stderr


def test_eval_metrics_equal_a_direct_recomputation(cli, emb, tmp_path):
    """The last eval record = metrics recomputed from the exported EMA model with independent code:
    `blip sample --split eval` (same seed and settings) for the tokens, the head for the globals,
    mean_cosine and retrieval_recall against the held-out images' ground truth and captions."""
    from blip_toolkit.dit.checkpoint import load_dit

    out = tmp_path / "run"
    run = run_train_dit(
        tiny_config(
            emb,
            out,
            **{
                "train.steps": 30,
                "data.eval_shards": 1,
                "eval.every": 30,
                "eval.steps": 6,
                "eval.cfg_scale": 2.0,
                "eval.batch_size": 3,
                "train.ema_decay": 0.8,
                "flow.cond_dropout": 0.2,
            },
        )
    )
    last = [r for r in run.history if r["type"] == "eval"][-1]
    assert set(last) >= {"val_loss", "vel_cos", "patch_cos", "patch_cos_raw", "global_cos", "est_r@1"}
    samples = tmp_path / "eval.safetensors"
    result = cli(
        "sample",
        "--checkpoint",
        out,
        "--data",
        emb,
        "--out",
        samples,
        "--split",
        "eval",
        "--steps",
        "6",
        "--cfg-scale",
        "2",
        "--batch-size",
        "5",
        "--seed",
        "0",
    )
    assert result.code == 0, result.stderr
    generated = read_generated(samples)
    shards = EmbeddingShards(emb)
    held = np.arange(16, 24)
    assert generated.keys == [shards.keys()[i] for i in held]
    _, _, info = load_dit(out)
    truth = torch.stack([shards[int(i)]["target"] for i in held]).float()
    # the file stores tokens in the storage dtype (float16): compare the globals it stores, in float32
    tokens = generated.tokens().float()
    assert mean_cosine(tokens, truth) == pytest.approx(last["patch_cos_raw"], abs=2e-3)
    # patch_cos: both standardised by the held-out ground truth's per-dimension mean and std
    flat = truth.reshape(-1, truth.shape[-1])
    mean, std = flat.mean(dim=0), flat.std(dim=0)
    assert mean_cosine((tokens - mean) / std, (truth - mean) / std) == pytest.approx(
        last["patch_cos"], abs=2e-3
    )
    # eval-recall's token cosine of the same file is the same number
    report = cli("eval-recall", emb, "--generated", samples, "--format", "json")
    assert report.code == 0, report.stderr
    cosine = json.loads(report.stdout)["cosine"]
    assert cosine["generated_tokens_vs_target"] == pytest.approx(last["patch_cos"], abs=2e-3)
    assert cosine["generated_tokens_vs_target_raw"] == pytest.approx(last["patch_cos_raw"], abs=2e-3)
    globals_ = generated.global_emb()
    truth_global = info["head"](truth)
    assert mean_cosine(globals_, truth_global) == pytest.approx(last["global_cos"], abs=1e-5)
    texts = shards.text_embeddings()
    mine = texts.caption_image >= 16
    recall = retrieval_recall(
        globals_, texts.text_emb[mine], texts.caption_image[mine] - 16, torch.arange(int(mine.sum())), (1,)
    )
    assert recall.i2t[1] == last["est_r@1"]


def test_dataloader_workers_train_the_same_model(emb, tmp_path):
    changes = {"train.steps": 5, "data.shuffle_buffer": 6, "flow.cond_dropout": 0.3}
    plain = run_train_dit(tiny_config(emb, tmp_path / "plain", **changes))
    workers = run_train_dit(tiny_config(emb, tmp_path / "workers", **changes, **{"data.num_workers": 2}))
    assert [r["loss"] for r in workers.history if r["type"] == "train"] == [
        r["loss"] for r in plain.history if r["type"] == "train"
    ]
    assert_same(weights(tmp_path / "plain"), weights(tmp_path / "workers"))


def test_trackers_receive_the_config_and_the_records(emb, tmp_path, monkeypatch):
    """--log-with wiring, with a custom Accelerate tracker standing in for tensorboard / wandb."""
    from accelerate.tracking import GeneralTracker

    import blip_toolkit.dit.train_inputs as train_inputs_module

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False
        main_process_only = True

        def __init__(self):
            super().__init__()
            self.config, self.logged = None, []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

    recorder = Recorder()
    monkeypatch.setattr(train_inputs_module, "check_trackers", lambda names: [recorder] if names else [])
    run_train_dit(
        tiny_config(
            emb, tmp_path / "run", **{"train.log_with": ["recorder"], "train.steps": 4, "eval.every": 2}
        )
    )
    assert recorder.config["train.max_steps"] == 4 and recorder.config["model.num_tokens"] == 16
    assert recorder.config["train.log_with"] == "recorder"
    train_steps = [step for step, values in recorder.logged if "train/loss" in values]
    eval_steps = [step for step, values in recorder.logged if "eval/val_loss" in values]
    assert train_steps == [1, 2, 3, 4] and eval_steps == [2, 4]


def test_bf16_mixed_precision_runs(emb, tmp_path):
    result = run_train_dit(
        tiny_config(
            emb,
            tmp_path / "bf16",
            **{"train.steps": 2, "train.mixed_precision": "bf16", "eval.every": 2, "train.cpu": True},
        )
    )
    assert result.steps == 2 and np.isfinite(result.final_loss) and np.isfinite(result.eval["val_loss"])
    ema = weights(tmp_path / "bf16", "ema.safetensors")
    assert all(v.dtype == torch.float32 for v in ema.values())


def test_a_global_batch_that_processes_cannot_split_is_refused_early(emb, tmp_path, monkeypatch):
    from blip_toolkit.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        run_train_dit(tiny_config(emb, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_est_recall_treats_identical_captions_as_one_text(cli, tmp_path):
    """Class-name captions (four images share each): EstR@1 = eval-recall --dedupe-captions on the
    same samples, an independent implementation (4 texts, not 8 caption rows). With real encoders the
    rows of one string have identical embeddings, so scored per row they would tie, and recall's
    pessimistic tie rule would count every image a miss."""
    from tests.builders.embeddings import write_embeddings

    emb = write_embeddings(
        tmp_path / "emb", samples=24, shard_size=8, caption_text=lambda image, c: f"class {image % 4}"
    )
    out = tmp_path / "run"
    changes = {
        "train.steps": 20,
        "data.eval_shards": 1,
        "eval.every": 20,
        "eval.steps": 4,
        "eval.batch_size": 8,
    }
    run = run_train_dit(tiny_config(emb, out, **changes))
    last = [r for r in run.history if r["type"] == "eval"][-1]
    samples = tmp_path / "eval.safetensors"
    args = ["--checkpoint", out, "--data", emb, "--out", samples, "--split", "eval", "--steps", "4"]
    assert cli("sample", *args, "--seed", "0").code == 0
    result = cli(
        "eval-recall", emb, "--generated", samples, "--dedupe-captions", "--k", "1", "--format", "json"
    )
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["features"]["generated"]["num_texts"] == 4
    assert last["est_r@1"] == pytest.approx(report["features"]["generated"]["i2t"]["R@1"])
    assert last["est_r@1"] > 0


def test_default_split_holds_out_images_and_sample_uses_them(cli, emb, tmp_path, caplog):
    """No split configured: a seeded 5% of the images is held out, recorded in the run, evaluated on
    (never a training image), and `blip sample` on the same embeddings samples exactly those."""
    import logging

    from blip_toolkit.dit.data import DEFAULT_EVAL_FRACTION, split_indices

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="blip"):
        result = run_train_dit(tiny_config(emb, out, **{"train.steps": 3, "eval.every": 3}))
    assert "no split configured: holding out" in caplog.text
    record = json.loads((out / "blip_run.json").read_text())["data"]
    assert record["split"] == {
        "eval_shards": 0,
        "eval_fraction": DEFAULT_EVAL_FRACTION,
        "split_seed": 0,
        "overfit": 0,
    }
    assert record["split_default"] and record["eval_kind"] == "held-out"
    split = split_indices(EmbeddingShards(emb))
    assert len(split.eval) >= 1 and not set(split.eval.tolist()) & set(split.train.tolist())
    assert result.eval_kind == "held-out" and result.train_samples == len(split.train)
    assert result.eval_samples == len(split.eval) and [r for r in result.history if r["type"] == "eval"]
    export = json.loads((out / "config.json").read_text())["data"]
    assert export["split"] == record["split"]

    samples = tmp_path / "s.safetensors"
    sampled = cli("sample", "--checkpoint", out, "--data", emb, "--out", samples, "--steps", "2")
    assert sampled.code == 0, sampled.stderr
    keys = EmbeddingShards(emb).keys()
    assert read_generated(samples).keys == [keys[i] for i in split.eval.tolist()]
    assert read_generated(samples).metadata["training_images"] == "0"
    train = tmp_path / "train.safetensors"
    assert (
        cli(
            "sample", "--checkpoint", out, "--data", emb, "--out", train, "--split", "train", "--steps", "2"
        ).code
        == 0
    )
    assert read_generated(train).keys == [keys[i] for i in split.train.tolist()]


def test_nothing_held_out_means_no_evaluation(cli, emb, tmp_path, caplog):
    import logging

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="blip"):
        result = run_train_dit(
            tiny_config(emb, out, **{"train.steps": 2, "eval.every": 1, "data.eval_fraction": 0})
        )
    assert "nothing held out (data.eval_fraction = 0)" in caplog.text and "no evaluation" in caplog.text
    assert result.eval_kind == "none" and result.train_samples == 24 and result.eval_samples == 0
    assert not [r for r in result.history if r["type"] == "eval"]
    refused = cli("sample", "--checkpoint", out, "--data", emb, "--out", tmp_path / "s.safetensors")
    assert refused.code == 2 and "held out no images" in refused.stderr and "--split all" in refused.stderr
    allowed = cli(
        "sample",
        "--checkpoint",
        out,
        "--data",
        emb,
        "--out",
        tmp_path / "a.safetensors",
        "--split",
        "all",
        "--steps",
        "2",
        "--format",
        "json",
    )
    assert allowed.code == 0 and json.loads(allowed.stdout)["training_images"] == 24


def test_cls_targets_get_their_own_normaliser_statistics_and_contrastive_training_runs(tmp_path):
    """cls+patch targets: the export's normaliser holds CLS statistics of the training images' CLS
    tokens (load_dit restores them); the contrastive term trains on the same data."""
    from blip_toolkit.dit.checkpoint import load_dit
    from blip_toolkit.dit.data import split_indices

    from .helpers import write_embeddings

    emb = write_embeddings(tmp_path / "emb", samples=16, shard_size=8, dtype=torch.float32, cls=True)
    out = tmp_path / "run"
    changes = {"train.steps": 3, "flow.contrastive_weight": 0.1, "data.eval_shards": 1}
    result = run_train_dit(tiny_config(emb, out, **changes))
    assert all(np.isfinite(r["loss"]) for r in result.history if r["type"] == "train")
    _, normalizer, info = load_dit(out)
    assert normalizer.has_cls and info["record"]["normalizer"]["has_cls"]
    shards = EmbeddingShards(emb)
    train = split_indices(shards, eval_shards=1).train
    tokens = shards.rows(train, "target").double()  # [8, 17, 16]
    torch.testing.assert_close(normalizer.cls_mean.double(), tokens[:, 0].mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalizer.cls_std.double(), tokens[:, 0].std(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        normalizer.mean.double(), tokens[:, 1:].reshape(-1, 16).mean(0), rtol=1e-5, atol=1e-5
    )


def test_default_contrastive_term_pulls_towards_the_captions_when_there_are_any(emb, tmp_path, caplog):
    """flow.contrastive_positive = auto (the default, weight 0.5): the run trains as one told
    contrastive_positive = text on embeddings with captions, and as one with no contrastive term on
    embeddings without; the run records what it trained with."""
    import logging

    from .helpers import write_embeddings

    def losses(run_dir, emb_dir, **changes):
        result = run_train_dit(tiny_config(emb_dir, tmp_path / run_dir, **{"train.steps": 3, **changes}))
        flow = json.loads((tmp_path / run_dir / "config.json").read_text())["flow"]
        return [r["loss"] for r in result.history if r["type"] == "train"], flow

    default, flow = losses("default", emb)
    text, _ = losses("text", emb, **{"flow.contrastive_positive": "text"})
    off, _ = losses("off", emb, **{"flow.contrastive_weight": 0})
    assert (flow["contrastive_positive"], flow["contrastive_weight"]) == ("text", 0.5)
    assert default == text and default != off

    bare = write_embeddings(tmp_path / "bare", samples=24, shard_size=8, captions=0)
    with caplog.at_level(logging.INFO, logger="blip"):
        default, flow = losses("bare-default", bare)
    off, _ = losses("bare-off", bare, **{"flow.contrastive_weight": 0})
    assert flow["contrastive_weight"] == 0 and default == off
    assert "holds no captions: no contrastive term" in caplog.text


def test_learned_head_trains_with_the_dit_and_projects_what_it_samples(emb, tmp_path, cli):
    """flow.contrastive_head = learned: a copy of the target head trains with the DiT under the
    contrastive term (the first step's loss is the frozen head's, later ones differ); the run keeps it
    (EMA included), load_dit gives it as the head, and the global features `blip sample` writes are its
    projection of the generated tokens, not the target head's."""
    from blip_toolkit.dit.checkpoint import load_dit

    changes = {"train.steps": 6, "flow.contrastive_positive": "text", "flow.contrastive_weight": 1.0}
    frozen = run_train_dit(tiny_config(emb, tmp_path / "frozen", **changes))
    out = tmp_path / "learned"
    learned = run_train_dit(tiny_config(emb, out, **changes, **{"flow.contrastive_head": "learned"}))

    def losses(result):
        return [r["loss"] for r in result.history if r["type"] == "train"]

    assert losses(learned)[0] == pytest.approx(losses(frozen)[0], rel=1e-6)
    assert losses(learned)[1:] != losses(frozen)[1:]
    assert "text_head.proj.weight" not in weights(tmp_path / "frozen")

    target = EmbeddingShards(emb).head()
    model, _, info = load_dit(out)
    head = info["head"]
    assert head is model.text_head
    ema, exported = weights(out, "ema.safetensors"), weights(out, "target_head.safetensors")
    for name, value in head.state_dict().items():
        assert torch.equal(value, ema[f"text_head.{name}"]) and torch.equal(value, exported[name])
    assert not torch.equal(head.proj.weight, target.proj.weight)  # it trained
    raw_model, _, raw = load_dit(out, ema=False)
    assert torch.equal(raw["head"].proj.weight, weights(out)["text_head.proj.weight"])

    samples = tmp_path / "samples.safetensors"
    result = cli(
        "sample", "--checkpoint", out, "--data", emb, "--out", samples, "--steps", "4", "--seed", "0"
    )
    assert result.code == 0, result.stderr
    generated = read_generated(samples)
    tokens, stored = generated.tokens().float(), generated.global_emb().float()
    by_learned, by_target = head.embed(tokens), target.embed(tokens)
    # the file's tokens are float16; its globals were projected from the float32 tokens
    torch.testing.assert_close(stored, by_learned, rtol=0, atol=5e-3)
    assert (stored - by_target).abs().max() > 10 * (stored - by_learned).abs().max()


def test_learned_head_resumes_exactly(emb, tmp_path):
    """A learned head is part of the model: a killed run resumed from its checkpoint ends with the
    same DiT, head and EMA as one run straight through."""
    settings = {**RESUME, "flow.contrastive_positive": "text", "flow.contrastive_head": "learned"}
    straight_out, out = tmp_path / "straight", tmp_path / "run"
    run_train_dit(tiny_config(emb, straight_out, **settings))

    def kill_after_step_3_checkpoint(record):
        if record["type"] == "checkpoint" and record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_train_dit(tiny_config(emb, out, **settings), callback=kill_after_step_3_checkpoint)
    run_train_dit(tiny_config(emb, out, resume=True, **settings))
    for name in ("model.safetensors", "ema.safetensors", "target_head.safetensors"):
        assert_same(weights(out, name), weights(straight_out, name))
    assert "text_head.proj.weight" in weights(out)
