"""The output policy (engine/outputs.py): what is used, refused, cleared; the run record."""

from __future__ import annotations

import json

import pytest

from blip_toolkit.engine.outputs import (
    RunRecord,
    check_output_file,
    check_resume_settings,
    prepare_output_dir,
)
from blip_toolkit.errors import OutputExistsError, UsageError


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


def test_resume_needs_a_run_of_the_same_kind(tmp_path):
    run = tmp_path / "run"
    prepare_output_dir(run)
    RunRecord(run, "blip-finetune").start({"config": {"seed": 0}})
    assert prepare_output_dir(run, resume=True, kind="blip-finetune") == run
    with pytest.raises(OutputExistsError, match="not a train-dit run"):
        prepare_output_dir(run, resume=True, kind="blip-train-dit")


def test_run_record_keeps_the_start_time_and_marks_failures(tmp_path):
    record = RunRecord(tmp_path, "blip-finetune")
    record.start({"config": {}})
    started = record.read()["started"]
    record.start({"config": {}}, previous={"started": "2000-01-01T00:00:00"})
    assert record.read()["started"] == "2000-01-01T00:00:00" != started
    record.fail(ValueError("boom\nsecond line"), failed_at_step=3)
    saved = json.loads((tmp_path / "blip_run.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "boom" and saved["failed_at_step"] == 3
    record.fail(KeyboardInterrupt())
    assert record.read()["status"] == "interrupted"


def test_resume_settings_locked_and_free(caplog):
    before = {"seed": 0, "train": {"learning_rate": 1e-3, "log_every": 10}}
    free = ("train.log_every",)
    check_resume_settings(
        before, {"seed": 0, "train": {"learning_rate": 1e-3, "log_every": 5}}, free=free, where="run"
    )
    assert "train.log_every 10 -> 5" in caplog.text
    with pytest.raises(UsageError, match=r"train.learning_rate: 0.001 -> 0.01"):
        check_resume_settings(
            before, {"seed": 0, "train": {"learning_rate": 1e-2, "log_every": 10}}, free=free, where="run"
        )
    check_resume_settings(
        before, {**before, "train": {**before["train"], "log_every": 1}}, free=("train.",), where="run"
    )
