"""Caption metrics against pycocoevalcap's own `COCOEvalCap`, called directly with pycocotools
`COCO` objects built from the same files (what LAVIS's `coco_caption_eval` does).

METEOR loads a 60 MB paraphrase table into a fresh JVM (15-30 s on these machines), so the scoring
runs once per module, ours and the reference in two threads at the same time, and both use one
METEOR process (pycocoevalcap's `Meteor` object is thread-safe: it holds a lock per call). Each
side still does everything else itself: its own PTB tokenizer runs, BLEU, ROUGE-L and CIDEr.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from blip_toolkit.metrics.caption_metrics import (
    JavaMissingError,
    require_java,
    score_captions,
    simple_tokenize,
    spice_missing_reason,
)

# Ordinary COCO-style captions with capitals, punctuation and contractions (the tokenizer's job).
REFERENCES = {
    1: [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave!",
        "a man surfing in the ocean",
    ],
    2: ["Two dogs don't like the cat's toy.", "Two dogs playing with a toy", "dogs in a yard, playing"],
    3: ["A black-and-white photo of an old TV.", "An old television set.", "a vintage tv on a table"],
    4: ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a plate", "a healthy meal"],
    5: ["A red double-decker bus on the street.", "A bus driving down a city street.", "the bus is red"],
}
PREDICTIONS = {
    1: "A man riding a wave on a surfboard.",
    2: "Two dogs playing with a toy.",
    3: "An old TV on a table",
    4: "A plate of food with rice and broccoli.",
    5: "A red bus driving down the street.",
}


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    annotations = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in REFERENCES], "annotations": []}
    for image_id, captions in REFERENCES.items():
        for caption in captions:
            annotations["annotations"].append(
                {"id": len(annotations["annotations"]) + 1, "image_id": image_id, "caption": caption}
            )
    ann_file = root / "captions_test.json"
    ann_file.write_text(json.dumps(annotations))
    res_file = root / "results.json"
    res_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()]))
    return ann_file, res_file


def _reference_cocoevalcap(ann_file, res_file):
    """COCOEvalCap.evaluate() as LAVIS calls it. Its SPICE step would download Stanford CoreNLP
    (no network here), so only that scorer is swapped for one that scores nothing."""
    import pycocoevalcap.eval as coco_eval_module
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return float("nan"), [float("nan")] * len(gts)

        def method(self):
            return "SPICE (not available offline)"

    coco = COCO(str(ann_file))
    coco_result = coco.loadRes(str(res_file))
    evaluator = COCOEvalCap(coco, coco_result)
    original = coco_eval_module.Spice
    coco_eval_module.Spice = NoSpice
    try:
        evaluator.evaluate()
    finally:
        coco_eval_module.Spice = original
    return evaluator


def _ptb(captions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})


@pytest.fixture(scope="module")
def scored(coco_files):
    """(our scores, COCOEvalCap's evaluator, PTB tokenizations of every caption), in parallel."""
    import pycocoevalcap.eval as coco_eval_module
    import pycocoevalcap.meteor.meteor as meteor_module

    ann_file, res_file = coco_files
    references = {str(i): caps for i, caps in REFERENCES.items()}
    predictions = {str(i): c for i, c in PREDICTIONS.items()}
    every_caption = [c for caps in REFERENCES.values() for c in caps] + list(PREDICTIONS.values())
    meteor_class = meteor_module.Meteor
    shared = meteor_class()
    meteor_module.Meteor = coco_eval_module.Meteor = lambda: shared
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            ours = pool.submit(score_captions, references, predictions)
            reference = pool.submit(_reference_cocoevalcap, ann_file, res_file)
            ptb = pool.submit(_ptb, every_caption)
            return ours.result(), reference.result(), (every_caption, ptb.result())
    finally:
        meteor_module.Meteor = coco_eval_module.Meteor = meteor_class


def test_scores_equal_cocoevalcap(scored):
    ours, reference, _ = scored
    expected = {name: 100 * value for name, value in reference.eval.items() if name != "SPICE"}
    assert (
        set(ours.metrics)
        == set(expected)
        == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    )
    assert ours.metrics == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # and per image
    for image_id, per_image in reference.imgToEval.items():
        for name, value in per_image.items():
            if name in expected:
                assert ours.per_image[str(image_id)][name] == pytest.approx(100 * value, rel=1e-9, abs=1e-12)
    assert ours.comparable and ours.tokenizer == "ptb"
    assert 0 < ours.metrics["CIDEr"] and 0 < ours.metrics["Bleu_4"] < 100  # not a degenerate case


def test_spice_left_out_with_one_line_saying_why(scored):
    ours, _, _ = scored
    reason = spice_missing_reason()
    assert reason is not None and "network" in reason and "\n" not in reason
    assert reason in ours.notes and "SPICE" not in ours.metrics


def test_python_tokenizer_agrees_with_ptb_and_gives_the_same_scores(scored):
    ours, _, (captions, tokenized) = scored
    for i, caption in enumerate(captions):
        assert simple_tokenize(caption) == tokenized[i][0], caption
    # Same tokens -> BLEU, ROUGE-L and CIDEr are exactly the Java pipeline's; METEOR is missing.
    no_java = score_captions(
        {str(i): caps for i, caps in REFERENCES.items()},
        {str(i): c for i, c in PREDICTIONS.items()},
        java=False,
    )
    assert no_java.metrics == pytest.approx(
        {k: v for k, v in ours.metrics.items() if k != "METEOR"}, rel=1e-12
    )
    assert not no_java.comparable and "not comparable to published numbers" in no_java.notes[0]


def test_python_tokenizer_ptb_conventions():
    # PTB splits contractions ("do n't", "ca n't"), keeps hyphenated words, numbers and
    # abbreviations whole, drops the punctuation tokens pycocoevalcap lists, and leaves brackets as
    # -lrb- / -rrb- (lower-cased by -lowerCase, so not in that list).
    assert simple_tokenize("I can't, won't!") == "i ca n't wo n't"
    assert simple_tokenize("A black-and-white TV (old), 3.5 inch, at 10:30 a.m.") == (
        "a black-and-white tv -lrb- old -rrb- 3.5 inch at 10:30 a.m."
    )
    assert simple_tokenize('a "red" car') == "a red car"


def test_without_java_the_error_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on the PATH
    with pytest.raises(JavaMissingError, match="Java") as info:
        require_java()
    assert "--no-java" in str(info.value)
    # --no-java does not need it
    result = score_captions({"a": ["a cat on a mat"]}, {"a": "a cat on the mat"}, java=False)
    assert set(result.metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
