"""Readers of the evaluation inputs: caption / retrieval annotations, VQA questions and answers, and
prediction files, with every problem reported as one line naming the file and the key or line.

Caption and retrieval annotations (`read_caption_annotations`), two shapes, told apart by the top level:

- COCO caption format (an object): `{"images": [{"id", "file_name"}, ...], "annotations":
  [{"image_id", "caption"}, ...]}`, e.g. `captions_val2014.json` or LAVIS's
  `coco_karpathy_test_gt.json` (whose images have an `id` only: enough to score predictions, not to
  find the image files).
- Karpathy split format (a list), as LAVIS / BLIP ship it: `[{"image": "val2014/x.jpg", "caption":
  ["...", ...]}, ...]` (`caption` may be one string), e.g. `coco_karpathy_test.json`,
  `flickr30k_test.json`.

VQA (`read_vqa_annotations` / `read_vqa_manifest`): VQAv2 questions + annotations files, or a TSV
manifest `image<TAB>question<TAB>answer[|answer...]`.

Predictions (`read_predictions`): JSON (a list of records, or an object mapping an image / question
id to the text) or JSONL (one record per line), for example `blip caption --format jsonl` output
(`{"image", "caption"}`), `blip vqa --format jsonl` output (`{"image", "question", "answer"}`), the
COCO results format (`{"image_id", "caption"}`) or the VQA results format (`{"question_id",
"answer"}`). Records carrying an `"error"` (items a batch command could not process) count as missing.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip_toolkit.data.manifests import read_manifest
from blip_toolkit.errors import InputError, UsageError
from blip_toolkit.fsutil import sha256_file

logger = logging.getLogger("blip")

MAX_LISTED = 20  # items listed by name in messages and reports


# ----------------------------------------------------------------------------- caption / retrieval


@dataclass(frozen=True)
class AnnotatedImage:
    """One image of a caption / retrieval set: its id (COCO `id`, or the Karpathy `image` path, as a
    string), its file as written in the annotation (relative to the image root; "" when a COCO file
    has no `file_name`) and its captions."""

    id: str
    file: str
    captions: tuple[str, ...]


@dataclass
class CaptionAnnotations:
    path: Path
    format: str  # "coco" | "karpathy"
    images: list[AnnotatedImage]
    sha256: str

    @property
    def num_captions(self) -> int:
        return sum(len(im.captions) for im in self.images)

    def require_files(self) -> None:
        """InputError unless every image has a file name (COCO files may carry ids only)."""
        without = [im.id for im in self.images if not im.file]
        if without:
            raise InputError(
                f"{self.path}: {len(without)} image(s) have no 'file_name' (first: id {without[0]}); "
                "finding the images needs it (use the Karpathy split file, which names them)"
            )

    def references(self) -> dict[str, list[str]]:
        return {im.id: list(im.captions) for im in self.images}

    def describe(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "format": self.format,
            "images": len(self.images),
            "captions": self.num_captions,
        }


def read_caption_annotations(path: str | os.PathLike) -> CaptionAnnotations:
    """Read a COCO caption file or a Karpathy split file (see the module docstring)."""
    path = Path(path)
    data = _load_json(path)
    if isinstance(data, dict):
        images = _coco_images(path, data)
        fmt = "coco"
    elif isinstance(data, list):
        images = _karpathy_images(path, data)
        fmt = "karpathy"
    else:
        raise InputError(
            f"{path}: expected a COCO caption object ({{'images', 'annotations'}}) or a Karpathy split list "
            f"([{{'image', 'caption'}}]), found a JSON {type(data).__name__}"
        )
    if not images:
        raise InputError(f"{path}: no images")
    return CaptionAnnotations(path=path, format=fmt, images=images, sha256=sha256_file(path))


def _coco_images(path: Path, data: dict) -> list[AnnotatedImage]:
    for key in ("images", "annotations"):
        if key not in data:
            raise InputError(
                f"{path}: missing key {key!r} (a COCO caption file has 'images' and 'annotations')"
            )
        if not isinstance(data[key], list):
            raise InputError(f"{path}: {key!r} must be a list, found {type(data[key]).__name__}")
    files: dict[str, str] = {}
    first_at: dict[str, int] = {}
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        _require(image, ("id",), where)
        image_id = _id(image["id"], f"{where}.id")
        if image_id in first_at:
            raise InputError(
                f"{where}: duplicate image id {image['id']!r} (first at images[{first_at[image_id]}])"
            )
        first_at[image_id] = i
        # LAVIS's coco_karpathy_test_gt.json has ids only: enough to score predictions, not to find images.
        files[image_id] = _text(image["file_name"], f"{where}.file_name") if "file_name" in image else ""
    captions: dict[str, list[str]] = {image_id: [] for image_id in files}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        _require(ann, ("image_id", "caption"), where)
        image_id = _id(ann["image_id"], f"{where}.image_id")
        if image_id not in captions:
            raise InputError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        captions[image_id].append(_text(ann["caption"], f"{where}.caption"))
    without = [image_id for image_id, caps in captions.items() if not caps]
    if without:
        raise InputError(
            f"{path}: {len(without)} image(s) have no caption in 'annotations' (first: id {without[0]})"
        )
    return [AnnotatedImage(image_id, files[image_id], tuple(captions[image_id])) for image_id in files]


def _karpathy_images(path: Path, data: list) -> list[AnnotatedImage]:
    images: list[AnnotatedImage] = []
    first_at: dict[str, int] = {}
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        _require(entry, ("image", "caption"), where)
        file = _text(entry["image"], f"{where}.image")
        if file in first_at:
            raise InputError(f"{where}: duplicate image {file!r} (first at entry {first_at[file]})")
        first_at[file] = i
        raw = entry["caption"]
        caps = [raw] if isinstance(raw, str) else raw
        if not isinstance(caps, list) or not caps:
            raise InputError(f"{where}.caption: expected a caption or a non-empty list of captions")
        images.append(AnnotatedImage(file, file, tuple(_text(c, f"{where}.caption") for c in caps)))
    return images


# ----------------------------------------------------------------------------- VQA


@dataclass(frozen=True)
class VqaItem:
    """One question with its human answers. `image` is the image file (relative to the image root
    for VQAv2 files, resolved for manifests) or None when no image pattern is known."""

    question_id: str
    image_id: str
    image: str | None
    question: str
    answers: tuple[str, ...]
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None


@dataclass
class VqaAnnotations:
    files: list[Path]
    format: str  # "vqav2" | "manifest"
    items: list[VqaItem]
    sha256: dict[str, str] = field(default_factory=dict)
    image_pattern: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "files": [str(p) for p in self.files],
            "sha256": self.sha256,
            "format": self.format,
            "questions": len(self.items),
            "image_pattern": self.image_pattern,
        }


def default_image_pattern(data_subtype: str | None) -> str | None:
    """The COCO file name of a VQAv2 image (the official vqaDemo.py's
    'COCO_' + dataSubType + '_' + str(imgId).zfill(12) + '.jpg'), or None without a subtype."""
    if not data_subtype:
        return None
    return f"COCO_{data_subtype}_{{image_id:012d}}.jpg"


def read_vqa_annotations(
    questions: str | os.PathLike, annotations: str | os.PathLike, *, image_pattern: str | None = None
) -> VqaAnnotations:
    """VQAv2 `..._questions.json` + `..._annotations.json`. `image_pattern` names an image file from
    `{image_id}` (format spec allowed, e.g. `COCO_val2014_{image_id:012d}.jpg`); by default the
    official COCO naming with the questions file's `data_subtype`."""
    q_path, a_path = Path(questions), Path(annotations)
    q_data = _load_json(q_path)
    a_data = _load_json(a_path)
    for data, path, key in ((q_data, q_path, "questions"), (a_data, a_path, "annotations")):
        if not isinstance(data, dict) or key not in data:
            raise InputError(f"{path}: missing key {key!r} (a VQAv2 {key} file has a top-level {key!r} list)")
        if not isinstance(data[key], list):
            raise InputError(f"{path}: {key!r} must be a list, found {type(data[key]).__name__}")
    pattern = image_pattern or default_image_pattern(q_data.get("data_subtype"))
    questions_by_id: dict[str, tuple[int, dict]] = {}
    for i, q in enumerate(q_data["questions"]):
        where = f"{q_path}: questions[{i}]"
        _require(q, ("question_id", "image_id", "question"), where)
        qid = _id(q["question_id"], f"{where}.question_id")
        if qid in questions_by_id:
            raise InputError(
                f"{where}: duplicate question_id {q['question_id']!r} (first at questions[{questions_by_id[qid][0]}])"
            )
        questions_by_id[qid] = (i, q)
    items: list[VqaItem] = []
    seen: dict[str, int] = {}
    for i, ann in enumerate(a_data["annotations"]):
        where = f"{a_path}: annotations[{i}]"
        _require(ann, ("question_id", "image_id", "answers"), where)
        qid = _id(ann["question_id"], f"{where}.question_id")
        if qid in seen:
            raise InputError(
                f"{where}: duplicate question_id {ann['question_id']!r} (first at annotations[{seen[qid]}])"
            )
        seen[qid] = i
        if qid not in questions_by_id:
            raise InputError(f"{where}: question_id {ann['question_id']!r} is not in {q_path}")
        q = questions_by_id[qid][1]
        if not isinstance(ann["answers"], list) or not ann["answers"]:
            raise InputError(f"{where}.answers: expected a non-empty list of {{'answer': ...}}")
        answers = []
        for j, a in enumerate(ann["answers"]):
            _require(a, ("answer",), f"{where}.answers[{j}]")
            answers.append(_text(a["answer"], f"{where}.answers[{j}].answer", allow_empty=True))
        image_id = _id(ann["image_id"], f"{where}.image_id")
        items.append(
            VqaItem(
                question_id=qid,
                image_id=image_id,
                image=_image_file(pattern, ann["image_id"], where) if pattern else None,
                question=_text(q["question"], f"{q_path}: questions[{questions_by_id[qid][0]}].question"),
                answers=tuple(answers),
                answer_type=_optional_text(ann.get("answer_type")),
                question_type=_optional_text(ann.get("question_type")),
                multiple_choice_answer=_optional_text(ann.get("multiple_choice_answer")),
            )
        )
    unanswered = [qid for qid in questions_by_id if qid not in seen]
    if unanswered:
        raise InputError(
            f"{q_path}: {len(unanswered)} question(s) have no annotation in {a_path} (first: question_id {unanswered[0]})"
        )
    if not items:
        raise InputError(f"{a_path}: no annotations")
    return VqaAnnotations(
        files=[q_path, a_path],
        format="vqav2",
        items=items,
        sha256={str(q_path): sha256_file(q_path), str(a_path): sha256_file(a_path)},
        image_pattern=pattern,
    )


