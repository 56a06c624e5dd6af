"""Build frozen dataclasses from TOML tables, naming the bad key on any error.

One small converter serves the daemon's config and the hardware profiles: unknown keys, missing keys and wrong
types are all errors that say ``where.the.key: what is wrong``. A dataclass may check its own values in
``__post_init__`` by raising ``ValueError("field: message")``; the field is then named with its full path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

from .errors import ConfigError

T = TypeVar("T")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error is a ``ConfigError`` naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def build(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Make a ``cls`` from ``data``, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or '<top>'}: expected a table, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}{key}: unknown key (known keys here: {', '.join(names)})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}{f.name}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{where}{exc}") from exc


def _kind(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a float"}.get(type(value), type(value).__name__)


def _convert(tp: Any, value: Any, where: str) -> Any:
    if tp is Any:  # free-form data (an inline JSON Schema): checked by its owner
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {_kind(value)}")
        (item,) = get_args(tp)[:1]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or (origin is not None and origin.__name__ == "Mapping"):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {_kind(value)}")
        _key_tp, val_tp = get_args(tp)
        return {str(k): _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build(tp, value, f"{where}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_kind(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # a programming error, named all the same


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two TOML documents: tables merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def digest(obj: object) -> str:
    """A stable SHA-256 of a dataclass tree, for provenance."""
    plain = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj
    text = json.dumps(plain, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
