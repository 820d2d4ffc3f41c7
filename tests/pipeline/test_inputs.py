"""Data where users keep it, through the one pipeline: the same images as webdataset tars, a Parquet
file, a `datasets.save_to_disk` directory, and that Parquet file on a local S3 server (moto, behind a
fault-injecting proxy: tests/servers.py) give the same records, in input order, for captioning and
the same embeddings for extract-embeddings; a remote read cut half way leaves its unit for --resume;
--retry-failed replaces failed records in place; bad tables and buckets are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from blip_toolkit.embeddings.shard_reader import EmbeddingShards
from blip_toolkit.pipeline.outputs import read_output, run_directory
from tests.builders.wds import write_tar

from ..embeddings.conftest import CAPTIONS

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

GEN = ["--max-new-tokens", "5", "--batch-size", "2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def dataset(tmp_path, sample_images):
    """The 8 sample photos, keys 0000..0007, captions from CAPTIONS, as: three tars (3 + 3 + 2), one
    Parquet file (binary images, row groups of 3), one Parquet file with datasets' {bytes, path} image
    struct (written by `datasets`), and a save_to_disk directory."""
    datasets = pytest.importorskip("datasets")
    keys = [f"{i:04d}" for i in range(len(sample_images))]
    images = [p.read_bytes() for p in sample_images]
    captions = [CAPTIONS[p.name] for p in sample_images]
    tars, start = [], 0
    (tmp_path / "wds").mkdir()
    for number, size in enumerate((3, 3, 2)):
        samples = [
            {"__key__": keys[i], "jpg": images[i], "txt": "\n".join(captions[i])}
            for i in range(start, start + size)
        ]
        tars.append(write_tar(tmp_path / "wds" / f"part-{number:03d}.tar", samples))
        start += size
    table = pa.table({"key": keys, "image": pa.array(images, pa.binary()), "caption": captions})
    parquet = tmp_path / "photos.parquet"
    pq.write_table(table, parquet, row_group_size=3)
    hf = datasets.Dataset.from_dict(
        {"key": keys, "image": [{"bytes": b, "path": None} for b in images], "caption": captions}
    ).cast_column("image", datasets.Image(decode=False))
    hf_parquet = tmp_path / "hf.parquet"
    hf.to_parquet(str(hf_parquet))
    hf.save_to_disk(str(tmp_path / "hf-disk"))
    return {
        "tars": tars,
        "parquet": parquet,
        "hf_parquet": hf_parquet,
        "hf_disk": tmp_path / "hf-disk",
        "keys": keys,
        "images": sample_images,
    }


def _caption(cli, model, inputs, out, *extra):
    result = cli("caption", *inputs, "-m", model, *GEN, "--output", out, *extra)
    return result, (read_output(out) if not str(out).startswith("s3://") and Path(out).exists() else None)


def _key_caption(records):
    return [(r.get("key"), r.get("caption"), r.get("error")) for r in records]


def test_tars_parquet_hf_and_s3_give_the_same_captions(cli, tiny_models, dataset, s3, tmp_path):
    model = tiny_models["blip-caption"]
    result, from_tars = _caption(cli, model, dataset["tars"], tmp_path / "tars.jsonl")
    assert result.code == 0, result.stderr
    expected = _key_caption(from_tars)
    assert [k for k, _, _ in expected] == dataset["keys"] and all(c for _, c, _ in expected)

    for name, inputs in {
        "parquet": [dataset["parquet"]],
        "hf-struct": [dataset["hf_parquet"]],
        "save_to_disk": [dataset["hf_disk"]],
    }.items():
        result, records = _caption(cli, model, inputs, tmp_path / f"{name}.jsonl", "--key-column", "key")
        assert result.code == 0, (name, result.stderr)
        assert _key_caption(records) == expected, name

    bucket = s3.create_bucket()
    s3.upload(bucket, "data/photos.parquet", dataset["parquet"])
    url = f"s3://{bucket}/data/photos.parquet"
    result, records = _caption(cli, model, [url], tmp_path / "s3.parquet", "--key-column", "key")
    assert result.code == 0, result.stderr
    assert _key_caption(records) == expected
    assert {r["shard"] for r in records} == {"photos"}

    # The tars on S3 (a brace pattern), written to S3: the same records as the local tars.
    for tar in dataset["tars"]:
        s3.upload(bucket, f"wds/{tar.name}", tar)
    out = f"s3://{bucket}/out/captions.jsonl"
    result = cli("caption", f"s3://{bucket}/wds/part-{{000..002}}.tar", "-m", model, *GEN, "--output", out)
    assert result.code == 0, result.stderr
    assert [json.loads(line) for line in s3.get(bucket, "out/captions.jsonl").splitlines()] == from_tars


def test_vqa_questions_from_a_text_column_equal_a_manifest(cli, tiny_models, dataset, tmp_path):
    model = tiny_models["blip-vqa"]
    questions = [f"what is in picture {i}?" if i % 2 else "what color is it?" for i in range(8)]
    table = pq.read_table(dataset["parquet"]).append_column("question", pa.array(questions))
    pq.write_table(table, tmp_path / "q.parquet", row_group_size=3)
    manifest = tmp_path / "q.tsv"
    manifest.write_text("".join(f"{p}\t{q}\n" for p, q in zip(dataset["images"], questions)))
    by_manifest = cli("vqa", "--manifest", manifest, "-m", model, *GEN, "-f", "jsonl")
    by_table = cli(
        "vqa", tmp_path / "q.parquet", "--text-column", "question", "-m", model, *GEN, "-f", "jsonl"
    )
    assert by_manifest.code == 0 and by_table.code == 0, by_table.stderr
    expected = [(r["question"], r["answer"]) for r in map(json.loads, by_manifest.stdout.splitlines())]
    assert [(r["question"], r["answer"]) for r in map(json.loads, by_table.stdout.splitlines())] == expected


def _extract(cli, tiny_models, inputs, out, *extra):
    return cli(
        "extract-embeddings",
        *inputs,
        "--out",
        out,
        "--cond-encoder",
        tiny_models["blip2-opt"],
        "--target-encoder",
        tiny_models["clip"],
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--num-workers",
        "1",
        *extra,
    )


def _embeddings(out: Path, prefix: bool = True) -> dict:
    """The tensors, keys (without the shard prefix of tar / table keys) and captions of a run."""
    shards = EmbeddingShards(out)
    data = {name: shards.column(name).numpy() for name in ("cond", "target", "target_global")}
    data["text"] = shards.text_embeddings().text_emb.numpy()
    data["keys"] = [key.split("/", 1)[1] if prefix else key for key in shards.keys()]
    data["captions"] = [shards[i]["captions"] for i in range(len(shards))]
    return data


def test_extract_embeddings_from_tars_parquet_and_s3_are_equal(cli, tiny_models, dataset, s3, tmp_path):
    assert _extract(cli, tiny_models, dataset["tars"], tmp_path / "tars").code == 0
    expected = _embeddings(tmp_path / "tars")
    assert expected["keys"] == dataset["keys"]
    bucket = s3.create_bucket()
    s3.upload(bucket, "photos.parquet", dataset["parquet"])

    # A TSV manifest on S3 (image<TAB>caption, paths relative to it): the same embeddings in key order.
    rows = []
    for key, path in zip(dataset["keys"], dataset["images"]):
        s3.upload(bucket, f"photos/{key}.jpg", path)
        rows += [f"photos/{key}.jpg\t{caption}\n" for caption in CAPTIONS[path.name]]
    (tmp_path / "captions.tsv").write_text("".join(rows))
    s3.upload(bucket, "captions.tsv", tmp_path / "captions.tsv")
    assert _extract(cli, tiny_models, [f"s3://{bucket}/captions.tsv"], tmp_path / "tsv").code == 0
    from_tsv = _embeddings(tmp_path / "tsv", prefix=False)
    assert from_tsv["keys"] == [f"photos/{k}.jpg" for k in dataset["keys"]]
    for tensor in ("cond", "target", "target_global", "text"):
        np.testing.assert_array_equal(from_tsv[tensor], expected[tensor], err_msg=f"remote tsv: {tensor}")
    for name, source in {"parquet": str(dataset["parquet"]), "s3": f"s3://{bucket}/photos.parquet"}.items():
        result = _extract(
            cli, tiny_models, [source], tmp_path / name, "--key-column", "key", "--text-column", "caption"
        )
        assert result.code == 0, (name, result.stderr)
        got = _embeddings(tmp_path / name)
        assert got["keys"] == expected["keys"] and got["captions"] == expected["captions"], name
        for tensor in ("cond", "target", "target_global", "text"):
            np.testing.assert_array_equal(got[tensor], expected[tensor], err_msg=f"{name}: {tensor}")


def test_a_read_cut_half_way_is_left_for_resume(cli, tiny_models, dataset, s3, tmp_path):
    """The proxy resets every GET of one tar after 2 kB of its body (s3fs's own retries are cut too):
    the other tars are captioned, the run names the tar and exits 1 without writing the output; once
    the network is back, --resume reads only that tar and the output equals an uninterrupted run."""
    model = tiny_models["blip-caption"]
    bucket = s3.create_bucket()
    for tar in dataset["tars"]:
        s3.upload(bucket, f"wds/{tar.name}", tar)
    result, expected = _caption(cli, model, dataset["tars"], tmp_path / "local.jsonl")
    assert result.code == 0
    url = f"s3://{bucket}/wds/part-{{000..002}}.tar"
    out = tmp_path / "cut.jsonl"
    s3.proxy.cut("part-001.tar", after=2048)
    stopped = cli("caption", url, "-m", model, *GEN, "--output", out)
    s3.proxy.clear()
    assert s3.proxy.cut_count >= 1
    assert stopped.code == 1, stopped.stderr
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"s3://{bucket}/wds/part-001.tar" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in stopped.stderr and not out.exists()
    journal = read_output_journal(run_directory(out))
    assert {pos[0] for pos in journal} == {0, 2}  # the two other tars were done

    resumed = cli("caption", url, "-m", model, *GEN, "--output", out, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert "5 from earlier runs" in resumed.stderr
    assert read_output(out) == expected


def read_output_journal(run_dir: Path) -> list[tuple[int, int]]:
    from blip_toolkit.pipeline.journal import journal_records

    return [pos for pos, _ in journal_records(run_dir)]


def test_retry_failed_replaces_failed_records_in_place(cli, tiny_models, dataset, s3, tmp_path):
    """Images under an S3 prefix, one key denied for the first run: its record holds the error (exit
    3); after the key is allowed, --retry-failed reruns that item only and the file equals a run that
    never failed, byte for byte."""
    model = tiny_models["blip-caption"]
    bucket = s3.create_bucket()
    for path in dataset["images"]:
        s3.upload(bucket, f"photos/{path.name}", path)
    prefix = f"s3://{bucket}/photos/"
    clean = tmp_path / "clean.parquet"
    assert cli("caption", prefix, "-m", model, *GEN, "--output", clean).code == 0
    denied = sorted(p.name for p in dataset["images"])[3]
    s3.deny(bucket, f"photos/{denied}")
    out = tmp_path / "out.parquet"
    first = cli("caption", prefix, "-m", model, *GEN, "--output", out)
    assert first.code == 3, first.stderr
    records = read_output(out)
    failed = [r for r in records if "error" in r]
    assert len(failed) == 1 and failed[0]["image"].endswith(denied) and "access denied" in failed[0]["error"]
    s3.allow_all()

    again = cli("caption", prefix, "-m", model, *GEN, "--output", out)
    assert again.code == 1 and "--retry-failed" in again.stderr  # the output is there: say how
    retried = cli("caption", prefix, "-m", model, *GEN, "--output", out, "--retry-failed", "-f", "json")
    assert retried.code == 0, retried.stderr
    assert json.loads(retried.stdout)["failed"] == 0 and json.loads(retried.stdout)["retried"] == 1
    assert read_output(out) == read_output(clean)
    nothing = cli("caption", prefix, "-m", model, *GEN, "--output", out, "--retry-failed")
    assert nothing.code == 0 and "no failed records" in nothing.stderr


def test_bad_tables_and_buckets_are_one_line(cli, tiny_models, dataset, s3, tmp_path):
    model = tiny_models["blip-caption"]

    def one_line(result, code, *parts):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.code == code, result.stderr
        assert len(errors) == 1 and all(p in errors[0] for p in parts), result.stderr
        assert "Traceback" not in result.stderr

    missing_column = cli("caption", dataset["parquet"], "-m", model, "--image-column", "img")
    one_line(missing_column, 1, "photos.parquet", "no column 'img'")
    wrong_type = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"image": pa.array(range(3), pa.int64())}), wrong_type)
    one_line(cli("caption", wrong_type, "-m", model), 1, "ints.parquet", "column 'image' is int64")

    # A corrupt row group: its rows fail one by one (exit 3), the other row groups are captioned.
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(dataset["parquet"].read_bytes())
    column = pq.ParquetFile(corrupt).metadata.row_group(1).column(1)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(corrupt.read_bytes())
    data[start : start + 16] = b"\xff" * 16  # the page header of the image column of row group 1
    corrupt.write_bytes(bytes(data))
    result = cli(
        "caption", corrupt, "-m", model, *GEN, "--key-column", "key", "--output", tmp_path / "c.jsonl"
    )
    assert result.code == 3, result.stderr
    records = read_output(tmp_path / "c.jsonl")
    # The failed rows are named by their row number in the file (their key column is unreadable too).
    assert [r["key"] for r in records] == dataset["keys"][:3] + ["3", "4", "5"] + dataset["keys"][6:]
    assert [("error" in r) for r in records] == [False] * 3 + [True] * 3 + [False] * 2
    assert "row group 1" in records[3]["error"]

    bucket = s3.create_bucket()
    s3.upload(bucket, "photos.parquet", dataset["parquet"])
    one_line(
        cli("caption", "s3://no-such-bucket-here/x.parquet", "-m", model),
        1,
        "s3://no-such-bucket-here",
        "no such bucket",
    )
    s3.deny(bucket, "photos.parquet")
    one_line(
        cli("caption", f"s3://{bucket}/photos.parquet", "-m", model),
        1,
        f"s3://{bucket}/photos.parquet",
        "access denied",
    )
    s3.allow_all()
    one_line(cli("caption", f"s3://{bucket}/none/*.tar", "-m", model), 1, f"s3://{bucket}/none/*.tar")


def test_where_users_keep_images(cli, tiny_models, dataset, s3, tmp_path):
    """Layouts found in the wild, each captioned as the same images given as files: a brace pattern of
    images, a folder of tars beside img2dataset's per-shard .parquet statistics (local and an S3
    prefix), a TSV manifest of s3:// URLs, and a remote Parquet table whose image column holds paths
    relative to the table."""
    model = tiny_models["blip-caption"]
    images = sorted(dataset["images"])
    reference = cli("caption", *images, "-m", model, *GEN, "-f", "jsonl")
    captions = [json.loads(line)["caption"] for line in reference.stdout.splitlines()]
    by_name = dict(zip((p.name for p in images), captions))

    pattern = str(images[0].parent / ("{" + ",".join(p.stem for p in images[:3]) + "}.jpg"))
    braces = cli("caption", pattern, "-m", model, *GEN, "-f", "jsonl")
    assert braces.code == 0, braces.stderr
    assert [json.loads(line)["caption"] for line in braces.stdout.splitlines()] == captions[:3]

    folder = tmp_path / "img2dataset"
    folder.mkdir()
    for tar in dataset["tars"]:
        shutil.copy(tar, folder / tar.name)
        pq.write_table(pa.table({"key": ["x"], "status": ["success"]}), folder / (tar.stem + ".parquet"))
    tars = cli("caption", folder, "-m", model, *GEN, "-f", "jsonl")
    assert tars.code == 0, tars.stderr
    from_tars = [json.loads(line) for line in tars.stdout.splitlines()]
    assert [r["key"] for r in from_tars] == dataset["keys"]

    bucket = s3.create_bucket()
    for path in folder.iterdir():
        s3.upload(bucket, f"shards/{path.name}", path)
    prefix = cli("caption", f"s3://{bucket}/shards/", "-m", model, *GEN, "-f", "jsonl")
    assert prefix.code == 0, prefix.stderr
    assert [json.loads(line) for line in prefix.stdout.splitlines()] == from_tars

    for path in images:
        s3.upload(bucket, f"photos/{path.name}", path)
    manifest = tmp_path / "urls.tsv"
    manifest.write_text("".join(f"s3://{bucket}/photos/{p.name}\n" for p in images))
    urls = cli("caption", "--manifest", manifest, "-m", model, *GEN, "-f", "jsonl")
    assert urls.code == 0, urls.stderr
    assert [json.loads(line)["image"] for line in urls.stdout.splitlines()] == [
        f"s3://{bucket}/photos/{p.name}" for p in images
    ]
    assert [json.loads(line)["caption"] for line in urls.stdout.splitlines()] == captions

    # a manifest on S3 whose paths are relative to it
    (tmp_path / "remote.tsv").write_text("".join(f"../photos/{p.name}\n" for p in images))
    s3.upload(bucket, "lists/remote.tsv", tmp_path / "remote.tsv")
    listed = cli("caption", "--manifest", f"s3://{bucket}/lists/remote.tsv", "-m", model, *GEN, "-f", "jsonl")
    assert listed.code == 0, listed.stderr
    assert [json.loads(line)["image"] for line in listed.stdout.splitlines()] == [
        f"s3://{bucket}/photos/{p.name}" for p in images
    ]
    assert [json.loads(line)["caption"] for line in listed.stdout.splitlines()] == captions

    table = tmp_path / "relative.parquet"
    pq.write_table(pa.table({"image": [f"../photos/{p.name}" for p in images]}), table)
    s3.upload(bucket, "tables/relative.parquet", table)
    relative = cli("caption", f"s3://{bucket}/tables/relative.parquet", "-m", model, *GEN, "-f", "jsonl")
    assert relative.code == 0, relative.stderr
    assert [json.loads(line)["caption"] for line in relative.stdout.splitlines()] == [
        by_name[p.name] for p in images
    ]


def test_questions_from_a_column_fail_per_row(cli, tiny_models, dataset, tmp_path):
    images = [p.read_bytes() for p in sorted(dataset["images"])[:3]]
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"image": images, "q": ["what is it?", None, " "]}), path)
    result = cli("vqa", path, "--text-column", "q", "-m", tiny_models["blip-vqa"], *GEN, "-f", "jsonl")
    assert result.code == 3, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert "answer" in records[0] and all("no question" in r["error"] for r in records[1:])
    both = cli("vqa", path, "--text-column", "q", "--question", "why?", "-m", tiny_models["blip-vqa"])
    assert both.code == 2 and "--text-column" in both.stderr


def test_remote_outputs_and_refusals(cli, tiny_models, dataset, s3, tmp_path):
    model = tiny_models["blip-caption"]
    missing = cli("caption", dataset["tars"][0], "-m", model, "--output", "s3://no-such-bucket-here/c.jsonl")
    assert (
        missing.code == 1
        and "s3://no-such-bucket-here" in missing.stderr
        and "no such bucket" in missing.stderr
    )
    remote_out = cli(
        "extract-embeddings", dataset["tars"][0], "--out", "s3://bucket/emb", "--cond-encoder",
        tiny_models["blip2-opt"], "--target-encoder", tiny_models["clip"],
    )  # fmt: skip
    assert remote_out.code == 2 and "local directory" in remote_out.stderr
    assert not Path("s3:").exists()

    # --retry-failed on a remote .jsonl (read back line by line through fsspec, rewritten in one put)
    bucket = s3.create_bucket()
    for path in dataset["images"]:
        s3.upload(bucket, f"photos/{path.name}", path)
    prefix, out = f"s3://{bucket}/photos/", f"s3://{bucket}/out/c.jsonl"
    clean = cli("caption", prefix, "-m", model, *GEN, "-f", "jsonl")
    denied = sorted(p.name for p in dataset["images"])[0]
    s3.deny(bucket, f"photos/{denied}")
    assert cli("caption", prefix, "-m", model, *GEN, "--output", out).code == 3
    s3.allow_all()
    retried = cli("caption", prefix, "-m", model, *GEN, "--output", out, "--retry-failed")
    assert retried.code == 0, retried.stderr
    assert s3.get(bucket, "out/c.jsonl").decode() == clean.stdout


def test_dataset_dict_splits_keep_their_names(cli, tiny_models, dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [{"bytes": p.read_bytes(), "path": None} for p in sorted(dataset["images"])]
    split = lambda rows: datasets.Dataset.from_dict({"image": rows}).cast_column(
        "image", datasets.Image(decode=False)
    )  # noqa: E731
    datasets.DatasetDict({"train": split(images[:5]), "test": split(images[5:])}).save_to_disk(
        str(tmp_path / "dd")
    )
    result = cli("caption", tmp_path / "dd", "-m", tiny_models["blip-caption"], *GEN, "-f", "jsonl")
    assert result.code == 0, result.stderr
    shards = [json.loads(line)["shard"] for line in result.stdout.splitlines()]
    assert len(shards) == 8 and all(s.startswith(("train_", "test_")) for s in shards), shards
