"""Readers of annotation and prediction files: both caption shapes, VQAv2 and TSV, predictions in
JSON / JSONL / object form, and one clear line for each kind of bad input."""

from __future__ import annotations

import json

import pytest

from blip_toolkit.errors import InputError
from blip_toolkit.fsutil import sha256_file
from blip_toolkit.metrics.annotations import (
    ImageKeys,
    read_caption_annotations,
    read_predictions,
    read_vqa_annotations,
    read_vqa_manifest,
)


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_coco_and_karpathy_give_the_same_images(tmp_path):
    coco = write(
        tmp_path / "coco.json",
        {
            "images": [{"id": 7, "file_name": "val/a.jpg"}, {"id": 9, "file_name": "val/b.jpg"}],
            "annotations": [
                {"image_id": 9, "caption": "b one"},
                {"image_id": 7, "caption": "a one"},
                {"image_id": 7, "caption": "a two"},
            ],
        },
    )
    karpathy = write(
        tmp_path / "k.json",
        [{"image": "val/a.jpg", "caption": ["a one", "a two"]}, {"image": "val/b.jpg", "caption": "b one"}],
    )
    c, k = read_caption_annotations(coco), read_caption_annotations(karpathy)
    assert (c.format, k.format) == ("coco", "karpathy")
    assert [(im.file, im.captions) for im in c.images] == [(im.file, im.captions) for im in k.images]
    assert [im.id for im in c.images] == ["7", "9"] and [im.id for im in k.images] == [
        "val/a.jpg",
        "val/b.jpg",
    ]
    assert c.sha256 == sha256_file(coco) and c.num_captions == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ({"images": []}, "missing key 'annotations'"),
        ({"annotations": []}, "missing key 'images'"),
        ({"images": [{"file_name": "a.jpg"}], "annotations": []}, "images[0]: missing key 'id'"),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
            "annotations[0]: missing key 'caption'",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]},
            "annotations[0]: image_id 2 is not in 'images'",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []},
            "images[1]: duplicate image id 1 (first at images[0])",
        ),
        ([{"image": "a.jpg"}], "entry 0: missing key 'caption'"),
        ([{"caption": ["x"]}], "entry 0: missing key 'image'"),
        (
            [{"image": "a.jpg", "caption": ["x"]}, {"image": "a.jpg", "caption": ["y"]}],
            "entry 1: duplicate image 'a.jpg' (first at entry 0)",
        ),
        ("just a string", "expected a COCO caption object"),
    ],
)
def test_bad_caption_annotations_name_the_file_and_key(tmp_path, content, message):
    path = write(tmp_path / "ann.json", content)
    with pytest.raises(InputError) as info:
        read_caption_annotations(path)
    text = str(info.value)
    assert str(path) in text and message in text and "\n" not in text


def test_coco_ids_only_score_but_cannot_find_images(tmp_path):
    # LAVIS's coco_karpathy_test_gt.json: images carry an id and no file_name.
    path = write(
        tmp_path / "gt.json", {"images": [{"id": 5}], "annotations": [{"image_id": 5, "caption": "x"}]}
    )
    data = read_caption_annotations(path)
    assert data.references() == {"5": ["x"]} and ImageKeys(["5"], [""], None).find(5) == "5"
    with pytest.raises(InputError, match=r"gt\.json: 1 image\(s\) have no 'file_name' \(first: id 5\)"):
        data.require_files()


def test_not_json(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('{"images": [}')
    with pytest.raises(InputError, match=r"ann\.json: not valid JSON .* line 1"):
        read_caption_annotations(path)


def vqav2_files(tmp_path, n_answers=10):
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"question_id": 11, "image_id": 1, "question": "How many dogs?"},
            {"question_id": 12, "image_id": 2, "question": "What color?"},
        ],
    }
    annotations = {
        "annotations": [
            {
                "question_id": 11,
                "image_id": 1,
                "answer_type": "number",
                "question_type": "how many",
                "multiple_choice_answer": "2",
                "answers": [{"answer": "2", "answer_id": i + 1} for i in range(n_answers)],
            },
            {
                "question_id": 12,
                "image_id": 2,
                "answer_type": "other",
                "question_type": "what color",
                "multiple_choice_answer": "red",
                "answers": [{"answer": "red", "answer_id": i + 1} for i in range(n_answers)],
            },
        ]
    }
    return write(tmp_path / "q.json", questions), write(tmp_path / "a.json", annotations)