def read_vqa_manifest(path: str | os.PathLike) -> VqaAnnotations:
    """TSV `image<TAB>question<TAB>answer[|answer...]` (docs/formats.md); the question id is the line
    number, images are resolved against the manifest's folder."""
    path = Path(path)
    manifest = read_manifest(path, "vqa", check_images=False)
    items = []
    for row in manifest.records():
        answers = tuple(a.strip() for a in row["answer"].split("|") if a.strip())
        if not answers:
            raise InputError(f"{path}:{row['line']}: no answer in the answer column")
        items.append(
            VqaItem(
                question_id=str(row["line"]),
                image_id=row["image"],
                image=row["image"],
                question=row["question"],
                answers=answers,
            )
        )
    return VqaAnnotations(files=[path], format="manifest", items=items, sha256={str(path): sha256_file(path)})


def _image_file(pattern: str, image_id: Any, where: str) -> str:
    try:
        return pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(
            f"--image-pattern {pattern!r} cannot name the image of {where} (image_id {image_id!r}): {exc}"
        ) from exc


# ----------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    """One record of a predictions file: where it is (`line`: JSONL line or JSON index, 1-based) and
    its fields."""

    line: int
    record: dict[str, Any]


@dataclass
class Predictions:
    path: Path
    records: list[Prediction]
    failed: list[Prediction]  # records with an "error"
    sha256: str


def read_predictions(path: str | os.PathLike, text_key: str, *, id_key: str) -> Predictions:
    """Read a predictions file. `text_key`: "caption" or "answer"; `id_key`: the key an object-form
    file maps from ("image" or "question_id")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such predictions file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start})") from exc
    raw: list[tuple[int, Any]]
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
        raw = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    else:
        if isinstance(whole, list):
            raw = list(enumerate(whole, start=1))
        elif isinstance(whole, dict) and not (text_key in whole or "error" in whole):
            raw = [(i, {id_key: k, text_key: v}) for i, (k, v) in enumerate(whole.items(), start=1)]
        else:  # a JSONL file with a single record
            raw = [(1, whole)]
    records, failed = [], []
    for number, record in raw:
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        if "error" in record:
            failed.append(Prediction(number, record))
            continue
        if text_key not in record:
            raise InputError(f"{path}:{number}: missing key {text_key!r}")
        if not isinstance(record[text_key], str):
            raise InputError(f"{path}:{number}: {text_key!r} must be a string")
        records.append(Prediction(number, record))
    if not records and not failed:
        raise InputError(f"{path}: no predictions")
    return Predictions(path=path, records=records, failed=failed, sha256=sha256_file(path))


