"""`blip eval caption | vqa | retrieval` through the real entry point: exit codes, bad input, the
report file, and the --model path (tiny checkpoints: the numbers are meaningless, the plumbing is
not) equal to scoring its own saved predictions.

Caption runs use --no-java here (test_caption_metrics.py covers the Java pipeline against
COCOEvalCap); METEOR's JVM start alone takes 15-30 s.
"""

from __future__ import annotations

import json
import shutil

import pytest

from blip_toolkit import __version__
from blip_toolkit.fsutil import sha256_file
from blip_toolkit.metrics.vqa_accuracy import question_accuracy

CAPTIONS = {
    "astronaut.jpg": ["a woman astronaut in an orange suit", "an astronaut in a space suit"],
    "cat.jpg": ["a tabby cat looking to the side", "a cat with green eyes"],
    "coffee.jpg": ["a cup of coffee on a table", "coffee in a white cup"],
    "rocket.jpg": ["a rocket launching into the sky", "a space shuttle lifting off"],
}


@pytest.fixture(scope="module")
def images(tmp_path_factory, sample_images):
    root = tmp_path_factory.mktemp("eval-images")
    for path in sample_images:
        if path.name in CAPTIONS:
            shutil.copy(path, root / path.name)
    return root


@pytest.fixture
def karpathy(tmp_path):
    path = tmp_path / "coco_karpathy_test.json"
    path.write_text(json.dumps([{"image": name, "caption": caps} for name, caps in CAPTIONS.items()]))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_help_lists_the_eval_commands_with_examples(cli):
    assert "eval" in cli("--help").stdout
    group = cli("eval", "--help")
    assert group.code == 0
    for command in ("caption", "vqa", "retrieval"):
        assert command in group.stdout
        sub = cli("eval", command, "--help")
        assert sub.code == 0 and "Examples" in sub.stdout and f"blip eval {command}" in sub.stdout


def test_caption_predictions_missing_images_exit_3_listed(cli, karpathy, images, tmp_path):
    # `blip caption --format jsonl` records: the image as the path it was given.
    preds = write_jsonl(
        tmp_path / "captions.jsonl",
        [{"image": str(images / name), "caption": caps[0]} for name, caps in list(CAPTIONS.items())[:3]],
    )
    result = cli("eval", "caption", karpathy, "--predictions", preds, "--no-java", "--format", "json")
    assert result.code == 3
    assert "1 of 4 image(s) were not scored (1 no prediction: rocket.jpg)" in result.stderr
    report = json.loads(result.stdout)
    assert report["scored"] == 3 and report["missing"]["items"] == [
        {"item": "rocket.jpg", "reason": "no prediction"}
    ]
    assert report["metrics"]["Bleu_1"] == pytest.approx(100.0)  # each prediction is one of its references
    assert not report["comparable"] and "not comparable" in report["notes"][0]

    allowed = cli("eval", "caption", karpathy, "--predictions", preds, "--no-java", "--allow-missing")
    assert allowed.code == 0, allowed.stderr
    assert "# caption metrics on 3 of 4 images, x100" in allowed.stdout
    assert "Bleu_1\t100.00" in allowed.stdout


def test_caption_without_java_names_it(cli, karpathy, tmp_path, monkeypatch):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"image": n, "caption": c[0]} for n, c in CAPTIONS.items()])
    monkeypatch.setenv("PATH", str(tmp_path))
    result = cli("eval", "caption", karpathy, "--predictions", preds)
    assert result.code == 1
    assert (
        result.stderr.startswith("error: Java is not installed")
        and len(result.stderr.strip().splitlines()) == 1
    )
    assert cli("eval", "caption", karpathy, "--predictions", preds, "--no-java").code == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ({"images": [{"id": 1, "file_name": "cat.jpg"}]}, "missing key 'annotations'"),
        (
            [{"image": "cat.jpg", "caption": ["x"]}, {"image": "cat.jpg", "caption": ["y"]}],
            "duplicate image 'cat.jpg'",
        ),
        (
            {"images": [{"id": 3, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}], "annotations": []},
            "duplicate image id 3",
        ),
    ],
)
def test_bad_annotations_one_line(cli, tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(content))
    preds = write_jsonl(tmp_path / "p.jsonl", [{"image": "cat.jpg", "caption": "a cat"}])
    result = cli("eval", "caption", path, "--predictions", preds, "--no-java")
    assert result.code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(path) in result.stderr and message in result.stderr


def test_duplicate_prediction_names_the_line(cli, karpathy, tmp_path):
    preds = write_jsonl(
        tmp_path / "p.jsonl",
        [{"image": "cat.jpg", "caption": "a cat"}, {"image": "cat.jpg", "caption": "a dog"}],
    )
    result = cli("eval", "caption", karpathy, "--predictions", preds, "--no-java")
    assert (
        result.code == 1
        and "p.jsonl:2: a second caption for image 'cat.jpg' (first at line 1)" in result.stderr
    )


