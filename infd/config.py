"""Typed configuration: dataclasses built from plain mappings (YAML, JSON, Hydra).

Every component owns one dataclass next to its code. `from_mapping` turns a nested
mapping into such a dataclass and fails on an unknown key or a wrong type with the
full dotted key and a hint, so a typo in a config stops the run at start.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}{name}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return from_mapping(hint, value, prefix=key + ".")
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] / Union[...] or X | None
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):  # the first alternative that fits
            try:
                return _convert(inner, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(" or ".join(errors))
    if origin in (tuple, list):
        if isinstance(value, str):  # a single string where a list is expected: one item
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {list(allowed)}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"config key '{key}' must be {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be int, got {value!r}")
    return value


def to_mapping(obj: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists, JSON-ready)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def load_mapping(path: str | Path) -> dict:
    """Read a YAML or JSON file into a dict."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text) or {}
