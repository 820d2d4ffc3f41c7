"""`blip demo`: the quick mode through the real command, with its numbers recounted from the files it
wrote; determinism of a tiny plan; the output-directory policy.

Floors of the quick mode (seed 0) and why they are safe. Chance levels on the balanced test set:
both digits of a caption right and in order 1% (100 ordered pairs); VQA 10% for a left / right digit,
at most 1/19 for the sum, 50% for "same" (same-class pairs are weighted five times) and at most 45%
for "larger" (left / right / neither), so about 23 overall; image-to-text R@1 1% among the 100
captions. The floors below are several times chance and well under what the quick run measured on
this machine (QUICK_MEASURED). The run is deterministic for a seed and thread count, so only another
platform's float rounding over a few hundred optimiser steps can move the numbers; the margins leave
room for that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from blip_toolkit.demo.data import digits_in
from blip_toolkit.metrics.vqa_accuracy import exact_match

# What `blip demo --quick` measured here (seed 0, two threads), for the record; the floors are what is
# asserted. generated_r1 is with the DiT's contrastive term towards the caption embedding
# (configs/dit-demo.toml; the target encoder's own: 0.250).
QUICK_MEASURED = {"caption": 0.214, "vqa": 43.6, "digit": 51.4, "retrieval": 16.4, "generated_r1": 0.279}
QUICK_FLOORS = {
    "caption": 0.15,  # both digits right and in order; chance 1%
    "vqa": 33.0,  # official accuracy x100; chance about 23
    "digit": 30.0,  # left / right digit question, x100; chance 10
    "retrieval": 10.0,  # image-to-text R@1 in %, among 100 captions; chance 1
    "generated_r1": 0.08,  # the DiT's generated features, i2t R@1 among 100 captions; chance 0.01
    "generated_over_baseline": 0.3,  # measured 1.11
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `blip demo --quick --format json` run."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo") / "quick"
    proc = subprocess.run(
        [sys.executable, "-m", "blip_toolkit", "demo", "--quick", "--out", str(out), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, proc


@pytest.mark.e2e
def test_quick_demo_learns_every_task(quick):
    out, proc = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert report["mode"] == "quick"
    assert m["caption"]["both_digits_in_order"] >= QUICK_FLOORS["caption"], m["caption"]
    vqa = m["vqa"]["eval"]
    assert vqa["overall"] >= QUICK_FLOORS["vqa"], vqa
    for kind in ("left digit", "right digit"):
        assert vqa["per_question_type"][kind] >= QUICK_FLOORS["digit"], vqa
    assert m["retrieval"]["eval"]["txt_r1"] >= QUICK_FLOORS["retrieval"], m["retrieval"]
    assert m["retrieval"]["texts"] == 100 and m["dit"]["texts"] == 100
    recall = m["dit"]["recall"]
    generated, baseline = recall["generated"]["i2t"]["R@1"], recall["baseline"]["i2t"]["R@1"]
    assert generated >= QUICK_FLOORS["generated_r1"], recall
    assert generated >= QUICK_FLOORS["generated_over_baseline"] * baseline, recall
    # the guidance scale the test pairs were sampled with is the best of the held-out sweep
    sweep = m["dit"]["guidance_sweep"]
    assert m["dit"]["cfg_scale"] in [row["cfg_scale"] for row in sweep]
    assert max(row["i2t_r1"] for row in sweep) == next(
        row["i2t_r1"] for row in sweep if row["cfg_scale"] == m["dit"]["cfg_scale"]
    )
    # progress per stage on stderr, nothing but the JSON on stdout
    assert "[1/8]" in proc.stderr and "[8/8]" in proc.stderr


@pytest.mark.e2e
def test_quick_demo_numbers_match_its_own_files(quick):
    """Counts recomputed from the prediction files and the test manifests (an independent count)."""
    out, proc = quick
    assert proc.returncode == 0
    m = json.loads((out / "report.json").read_text())["metrics"]
    data = out / "data"

    def rows(name):
        return [line.split("\t") for line in (data / name).read_text().splitlines()]

    def records(name):
        return [json.loads(line) for line in (out / "predictions" / name).read_text().splitlines()]

    truth = {Path(image).name: digits_in(caption) for image, caption in rows("retrieval-test.tsv")}
    captions = {Path(r["image"]).name: r["caption"] for r in records("captions.jsonl")}
    assert (
        captions.keys() == truth.keys()
        and len(truth) == m["data"]["pairs"]["test"] == m["caption"]["test_pairs"]
    )
    in_order = sum(digits_in(captions[k])[:2] == truth[k] for k in truth) / len(truth)
    assert m["caption"]["both_digits_in_order"] == in_order

    expected = {(Path(image).name, question): answer for image, question, answer in rows("vqa-test.tsv")}
    answers = {(Path(r["image"]).name, r["question"]): r["answer"] for r in records("answers.jsonl")}
    assert answers.keys() == expected.keys() and m["vqa"]["questions"] == len(expected) == 5 * len(truth)
    hits = sum(exact_match(answers[k], expected[k]) for k in expected)
    assert m["vqa"]["eval"]["exact_match"] == pytest.approx(100 * hits / len(expected))


@pytest.mark.e2e
def test_quick_demo_writes_report_and_figures(quick):
    out, proc = quick
    assert proc.returncode == 0
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    m = report["metrics"]
    assert f"{m['caption']['both_digits_in_order']:.1%}" in markdown
    assert (
        f"{m['caption']['eval']['CIDEr']:.1f}" in markdown
        and f"{m['vqa']['eval']['overall']:.1f}" in markdown
    )
    assert set(report["stage_seconds"]) == {
        "data",
        "build",
        "caption",
        "vqa",
        "retrieval",
        "embeddings",
        "dit",
        "report",
    }
    # VQA runs in a process of its own beside retrieval and the DiT (demo/run.py CONCURRENT)
    one_after_another = sum(v for k, v in report["stage_seconds"].items() if k != "vqa")
    assert report["total_seconds"] >= one_after_another - 1
    for name in ("curves", "recall", "samples"):
        path = out / report["figures"][name]
        assert f"]({report['figures'][name]})" in markdown
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 200, (name, image.size)
    # every command's output is there for a person to inspect, in the standard formats
    for path in (
        "models/caption/model.safetensors",
        "models/retrieval/config.json",
        "data/captions_test.json",
        "data/vqa_test_questions.json",
        "data/retrieval_test.json",
        "embeddings/test/index.json",
        "dit/config.json",
        "guidance-sweep/sweep.json",
        "generated.safetensors",
    ):
        assert (out / path).is_file(), path
    tuned = json.loads((out / "dit" / "config.json").read_text())
    assert tuned["sample"]["cfg_scale"] == m["dit"]["cfg_scale"] and "sample_tuning" in tuned


def tiny_plan():
    from blip_toolkit.demo.run import Plan

    return Plan(
        train_pairs=60,
        test_per_combo=1,
        caption_epochs=1,
        vqa_epochs=1,
        retrieval_epochs=1,
        dit_steps=4,
        val_pairs=10,
        sample_steps=2,
    )


def test_a_fixed_seed_gives_the_same_numbers(tmp_path):
    """Two runs of a tiny plan, without Java (--no-java: the caption metrics of `blip eval caption
    --no-java`, and a report that says they are not comparable to published numbers)."""
    from blip_toolkit.demo.run import DemoConfig, run_demo

    first = run_demo(DemoConfig(out=str(tmp_path / "a"), seed=3, plan=tiny_plan(), java=False))
    second = run_demo(DemoConfig(out=str(tmp_path / "b"), seed=3, plan=tiny_plan(), java=False))
    assert first.mode == "custom" and first.metrics["data"]["pairs"] == {"train": 60, "val": 10, "test": 140}
    assert first.metrics == second.metrics
    assert "METEOR" not in first.metrics["caption"]["eval"] and "CIDEr" in first.metrics["caption"]["eval"]
    assert "not comparable to published numbers" in Path(first.report_md).read_text()
    for name in ("captions.jsonl", "answers.jsonl"):
        assert (tmp_path / "a" / "predictions" / name).read_text().replace("/a/", "/b/") == (
            tmp_path / "b" / "predictions" / name
        ).read_text()


def test_an_existing_directory_is_refused_untouched(cli, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = cli("demo", "--out", out, "--quick")
    assert result.code == 1
    assert "already exists and is not empty" in result.stderr and "--overwrite" in result.stderr
    assert "--resume" not in result.stderr and "Traceback" not in result.stderr
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    # --overwrite does not clear a directory blip did not write
    result = cli("demo", "--out", out, "--quick", "--overwrite")
    assert result.code == 1 and "was not written by blip" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me"
