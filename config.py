"""TOML config loading: one dataclass per [section], `section.key=value` overrides, typo suggestions.

Precedence: command line > TOML file > dataclass defaults. Values are coerced to each field's declared type
(int, float, str, bool, list[str], list[float]); an unknown section or key is an error naming it and suggesting
the nearest valid one. The section dataclasses live next to the code that uses them (data.DataConfig, ...);
train.Config composes them.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the file or `command line` and the key."""


def load_config(root_cls: type[T], path: str, overrides: typing.Sequence[str] = ()) -> T:
    """Build `root_cls` (a dataclass of section dataclasses) from a TOML file and `section.key=value` overrides."""
    cfg = root_cls()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for section_name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key '{section_name}' must be a [section]")
        for key, value in table.items():
            _set(cfg, f"{section_name}.{key}", value, path)
    for item in overrides:
        dotted, eq, text = item.partition("=")
        if not eq or "." not in dotted:
            raise ConfigError(f"command line: '{item}' is not section.key=value")
        try:  # a TOML literal (numbers, booleans, arrays); anything else is taken as a plain string
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        _set(cfg, dotted.strip(), value, "command line")
    for section_field in dataclasses.fields(cfg):  # re-run each section's own checks on the final values
        section = getattr(cfg, section_field.name)
        if hasattr(section, "__post_init__"):
            try:
                section.__post_init__()
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    return cfg


def _set(cfg: Any, dotted: str, value: Any, where: str) -> None:
    sections = [f.name for f in dataclasses.fields(cfg)]
    section_name, _, key = dotted.partition(".")
    if section_name not in sections:
        raise _unknown(section_name, sections, where, "section")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    keys = [f.name for f in dataclasses.fields(section)]
    if key not in keys:
        raise _unknown(dotted, [f"{section_name}.{k}" for k in keys], where, "key")
    setattr(section, key, _coerce(value, hints[key], f"{where}: {dotted}"))


def _unknown(name: str, valid: list[str], where: str, what: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(f"{where}: unknown {what} '{name}'{hint}")


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Convert a TOML or command-line value to a field's declared type, or fail naming the key."""
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):  # a,b,c on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def config_to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)
