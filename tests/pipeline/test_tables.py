"""The table reader against real files: Parquet written by pyarrow and by `datasets`, directories
written by `datasets.save_to_disk`, and the same files behind an fsspec URL (memory://)."""

from __future__ import annotations

import io
import os
import random
import tracemalloc
import uuid

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from PIL import Image

from blip_toolkit.errors import InputError
from blip_toolkit.pipeline import tables
from blip_toolkit.pipeline.remote import TransportError
from blip_toolkit.pipeline.tables import (
    TableColumns,
    UnitDataError,
    arrow_stream_rows,
    is_table_spec,
    read_unit,
    table_units,
)

datasets.disable_progress_bars()


def png(seed: int) -> bytes:
    """A distinct 8x8 RGB PNG (random pixels, so neither dictionary encoding nor compression folds
    rows together)."""
    pixels = random.Random(seed).randbytes(8 * 8 * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (8, 8), pixels).save(buffer, "PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_all(specs, columns: TableColumns, **kwargs) -> list[tuple[str, tables.TableRow]]:
    """(unit name, row) of every row of every unit, in order."""
    return [
        (unit.name, row) for unit in table_units(specs, columns) for row in read_unit(unit, columns, **kwargs)
    ]


# ----------------------------------------------------------------------------- formats


def test_binary_parquet_rows_keys_texts_in_order_across_row_groups(tmp_path):
    images = [png(i) for i in range(10)]
    ids = [100 + i for i in range(10)]
    texts = [f"a photo number {i}" for i in range(10)]
    texts[3] = None
    path = tmp_path / "shard.parquet"
    pq.write_table(
        pa.table(
            {"jpg": pa.array(images, pa.large_binary()), "id": ids, "q": texts, "other": list(range(10))}
        ),
        path,
        row_group_size=4,
    )
    columns = TableColumns(image="jpg", key="id", text="q")
    units = table_units([str(path)], columns)
    assert [(u.kind, u.index, u.rows, u.start, u.name) for u in units] == [
        ("parquet", 0, 4, 0, "shard"),
        ("parquet", 1, 4, 4, "shard"),
        ("parquet", 2, 2, 8, "shard"),
    ]
    rows = [row for unit in units for row in read_unit(unit, columns)]
    assert [r.key for r in rows] == [str(i) for i in ids]
    assert [r.image for r in rows] == images
    assert [r.text for r in rows] == texts
    assert [r.captions for r in rows] == [(t,) if t else () for t in texts]
    assert [r.offset for r in rows] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert all(r.error is None for r in rows)

    # without a key column the key is the row index in the file, counted across row groups
    keys = [row.key for _, row in read_all([str(path)], TableColumns(image="jpg"))]
    assert keys == [str(i) for i in range(10)]


def test_datasets_image_struct_parquet_and_caption_lists(tmp_path):
    images = [png(i) for i in range(7)]
    captions = [[f"cap {i}", "", f"second {i}"] for i in range(7)]
    captions[2] = []
    captions[5] = None
    cells = [{"bytes": b, "path": None} for b in images]
    cells[4] = None
    dataset = datasets.Dataset.from_dict(
        {"image": cells, "captions": captions, "name": [f"img{i}" for i in range(7)]}
    )
    dataset = dataset.cast_column("image", datasets.Image())
    path = tmp_path / "train-00000-of-00001.parquet"
    dataset.to_parquet(str(path))
    assert pq.ParquetFile(path).schema_arrow.field("image").type == datasets.Image().pa_type

    columns = TableColumns(key="name", text="captions")
    rows = [row for _, row in read_all([str(path)], columns)]
    assert [r.key for r in rows] == [f"img{i}" for i in range(7)]
    for i, row in enumerate(rows):
        if i == 4:
            assert row.image is None
            assert row.error == f"{path} row 4: no image (null)"
            continue
        assert row.error is None
        assert row.image == images[i]
        np.testing.assert_array_equal(pixels(row.image), pixels(images[i]))
        expected = () if captions[i] is None else tuple(c for c in captions[i] if c)
        assert row.captions == expected
        assert row.text == (expected[0] if expected else None)


def test_path_strings_resolve_against_the_table_folder(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(i))
    stored = ["../imgs/0.png", str(tmp_path / "imgs" / "1.png"), "https://example.org/2.png", None]
    expected = [
        str(tmp_path / "imgs" / "0.png"),
        str(tmp_path / "imgs" / "1.png"),
        "https://example.org/2.png",
    ]
    path = tmp_path / "tables" / "paths.parquet"
    pq.write_table(pa.table({"image": pa.array(stored, pa.large_string())}), path)
    rows = [row for _, row in read_all([str(path)], TableColumns())]
    assert [r.image for r in rows[:3]] == expected
    assert open(rows[0].image, "rb").read() == png(0)
    assert rows[3].error == f"{path} row 3: no image (null)"

    # datasets' Image struct holding a path and no bytes (what it stores for files it did not embed)
    cells = [{"bytes": None, "path": p} for p in stored[:3]] + [{"bytes": png(5), "path": "5.png"}]
    struct = tmp_path / "tables" / "struct.parquet"
    pq.write_table(pa.table({"image": pa.array(cells, datasets.Image().pa_type)}), struct)
    rows = [row for _, row in read_all([str(struct)], TableColumns())]
    assert [r.image for r in rows] == expected + [png(5)]


def test_save_to_disk_directory_and_dataset_dict(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    paths = []
    for i in range(150):
        paths.append(str(folder / f"{i}.png"))
        (folder / f"{i}.png").write_bytes(png(i))
    texts = [f"caption {i}" for i in range(150)]
    # built from paths: save_to_disk embeds the files' bytes into the {bytes, path} struct
    by_path = datasets.Dataset.from_dict({"image": paths, "text": texts}).cast_column(
        "image", datasets.Image()
    )
    by_path.save_to_disk(str(tmp_path / "by_path"), num_shards=2)
    columns = TableColumns(text="text")
    units = table_units([str(tmp_path / "by_path")], columns)
    assert [(u.kind, u.index, u.rows, u.name) for u in units] == [
        ("arrow", 0, 75, "data-00000-of-00002"),
        ("arrow", 0, 75, "data-00001-of-00002"),
    ]
    rows = [row for unit in units for row in read_unit(unit, columns)]
    assert [r.image for r in rows] == [png(i) for i in range(150)]
    assert [r.text for r in rows] == texts
    assert [r.key for r in rows] == [str(i) for i in range(75)] * 2

    # embedded bytes, and a DatasetDict: splits in dataset_dict.json's order
    embedded = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(i), "path": None} for i in range(150)], "text": texts}
    )
    embedded = embedded.cast_column("image", datasets.Image())
    datasets.DatasetDict({"validation": embedded.select(range(100, 150)), "train": embedded}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert is_table_spec(str(tmp_path / "dict"))
    got = read_all([str(tmp_path / "dict")], columns)
    # the splits' files share a stem: their split folder names them apart
    assert [name for name, _ in got] == ["validation_data-00000-of-00001"] * 50 + [
        "train_data-00000-of-00001"
    ] * 150
    expected = list(range(100, 150)) + list(range(150))
    assert [row.image for _, row in got] == [png(i) for i in expected]
    assert [row.text for _, row in got] == [texts[i] for i in expected]


def test_arrow_stream_rows_equals_pyarrow(tmp_path):
    table = pa.table(
        {
            "image": [png(i) for i in range(300)],
            "label": pa.array([f"class{i % 3}" for i in range(300)]).dictionary_encode(),
        }
    )
    for legacy in (False, True):
        path = tmp_path / f"stream-{legacy}.arrow"
        options = pa.ipc.IpcWriteOptions(use_legacy_format=legacy)
        with pa.ipc.new_stream(str(path), table.schema, options=options) as writer:
            for size in (1, 128, 0, 171):
                writer.write_table(table.slice(0, size))
        reference = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().num_rows
        with open(path, "rb") as file:
            assert arrow_stream_rows(file) == reference == 300
    truncated = tmp_path / "cut.arrow"
    truncated.write_bytes(path.read_bytes()[:-2000])
    with open(truncated, "rb") as file, pytest.raises(ValueError, match="cut short"):
        arrow_stream_rows(file)


# ----------------------------------------------------------------------------- resume, layout


def test_skip_gives_the_other_rows_with_their_offsets(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"image": [png(i) for i in range(200)], "t": [str(i) for i in range(200)]}), path)
    columns = TableColumns(text="t")
    (unit,) = table_units([str(path)], columns)
    everything = list(read_unit(unit, columns))
    skip = set(range(0, 200, 3)) | set(range(64, 128))  # a whole 64-row batch too
    rest = list(read_unit(unit, columns, skip=skip))
    assert rest == [row for row in everything if row.offset not in skip]
    assert list(read_unit(unit, columns, skip=range(200))) == []

    # save_to_disk files: same contract
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(100)]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "sd"))
    (unit,) = table_units([str(tmp_path / "sd")], TableColumns())
    rows = list(read_unit(unit, TableColumns(), skip={0, 99, 50}))
    assert [r.offset for r in rows] == [i for i in range(100) if i not in {0, 50, 99}]
    assert [r.image for r in rows] == [png(i) for i in range(100) if i not in {0, 50, 99}]


