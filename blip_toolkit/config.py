"""Dataclass configs: load TOML / YAML / JSON, apply command-line overrides, refuse unknown keys,
and dump the resolved config next to the outputs it produced.

A config is a dataclass whose fields are scalars, lists, or nested config dataclasses (sections).
Files use the same nesting (`[train]` in TOML, `train:` in YAML); overrides use dotted keys
(`train.learning_rate=1e-4`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from blip_toolkit.errors import ConfigError

C = TypeVar("C")

# Choices shared by several configs, declared once (the CLI derives its option choices from these).
MixedPrecision = Literal["no", "fp16", "bf16"]
MIXED_PRECISION: tuple[str, ...] = typing.get_args(MixedPrecision)
# `--quantize` of caption / vqa / retrieval / extract-embeddings (models/quantize.py).
Quantize = Literal["int8", "4bit"]
QUANTIZE_MODES: tuple[str, ...] = typing.get_args(Quantize)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    flags: tuple[str, ...] = (),
    flag: str | None = None,
    factory: Any = dataclasses.MISSING,
    cli: bool = True,
    **typer: Any,
) -> Any:
    """A config field with what the command line derives from it (cli/derive.py): the option's help,
    its name when it is not `--field-name` (`flag`), extra spellings (`flags`, e.g. an old `--lr`), Typer
    keywords, or `cli=False` for a file-only key.
    The field is the setting's one home: config-file key, `--set` key and `--flag-name` all come from it."""
    metadata = {"help": help, "flag": flag, "flags": flags, "cli": cli, "typer": typer}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a dict; the format is chosen by extension."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r} (use .toml, .yaml or .json)")
    except ConfigError:
        raise
    except Exception as exc:  # the parsers' own messages carry line numbers
        raise ConfigError(f"{path}: cannot parse: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table / mapping")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse `--set key.sub=value` items; values are read as JSON when possible (numbers, booleans,
    lists), else kept as strings."""
    result: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        result[key.strip()] = value
    return result


def build_config(
    cls: type[C],
    values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    source: str = "config",
    aliases: dict[str, str] | None = None,
) -> C:
    """Build `cls` from nested `values` (a file) then dotted `overrides` (flags; None values are
    skipped, meaning "not given"). Unknown keys anywhere are an error that lists them all.
    `aliases`: old dotted key -> its current name (accepted in files and overrides alike)."""
    aliases = aliases or {}
    merged = _deep_copy(values or {})
    _rename_aliases(merged, aliases, source)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(merged, aliases.get(dotted, dotted), value)
    unknown = sorted(_unknown_keys(cls, merged))
    if unknown:
        known = ", ".join(sorted(_known_keys(cls)))
        raise ConfigError(f"{source}: unknown key(s): {', '.join(unknown)}", hint=f"known keys: {known}")
    return _construct(cls, merged, prefix="", source=source)


def _rename_aliases(data: dict[str, Any], aliases: dict[str, str], source: str) -> None:
    for old, new in aliases.items():
        *path, leaf = old.split(".")
        node = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        new_leaf = new.split(".")[-1]
        if new_leaf in node:
            raise ConfigError(f"{source}: {old} and {new} are the same setting; give one of them")
        node[new_leaf] = node.pop(leaf)


def fields_own_first(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields of `cls`, those it declares first, then those it inherits (a trainer's
    own settings before the training loop's): the order of --help and of a dumped config."""
    inherited = {name for base in cls.__mro__[1:] for name in getattr(base, "__dataclass_fields__", {})}
    own = set(vars(cls).get("__annotations__", {})) - inherited
    return sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)


def _as_dict_own_first(config: Any) -> dict[str, Any]:
    return {
        f.name: _as_dict_own_first(value)
        if dataclasses.is_dataclass(value)
        else dataclasses.asdict(config)[f.name]
        for f in fields_own_first(type(config))
        for value in [getattr(config, f.name)]
    }


def dump_config(config: Any, fmt: str = "toml") -> str:
    """A dataclass config as TOML (None values become comments: unset means the default) or JSON.
    Either parses back to the same config with `build_config`."""
    data = _as_dict_own_first(config)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    lines = ["# blip config; unset keys are commented out"]
    sections = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines += [_toml_line(key, value) for key, value in data.items() if key not in sections]
    for name, values in sections.items():
        lines += ["", f"[{name}]"]
        lines += [_toml_line(key, value) for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_line(key: str, value: Any) -> str:
    return f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data, default=str))


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_keys(cls: type, data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    hints = _hints(cls)
    for key, value in data.items():
        if key not in hints:
            out.append(prefix + key)
            continue
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            out.extend(_unknown_keys(sub, value, prefix=f"{prefix}{key}."))
    return out


def _known_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for key, sub in _hints(cls).items():
        if dataclasses.is_dataclass(sub):
            out.extend(_known_keys(sub, prefix=f"{prefix}{key}."))
        else:
            out.append(prefix + key)
    return out


def _construct(cls: type[C], data: dict[str, Any], *, prefix: str, source: str) -> C:
    kwargs = {}
    hints = _hints(cls)
    for name in _fields(cls):
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(data[name], dict):
                raise ConfigError(f"{source}: {prefix}{name} must be a section")
            kwargs[name] = _construct(hint, data[name], prefix=f"{prefix}{name}.", source=source)
        else:
            kwargs[name] = _coerce(data[name], hint, f"{prefix}{name}", source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: {key}: cannot use {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key, source) for v in value]
        return items if origin is list else tuple(items)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())
        ):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from exc
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return str(value)
    return value


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """ "2GB" -> 2_000_000_000, "512MiB" -> 536_870_912, "1e9" -> 1_000_000_000."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"--max-memory {text!r}: use a size such as 2GB, 512MB or 1GiB")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"--max-memory {text!r}: must be positive")
    return value
