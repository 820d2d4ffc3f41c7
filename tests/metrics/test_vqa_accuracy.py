"""The official VQA accuracy, on cases whose official score is derived by hand from the official
script (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py).

Closed form used below: with n human answers of which m equal the normalised prediction, the mean
over the n leave-one-out subsets of min(#matching in the subset / 3, 1) is
    (m * min((m - 1) / 3, 1) + (n - m) * min(m / 3, 1)) / n
(leaving out a matching answer leaves m - 1 matches; leaving out another leaves m).
"""

from __future__ import annotations

import pytest

from blip_toolkit.metrics.vqa_accuracy import (
    ScoredQuestion,
    exact_match,
    normalize_prediction,
    process_punctuation,
    question_accuracy,
    vqa_accuracy,
)


def closed_form(m: int, n: int = 10) -> float:
    return (m * min((m - 1) / 3, 1) + (n - m) * min(m / 3, 1)) / n


def test_number_word_prediction_matches_digit_answers():
    # "two" -> processDigitArticle maps it to "2"; all 10 humans said "2": every subset has 9 matches.
    assert question_accuracy("two", ["2"] * 10) == 1.0
    assert question_accuracy("Two.", ["2"] * 10) == 1.0  # lower-cased, trailing period stripped


def test_digit_prediction_against_unnormalised_word_answers_is_zero():
    # The official script never digit-normalises the human answers (VQAv2's are already digits), and
    # with unanimous answers it does not even touch their punctuation: "2" != "two".
    assert question_accuracy("2", ["two"] * 10) == 0.0


def test_article_dropped_from_prediction():
    # "the dog" -> "dog" (articles a / an / the are removed).
    assert normalize_prediction("the dog") == "dog"
    assert question_accuracy("the dog", ["dog"] * 10) == 1.0
    assert question_accuracy("a dog", ["dog"] * 10) == 1.0


def test_trailing_period_and_case():
    # "yes." -> periodStrip removes a period not followed by a digit -> "yes".
    assert normalize_prediction("yes.") == "yes"
    assert question_accuracy("yes.", ["yes"] * 10) == 1.0
    assert question_accuracy("Yes.\n", ["yes"] * 10) == 1.0  # newline -> space, stripped


def test_two_of_ten_humans_agree():
    # m = 2, n = 10: leaving out one of the 2 "red" (2 subsets) leaves 1 match -> 1/3; leaving out a
    # "blue" (8 subsets) leaves 2 matches -> 2/3. (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6.
    answers = ["red", "red"] + ["blue"] * 8
    assert question_accuracy("red", answers) == pytest.approx(0.6, abs=1e-15)
    assert closed_form(2) == pytest.approx(0.6, abs=1e-15)


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_accuracy_by_number_of_agreeing_humans(m, expected):
    # closed form: m=1: 9 * (1/3) / 10 = 0.3; m=3: (3 * 2/3 + 7 * 1) / 10 = 0.9; m>=4: every subset >= 3.
    answers = ["cat"] * m + [f"other{i}" for i in range(10 - m)]
    assert question_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
    assert closed_form(m) == pytest.approx(expected, abs=1e-12)


def test_human_answers_get_punctuation_processing_only_when_they_disagree():
    # Disagreeing humans: processPunctuation runs on every answer, "yes." -> "yes": 10 matches.
    assert question_accuracy("yes", ["yes."] + ["yes"] * 9) == 1.0
    # Unanimous "yes.": left as written, so the normalised prediction "yes" matches none of them.
    assert question_accuracy("yes", ["yes."] * 10) == 0.0


def test_punctuation_rules():
    # "-" not next to a space (and no comma between digits): replaced by a space.
    assert normalize_prediction("hot-dog") == "hot dog"
    # A comma between digits anywhere: every listed mark is removed outright ("1,000" -> "1000").
    assert process_punctuation("1,000") == "1000"
    assert question_accuracy("1,000", ["1000"] * 10) == 1.0
    # A decimal point is kept (the period regex spares a period followed by a digit).
    assert normalize_prediction("3.5") == "3.5"
    # A mark next to a space is removed, not replaced: "what ?" keeps no trailing space.
    assert process_punctuation("what ?") == "what "
    # Apostrophes and colons are not in the official list.
    assert normalize_prediction("10:30") == "10:30"


def test_contractions_get_their_apostrophe():
    assert normalize_prediction("dont") == "don't"
    assert question_accuracy("dont", ["don't"] * 10) == 1.0
    # Capitalised keys of the official table ("Im") never match: words are lower-cased first.
    assert normalize_prediction("Im") == "im"


def test_overall_and_per_type_means_and_exact_match():
    questions = [
        # accuracy 1.0, exact match (prediction "two" normalises to the answer "2")
        ScoredQuestion("1", "two", ("2",) * 10, "number", "how many", "2"),
        # accuracy 0.6 (2 of 10), NOT an exact match: the most common answer is "blue"
        ScoredQuestion("2", "red", ("red", "red") + ("blue",) * 8, "other", "what color", "blue"),
        # accuracy 0.0
        ScoredQuestion("3", "no", ("yes",) * 10, "yes/no", "is the", "yes"),
        # accuracy 0.3 (1 of 10); no multiple_choice_answer given: the most common answer is "dog"
        ScoredQuestion("4", "cat", ("cat",) + ("dog",) * 9, "other", "what animal"),
    ]
    result = vqa_accuracy(questions)
    assert result["overall"] == pytest.approx(100 * (1.0 + 0.6 + 0.0 + 0.3) / 4)  # 47.5
    assert result["exact_match"] == pytest.approx(100 * 1 / 4)
    assert result["per_answer_type"] == pytest.approx({"number": 100.0, "other": 45.0, "yes/no": 0.0})
    assert result["per_question_type"] == pytest.approx(
        {"how many": 100.0, "what color": 60.0, "is the": 0.0, "what animal": 30.0}
    )
    assert result["per_question"] == pytest.approx({"1": 100.0, "2": 60.0, "3": 0.0, "4": 30.0})
    assert result["num_questions"] == 4


def test_exact_match_normalises_both_sides():
    assert exact_match("Two", "2")
    assert exact_match("the dog.", "dog")
    assert not exact_match("dogs", "dog")


def test_no_answers_is_an_error():
    with pytest.raises(ValueError):
        question_accuracy("x", [])