def test_specs_globs_directories_and_names(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for i in range(2):
            pq.write_table(pa.table({"image": [png(i)]}), tmp_path / sub / f"part-{i}.parquet")
    (tmp_path / "b" / "_SUCCESS").write_text("")
    (tmp_path / "b" / ".hidden").mkdir()
    pq.write_table(pa.table({"image": [png(9)]}), tmp_path / "b" / ".hidden" / "x.parquet")
    pq.write_table(pa.table({"image": [png(9)]}), tmp_path / "b" / "_tmp.parquet")

    assert is_table_spec(str(tmp_path / "a"))
    assert is_table_spec(str(tmp_path / "a" / "*.parquet"))
    assert is_table_spec(str(tmp_path / "a" / "part-{0..1}.parquet"))
    assert is_table_spec("hf://datasets/org/name/data/*.parquet")
    assert not is_table_spec(str(tmp_path / "a" / "part-0.tar"))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(png(0))
    assert not is_table_spec(str(tmp_path / "imgs"))

    units = table_units([str(tmp_path / "b"), str(tmp_path / "a" / "part-{1..0}.parquet")], TableColumns())
    # shared stems are qualified by their folder first
    assert [(u.url, u.name) for u in units] == [
        (str(tmp_path / "b" / "part-0.parquet"), "b_part-0"),
        (str(tmp_path / "b" / "part-1.parquet"), "b_part-1"),
        (str(tmp_path / "a" / "part-1.parquet"), "a_part-1"),
        (str(tmp_path / "a" / "part-0.parquet"), "a_part-0"),
    ]
    units = table_units([str(tmp_path / "*" / "part-1.parquet")], TableColumns())
    assert [u.url for u in units] == [str(tmp_path / s / "part-1.parquet") for s in ("a", "b")]


def test_empty_row_groups_are_units_without_rows(tmp_path):
    table = pa.table({"image": [png(0), png(1)]})
    path = tmp_path / "e.parquet"
    with pq.ParquetWriter(path, table.schema) as writer:
        for part in (table, table.slice(0, 0), table):
            writer.write_table(part)
    units = table_units([str(path)], TableColumns())
    assert [(u.index, u.rows, u.start) for u in units] == [(0, 2, 0), (1, 0, 2), (2, 2, 2)]
    assert [[r.key for r in read_unit(u, TableColumns())] for u in units] == [["0", "1"], [], ["2", "3"]]


# ----------------------------------------------------------------------------- bad input


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_bad_input_is_refused_with_one_line(tmp_path):
    good = tmp_path / "x.parquet"
    pq.write_table(pa.table({"image": [png(0)], "text": ["t"], "id": [1]}), good)

    with pytest.raises(InputError) as info:
        table_units([str(good)], TableColumns(image="img"))
    assert one_line(info.value) == f"{good}: no column 'img' (columns: image, text, id)"

    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"image": [1, 2]}), ints)
    with pytest.raises(InputError) as info:
        table_units([str(ints)], TableColumns())
    assert one_line(info.value) == (
        f"{ints}: column 'image' is int64; expected image bytes (binary), a {{bytes, path}} struct as "
        "datasets writes, or paths / URLs (string)"
    )
    with pytest.raises(
        InputError, match=r"column 'id' is int64; expected text \(string\) or a list of strings"
    ):
        table_units([str(good)], TableColumns(text="id"))
    floats = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"image": [png(0)], "k": [0.5]}), floats)
    with pytest.raises(InputError, match="column 'k' is double; expected keys as strings or integers"):
        table_units([str(floats)], TableColumns(key="k"))

    for name, content in (("text.parquet", b"id,image\n1,a.png\n"), ("empty.parquet", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError) as info:
            table_units([str(tmp_path / name)], TableColumns())
        assert one_line(info.value).startswith(f"{tmp_path / name}: not a Parquet file (")

    strings = tmp_path / "y.parquet"
    pq.write_table(pa.table({"image": ["a.png"]}), strings)
    with pytest.raises(InputError) as info:
        table_units([str(good), str(strings)], TableColumns())
    assert one_line(info.value) == (
        f"{strings}: column 'image' is string but {good} has binary; all files must give the named "
        "columns the same type"
    )

    with pytest.raises(InputError, match="no such file"):
        table_units([str(tmp_path / "missing.parquet")], TableColumns())
    with pytest.raises(InputError, match="matches no Parquet files"):
        table_units([str(tmp_path / "none-*.parquet")], TableColumns())

    dataset = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(50)]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "sd"))
    arrow = tmp_path / "sd" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:-1000])
    with pytest.raises(InputError) as info:
        table_units([str(tmp_path / "sd")], TableColumns())
    assert one_line(info.value).startswith(f"{arrow}: not an Arrow stream file (cut short")


