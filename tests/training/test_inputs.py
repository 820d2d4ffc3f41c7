"""Bad input gives one clear error (file:line where it applies), the right exit code, no traceback,
and nothing written: checked before any model is loaded."""

from __future__ import annotations

import json

import pytest

from .helpers import SAMPLES

CAPTION_ROWS = (SAMPLES / "captions.tsv").read_text()


def run(cli, manifest, *extra, task="caption", model=None, out=None, checkpoint=None):
    model = model or checkpoint("blip-caption")
    result = cli("finetune", manifest, "--task", task, "--model", model, "--output-dir", out, *extra)
    assert "Traceback" not in result.stderr
    return result


def last_error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_empty_manifest(cli, checkpoint, tmp_path):
    manifest = tmp_path / "empty.tsv"
    manifest.write_text("# only a comment\n\n")
    result = run(cli, manifest, out=tmp_path / "out", checkpoint=checkpoint)
    assert result.code == 1
    assert "empty.tsv: the caption manifest has no examples" in last_error(result)
    assert not (tmp_path / "out").exists()


def test_wrong_columns_for_the_task(cli, checkpoint, tmp_path):
    result = run(cli, SAMPLES / "vqa.tsv", out=tmp_path / "out", checkpoint=checkpoint)
    assert result.code == 1
    assert "vqa.tsv: 8 problem(s) in the caption manifest" in last_error(result)
    assert (
        f"{SAMPLES / 'vqa.tsv'}:2: expected 2 tab-separated columns (image<TAB>caption), found 3"
        in result.stderr
    )


def test_val_manifest_of_another_task(cli, checkpoint, tmp_path):
    result = run(
        cli,
        SAMPLES / "captions.tsv",
        "--val-manifest",
        SAMPLES / "vqa.tsv",
        out=tmp_path / "out",
        checkpoint=checkpoint,
    )
    assert result.code == 1
    assert "looks like a vqa manifest, but --task caption needs 2 (image<TAB>caption)" in last_error(result)