def test_vqav2_files_and_image_names(tmp_path):
    q, a = vqav2_files(tmp_path)
    data = read_vqa_annotations(q, a)
    assert [item.question_id for item in data.items] == ["11", "12"]
    # the official COCO naming: 'COCO_' + data_subtype + '_' + zero-padded 12-digit id + '.jpg'
    assert data.items[0].image == "COCO_val2014_000000000001.jpg"
    assert data.items[0].answers == ("2",) * 10 and data.items[0].answer_type == "number"
    assert read_vqa_annotations(q, a, image_pattern="img{image_id}.png").items[1].image == "img2.png"


def test_vqav2_bad_shapes(tmp_path):
    q, a = vqav2_files(tmp_path)
    bad = write(tmp_path / "bad.json", {"info": {}})
    with pytest.raises(InputError, match=r"bad\.json: missing key 'annotations'"):
        read_vqa_annotations(q, bad)
    broken = json.loads(a.read_text())
    del broken["annotations"][1]["answers"][3]["answer"]
    write(a, broken)
    with pytest.raises(InputError, match=r"a\.json: annotations\[1\]\.answers\[3\]: missing key 'answer'"):
        read_vqa_annotations(q, a)
    broken = json.loads(q.read_text())
    broken["questions"][1]["question_id"] = 11
    write(q, broken)
    with pytest.raises(InputError, match=r"questions\[1\]: duplicate question_id 11"):
        read_vqa_annotations(q, a)


def test_vqa_manifest_answers_split_on_bars(tmp_path):
    path = tmp_path / "qa.tsv"
    path.write_text("# image<TAB>question<TAB>answers\nimgs/a.jpg\twhat is it?\tcat|a cat| cat \n")
    data = read_vqa_manifest(path)
    (item,) = data.items
    assert item.answers == ("cat", "a cat", "cat") and item.question_id == "2"
    assert item.image == str(tmp_path / "imgs" / "a.jpg")  # relative to the manifest's folder


def test_predictions_jsonl_json_and_object_forms(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"image": "a.jpg", "caption": "x"}\n\n{"image": "b.jpg", "error": "b.jpg: corrupt"}\n')
    preds = read_predictions(jsonl, "caption", id_key="image")
    assert [p.record["image"] for p in preds.records] == ["a.jpg"] and preds.records[0].line == 1
    assert [p.line for p in preds.failed] == [3]
    listed = write(tmp_path / "p.json", [{"image_id": 1, "caption": "x"}])
    assert read_predictions(listed, "caption", id_key="image").records[0].record == {
        "image_id": 1,
        "caption": "x",
    }
    mapping = write(tmp_path / "m.json", {"101": "yes", "102": "2"})
    records = [p.record for p in read_predictions(mapping, "answer", id_key="question_id").records]
    assert records == [{"question_id": "101", "answer": "yes"}, {"question_id": "102", "answer": "2"}]


def test_bad_predictions_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg"}\n')
    with pytest.raises(InputError, match=r"p\.jsonl:2: missing key 'caption'"):
        read_predictions(path, "caption", id_key="image")
    path.write_text('{"image": "a.jpg", "caption": "x"}\nnot json\n')
    with pytest.raises(InputError, match=r"p\.jsonl:2: not valid JSON"):
        read_predictions(path, "caption", id_key="image")


def test_image_keys_find_ids_files_paths_and_unique_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keys = ImageKeys(["7", "9", "10"], ["val/a.jpg", "val/b.jpg", "test/b.jpg"], "root")
    assert keys.find(7) == "7"  # COCO results format: the image id
    assert keys.find("val/a.jpg") == "7"  # as written in the annotation
    assert keys.find(str(tmp_path / "root" / "val" / "a.jpg")) == "7"  # absolute path under the root
    assert keys.find("root/val/../val/a.jpg") == "7"  # relative to the current directory
    assert keys.find("/elsewhere/a.jpg") == "7"  # unique file name
    assert keys.find("/elsewhere/b.jpg") is None  # b.jpg is ambiguous
    assert keys.find("c.jpg") is None
