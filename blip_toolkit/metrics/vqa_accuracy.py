"""The official VQA accuracy (VQAv2), ported from the official evaluation script.

Source: GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (class `VQAEval`, the
Python 3 version; LAVIS ships the same file as `lavis/common/vqa_tools/vqa_eval.py`). No maintained
PyPI package provides this metric on its own (LAVIS and lmms-eval carry copies inside large
frameworks with pinned, conflicting dependencies), and the logic is ~60 lines, so it is ported here
statement by statement, quirks included:

- The **prediction** is cleaned: newlines and tabs become spaces, it is stripped, then
  `process_punctuation` and `process_digit_article` run (lower-casing, number words "none".."ten" to
  digits, articles a/an/the dropped, missing apostrophes added to contractions).
- The **human answers** are compared as written in the annotation file (VQAv2's are already
  normalised), except that `process_punctuation` is applied to them when the humans disagree
  (more than one distinct answer). They are never lower-cased or digit/article-processed.
- `process_punctuation` removes a punctuation mark outright when the answer contains it next to a
  space, or contains a comma between digits anywhere; otherwise it replaces the mark by a space. The
  period regex `(?!<=\\d)(\\.)(?!\\d)` is the official one: `(?!<=\\d)` is a look-ahead (a typo for a
  look-behind), so every period not followed by a digit is removed. `re.UNICODE` is passed where
  `sub` expects its `count`, which limits the removal to the first 32 periods; kept.
- Contraction keys with capitals ("Im", "Ive") can never match the lower-cased words; kept.
- Accuracy of one question = mean over the leave-one-out subsets of the human answers (10 in VQAv2)
  of min(#answers in the subset equal to the prediction / 3, 1). The official code leaves out every
  answer *dict* equal to the current one; VQAv2's answers carry distinct `answer_id`s, so that is
  exactly one answer, which is what this port leaves out (by position).
- Overall, per answer type and per question type: the mean of the per-question accuracies
  (the Python 3 script; an older Python 2 version averaged the last subset's value per type).

The official script reports `round(100 * mean, 2)`; we keep full precision (x100) and round only
for display. Exact match (the normalised prediction equals the normalised most common human answer)
is reported beside it; it is a different, lower number.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# --- tables of the official script (vqaEval.py, VQAEval.__init__) -------------------------------------

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCTUATION = (
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official call is `periodStrip.sub("", outText, re.UNICODE)`: the flag lands in `count`.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """VQAEval.processPunctuation."""
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """VQAEval.processDigitArticle."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_prediction(answer: str) -> str:
    """What the official script does to a model's answer before comparing it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def reference_answers(answers: Sequence[str]) -> list[str]:
    """The human answers as the official script compares them: punctuation-processed only when the
    humans disagree."""
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return list(answers)


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy of one prediction against the human answers, in [0, 1].

    With m of the n answers equal to the (normalised) prediction this is
    (m * min((m - 1) / 3, 1) + (n - m) * min(m / 3, 1)) / n; for n = 10: m = 0 -> 0, 1 -> 0.3,
    2 -> 0.6, 3 -> 0.9, 4 or more -> 1."""
    if not answers:
        raise ValueError("a question needs at least one human answer")
    predicted = normalize_prediction(prediction)
    refs = reference_answers(answers)
    total = 0.0
    for left_out in range(len(refs)):
        matching = sum(1 for j, ref in enumerate(refs) if j != left_out and ref == predicted)
        total += min(1.0, matching / 3)
    return total / len(refs)


def most_common_answer(answers: Sequence[str]) -> str:
    """The most frequent human answer (first given wins a tie), VQAv2's `multiple_choice_answer`."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def exact_match(prediction: str, target: str) -> bool:
    """Prediction and target equal after the official answer normalisation (both sides)."""
    return normalize_prediction(prediction) == normalize_prediction(target)


@dataclass(frozen=True)
class ScoredQuestion:
    """The inputs of one question's score."""

    question_id: str
    prediction: str
    answers: tuple[str, ...]
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None  # None: the most common of `answers`


def vqa_accuracy(questions: Iterable[ScoredQuestion]) -> dict:
    """Official VQA accuracy over `questions`, x100 (unrounded), with the per-type breakdowns.

    Returns {"overall", "exact_match", "per_answer_type": {type: acc}, "per_question_type": {...},
    "num_questions", "per_question": {question_id: acc}}; the per-type dicts hold only the types
    that were given."""
    per_question: dict[str, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    exact = 0
    for q in questions:
        acc = question_accuracy(q.prediction, q.answers)
        per_question[q.question_id] = acc
        if q.answer_type is not None:
            by_answer_type[q.answer_type].append(acc)
        if q.question_type is not None:
            by_question_type[q.question_type].append(acc)
        target = (
            q.multiple_choice_answer
            if q.multiple_choice_answer is not None
            else most_common_answer(q.answers)
        )
        exact += exact_match(q.prediction, target)
    if not per_question:
        raise ValueError("no questions to score")
    n = len(per_question)
    return {
        "overall": 100.0 * sum(per_question.values()) / n,
        "exact_match": 100.0 * exact / n,
        "per_answer_type": _means(by_answer_type),
        "per_question_type": _means(by_question_type),
        "num_questions": n,
        "per_question": {qid: 100.0 * acc for qid, acc in per_question.items()},
    }


def _means(groups: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: 100.0 * sum(values) / len(values) for name, values in sorted(groups.items())}
