"""Typed dataclasses from plain data (parsed YAML or JSON) and back: every unknown key, missing key and wrong
type is a ValueError naming the dotted key path. Used by the recipe loader; knows nothing of recipes."""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from typing import Any, Union


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist = 3, 6, 6


def show(value) -> str:
    """A bounded repr for messages: a YAML alias can make a value huge or self-containing."""
    return _REPR.repr(value)


_SCALARS = {bool: ("true or false", bool), int: ("an integer", int), float: ("a number", (int, float)),
            str: ("a string", str)}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, key: str):
    """`value` checked against annotation `tp` (dataclass, Optional/Union, list/tuple/dict, scalars)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for arg in options:
            try:
                return _coerce(arg, value, key)
            except ValueError as e:
                errors.append(e)
        deeper = [e for e in errors if len(options) == 1 or str(e).startswith((f"{key}.", f"{key}["))]
        if deeper:
            raise deeper[0]
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        raise ValueError(f"{key}: expected {names}, got {show(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if origin is tuple and isinstance(value, dict) and args and typing.get_origin(args[0]) is tuple:
            value = list(value.items())
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {show(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError(f"{key}: expected {len(args)} items, got {show(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {show(value)}")
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp in _SCALARS:
        what, kinds = _SCALARS[tp]
        if not isinstance(value, kinds) or (tp is not bool and isinstance(value, bool)):
            raise ValueError(f"{key}: expected {what}, got {show(value)}")
        return float(value) if tp is float else value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {show(value)}")
    return value


def from_dict(cls, data, key: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys, missing required keys and wrong types;
    errors carry the dotted key path."""
    where = key or "recipe"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of keys, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        path = f"{key}.{unknown[0]}" if key else str(unknown[0])
        raise ValueError(f"{path}: unknown key; {where} takes {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{key}.{name}" if key else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{path}: required key is missing")
            continue
        kwargs[name] = _coerce(hints[name], data[name], path)
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        parent, _, last = key.rpartition(".")
        if parent and msg.startswith((f"{last}.", f"{last}:", f"{last}=")):
            msg = f"{parent}.{msg}"  # a section that names itself as at the top level, nested here (tune.optim)
        named = not key or msg.startswith((f"{key}.", f"{key}:", f"{key}=")) or ":" in msg.split(" ")[0]
        raise ValueError(msg if named else f"{key}: {msg}") from None


def to_dict(cfg) -> dict:
    """Plain YAML/JSON-able dict of a (resolved) config: tuples become lists."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)