def corrupt_row_group(path, row_group: int, column: int, *, where: str) -> None:
    """Overwrite bytes inside one column chunk of one row group (its byte range from the footer)."""
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    position = start if where == "page header" else start + chunk.total_compressed_size // 2
    with open(path, "r+b") as file:
        file.seek(position)
        file.write(b"\xff" * 32)


# A garbled page header fails to parse in any file. Garbled bytes inside page data are caught by
# the page checksums pyarrow can write (write_page_checksum; the reader verifies them); without
# checksums such bytes may decode to different, still well-formed values, which only the image
# decoder downstream can notice.
@pytest.mark.parametrize("where, checksums", [("page header", False), ("page data", True)])
def test_corrupt_row_group_fails_that_unit_only(tmp_path, where, checksums):
    images = [png(i) for i in range(300)]
    path = tmp_path / "c.parquet"
    table = pa.table({"image": images, "id": [f"k{i}" for i in range(300)]})
    pq.write_table(table, path, row_group_size=100, write_page_checksum=checksums)
    corrupt_row_group(path, 1, 0, where=where)
    columns = TableColumns(key="id")
    units = table_units([str(path)], columns)  # the footer is intact
    assert [u.rows for u in units] == [100, 100, 100]
    for unit in (units[0], units[2]):
        rows = list(read_unit(unit, columns))
        assert [r.image for r in rows] == images[unit.start : unit.start + 100]
    with pytest.raises(UnitDataError) as info:
        list(read_unit(units[1], columns))
    assert one_line(info.value).startswith(f"{path} row group 1: cannot decode (")

    # only the named columns are read: a corrupt column that is not named does not matter
    pq.write_table(table, path, row_group_size=100, write_page_checksum=checksums)
    corrupt_row_group(path, 1, 1, where=where)  # the "id" column
    image_only = [row.image for unit in units for row in read_unit(unit, TableColumns())]
    assert image_only == images
    with pytest.raises(UnitDataError):
        list(read_unit(units[1], columns))


