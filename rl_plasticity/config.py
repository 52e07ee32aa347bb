"""Typed views of config nodes, with one clear error per bad value.

Hydra composes plain YAML; this module turns a node into a dataclass, checking each value's type
against the dataclass field and naming the full key (e.g. `agent.batch_size`) when it is wrong.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and what is valid."""


def check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return check_type(key, value, inner)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if annotation is list or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    return value


def from_node(cls: type[T], node: Mapping[str, Any], prefix: str) -> T:
    """Build dataclass `cls` from a config node; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}. Valid keys: {', '.join(sorted(names))}")
    values = {k: check_type(f"{prefix}.{k}" if prefix else k, node[k], hints[k]) for k in node}
    return cls(**values)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