def test_model_or_predictions_not_both(cli, karpathy, tmp_path, tiny_models):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"image": "cat.jpg", "caption": "a cat"}])
    both = cli("eval", "caption", karpathy, "--predictions", preds, "--model", tiny_models["blip-caption"])
    assert both.code == 2 and "not both" in both.stderr
    assert cli("eval", "caption", karpathy, "--no-java").code == 2


def test_caption_model_equals_scoring_its_saved_predictions(cli, karpathy, images, tmp_path, tiny_models):
    saved, out = tmp_path / "generated.jsonl", tmp_path / "report.json"
    # cat.jpg is removed from the root: left out, listed, exit 3
    root = tmp_path / "root"
    shutil.copytree(images, root)
    (root / "cat.jpg").unlink()
    args = (
        "eval",
        "caption",
        karpathy,
        "--images",
        root,
        "--model",
        tiny_models["blip-caption"],
        "--no-java",
    )
    result = cli(*args, "--save-predictions", saved, "--out", out, "--format", "json")
    assert result.code == 3, result.stderr
    assert "1 image(s) not found under" in result.stderr and "cat.jpg" in result.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    assert report["missing"]["items"] == [{"item": "cat.jpg", "reason": "image not found"}]
    assert report["tool"]["version"] == __version__
    assert report["dataset"]["sha256"] == sha256_file(karpathy)
    assert report["model"] == {"source": str(tiny_models["blip-caption"]), "family": "blip-caption"}
    assert report["decoding"] == {
        "prompt": "a picture of ",
        "num_beams": 3,
        "max_new_tokens": 16,
        "min_new_tokens": 1,
        "sample": False,
    }
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(records) == 3 and all(r["caption"] for r in records)

    rescored = cli(
        "eval",
        "caption",
        karpathy,
        "--predictions",
        saved,
        "--no-java",
        "--allow-missing",
        "--format",
        "json",
    )
    assert rescored.code == 0, rescored.stderr
    again = json.loads(rescored.stdout)
    assert again["metrics"] == report["metrics"] and again["scored"] == report["scored"] == 3
    assert again["predictions"]["sha256"] == sha256_file(saved)

    refused = cli(*args, "--save-predictions", saved, "--allow-missing")
    assert refused.code == 1 and "already exists" in refused.stderr


@pytest.fixture
def vqav2(tmp_path):
    """Two VQAv2 questions; image files are COCO_val2014_<12-digit id>.jpg under the root."""
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"question_id": 101, "image_id": 1, "question": "How many cats?"},
            {"question_id": 102, "image_id": 2, "question": "What color is it?"},
            {"question_id": 103, "image_id": 2, "question": "Is it hot?"},
        ],
    }
    ann = {
        "annotations": [
            {
                "question_id": 101,
                "image_id": 1,
                "question_type": "how many",
                "answer_type": "number",
                "multiple_choice_answer": "2",
                "answers": [
                    {"answer": "2", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)
                ],
            },
            {
                "question_id": 102,
                "image_id": 2,
                "question_type": "what color",
                "answer_type": "other",
                "multiple_choice_answer": "white",
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(["brown", "brown"] + ["white"] * 8)
                ],
            },
            {
                "question_id": 103,
                "image_id": 2,
                "question_type": "is the",
                "answer_type": "yes/no",
                "multiple_choice_answer": "yes",
                "answers": [
                    {"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)
                ],
            },
        ]
    }
    q, a = tmp_path / "questions.json", tmp_path / "annotations.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(ann))
    return q, a


def test_vqa_predictions_official_accuracy(cli, vqav2, tmp_path):
    q, a = vqav2
    preds = tmp_path / "answers.json"  # the official results format
    preds.write_text(
        json.dumps([{"question_id": 101, "answer": "two"}, {"question_id": 102, "answer": "Brown."}])
    )
    result = cli(
        "eval", "vqa", "--questions", q, "--annotations", a, "--predictions", preds, "--format", "json"
    )
    assert result.code == 3 and "1 of 3 question(s) were not scored (1 no prediction: 103)" in result.stderr
    report = json.loads(result.stdout)
    metrics = report["metrics"]
    # 101: "two" -> "2", 10 of 10 agree -> 1.0; 102: "Brown." -> "brown", 2 of 10 agree -> 0.6
    assert question_accuracy("Brown.", ["brown", "brown"] + ["white"] * 8) == pytest.approx(0.6)
    assert metrics["overall"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    assert metrics["exact_match"] == pytest.approx(50.0)  # "brown" is not the most common answer
    assert metrics["per_answer_type"] == pytest.approx({"number": 100.0, "other": 60.0})
    assert metrics["per_question_type"] == pytest.approx({"how many": 100.0, "what color": 60.0})
    assert report["dataset"]["sha256"] == {str(q): sha256_file(q), str(a): sha256_file(a)}


def test_vqa_bad_annotations_file(cli, vqav2, tmp_path):
    q, _ = vqav2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"questions": []}))
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"question_id": 101, "answer": "2"}]))
    result = cli("eval", "vqa", "--questions", q, "--annotations", bad, "--predictions", preds)
    assert result.code == 1 and f"{bad}: missing key 'annotations'" in result.stderr


