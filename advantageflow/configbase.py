"""Typed, nested configs from plain dicts: validation, suggestions and dotted overrides.

Configs are dataclasses.  :func:`from_dict` builds one from a YAML mapping, rejecting unknown
keys (naming the closest valid one) and wrong types (naming the key and the expected type).
A field may be a *tagged union*: its dict's ``name`` key picks a dataclass from a registry
(``field(metadata={"union": resolver})``), so a model's or task's options are typed too.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

import yaml

from advantageflow.registry import closest


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns in the message."""


def union_field(resolver: Callable[[str], type], default_name: str) -> Any:
    """A dataclass field whose type is picked by the ``name`` key of its dict."""
    return dataclasses.field(
        default_factory=lambda: resolver(default_name)(),
        metadata={"union": resolver, "default_name": default_name},
    )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting ints to floats etc.)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}': {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            hint = closest(str(value), [str(a) for a in args])
            more = f"; did you mean '{hint}'?" if hint else ""
            raise ConfigError(f"'{key}' must be one of {list(args)}, got {value!r}{more}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):  # NaN passes every comparison-based range check
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"'{key}': unsupported annotation {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = closest(str(key), list(fields))
            more = f"; did you mean '{prefix + '.' if prefix else ''}{hint}'?" if hint else ""
            raise ConfigError(f"unknown config key '{path}'{more}")
        resolver = fields[key].metadata.get("union")
        if resolver is not None:
            kwargs[key] = _from_union(resolver, value, path, fields[key].metadata["default_name"])
        else:
            kwargs[key] = coerce(value, hints[key], path)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{err}") from None
    return obj


def _from_union(resolver: Callable[[str], type], value: Any, path: str, default_name: str) -> Any:
    if dataclasses.is_dataclass(value):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"'{path}' must be a mapping (with a 'name' key), got {value!r}")
    value = {"name": default_name, **value}
    try:
        cls = resolver(value["name"])
    except KeyError as err:
        raise ConfigError(f"'{path}.name': {err}") from None
    return from_dict(cls, value, path)


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe dict of a (nested) dataclass config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> ``(["train", "lr"], 1e-4)``; values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.subkey=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-4" as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    """Set ``data[k0][k1]... = value``, creating intermediate mappings."""
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(keys)}': '{k}' is not a mapping")
        node = child
    node[keys[-1]] = value


def load_yaml(path: str) -> dict:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file '{path}' is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err.strerror or err}") from None
    except RecursionError:
        raise ConfigError(f"config file '{path}' is nested too deeply") from None
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())  # one line
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data