class ImageKeys:
    """Find a dataset item from how a prediction names its image: the annotation's image id, the file
    as written in the annotation, the path (absolute, or relative to the current directory), or the
    file name alone when no other item has the same name."""

    def __init__(self, ids: Iterable[str], files: Iterable[str], root: str | None):
        self._by_key: dict[str, str] = {}
        pairs = list(zip(ids, files))
        names = Counter(os.path.basename(file) for _, file in pairs)
        for image_id, file in pairs:
            self._by_key.setdefault(image_id, image_id)
            if not file:
                continue
            self._by_key.setdefault(file, image_id)
            self._by_key.setdefault(_abs(os.path.join(root, file) if root else file), image_id)
            if names[os.path.basename(file)] == 1:
                self._by_key.setdefault(os.path.basename(file), image_id)

    def find(self, value: Any) -> str | None:
        if value is None:
            return None
        key = str(value)
        return self._by_key.get(key) or self._by_key.get(_abs(key)) or self._by_key.get(os.path.basename(key))


def _abs(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


# ----------------------------------------------------------------------------- helpers


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object, found {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise InputError(f"{where}: missing key {key!r}")


def _id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}: expected an integer or string id, found {type(value).__name__}")
    return str(value)


def _text(value: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a string, found {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(f"{where}: empty")
    return value


def _optional_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def listed(items: list[str]) -> str:
    """'a, b, c' for the first MAX_LISTED items, then '... and N more'."""
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")
