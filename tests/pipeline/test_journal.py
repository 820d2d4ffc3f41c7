"""The journal and the output writers: k-way merge in input order, torn and damaged lines, Parquet in
row groups and never half-written, TSV rows, records replaced in place (--retry-failed); the progress
line."""

from __future__ import annotations

import json
import logging

import pytest

from blip_toolkit.errors import InputError
from blip_toolkit.pipeline import outputs
from blip_toolkit.pipeline.items import Prepared
from blip_toolkit.pipeline.journal import JournalSink, journal_records, last_attempt, read_journal
from blip_toolkit.pipeline.outputs import columns_for, read_output, rewrite_output, write_output
from blip_toolkit.pipeline.resume import ResumeState
from blip_toolkit.pipeline.stream import Progress


def _journal(tmp_path, attempt, rank, positions):
    sink = JournalSink(tmp_path, attempt, rank, ResumeState(), lambda item, result: {**item.fields, **result})
    for pos in positions:
        sink.record(Prepared(pos, {"image": f"{pos[0]}-{pos[1]}"}), {"caption": "c"})
    sink.end(0, 5)
    sink.close(True)
    return sink.path


def test_merge_in_input_order_across_attempts_and_ranks(tmp_path):
    # Attempt 1: rank 0 did items 0, 2 (then was killed), rank 1 did 1, 3; attempt 2 (one process): 4.
    _journal(tmp_path, 1, 0, [(0, 0), (0, 2)])
    _journal(tmp_path, 1, 1, [(0, 1), (0, 3), (1, 0)])
    _journal(tmp_path, 2, 0, [(0, 4)])
    state = read_journal(tmp_path)
    assert last_attempt(tmp_path) == 2 and state.records == 6 and state.ends == {0: 5}
    assert state.complete(0) and state.has((1, 0)) and not state.has((1, 1))
    merged = [(pos, r["image"]) for pos, r in journal_records(tmp_path)]
    assert merged == [((0, i), f"0-{i}") for i in range(5)] + [((1, 0), "1-0")]


def test_torn_last_line_dropped_damaged_line_refused(tmp_path):
    path = _journal(tmp_path, 1, 0, [(0, 0), (0, 1)])
    with open(path, "ab") as handle:
        handle.write(b'{"pos": [0, 2], "rec')  # a kill in the middle of a write
    assert read_journal(tmp_path).records == 2
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b'{"pos": "zero"}', *lines[1:]]))
    with pytest.raises(InputError, match=r"a0001-r00000.jsonl:2: not a journal record"):
        read_journal(tmp_path)


def test_parquet_row_groups_and_no_half_written_file(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(outputs, "ROW_GROUP", 2)
    rows = [{"shard": "s", "key": str(i), "caption": f"c{i}"} for i in range(5)]
    rows.append({"shard": "s", "key": None, "error": "s.tar: truncated"})
    out = tmp_path / "o.parquet"
    assert write_output(str(out), "parquet", iter(rows), columns_for("caption", "webdataset")) == 6
    assert pq.ParquetFile(out).num_row_groups == 3
    assert read_output(out) == [{k: v for k, v in r.items() if v is not None} for r in rows]

    def dies():
        yield rows[0]
        yield rows[1]
        yield rows[2]  # a third row starts the second row group on disk
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_output(
            str(tmp_path / "killed.parquet"), "parquet", dies(), columns_for("caption", "webdataset")
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.parquet"]  # no final file, no temp left


def test_tsv_rows_for_retrieval(tmp_path):
    columns = columns_for("retrieval", "files", ("rank", "text", "score", "probability"))
    rows = [
        {"image": "a.jpg", "results": [{"rank": 1, "text": "x\ty", "score": 0.5, "probability": 0.6}]},
        {"image": "b.jpg", "error": "b.jpg: empty file"},
    ]
    write_output(str(tmp_path / "r.tsv"), "tsv", rows, columns)
    assert (tmp_path / "r.tsv").read_text().splitlines() == [
        "image\trank\ttext\tscore\tprobability\terror",
        "a.jpg\t1\tx y\t0.5\t0.6\t",
        "b.jpg\t\t\t\t\tb.jpg: empty file",
    ]
    write_output(str(tmp_path / "r.jsonl"), "jsonl", rows, columns)
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tsv"])
def test_rewrite_replaces_records_in_place(tmp_path, monkeypatch, fmt):
    """--retry-failed's rewrite: the given rows replaced, every other record byte-for-byte what it was
    (compared with a file written directly with the final records), across Parquet row groups."""
    pytest.importorskip("pyarrow")
    monkeypatch.setattr(outputs, "ROW_GROUP", 3)
    columns = columns_for("retrieval", "webdataset", ("rank", "text", "score", "probability"))

    def ranked(i):
        return {
            "shard": "s",
            "key": str(i),
            "results": [
                {"rank": r, "text": f"t{r}", "score": i / (r + 1), "probability": 0.5} for r in (1, 2)
            ],
        }

    first = [ranked(i) if i % 3 else {"shard": "s", "key": str(i), "error": f"s#{i}: cut"} for i in range(8)]
    target = tmp_path / f"out.{fmt}"
    write_output(str(target), fmt, first, columns)
    fixed = {i: ranked(i + 100) for i in (0, 6)}  # row 3 stays failed
    assert rewrite_output(str(target), fmt, fixed, columns) == 8
    final = [fixed.get(i, record) for i, record in enumerate(first)]
    reference = tmp_path / f"reference.{fmt}"
    write_output(str(reference), fmt, final, columns)
    assert read_output(target, columns) == read_output(reference, columns)
    if fmt != "parquet":  # Parquet files carry writer metadata; their records are compared above
        assert target.read_bytes() == reference.read_bytes()


def test_progress_plain_lines_when_not_a_terminal(caplog):
    blip_logger = logging.getLogger("blip")  # it does not propagate once the CLI has set logging up
    blip_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="blip")
    try:
        progress = Progress(4, every=0.0)
        for failed in (False, True, False):
            progress.update(failed)
        progress.close()
    finally:
        blip_logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("3/4 done, 1 failed,") and "items/s" in lines[-1] and "ETA" in lines[-1]
    assert Progress(None).line().startswith("0 done, 0 failed")  # no total, no ETA
    assert "3 item(s) in" in progress.summary() and progress.summary().endswith("1 failed")
