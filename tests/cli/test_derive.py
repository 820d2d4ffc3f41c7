"""Options derived from settings dataclasses (cli/derive.py), through a real Typer app: names, types,
defaults, help, choices, lists, booleans, per-command defaults, and given-only overrides for commands
that also read a config file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from blip_toolkit.cli.derive import derived, options


@dataclass
class Decoding:
    max_new_tokens: int = field(default=30, metadata={"help": "Maximum new tokens."})
    num_beams: int = field(default=1, metadata={"help": "Beam width (1 = greedy).", "flags": ("-k",)})
    sample: bool = field(default=False, metadata={"help": "Sample instead of searching."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus mass."})
    internal: int = field(default=7, metadata={"cli": False})


@dataclass
class Loop:
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate.", "flags": ("--lr",)})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "Autocast."})
    log_with: list[str] = field(default_factory=list, metadata={"help": "Trackers."})


def app_with(command) -> typer.Typer:
    app = typer.Typer()
    app.command("run")(command)
    app.command("other")(lambda: None)  # two commands: Typer keeps "run" as a subcommand
    return app


def invoke(app, *args):
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_built_settings_with_the_fields_defaults_and_per_command_defaults():
    @derived(decoding=options(Decoding, max_new_tokens=10))
    def run(image: str, *, decoding: Decoding) -> None:
        print(json.dumps({"image": image, **decoding.__dict__}))

    app = app_with(run)
    assert json.loads(invoke(app, "x.jpg")) == {
        "image": "x.jpg", "max_new_tokens": 10, "num_beams": 1, "sample": False, "top_p": None, "internal": 7,
    }  # fmt: skip
    got = json.loads(invoke(app, "x.jpg", "--max-new-tokens", "5", "-k", "3", "--sample", "--top-p", "0.5"))
    assert (got["max_new_tokens"], got["num_beams"], got["sample"], got["top_p"]) == (5, 3, True, 0.5)
    help_text = CliRunner().invoke(app, ["run", "--help"]).output
    assert (
        "--max-new-tokens" in help_text
        and "Maximum new tokens." in help_text
        and "[default: 10]" in help_text
    )
    assert "--internal" not in help_text  # metadata cli=False
    assert run.__derived__["--num-beams"] == "Decoding.num_beams"
    bad = CliRunner().invoke(app, ["run", "x.jpg", "--num-beams", "many"])
    assert bad.exit_code == 2


def test_given_only_overrides_for_config_file_commands():
    @derived(train=options(Loop, section="train", given=True))
    def run(*, train: dict) -> None:
        print(json.dumps(train))

    app = app_with(run)
    assert json.loads(invoke(app)) == {}  # nothing given: the config file's values stay
    got = json.loads(invoke(app, "--lr", "0.003", "--mixed-precision", "bf16", "--log-with", "tensorboard"))
    assert got == {
        "train.learning_rate": 0.003,
        "train.mixed_precision": "bf16",
        "train.log_with": ["tensorboard"],
    }
    help_text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "[default: 0.0001]" in help_text and "no|fp16|bf16" in help_text
    assert CliRunner().invoke(app, ["run", "--mixed-precision", "fp8"]).exit_code == 2


def test_mistakes_in_a_declaration_are_caught():
    with pytest.raises(TypeError, match="no field"):
        options(Decoding, max_tokens=3)

    with pytest.raises(TypeError, match="two options named"):
        # b's num_beams clashes with a's, and its prefixed name with the command's own parameter
        @derived(a=options(Decoding), b=options(Decoding, only=("num_beams",)))
        def run(*, a, b, b__num_beams=None) -> None: ...
