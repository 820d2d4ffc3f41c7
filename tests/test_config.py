"""Config files: three formats, nested sections, overrides, unknown keys, type errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import pytest

from blip_toolkit.config import build_config, load_config_file, parse_overrides
from blip_toolkit.errors import ConfigError


@dataclass
class Optim:
    learning_rate: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    resume: bool = False
    limit: int | None = None
    optim: Optim = field(default_factory=Optim)


@pytest.mark.parametrize(
    "suffix,text",
    [
        (".toml", 'name = "x"\nsteps = 5\n[optim]\nlearning_rate = 0.5\n'),
        (".yaml", "name: x\nsteps: 5\noptim:\n  learning_rate: 0.5\n"),
        (".json", '{"name": "x", "steps": 5, "optim": {"learning_rate": 0.5}}'),
    ],
)
def test_three_formats_give_the_same_config(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    config = build_config(Run, load_config_file(path))
    assert (config.name, config.steps, config.optim.learning_rate, config.optim.betas) == (
        "x",
        5,
        0.5,
        [0.9, 0.999],
    )


def test_overrides_win_and_none_means_not_given():
    config = build_config(
        Run,
        {"steps": 5},
        {
            "steps": 7,
            "optim.learning_rate": "2e-3",
            "name": None,
            **parse_overrides(["mode=b", "resume=true", "limit=null"]),
        },
    )
    assert (
        config.steps,
        config.optim.learning_rate,
        config.name,
        config.mode,
        config.resume,
        config.limit,
    ) == (7, 2e-3, "run", "b", True, None)
    assert asdict(config)["optim"] == {"learning_rate": 2e-3, "betas": [0.9, 0.999]}


def test_unknown_keys_are_listed(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_config(Run, {"stepz": 1, "optim": {"lr": 1}}, source="c.toml")
    assert "unknown key(s): optim.lr, stepz" in str(info.value)
    assert "optim.learning_rate" in str(info.value)  # the hint lists the known keys


@pytest.mark.parametrize(
    "values,message",
    [
        ({"steps": "many"}, "steps must be an integer"),
        ({"mode": "c"}, "mode must be one of"),
        ({"resume": "maybe"}, "resume must be true or false"),
        ({"optim": 3}, "optim must be a section"),
    ],
)
def test_type_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(Run, values)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(bad)
    other = tmp_path / "c.ini"
    other.write_text("x")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config_file(other)