# ----------------------------------------------------------------------------- remote (fsspec)


class FailingFile(MemoryFile):
    """A memory file whose reads touching `fail_range` raise, like a dropped connection."""

    def __init__(self, *args, fail_range: tuple[int, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_range = fail_range

    def read(self, size=-1):
        start = self.tell()
        end = start + (size if size is not None and size >= 0 else len(self.getbuffer()))
        if start < self.fail_range[1] and end > self.fail_range[0]:
            raise ConnectionResetError(104, "connection reset by peer")
        return super().read(size)


class FailingFileSystem(MemoryFileSystem):
    protocol = "failing"
    fail_ranges: dict[str, tuple[int, int]] = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("failing://"))

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)
        path = self._strip_protocol(path)
        if mode == "rb" and path in self.fail_ranges:
            return FailingFile(self, path, file.getvalue(), fail_range=self.fail_ranges[path])
        return file


@pytest.fixture
def memory_root():
    """A fresh folder on fsspec's in-process memory file system: the reader's URL code paths
    (listing, globbing, joining, reading through open_input) without a network."""
    root = f"memory://tables-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def upload(local_dir, url: str) -> None:
    fs = fsspec.filesystem("memory")
    for folder, _, filenames in os.walk(local_dir):
        for name in filenames:
            relative = os.path.relpath(os.path.join(folder, name), local_dir)
            fs.pipe(f"{url}/{relative}", open(os.path.join(folder, name), "rb").read())


