"""Every setting has one home (issue 25): the command-line options of the commands that read a config
file (`finetune`, `train-dit`) are derived from the config's dataclass fields, not declared by hand;
each config field name is declared in one class (a trainer may change a default, through
`default_of`, which keeps the declaration); and the training loop's settings are the same fields, by
inheritance, in both trainers' configs, so the engine reads the config itself."""

from __future__ import annotations

import dataclasses

import click
import pytest
import typer.main

from blip_toolkit.cli.main import app
from blip_toolkit.config import fields_own_first
from blip_toolkit.dit.config import DiTConfig, FlowConfig
from blip_toolkit.dit.train_config import DataConfig, EvalConfig, SampleDefaults, TrainConfig, TrainDiTConfig
from blip_toolkit.engine.settings import LoopSettings
from blip_toolkit.training.config import FinetuneConfig

# Options of a config-file command that are the command's own, not settings of the run.
COMMAND_ONLY = {
    "--config",
    "--set",
    "--print-config",
    "--format",
    "--help",
    "--install-completion",
    "--show-completion",
}
CONFIG_COMMANDS = {
    "finetune": [FinetuneConfig],
    "train-dit": [TrainDiTConfig, DataConfig, DiTConfig, FlowConfig, TrainConfig, EvalConfig, SampleDefaults],
}


def command(name: str) -> click.Command:
    group = typer.main.get_command(app)  # a lazy group: commands load on demand
    return group.get_command(click.Context(group), name)


def field_flags(cls: type) -> dict[str, str]:
    """--flag -> field name, for every spelling a field's metadata gives."""
    out = {}
    for f in dataclasses.fields(cls):
        primary = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        for spelling in (primary, *f.metadata.get("flags", ())):
            out[spelling] = f.name
    return out


@pytest.mark.parametrize("name", sorted(CONFIG_COMMANDS))
def test_config_command_options_are_derived_from_the_config_fields(name):
    cmd = command(name)
    callback = cmd.callback
    derived = getattr(callback, "__derived__", None)
    assert derived, f"{name}: options not derived (cli/derive.py)"
    # Typer builds commands with its own copy of click: options by kind, not by class
    options = [p for p in cmd.params if p.param_type_name == "option"]
    assert options
    hand_written = [p.opts[0] for p in options if p.opts[0] not in derived and p.opts[0] not in COMMAND_ONLY]
    assert not hand_written, f"{name}: options declared by hand, not from a config field: {hand_written}"
    # Each derived option is a real field of the config, under the field's name or its declared flag.
    known = {
        flag: f"{cls.__name__}.{field}"
        for cls in CONFIG_COMMANDS[name]
        for flag, field in field_flags(cls).items()
    }
    for flag, origin in derived.items():
        assert known.get(flag, "").split(".")[-1] == origin.split(".")[-1], (flag, origin)
    # ... and its help is the field's.
    for p in options:
        if p.opts[0] in derived:
            cls_name, field_name = derived[p.opts[0]].split(".")
            cls = next(c for c in CONFIG_COMMANDS[name] if c.__name__ == cls_name)
            help_text = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[field_name]
            assert help_text and p.help.startswith(help_text.replace("[", "\\[")), (p.opts[0], p.help)


def test_the_training_loop_settings_are_declared_once_and_shared_by_both_trainers():
    loop = {f.name: f for f in dataclasses.fields(LoopSettings)}
    for config in (FinetuneConfig, TrainConfig):
        assert issubclass(config, LoopSettings)
        mine = {f.name: f for f in dataclasses.fields(config)}
        for name, field in loop.items():
            # the same declaration (help, spellings), whatever default the trainer gives it
            assert mine[name].metadata == field.metadata, (config.__name__, name)


def test_no_field_name_is_declared_in_two_unrelated_settings_classes_of_a_command():
    for name, classes in CONFIG_COMMANDS.items():
        owners: dict[str, str] = {}
        for cls in classes:
            inherited = {n for base in cls.__mro__[1:] for n in getattr(base, "__dataclass_fields__", {})}
            for f in fields_own_first(cls):
                if f.name in inherited or dataclasses.is_dataclass(
                    f.type if isinstance(f.type, type) else None
                ):
                    continue
                if not f.metadata.get("help"):
                    continue  # a file-only key without a flag
                assert f.name not in owners, (
                    f"{name}: {f.name} declared in {owners.get(f.name)} and {cls.__name__}"
                )
                owners[f.name] = cls.__name__


def subcommand(path: list[str]) -> click.Command:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.get_command(click.Context(cmd), name)
    return cmd


@pytest.mark.parametrize(
    "path",
    [
        ["caption"],
        ["vqa"],
        ["retrieval"],
        ["eval", "caption"],
        ["eval", "vqa"],
        ["eval", "retrieval"],
        ["ui"],
    ],
)
def test_dataset_and_eval_commands_derive_decoding_and_loading_from_one_dataclass_each(path):
    """--num-beams, --model, --batch-size, ... are the fields of GenerationOptions, LoadSpec and the
    predictor's options everywhere, not options written per command."""
    derived = subcommand(path).callback.__derived__
    origins = {flag: origin.split(".")[0] for flag, origin in derived.items()}
    assert origins["--model"] == "LoadSpec" and origins["--device"] == "LoadSpec"
    if path in (["eval", "retrieval"], ["ui"]):
        return  # their batch options are their own (ITM pairs per pass; requests per batch)
    assert origins["--batch-size"] in {"CaptionOptions", "VqaOptions", "RetrievalOptions"}
    if path[-1] != "retrieval":
        assert origins["--num-beams"] == origins["--max-new-tokens"] == "GenerationOptions"


def test_no_cli_function_is_longer_than_80_lines_and_run_inference_takes_at_most_6_parameters():
    import ast
    import inspect
    from pathlib import Path

    from blip_toolkit.cli import common

    cli = Path(common.__file__).parent
    long = [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(cli.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long
    assert len(inspect.signature(common.run_inference).parameters) <= 6
