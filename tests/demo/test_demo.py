"""`blip demo`: the quick mode through the real command, with its numbers checked against the files it
wrote; determinism of a tiny plan; the output-directory policy.

Thresholds of the quick mode (seed 0): every task has ten classes, so chance is 10% for caption
accuracy, VQA accuracy, retrieval top-1 and image-to-text R@1 of the generated features. The quick run
measured caption 83%, VQA 81%, retrieval 68%, generated R@1 67% (91% baseline) on this machine. The
asserted floors (caption and VQA 50%, retrieval 40%, generated R@1 30% and at least 40% of the
baseline's) are five times chance or more and far below the measured values. The run is
deterministic for a seed, so the only way to move the numbers is another platform's float rounding
across a few hundred optimiser steps; margins of 30 points and more leave room for that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

QUICK_FLOORS = {
    "caption": 0.5,
    "vqa": 0.5,
    "retrieval": 0.4,
    "generated_r1": 0.3,
    "generated_over_baseline": 0.4,
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `blip demo --quick --format json` run (about 1.5 minutes)."""
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


def test_quick_demo_learns_every_task(quick):
    out, proc = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert report["mode"] == "quick"
    assert m["caption"]["accuracy"] >= QUICK_FLOORS["caption"], m["caption"]
    assert m["vqa"]["accuracy"] >= QUICK_FLOORS["vqa"], m["vqa"]
    assert m["retrieval"]["top1"] >= QUICK_FLOORS["retrieval"], m["retrieval"]
    generated, baseline = m["recall"]["generated"]["i2t"]["R@1"], m["recall"]["baseline"]["i2t"]["R@1"]
    assert generated >= QUICK_FLOORS["generated_r1"], m["recall"]
    assert generated >= QUICK_FLOORS["generated_over_baseline"] * baseline, m["recall"]
    # progress per stage on stderr, nothing but the JSON on stdout
    assert "[1/8]" in proc.stderr and "[8/8]" in proc.stderr


def test_quick_demo_numbers_match_its_own_files(quick):
    """Accuracies recounted from the prediction files and the test manifest (an independent count)."""
    out, proc = quick
    assert proc.returncode == 0
    m = json.loads((out / "report.json").read_text())["metrics"]
    rows = [line.split("\t") for line in (out / "data" / "vqa-test.tsv").read_text().splitlines()]
    truth = {Path(image).name: answer for image, _question, answer in rows}
    assert len(truth) == m["vqa"]["test_images"] == m["data"]["splits"]["test"]

    def records(task):
        lines = (out / "predictions" / f"{task}.jsonl").read_text().splitlines()
        return {Path(r["image"]).name: r for r in map(json.loads, lines)}

    captions, answers, ranked = records("caption"), records("vqa"), records("retrieval")
    assert captions.keys() == answers.keys() == ranked.keys() == truth.keys()
    caption_hits = sum(truth[k] in captions[k]["caption"].split() for k in truth)
    vqa_hits = sum(answers[k]["answer"] == truth[k] for k in truth)
    top_hits = sum(ranked[k]["results"][0]["text"] == f"a handwritten digit {truth[k]}" for k in truth)
    assert m["caption"]["accuracy"] == caption_hits / len(truth)
    assert m["vqa"]["accuracy"] == vqa_hits / len(truth)
    assert m["retrieval"]["top1"] == top_hits / len(truth)


def test_quick_demo_writes_report_and_figures(quick):
    out, proc = quick
    assert proc.returncode == 0
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert f"{report['metrics']['caption']['accuracy']:.1%}" in markdown
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
    assert report["total_seconds"] >= sum(report["stage_seconds"].values()) - 1
    for name in ("curves", "recall", "samples"):
        path = out / report["figures"][name]
        assert f"]({report['figures'][name]})" in markdown
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 200, (name, image.size)
    # every command's output is there for a person to inspect
    for path in (
        "models/caption/model.safetensors",
        "models/retrieval/config.json",
        "embeddings/test/index.json",
        "dit/config.json",
        "generated.safetensors",
    ):
        assert (out / path).is_file(), path


def tiny_plan():
    from blip_toolkit.demo.run import Plan

    return Plan(caption_epochs=1, vqa_epochs=1, retrieval_epochs=1, dit_steps=6, limit=40, sample_steps=2)


def test_a_fixed_seed_gives_the_same_numbers(tmp_path):
    from blip_toolkit.demo.run import DemoConfig, run_demo

    first = run_demo(DemoConfig(out=str(tmp_path / "a"), seed=3, plan=tiny_plan()))
    second = run_demo(DemoConfig(out=str(tmp_path / "b"), seed=3, plan=tiny_plan()))
    assert first.mode == "custom" and first.metrics["data"]["splits"] == {"train": 40, "val": 40, "test": 40}
    assert first.metrics == second.metrics
    assert (tmp_path / "a" / "predictions" / "caption.jsonl").read_text().replace("/a/", "/b/") == (
        tmp_path / "b" / "predictions" / "caption.jsonl"
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
