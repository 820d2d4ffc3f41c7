"""Atomic writes and the output-directory policy."""

from __future__ import annotations

import pytest

from blip_toolkit.errors import OutputExistsError
from blip_toolkit.fsutil import atomic_write, check_output_file, prepare_output_dir, write_json


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'


def test_output_dir_policy(tmp_path):
    fresh = prepare_output_dir(tmp_path / "new")
    assert fresh.is_dir()
    (fresh / "blip_run.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--resume"):
        prepare_output_dir(fresh)
    assert (fresh / "blip_run.json").exists()  # untouched
    assert prepare_output_dir(fresh, resume=True) == fresh and (fresh / "blip_run.json").exists()
    prepare_output_dir(fresh, overwrite=True)
    assert not any(fresh.iterdir())

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match="not written by blip"):
        prepare_output_dir(foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_output_file_policy(tmp_path):
    path = tmp_path / "r.json"
    assert check_output_file(path, overwrite=False) == path
    path.write_text("x")
    with pytest.raises(OutputExistsError):
        check_output_file(path, overwrite=False)
    assert check_output_file(path, overwrite=True) == path
