"""Atomic writes."""

from __future__ import annotations

import pytest

from blip_toolkit.fsutil import atomic_write, write_json


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
