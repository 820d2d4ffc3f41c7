"""The inference commands through the real entry point: output formats, exit codes, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blip_toolkit import __version__


def test_help_lists_commands_with_examples(cli):
    result = cli("--help")
    assert result.code == 0
    for command in ("caption", "vqa", "retrieval"):
        assert command in result.stdout
        sub = cli(command, "--help")
        assert sub.code == 0 and "Examples" in sub.stdout and f"blip {command}" in sub.stdout


def test_version(cli):
    assert cli("--version").stdout.strip() == f"blip {__version__}"


def test_caption_text_json_jsonl(cli, tiny_models, sample_images):
    model = tiny_models["blip-caption"]
    args = ["caption", *sample_images[:2], "-m", model, "--max-new-tokens", "4"]
    text = cli(*args)
    assert text.code == 0, text.stderr
    lines = text.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in sample_images[:2]]
    as_json = json.loads(cli(*args, "--format", "json").stdout)
    as_jsonl = [json.loads(line) for line in cli(*args, "--format", "jsonl").stdout.splitlines()]
    assert as_json == as_jsonl
    assert [f"{r['image']}\t{r['caption']}" for r in as_json] == lines


def test_directory_stdin_and_manifest_inputs(cli, tiny_models, sample_images, samples, tmp_path):
    model = tiny_models["blip-caption"]
    from_dir = cli("caption", samples, "-m", model, "--max-new-tokens", "3", "-f", "jsonl")
    assert from_dir.code == 0 and len(from_dir.stdout.splitlines()) == len(sample_images)
    from_stdin = cli(
        "caption",
        "-",
        "-m",
        model,
        "--max-new-tokens",
        "3",
        "-f",
        "jsonl",
        stdin="\n".join(str(p) for p in sample_images) + "\n",
    )
    from_manifest = cli(
        "caption", "--manifest", samples / "captions.tsv", "-m", model, "--max-new-tokens", "3", "-f", "jsonl"
    )
    captions = lambda out: sorted(
        (json.loads(x)["image"].split("/")[-1], json.loads(x)["caption"]) for x in out.splitlines()
    )  # noqa: E731
    assert captions(from_dir.stdout) == captions(from_stdin.stdout) == captions(from_manifest.stdout)


def test_bad_items_exit_3_and_all_bad_exit_1(cli, tiny_models, sample_images, tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    model = tiny_models["blip-caption"]
    mixed = cli(
        "caption",
        sample_images[0],
        tmp_path / "zero.jpg",
        tmp_path / "missing.jpg",
        "-m",
        model,
        "--max-new-tokens",
        "3",
        "-f",
        "jsonl",
    )
    assert mixed.code == 3
    records = [json.loads(line) for line in mixed.stdout.splitlines()]
    assert [sorted(r) for r in records] == [["caption", "image"], ["error", "image"], ["error", "image"]]
    assert "zero.jpg: empty file" in mixed.stderr and "missing.jpg: no such file" in mixed.stderr
    assert "2 of 3 image(s) failed" in mixed.stderr
    assert "Traceback" not in mixed.stderr
    text_mode = cli("caption", sample_images[0], tmp_path / "zero.jpg", "-m", model, "--max-new-tokens", "3")
    assert text_mode.code == 3 and len(text_mode.stdout.splitlines()) == 1  # errors stay off stdout

    all_bad = cli("caption", tmp_path / "zero.jpg", "-m", model)
    assert all_bad.code == 1 and "all 1 image(s) failed" in all_bad.stderr
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    assert "directory has no images" in cli("caption", empty_dir, "-m", model).stderr


def test_vqa_single_and_manifest(cli, tiny_models, sample_images, samples):
    model = tiny_models["blip-vqa"]
    one = cli("vqa", sample_images[0], "what is this?", "-m", model, "-f", "json")
    assert one.code == 0
    [record] = json.loads(one.stdout)
    assert record["question"] == "what is this?" and isinstance(record["answer"], str)
    many = cli("vqa", "--manifest", samples / "vqa.tsv", "-m", model, "-f", "jsonl")
    assert many.code == 0 and len(many.stdout.splitlines()) == 8
    assert cli("vqa", sample_images[0], "-m", model).code == 2  # question missing: usage error


def test_vqa_manifest_errors_name_file_and_line(cli, tiny_models, tmp_path, sample_images):
    bad = tmp_path / "q.tsv"
    bad.write_bytes(
        f"{sample_images[0]}\n".encode() + f"{sample_images[0]}\tok?\n".encode() + b"\xff\xfe\tx\n"
    )
    result = cli("vqa", "--manifest", bad, "-m", tiny_models["blip-vqa"])
    assert result.code == 1
    assert f"{bad}:1: expected 2 or 3 tab-separated columns" in result.stderr
    assert f"{bad}:3: not valid UTF-8" in result.stderr


def test_image_token_in_text_is_refused(cli, tiny_models, sample_images):
    result = cli("retrieval", sample_images[0], "a <image> cat", "a dog", "-m", tiny_models["blip2-itm"])
    assert result.code == 1 and "candidate text 1 contains '<image>'" in result.stderr


def test_retrieval_outputs(cli, tiny_models, sample_images, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a cat\n\na dog\nred\n")
    result = cli(
        "retrieval",
        *sample_images[:2],
        "--texts-file",
        texts,
        "-m",
        tiny_models["blip-itm"],
        "-f",
        "jsonl",
        "--top",
        "2",
    )
    assert result.code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2 and all(len(r["results"]) == 2 for r in records)
    text = cli("retrieval", sample_images[0], "a cat", "a dog", "-m", tiny_models["blip-itm"])
    rows = [line.split("\t") for line in text.stdout.splitlines()]
    assert [row[1] for row in rows] == ["1", "2"] and {row[4] for row in rows} == {"a cat", "a dog"}


def test_model_errors(cli, tiny_models, sample_images, tmp_path):
    wrong = cli("caption", sample_images[0], "-m", tiny_models["blip-itm"])
    assert wrong.code == 1 and "cannot do caption; it can do: retrieval" in wrong.stderr
    missing = cli("caption", sample_images[0], "-m", tmp_path / "no-model")
    assert missing.code == 1 and "no such directory" in missing.stderr
    assert missing.stderr.count("\n") == 1  # one line, no traceback


def test_usage_errors_exit_2(cli, tiny_models, sample_images):
    assert cli("caption", sample_images[0], "--batch-size", "0", "-m", tiny_models["blip-caption"]).code == 2
    assert cli("caption", "-m", tiny_models["blip-caption"]).code == 2
    assert cli("retrieval", sample_images[0], "-m", tiny_models["blip-itm"]).code == 2
    assert (
        cli("vqa", sample_images[0], "q?", "--template", "no placeholder", "-m", tiny_models["blip-vqa"]).code
        == 2
    )
    assert cli("no-such-command").code == 2


def test_blip_debug_shows_the_traceback(cli, tmp_path, sample_images, monkeypatch):
    monkeypatch.setenv("BLIP_DEBUG", "1")
    result = cli("caption", sample_images[0], "-m", tmp_path / "none")
    assert result.code == 1 and "Traceback" in result.stderr


@pytest.mark.parametrize("entry", [["-m", "blip_toolkit"], None])
def test_python_dash_m_and_console_script(entry, tiny_models, sample_images):
    command = [sys.executable, *entry] if entry else [os.path.join(os.path.dirname(sys.executable), "blip")]
    result = subprocess.run(
        [
            *command,
            "caption",
            str(sample_images[0]),
            "-m",
            str(tiny_models["blip-caption"]),
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(sample_images[0]) + "\t")
