"""extract-embeddings, sample and eval-recall take their settings' options from their config dataclasses
(cli/derive.py), like the config-file commands of tests/cli/test_settings_once.py: no option of a
config field is declared by hand, each option's help is its field's, and every spelling the commands
had before keeps its default and whether it is required."""

from __future__ import annotations

import dataclasses

import click
import pytest
import typer.main

from blip_toolkit.cli.main import app
from blip_toolkit.dit.sample_config import SampleConfig
from blip_toolkit.jobs.extract_config import ExtractConfig
from blip_toolkit.jobs.recall_config import RecallConfig

ENGINE = {"--engine", "--ray-address", "--num-actors", "--gpus-per-actor", "--cpus-per-actor"}
# command -> (its config class, the options that are the command's own: output, engine, CLI spellings)
COMMANDS = {
    "extract-embeddings": (ExtractConfig, ENGINE | {"--format", "--help"}),
    "sample": (SampleConfig, {"--format", "--help"}),
    # --k also takes "1,5,10" (parsed by the command into RecallConfig.ks)
    "eval-recall": (RecallConfig, {"--k", "--out", "--update-run", "--overwrite", "--format", "--help"}),
}

# The options as they were declared by hand before (issue 25): spellings -> (default, required).
BEFORE = {
    "extract-embeddings": {
        ("--out", "-o"): (None, True),
        ("--cond-encoder",): ("Salesforce/blip2-opt-2.7b", False),
        ("--target-encoder",): ("openai/clip-vit-large-patch14", False),
        ("--tokens",): ("patch", False),
        ("--pool",): (None, False),
        ("--cond-tokens",): (None, False),
        ("--cond-pool",): (None, False),
        ("--head-pool",): (None, False),
        ("--crop",): ("center", False),
        ("--dtype",): ("float16", False),
        ("--encoder-dtype",): ("auto", False),
        ("--quantize",): (None, False),
        ("--device",): ("auto", False),
        ("--batch-size", "-b"): (32, False),
        ("--shard-size",): (256, False),
        ("--num-workers",): (2, False),
        ("--max-pixels",): (67108864, False),
        ("--allow-pipe",): (False, False),
        ("--image-column",): ("image", False),
        ("--key-column",): (None, False),
        ("--text-column",): (None, False),
        ("--engine",): ("local", False),
        ("--ray-address",): (None, False),
        ("--num-actors",): (None, False),
        ("--gpus-per-actor",): (0.0, False),
        ("--cpus-per-actor",): (1.0, False),
        ("--resume",): (False, False),
        ("--overwrite",): (False, False),
        ("--trust-remote-code",): (False, False),
        ("--format", "-f"): ("text", False),
    },
    "sample": {
        ("--checkpoint",): (None, True),
        ("--data", "-d"): (None, True),
        ("--out", "-o"): (None, True),
        ("--solver",): (None, False),
        ("--steps",): (None, False),
        ("--cfg-scale",): (None, False),
        ("--shift",): (None, False),
        ("--seed",): (0, False),
        ("--ema", "--no-ema"): (True, False),
        ("--batch-size", "-b"): (64, False),
        ("--split",): (None, False),
        ("--limit",): (None, False),
        ("--device",): ("auto", False),
        ("--overwrite",): (False, False),
        ("--format", "-f"): ("text", False),
    },
    "eval-recall": {
        ("--generated",): (None, False),
        ("--features",): (None, False),
        ("--k",): (None, False),
        ("--dedupe-captions",): (False, False),
        ("--max-memory",): ("2GB", False),
        ("--device",): ("cpu", False),
        ("--out", "-o"): (None, False),
        ("--update-run",): (False, False),
        ("--overwrite",): (False, False),
        ("--format", "-f"): ("text", False),
    },
}


def command(name: str) -> click.Command:
    group = typer.main.get_command(app)  # a lazy group: commands load on demand
    return group.get_command(click.Context(group), name)


def is_option(p) -> bool:
    # Typer 0.29 builds its commands with its own vendored click: not `click.Option` instances.
    return p.param_type_name == "option"


def fields_by_flag(cls: type) -> dict[str, dataclasses.Field]:
    """The primary flag of each field (`--field-name` or its metadata "flag", `--ema/--no-ema` -> `--ema`)."""
    out = {}
    for f in dataclasses.fields(cls):
        primary = (f.metadata.get("flag") or "--" + f.name.replace("_", "-")).split("/")[0]
        out[primary] = f
    return out


def field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_options_are_derived_from_the_config_fields(name):
    cls, own = COMMANDS[name]
    cmd = command(name)
    derived = {flag.split("/")[0]: origin for flag, origin in cmd.callback.__derived__.items()}
    options = [p for p in cmd.params if is_option(p)]
    hand_written = [p.opts[0] for p in options if p.opts[0] not in derived and p.opts[0] not in own]
    assert not hand_written, f"{name}: options declared by hand, not from a config field: {hand_written}"
    fields = fields_by_flag(cls)
    # Every field meant for the command line has its option, and only those.
    wanted = {flag for flag, f in fields.items() if f.metadata.get("cli", True)}
    assert set(derived) == wanted
    for p in options:
        if p.opts[0] not in derived:
            continue
        f = fields[p.opts[0]]
        assert derived[p.opts[0]] == f"{cls.__name__}.{f.name}"
        assert f.metadata["help"] and p.help.startswith(f.metadata["help"].replace("[", "\\[")), p.opts
        assert set(p.opts[1:]) == set(f.metadata.get("flags", ())), p.opts
        if p.default is not None:  # given-only options (eval-recall) default to None: "not given"
            assert getattr(p.default, "value", p.default) == field_default(f), p.opts


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_earlier_spelling_keeps_its_default(name):
    cls, _ = COMMANDS[name]
    cmd = command(name)
    by_spelling = {s: p for p in cmd.params if is_option(p) for s in p.opts + p.secondary_opts}
    fields = fields_by_flag(cls)
    derived = {flag.split("/")[0] for flag in cmd.callback.__derived__}
    for spellings, (default, required) in BEFORE[name].items():
        params = {id(by_spelling.get(s)) for s in spellings}
        assert len(params) == 1 and None not in {by_spelling.get(s) for s in spellings}, (name, spellings)
        p = by_spelling[spellings[0]]
        assert p.required == required, (name, spellings)
        got = getattr(p.default, "value", p.default)
        if got is None and p.opts[0] in derived and not required:  # a given-only flag: the field's default
            got = field_default(fields[p.opts[0]])
        assert got == default, (name, spellings, got)
    new = {p.opts[0] for p in cmd.params if is_option(p)} - {s[0] for s in BEFORE[name]}
    assert new <= {"--help"}, (name, new)