def test_missing_images_stop_the_run_unless_skipped(cli, checkpoint, samples_copy, tmp_path):
    (samples_copy / "cat.jpg").unlink()
    (samples_copy / "coins.jpg").unlink()
    manifest = samples_copy / "captions.tsv"
    result = run(cli, manifest, out=tmp_path / "out", checkpoint=checkpoint)
    assert result.code == 1
    assert "2 problem(s)" in last_error(result)
    assert f"{manifest}:3: image not found: {samples_copy / 'cat.jpg'}" in result.stderr
    assert f"{manifest}:7: image not found" in result.stderr
    assert "--skip-missing" in result.stderr
    assert not (tmp_path / "out").exists()

    result = run(
        cli,
        manifest,
        "--skip-missing",
        "--max-steps",
        "1",
        "--format",
        "json",
        out=tmp_path / "out",
        checkpoint=checkpoint,
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["skipped_missing"] == 2 and summary["train_examples"] == 6
    assert "skipped 2 example(s)" in result.stderr


def test_an_unreadable_image_is_reported_up_front(cli, checkpoint, samples_copy, tmp_path):
    (samples_copy / "grass.jpg").write_bytes(b"this is not a jpeg")
    result = run(cli, samples_copy / "captions.tsv", out=tmp_path / "out", checkpoint=checkpoint)
    assert result.code == 1
    assert f"captions.tsv:9: image not readable: {samples_copy / 'grass.jpg'} (not an image)" in result.stderr


def test_non_utf8_bytes(cli, checkpoint, samples_copy, tmp_path):
    manifest = samples_copy / "captions.tsv"
    manifest.write_bytes(CAPTION_ROWS.encode() + b"cat.jpg\ta caf\xe9 cat\n")
    result = run(cli, manifest, out=tmp_path / "out", checkpoint=checkpoint)
    assert result.code == 1
    assert f"{manifest}:10: not valid UTF-8 (byte 0xe9 at column 14)" in result.stderr


def test_reserved_tokens_in_text(cli, checkpoint, samples_copy, tmp_path):
    manifest = samples_copy / "captions.tsv"
    manifest.write_text(CAPTION_ROWS + "cat.jpg\ta <image> of a cat\n")
    result = run(cli, manifest, model=checkpoint("blip2-opt"), out=tmp_path / "out")
    assert result.code == 1
    assert f"{manifest}:10: caption contains reserved token '<image>'" in result.stderr


def test_existing_output_dir_is_refused_and_untouched(cli, checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # --overwrite only clears directories blip wrote
        result = run(cli, SAMPLES / "captions.tsv", *extra, out=out, checkpoint=checkpoint)
        assert result.code == 1
        assert str(out) in last_error(result)
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (
        "--resume"
        in cli(
            "finetune",
            SAMPLES / "captions.tsv",
            "--task",
            "caption",
            "--model",
            checkpoint("blip-caption"),
            "-o",
            out,
        ).stderr
    )


def test_config_file_then_flags(cli, checkpoint, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 2\nbatch_size: 4\nlearning_rate: 0.01\nfreeze: [vision]\n")
    out = tmp_path / "out"
    result = run(
        cli, SAMPLES / "captions.tsv", "--config", config, "--lr", "0.02", out=out, checkpoint=checkpoint
    )
    assert result.code == 0, result.stderr
    resolved = json.loads((out / "blip_run.json").read_text())["config"]
    assert resolved["learning_rate"] == 0.02  # the flag wins
    assert resolved["max_steps"] == 2 and resolved["batch_size"] == 4 and resolved["freeze"] == ["vision"]
    assert resolved["manifest"] == str((SAMPLES / "captions.tsv").resolve())
    assert result.stdout.startswith(f"output\t{out}\nsteps\t2 ")


def test_config_file_with_unknown_keys(cli, checkpoint, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("epochs = 2\nlearnig_rate = 0.1\nbatchsize = 4\n")
    result = run(
        cli, SAMPLES / "captions.tsv", "--config", config, out=tmp_path / "out", checkpoint=checkpoint
    )
    assert result.code == 2
    assert "unknown key(s): batchsize, learnig_rate" in last_error(result)
    assert "learning_rate" in last_error(result)  # the known keys are listed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grad-accum", "0"], "--grad-accum must be at least 1 (got 0)"),
        (["--learning-rate", "-1e-4"], "--learning-rate must be positive"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--max-steps", "-3"], "--max-steps must be at least 1"),
        (["--warmup-steps", "-1"], "--warmup-steps must be 0 or more"),
        (["--grad-clip", "-1"], "--grad-clip must be 0 (off) or positive"),
        (["--weight-decay", "nan"], "--weight-decay must be 0 or more"),
        (["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a GPU"),
        (["--epochs", "two"], "unable to parse string as an integer"),
        (["--template", "no placeholder"], "--template must contain exactly one {}"),
        (["--resume", "--overwrite"], "--resume and --overwrite cannot be combined"),
        (
            ["--freeze", "language-model"],
            "--freeze language-model: not a part of a BLIP captioning checkpoint",
        ),
    ],
)
def test_invalid_numbers_and_options_are_usage_errors(cli, checkpoint, tmp_path, flags, message):
    result = run(cli, SAMPLES / "captions.tsv", *flags, out=tmp_path / "out", checkpoint=checkpoint)
    assert result.code == 2, result.stderr
    assert message in " ".join(result.stderr.replace("│", " ").split())  # click's boxed message wraps
    assert not (tmp_path / "out").exists()


def test_prompt_is_for_captions_only(cli, checkpoint, tmp_path):
    result = run(
        cli,
        SAMPLES / "vqa.tsv",
        "--prompt",
        "a photo of",
        task="vqa",
        model=checkpoint("blip-vqa"),
        out=tmp_path / "out",
    )
    assert result.code == 2
    assert "--prompt is for --task caption" in last_error(result)


@pytest.mark.parametrize(
    "kind, message",
    [
        (
            "blip-caption",
            "is a BLIP captioning checkpoint and cannot be fine-tuned for retrieval; it can be fine-tuned for: caption",
        ),
        (
            "blip2-opt",
            "generative BLIP-2 (OPT) checkpoint: it ranks texts by likelihood and has no ITC/ITM heads",
        ),
    ],
)
def test_retrieval_needs_an_itm_checkpoint(cli, checkpoint, tmp_path, kind, message):
    result = run(
        cli, SAMPLES / "captions.tsv", task="retrieval", model=checkpoint(kind), out=tmp_path / "out"
    )
    assert result.code == 1
    assert message in last_error(result)