def test_remote_parquet_layouts_match_local(tmp_path, memory_root):
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "images").mkdir()
    for i in range(2):
        rows = range(i * 5, i * 5 + 5)
        pq.write_table(
            pa.table({"image": [png(r) for r in rows], "caption": [f"c{r}" for r in rows]}),
            hub / "data" / f"train-0000{i}-of-00002.parquet",
            row_group_size=2,
        )
    (hub / "other").mkdir()
    pq.write_table(pa.table({"image": ["../images/a.png"]}), hub / "other" / "paths.parquet")
    (hub / "README.md").write_text("card")
    (hub / ".gitattributes").write_text("")
    upload(hub, memory_root)

    columns = TableColumns(text="caption")
    local = read_all([str(hub / "data" / "train-*.parquet")], columns)
    assert is_table_spec(memory_root)
    for spec in (
        f"{memory_root}/data/train-*.parquet",
        f"{memory_root}/data/train-{{00000..00001}}-of-00002.parquet",
    ):
        remote = read_all([spec], columns)
        assert remote == local
        assert [row.image for _, row in remote] == [png(r) for r in range(10)]
    units = table_units([f"{memory_root}/data"], TableColumns())
    assert [u.name for u in units] == ["train-00000-of-00002"] * 3 + ["train-00001-of-00002"] * 3
    assert all(u.url.startswith("memory://") for u in units)
    with pytest.raises(InputError) as info:
        table_units([f"{memory_root}/data/missing.parquet"], TableColumns())
    assert one_line(info.value) == f"{memory_root}/data/missing.parquet: no such object"
    (unit,) = table_units([f"{memory_root}/other/paths.parquet"], TableColumns())
    (row,) = read_unit(unit, TableColumns())
    assert row.image == f"{memory_root}/images/a.png"  # joined, scheme kept


