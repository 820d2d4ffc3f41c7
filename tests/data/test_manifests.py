"""TSV manifests: comments and blank lines, quoting, relative paths, and file:line errors."""

from __future__ import annotations

import pytest

from blip_toolkit.data.manifests import ManifestError, read_manifest


@pytest.fixture
def images(tmp_path, sample_images):
    for src in sample_images[:3]:
        (tmp_path / src.name).write_bytes(src.read_bytes())
    return [src.name for src in sample_images[:3]]


def test_comments_blank_lines_quotes_and_relative_paths(tmp_path, images):
    path = tmp_path / "m.tsv"
    path.write_text(
        "# a comment\n\n"
        f'{images[0]}\ta "quoted" caption, with a comma\n'
        "   \n"
        f"{images[1]}\tcaption # with a hash\r\n"
        f"{tmp_path / images[2]}\tabsolute path\n",
        encoding="utf-8",
    )
    manifest = read_manifest(path, "caption")
    rows = manifest.records()
    assert [r["caption"] for r in rows] == [
        'a "quoted" caption, with a comma',
        "caption # with a hash",
        "absolute path",
    ]
    assert [r["line"] for r in rows] == [3, 5, 6]
    assert rows[0]["image"] == str(tmp_path / images[0])
    assert rows[2]["image"] == str(tmp_path / images[2])


def test_errors_name_file_and_line(tmp_path, images):
    path = tmp_path / "bad.tsv"
    path.write_bytes(
        f"{images[0]}\tfine\n".encode()
        + f"{images[1]}\n".encode()  # line 2: one column
        + f"{images[1]}\ta\tb\n".encode()  # line 3: three columns
        + f"{images[2]}\t   \n".encode()  # line 4: empty caption
        + b"caf\xe9.jpg\tnot utf-8\n"  # line 5: latin-1 byte
        + b"missing.jpg\tno such image\n"  # line 6: missing image
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(path, "caption")
    message = str(info.value)
    assert "5 problem(s)" in message
    for line, what in [
        (2, "found 1"),
        (3, "found 3"),
        (4, "empty caption"),
        (5, "not valid UTF-8"),
        (6, "image not found"),
    ]:
        assert f"{path}:{line}: " in message and what in message
    assert "--skip-missing" in message


def test_skip_missing_and_reporting_limit(tmp_path, images):
    path = tmp_path / "m.tsv"
    lines = [f"{images[0]}\tok"] + [f"missing-{i}.jpg\tgone" for i in range(30)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path, "caption")
    assert "30 problem(s)" in str(info.value) and "... and 10 more" in str(info.value)
    manifest = read_manifest(path, "caption", skip_missing=True)
    assert len(manifest) == 1 and len(manifest.skipped_missing) == 30


def test_empty_manifest_and_optional_columns(tmp_path, images):
    path = tmp_path / "empty.tsv"
    path.write_text("# nothing here\n\n")
    with pytest.raises(ManifestError, match="has no examples"):
        read_manifest(path, "caption")
    path = tmp_path / "q.tsv"
    path.write_text(f"{images[0]}\twhat is it?\n{images[1]}\twhere?\tthere\n")
    rows = read_manifest(path, "questions").records()
    assert [(r["question"], r["answer"]) for r in rows] == [("what is it?", ""), ("where?", "there")]


def test_urls_are_kept_for_inference_and_refused_where_local_files_are_read(tmp_path):
    """A URL in a manifest is not a path: kept as written when the pipeline reads the images (no check),
    refused with file:line where the command reads local files (fine-tuning checks its images)."""
    from blip_toolkit.data.manifests import ManifestError, read_manifest

    (tmp_path / "a.jpg").write_bytes(b"x")
    path = tmp_path / "m.tsv"
    path.write_text("s3://bucket/photos/x.jpg\ta cat\na.jpg\ta dog\n")
    frame = read_manifest(path, "caption", check_images=False).frame
    assert list(frame["image"]) == ["s3://bucket/photos/x.jpg", str(tmp_path / "a.jpg")]
    with pytest.raises(ManifestError, match=r"m.tsv:1: s3://bucket/photos/x.jpg: a URL"):
        read_manifest(path, "caption")
