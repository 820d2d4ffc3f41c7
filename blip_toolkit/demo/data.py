"""The demo dataset: pairs of UCI handwritten digits side by side (left, right), with captions, questions
and retrieval texts that need both digits and their order.

The digits (data/digits/digits.csv.gz, 1,797 images of 8x8 pixels, values 0..16) are split once,
stratified by class, into train / val / test digit images; a pair of a split is composed only from
digit images of that split, so no test digit image is ever seen in training. Each pair becomes one
32x32 greyscale PNG: each digit upscaled to 16x16, the left one in columns 0-15, the right one in
16-31, rows 8-23.

For every pair the demo writes the training manifests and, for val and test, the evaluation files in
the standard formats `blip eval` reads: COCO caption annotations (several references per image), VQAv2
questions + annotations (ten answers per question), and a Karpathy-style retrieval file.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from blip_toolkit.data.manifests import write_manifest
from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import write_json

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DATA_FILE = Path(__file__).resolve().parents[2] / "data" / "digits" / "digits.csv.gz"
IMAGE_SIZE = 32
IMAGE_PATTERN = "pair-{image_id:05d}.png"  # file name of a pair image from its id (VQAv2 style)

# Question types: the question, its VQAv2 answer type, and the answer for (left, right).
QUESTIONS = {
    "left digit": ("what is the left digit?", "other"),
    "right digit": ("what is the right digit?", "other"),
    "sum": ("what is the sum of the two digits?", "number"),
    "same": ("are the two digits the same?", "yes/no"),
    "larger": ("which digit is larger?", "other"),
}


def article(word: str) -> str:
    """The article before a digit word: "an eight", "a one" (by sound, not spelling)."""
    return "an" if word == "eight" else "a"


def answer(question_type: str, left: int, right: int) -> str:
    # Numbers as digits: VQAv2's answers are stored so, and the official metric turns a predicted
    # "three" into "3" but leaves a unanimous human "three" as it is (it would never match).
    if question_type == "left digit":
        return str(left)
    if question_type == "right digit":
        return str(right)
    if question_type == "sum":
        return str(left + right)
    if question_type == "same":
        return "yes" if left == right else "no"
    return "left" if left > right else "right" if right > left else "neither"


def references(left: int, right: int) -> list[str]:
    """Five reference captions of a pair; the first is the canonical one (the retrieval text)."""
    a, b = DIGIT_WORDS[left], DIGIT_WORDS[right]
    return [
        f"the digits {a} and {b}",
        f"{article(a)} {a} and {article(b)} {b}",
        f"a handwritten {a} next to {article(b)} {b}",
        f"{article(a)} {a} on the left and {article(b)} {b} on the right",
        f"{article(a)} {a} followed by {article(b)} {b}",
    ]


def canonical_caption(left: int, right: int) -> str:
    return references(left, right)[0]


CANONICAL_CAPTIONS = tuple(canonical_caption(left, right) for left in range(10) for right in range(10))
# Every word the demo's tokenizers must spell (the tiny WordPiece vocabulary is built from it).
CORPUS = [
    *(c for left in range(10) for right in range(10) for c in references(left, right)),
    *(q for q, _ in QUESTIONS.values()),
    *DIGIT_WORDS,
    *(str(n) for n in range(19)),
    "yes",
    "no",
    "left",
    "right",
    "neither",
]


def digits_in(text: str) -> list[int]:
    """The digit words of a caption, in order ("a three and a seven" -> [3, 7])."""
    return [DIGIT_WORDS.index(w) for w in text.lower().replace(",", " ").split() if w in DIGIT_WORDS]


def load_digits(path: Path = DATA_FILE):
    """Return (images uint8 [n, 8, 8] with values 0..16, labels int64 [n])."""
    if not path.is_file():
        raise InputError(
            f"{path}: the bundled digits data is missing (it ships in the repository's data/ folder)"
        )
    with gzip.open(path, "rt", encoding="ascii") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :64].reshape(-1, 8, 8).astype(np.uint8), table[:, 64]


def stratified_split(labels, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, list[int]]:
    """Per class, shuffle with `seed` and cut into train / val / test by `fractions`."""
    rng = np.random.RandomState(seed)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in sorted(set(int(x) for x in labels)):
        members = np.flatnonzero(np.asarray(labels) == label)
        rng.shuffle(members)
        n_train = int(round(len(members) * fractions[0]))
        n_val = int(round(len(members) * fractions[1]))
        splits["train"] += members[:n_train].tolist()
        splits["val"] += members[n_train : n_train + n_val].tolist()
        splits["test"] += members[n_train + n_val :].tolist()
    return splits


@dataclass(frozen=True)
class Pair:
    """One pair image: its id, file and the digit images (dataset indices) and labels it shows."""

    id: int
    file: str  # relative to the dataset root
    left_digit: int
    right_digit: int
    left: int  # label
    right: int


@dataclass
class DemoData:
    """Where the demo's files are. `manifests[task][split]` is a TSV path; `eval_files[split]` the
    evaluation inputs (captions, vqa_questions, vqa_annotations, retrieval) of val and test."""

    root: Path
    pairs: dict[str, list[Pair]]
    digit_splits: dict[str, list[int]]
    manifests: dict[str, dict[str, Path]] = field(default_factory=dict)
    eval_files: dict[str, dict[str, Path]] = field(default_factory=dict)

    def images(self, split: str) -> list[Path]:
        return [self.root / p.file for p in self.pairs[split]]


def compose(pixels: np.ndarray, left: int, right: int) -> Image.Image:
    """The 32x32 greyscale image of digit images `left` and `right` (dataset indices) side by side."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    half = IMAGE_SIZE // 2
    for column, index in ((0, left), (half, right)):
        grey = (pixels[index].astype(np.float32) * (255.0 / 16.0)).round().astype(np.uint8)
        digit = Image.fromarray(grey, mode="L").resize((half, half), Image.BILINEAR)
        canvas.paste(digit, (column, IMAGE_SIZE // 4))
    return canvas


def make_pairs(
    digit_split: list[int], labels: np.ndarray, count: int, *, seed: int, first_id: int, same: float = 0.3
) -> list[tuple[int, int, int]]:
    """`count` random (id, left digit, right digit) of one split, seeded. A fraction `same` shows one
    class twice (otherwise "are the two digits the same?" would be "no" nine times in ten)."""
    rng = np.random.default_rng(seed)
    by_class = {c: [i for i in digit_split if labels[i] == c] for c in range(10)}
    pairs = []
    for k in range(count):
        left = int(rng.choice(digit_split))
        if rng.random() < same:
            candidates = [i for i in by_class[int(labels[left])] if i != left] or [left]
            right = int(rng.choice(candidates))
        else:
            right = int(rng.choice(digit_split))
        pairs.append((first_id + k, left, right))
    return pairs


def balanced_pairs(
    digit_split: list[int],
    labels: np.ndarray,
    per_combo: int,
    *,
    seed: int,
    first_id: int,
    same_weight: int = 5,
) -> list[tuple[int, int, int]]:
    """`per_combo` pairs of every ordered class combination (left, right), `same_weight` times as many
    of the ten where both are the same class, each drawn from the split's digit images of those
    classes: every one of the 100 canonical captions is some test image's, and yes / no is balanced
    enough to mean something."""
    rng = np.random.default_rng(seed)
    by_class = {c: [i for i in digit_split if labels[i] == c] for c in range(10)}
    pairs = []
    for left_class in range(10):
        for right_class in range(10):
            repeats = per_combo * (same_weight if left_class == right_class else 1)
            for _ in range(repeats):
                left = int(rng.choice(by_class[left_class]))
                right = int(
                    rng.choice([i for i in by_class[right_class] if i != left] or by_class[right_class])
                )
                pairs.append((first_id + len(pairs), left, right))
    order = rng.permutation(len(pairs))
    return [(first_id + k, pairs[j][1], pairs[j][2]) for k, j in enumerate(order)]


def write_dataset(root: str | Path, *, train: int, val: int, test_per_combo: int, seed: int = 0) -> DemoData:
    """Compose `train` and `val` random pairs and `test_per_combo` test pairs of every class
    combination (`balanced_pairs`) into `root/images`, and write the manifests and the evaluation
    files (see the module docstring)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    pixels, labels = load_digits()
    digit_splits = stratified_split(labels, seed=seed)
    data = DemoData(root=root, pairs={}, digit_splits=digit_splits)
    drawn = {
        "train": make_pairs(digit_splits["train"], labels, train, seed=seed * 100, first_id=0),
        "val": make_pairs(digit_splits["val"], labels, val, seed=seed * 100 + 1, first_id=train),
        "test": balanced_pairs(
            digit_splits["test"], labels, test_per_combo, seed=seed * 100 + 2, first_id=train + val
        ),
    }
    for split, triples in drawn.items():
        pairs = []
        for pair_id, left, right in triples:
            file = f"images/{IMAGE_PATTERN.format(image_id=pair_id)}"
            compose(pixels, left, right).save(root / file)
            pairs.append(Pair(pair_id, file, left, right, int(labels[left]), int(labels[right])))
        data.pairs[split] = pairs
    rng = np.random.default_rng(seed)
    for split, pairs in data.pairs.items():
        data.manifests[split] = _write_manifests(root, split, pairs, rng)
        if split != "train":
            data.eval_files[split] = _write_eval_files(root, split, pairs)
    return data


def _write_manifests(root: Path, split: str, pairs: list[Pair], rng) -> dict[str, Path]:
    """caption (image, one reference drawn per pair), vqa (image, question, answer: every question
    type), retrieval (image, canonical caption)."""
    caption = [(p.file, references(p.left, p.right)[int(rng.integers(5))]) for p in pairs]
    vqa = [
        (p.file, question, answer(kind, p.left, p.right))
        for p in pairs
        for kind, (question, _) in QUESTIONS.items()
    ]
    retrieval = [(p.file, canonical_caption(p.left, p.right)) for p in pairs]
    paths = {}
    for task, rows in (("caption", caption), ("vqa", vqa), ("retrieval", retrieval)):
        paths[task] = root / f"{task}-{split}.tsv"
        write_manifest(paths[task], rows)
    return paths


def _write_eval_files(root: Path, split: str, pairs: list[Pair]) -> dict[str, Path]:
    """COCO caption annotations, VQAv2 questions + annotations, Karpathy-style retrieval file."""
    files = {
        "captions": root / f"captions_{split}.json",
        "vqa_questions": root / f"vqa_{split}_questions.json",
        "vqa_annotations": root / f"vqa_{split}_annotations.json",
        "retrieval": root / f"retrieval_{split}.json",
    }
    write_json(
        files["captions"],
        {
            "images": [{"id": p.id, "file_name": Path(p.file).name} for p in pairs],
            "annotations": [
                {"id": p.id * 10 + k, "image_id": p.id, "caption": c}
                for p in pairs
                for k, c in enumerate(references(p.left, p.right))
            ],
        },
    )
    questions, annotations = [], []
    for p in pairs:
        for k, (kind, (question, answer_type)) in enumerate(QUESTIONS.items()):
            question_id = p.id * 10 + k
            text = answer(kind, p.left, p.right)
            questions.append({"image_id": p.id, "question": question, "question_id": question_id})
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": p.id,
                    "question_type": kind,
                    "answer_type": answer_type,
                    "multiple_choice_answer": text,
                    # ten annotators who all agree: a right answer scores min(10 / 3, 1) = 1
                    "answers": [
                        {"answer": text, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)
                    ],
                }
            )
    write_json(
        files["vqa_questions"], {"task_type": "Open-Ended", "data_subtype": split, "questions": questions}
    )
    write_json(files["vqa_annotations"], {"data_subtype": split, "annotations": annotations})
    write_json(
        files["retrieval"],
        [{"image": Path(p.file).name, "caption": [canonical_caption(p.left, p.right)]} for p in pairs],
    )
    return files


def label_of(data: DemoData, split: str) -> list[tuple[int, int]]:
    return [(p.left, p.right) for p in data.pairs[split]]


def load_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))
