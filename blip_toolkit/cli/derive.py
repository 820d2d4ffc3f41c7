"""Command-line options derived from the library's settings dataclasses, so every setting has one home:
its dataclass field (name, type, default, help) in the library. `--flag-name` is the field name with
dashes; the help is the field's `metadata["help"]`; extra spellings (`-b`, an old `--lr`) are
`metadata["flags"]`; choices are the field's `Literal` values; `metadata["cli"] = False` keeps a field
out of the command line.

    @derived(decoding=options(Decoding, max_new_tokens=10), run=options(RunOptions))
    def vqa(image: str, question: str, *, decoding: Decoding, run: RunOptions) -> None: ...

The command receives built dataclasses. For a command whose settings come from a config file as well
(`finetune --config`, `train-dit --config`), `options(..., given=True)` gives the flags no default and
passes the command a dict of the flags that were given ({"train.learning_rate": 3e-4, ...} with
`section="train"`), which go over the config file's values.

Typer reads a command's parameters from its signature; `derived` builds that signature from the
command's own parameters and the groups' fields (`__signature__`), and records where every derived
option came from (`__derived__`, read by tests/cli/test_settings_once.py).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import typer

from blip_toolkit.config import fields_own_first


@dataclass(frozen=True)
class Group:
    """The options of one settings dataclass: `defaults` override the field defaults for this command
    (the same decoding options default to 30 new tokens for caption, 10 for vqa), `only` / `exclude`
    pick fields, `section` prefixes the keys of given-values dicts, `given` makes the flags optional
    overrides (no default; the command gets a dict of what was given), `panel` groups them in --help."""

    cls: type
    defaults: dict[str, Any] = field(default_factory=dict)
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    section: str = ""
    given: bool = False
    panel: str | None = None

    def fields(self) -> list[dataclasses.Field]:
        return [
            f
            for f in fields_own_first(self.cls)
            if f.init
            and f.metadata.get("cli", True) is not False
            and (self.only is None or f.name in self.only)
            and f.name not in self.exclude
        ]

    def hint(self, name: str):
        return typing.get_type_hints(self.cls, include_extras=True)[name]


def options(
    cls: type,
    *,
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    section: str = "",
    given: bool = False,
    panel: str | None = None,
    **defaults: Any,
) -> Group:
    """The options of dataclass `cls` for one command (see `Group`)."""
    unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {sorted(unknown)}")
    return Group(cls, dict(defaults), only, exclude, section, given, panel)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def primary_flag(f: dataclasses.Field) -> str:
    """`--field-name`, or the field's own `metadata["flag"]` (`data.dir` is `--data`)."""
    return f.metadata.get("flag") or flag(f.name)


_CHOICES: dict[tuple, type] = {}


def choice_type(values: tuple) -> type:
    """A str Enum of `values` for Typer (cached: one choice set, one type)."""
    if values not in _CHOICES:
        members = {str(v).replace("+", "_").replace("-", "_").replace(".", "_") or "empty": v for v in values}
        _CHOICES[values] = enum.Enum("Choice", members, type=str)
    return _CHOICES[values]


def _without_none(hint) -> tuple[Any, bool]:
    """(the type inside `X | None`, True) or (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def _cli_type(hint, optional: bool) -> Any:
    """What Typer gets for a field's type: Literal choices become a str Enum (also inside a list)."""
    inner, was_optional = _without_none(hint)
    if typing.get_origin(inner) is Annotated:
        inner = typing.get_args(inner)[0]
    if typing.get_origin(inner) is Literal:
        inner = choice_type(typing.get_args(inner))
    elif typing.get_origin(inner) is list and typing.get_origin(typing.get_args(inner)[0]) is Literal:
        inner = list[choice_type(typing.get_args(typing.get_args(inner)[0]))]
    return inner | None if (optional or was_optional) else inner


def _unwrap(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _default(f: dataclasses.Field, group: Group):
    if f.name in group.defaults:
        return group.defaults[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _parameter(f: dataclasses.Field, group: Group, name: str) -> inspect.Parameter:
    hint = _cli_type(group.hint(f.name), optional=group.given)
    default = None if group.given else _default(f, group)
    help_text = f.metadata.get("help", "").replace("[", "\\[")  # literal brackets, not Rich markup
    if group.given:  # no default on the flag ("not given"); the field's default shown in the help
        shown = _default(f, group)
        if shown is not False and shown not in (dataclasses.MISSING, None, [], (), ""):
            help_text = f"{help_text} \\[default: {_unwrap(shown)}]".strip()
    option = typer.Option(
        primary_flag(f),
        *f.metadata.get("flags", ()),
        help=help_text,
        show_default=not group.given,
        rich_help_panel=group.panel,
        **f.metadata.get("typer", {}),
    )
    kind = inspect.Parameter.KEYWORD_ONLY
    if default is dataclasses.MISSING:
        return inspect.Parameter(name, kind, annotation=Annotated[hint, option])
    return inspect.Parameter(name, kind, default=default, annotation=Annotated[hint, option])


def derived(**groups: Group) -> Callable:
    """Decorate a command whose keyword parameters named like `groups` receive the groups' settings
    (see the module docstring)."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        # Resolved annotations (a module with `from __future__ import annotations` has strings).
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints.get(name, p.annotation))
            for name, p in signature.parameters.items()
            if name not in groups
        ]
        taken = {p.name for p in own}
        generated: list[inspect.Parameter] = []
        sources: dict[str, tuple[str, str]] = {}  # parameter -> (group, field)
        flags: dict[str, str] = {}  # --flag -> "Class.field"
        for group_name, group in groups.items():
            for f in group.fields():
                parameter = f.name if f.name not in taken else f"{group_name}__{f.name}"
                if parameter in taken:
                    raise TypeError(f"{command.__name__}: two options named {parameter}")
                taken.add(parameter)
                generated.append(_parameter(f, group, parameter))
                sources[parameter] = (group_name, f.name)
                flags[primary_flag(f)] = f"{group.cls.__name__}.{f.name}"

        def run(**kwargs):
            built: dict[str, Any] = {}
            for group_name, group in groups.items():
                values = {
                    field_name: _unwrap(kwargs.pop(parameter))
                    for parameter, (owner, field_name) in sources.items()
                    if owner == group_name
                }
                if group.given:
                    prefix = f"{group.section}." if group.section else ""
                    built[group_name] = {prefix + k: v for k, v in values.items() if v is not None}
                else:
                    built[group_name] = group.cls(**values)
            return command(**kwargs, **built)

        # Typer reads the parameters from the signature: the command's own first, then the groups'.
        keyword = inspect.Parameter.KEYWORD_ONLY
        ordered = (
            [p for p in own if p.kind is not keyword] + [p for p in own if p.kind is keyword] + generated
        )
        run.__signature__ = signature.replace(parameters=ordered)
        run.__name__, run.__qualname__, run.__doc__ = command.__name__, command.__qualname__, command.__doc__
        run.__module__ = command.__module__
        run.__derived__ = flags
        return run

    return decorate