def test_remote_save_to_disk_directory(tmp_path, memory_root):
    texts = [f"t{i}" for i in range(80)]
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(i), "path": None} for i in range(80)], "text": texts}
    )
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "sd"), num_shards=2)
    upload(tmp_path / "sd", f"{memory_root}/sd")
    columns = TableColumns(text="text")
    assert is_table_spec(f"{memory_root}/sd")
    remote = read_all([f"{memory_root}/sd"], columns)
    assert remote == read_all([str(tmp_path / "sd")], columns)
    assert [row.text for _, row in remote] == texts
    # skip through the remote (non-memory-mapped) stream path
    (first, _) = table_units([f"{memory_root}/sd"], columns)
    assert [r.offset for r in read_unit(first, columns, skip=range(1, 40))] == [0]


def test_a_failing_read_is_a_transport_error_not_a_data_error(tmp_path):
    fsspec.register_implementation("failing", FailingFileSystem, clobber=True)
    path = tmp_path / "f.parquet"
    # row groups larger than pyarrow's speculative footer read (the last 64 KiB of the file)
    images = [png(i) for i in range(1200)]
    pq.write_table(pa.table({"image": images}), path, row_group_size=400)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    name = f"/failing-{uuid.uuid4().hex[:8]}/f.parquet"
    fs = fsspec.filesystem("failing")
    fs.pipe(name, path.read_bytes())
    FailingFileSystem.fail_ranges[name] = (start, start + chunk.total_compressed_size)
    try:
        units = table_units([f"failing://{name}"], TableColumns())
        assert [list(r.image for r in read_unit(units[i], TableColumns())) for i in (0, 2)] == [
            images[:400],
            images[800:],
        ]
        with pytest.raises(TransportError) as info:
            list(read_unit(units[1], TableColumns()))
        assert not isinstance(info.value, UnitDataError)
        assert one_line(info.value) == f"failing://{name}: connection reset"
        assert isinstance(info.value.__cause__, ConnectionResetError)
    finally:
        FailingFileSystem.fail_ranges.pop(name)
        fs.rm(name.rsplit("/", 1)[0], recursive=True)


# ----------------------------------------------------------------------------- memory


def peak_while_streaming(path) -> tuple[int, int, int]:
    """(rows, peak Python-allocated bytes, peak arrow pool bytes sampled at every row) over all
    units of `path`."""
    columns = TableColumns(text="text")
    units = table_units([str(path)], columns)
    base = pa.total_allocated_bytes()
    arrow_peak = rows = 0
    tracemalloc.start()
    try:
        for unit in units:
            for _ in read_unit(unit, columns):
                rows += 1
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - base)
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return rows, python_peak, arrow_peak


def test_memory_does_not_grow_with_the_file(tmp_path):
    distinct = [png(i) for i in range(2000)]
    sizes = {}
    for rows in (2_000, 20_000):
        path = tmp_path / f"{rows}.parquet"
        table = pa.table(
            {"image": [distinct[i % 2000] for i in range(rows)], "text": [f"c{i}" for i in range(rows)]}
        )
        # no dictionary, no compression: the repeated images take their full size in the file
        pq.write_table(table, path, row_group_size=1000, use_dictionary=False, compression="none")
        sizes[rows] = (path.stat().st_size, *peak_while_streaming(path))
    (small_file, small_rows, small_py, small_arrow) = sizes[2_000]
    (large_file, large_rows, large_py, large_arrow) = sizes[20_000]
    assert (small_rows, large_rows) == (2_000, 20_000)
    assert large_file > 9 * small_file
    assert large_py <= 1.2 * small_py, sizes
    assert large_arrow <= 1.2 * small_arrow, sizes
    # and neither holds the file: about one row group (1000 rows) of it
    assert large_py + large_arrow < large_file / 3, sizes


def test_is_table_spec_needs_no_reading(tmp_path):
    assert is_table_spec("s3://bucket/x.parquet")
    assert is_table_spec("data/train-{00000..00002}-of-00003.parquet")
    assert not is_table_spec("data/{000..009}.tar")
    assert not is_table_spec(str(tmp_path / "missing"))
    # http(s) has no directories: nothing is fetched to find out (there is no network here either)
    assert not is_table_spec("https://example.invalid/dataset/")
    assert not is_table_spec("s3://bucket/shards/000.tar")
