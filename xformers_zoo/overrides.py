"""Typed, frozen configuration dataclasses: overriding fields by dotted name with type checks,
parsing command-line strings into field types, and round-tripping through plain dicts (JSON)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A field that does not exist, or a value of the wrong type or out of the accepted set."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_names(cfg_or_cls: Any) -> list[str]:
    """Names of a config dataclass's fields, in declaration order."""
    return [f.name for f in dataclasses.fields(cfg_or_cls)]


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; strings are parsed into the type.

    Accepted annotations: bool, int, float, str, Literal[...], tuple[X, ...], X | None, Any and
    config dataclasses (given as a dataclass instance or a mapping of its fields).
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{where}: {value!r} is not accepted; choose one of {list(allowed)}")
    if origin is tuple:
        (item_tp, *rest) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a tuple, got {value!r}")
        return tuple(coerce(v.strip() if isinstance(v, str) else v, item_tp, where) for v in value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value)
        raise ConfigError(f"{where}: expected {tp.__name__} fields, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def replace(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Returns ``cfg`` with ``overrides`` applied; keys may be dotted ("train.lr") to reach
    nested config dataclasses. An unknown field raises naming it and listing the known ones."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    hints = _hints(type(cfg))
    names = field_names(cfg)
    for key, value in overrides.items():
        head, _, tail = key.partition(".")
        if head not in names:
            raise ConfigError(
                f"unknown field {key!r} in {type(cfg).__name__}; known fields: {', '.join(names)}"
            )
        if tail:
            current = getattr(cfg, head)
            if not dataclasses.is_dataclass(current):
                raise ConfigError(
                    f"{key!r}: {head!r} is a {_type_name(hints[head])}, not a section")
            nested.setdefault(head, {})[tail] = value
        else:
            direct[head] = coerce(value, hints[head], f"{type(cfg).__name__}.{head}")
    for head, sub in nested.items():
        base = direct.get(head, getattr(cfg, head))
        direct[head] = replace(base, sub)
    return dataclasses.replace(cfg, **direct)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as nested plain dicts (tuples become lists), ready for JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = {"__type__": type(value).__name__, **to_dict(value)}
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Builds a config dataclass from ``to_dict`` output, checking every field's type."""
    data = {k: v for k, v in data.items() if k != "__type__"}
    return replace(cls(), data) if _all_defaulted(cls) else cls(**_coerced(cls, data))


def _all_defaulted(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _coerced(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    hints = _hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ConfigError(f"unknown fields {sorted(unknown)} for {cls.__name__}")
    return {k: coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in data.items()}


def dumps(cfg: Any) -> str:
    """Pretty JSON of a config, stable key order, used for printing and saving."""
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """Parses ``["train.lr=0.1", "model.num_layers=2"]`` into a dict of dotted key -> raw string."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        out[key.strip()] = value.strip()
    return out


def parse_scoped(items: Sequence[str],
                 scopes: Mapping[str, Sequence[str]]) -> list[tuple[str | None, str]]:
    """``[scope:]section.field=value`` items as (scope or None, assignment). A scope must be one
    of the names in ``scopes`` (what they are -> names, e.g. {"task": [...]}, for the error
    message); a malformed assignment raises naming it."""
    known = {name for names in scopes.values() for name in names}
    out: list[tuple[str | None, str]] = []
    for item in items:
        scope, sep, assignment = item.partition(":")
        if not sep or "=" in scope:  # no scope, or a value holding a colon
            out.append((None, item))
            continue
        if scope not in known:
            kinds = [f"a {kind} ({', '.join(names)})" for kind, names in scopes.items()]
            raise ConfigError(f"override {item!r}: {scope!r} is "
                              f"{'neither ' if len(kinds) > 1 else 'not '}{' nor '.join(kinds)}")
        out.append((scope, assignment))
    parse_assignments([a for _, a in out])
    return out