def test_vqa_model_on_vqav2_images_equals_its_saved_predictions(cli, vqav2, images, tmp_path, tiny_models):
    q, a = vqav2
    root = tmp_path / "val2014"
    root.mkdir()
    shutil.copy(images / "cat.jpg", root / "COCO_val2014_000000000001.jpg")
    shutil.copy(images / "coffee.jpg", root / "COCO_val2014_000000000002.jpg")
    saved = tmp_path / "answers.jsonl"
    common = ("eval", "vqa", "--questions", q, "--annotations", a, "--format", "json")
    fast = ("--num-beams", "1", "--max-new-tokens", "3")
    result = cli(
        *common, "--images", root, "--model", tiny_models["blip-vqa"], "--save-predictions", saved, *fast
    )
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["scored"] == 3 and report["decoding"]["num_beams"] == 1
    assert report["decoding"]["template"] is None  # BLIP VQA takes the bare question
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["101", "102", "103"]
    rescored = json.loads(cli(*common, "--predictions", saved).stdout)
    assert rescored["metrics"] == report["metrics"]


def test_vqa_manifest_with_model_matches_by_image_and_question(cli, images, tmp_path, tiny_models):
    manifest = tmp_path / "qa.tsv"
    manifest.write_text(
        f"{images / 'cat.jpg'}\twhat animal is this?\tcat|cat|a cat\n{images / 'rocket.jpg'}\twhat is launching?\trocket\n"
    )
    saved = tmp_path / "answers.jsonl"
    result = cli(
        "eval",
        "vqa",
        "--manifest",
        manifest,
        "--model",
        tiny_models["blip-vqa"],
        "--save-predictions",
        saved,
        "--num-beams",
        "1",
        "-f",
        "json",
    )
    assert result.code == 0, result.stderr
    assert "fewer than 10 human answers" in result.stderr
    # `blip vqa --format jsonl` style records ({"image", "question", "answer"}) match by image + question
    records = [
        {k: r[k] for k in ("image", "question", "answer")}
        for r in map(json.loads, saved.read_text().splitlines())
    ]
    plain = write_jsonl(tmp_path / "plain.jsonl", records)
    rescored = cli("eval", "vqa", "--manifest", manifest, "--predictions", plain, "-f", "json")
    assert json.loads(rescored.stdout)["metrics"] == json.loads(result.stdout)["metrics"]


def test_retrieval_cli_missing_image_and_out(cli, karpathy, images, tmp_path, tiny_models):
    root = tmp_path / "root"
    shutil.copytree(images, root)
    (root / "coffee.jpg").unlink()
    out = tmp_path / "retrieval.json"
    args = (
        "eval",
        "retrieval",
        karpathy,
        "--images",
        root,
        "--model",
        tiny_models["blip-itm"],
        "--k-test",
        "3",
    )
    result = cli(*args, "--out", out)
    assert result.code == 3, result.stderr
    assert "coffee.jpg" in result.stderr
    assert "# retrieval recall in %, 3 images x 6 texts (itm+itc, k_test 3" in result.stdout
    report = json.loads(out.read_text())
    assert report["scored"] == {"images": 3, "texts": 6} and report["protocol"]["k_test"] == 3
    assert set(report["metrics"]) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert cli(*args, "--allow-missing", "--out", out).code == 1  # exists, no --overwrite
    again = cli(*args, "--allow-missing", "--out", out, "--overwrite", "--score", "itc")
    assert again.code == 0 and json.loads(out.read_text())["protocol"]["itm_pairs"] == 0


def test_retrieval_unreadable_image_is_left_out_with_its_captions(
    cli, karpathy, images, tmp_path, tiny_models
):
    root = tmp_path / "root"
    shutil.copytree(images, root)
    (root / "cat.jpg").write_bytes(b"not an image")
    result = cli(
        "eval",
        "retrieval",
        karpathy,
        "--images",
        root,
        "--model",
        tiny_models["blip-itm"],
        "--k-test",
        "2",
        "-f",
        "json",
    )
    assert result.code == 3 and "1 failed: cat.jpg" in result.stderr
    report = json.loads(result.stdout)
    assert report["scored"] == {"images": 3, "texts": 6}
    assert (
        report["missing"]["items"][0]["item"] == "cat.jpg"
        and "not an image" in report["missing"]["items"][0]["reason"]
    )
    assert (report["protocol"]["k_i2t"], report["protocol"]["k_t2i"]) == (2, 2)


def test_default_k_test_by_dataset_name():
    from blip_toolkit.jobs.eval_retrieval import default_k_test

    assert default_k_test("data/flickr30k_test.json") == 128
    assert default_k_test("data/coco_karpathy_test.json") == 256
