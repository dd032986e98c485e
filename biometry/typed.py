"""One typed loader for every configuration file: a mapping -> a dataclass, key by key.

The trial config's sections, a preset's ``search:`` section, ``model.yaml`` and each
post-processing step's options are all read by :func:`from_mapping`: an unknown key, a value of
the wrong type or one its ``__post_init__`` refuses is one :class:`BiometryInputError` line naming
the file and the dotted key. Ints are accepted for floats and lists for tuples; nothing else is
converted.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from biometry.errors import BiometryInputError


def from_mapping(cls: type, values: Any, *, source: str, section: str = "",
                 base: Any = None) -> Any:
    """``cls`` (a dataclass) built from ``values`` over ``base`` (default: ``cls()``).

    ``section``: the dotted prefix the keys are named with (``"train"`` -> ``'train.lr'``).
    """
    prefix = f"{section}." if section else ""
    if values is None:
        return base if base is not None else cls()
    if not isinstance(values, dict):
        raise BiometryInputError(f"{source}: '{section or cls.__name__}' must be a mapping but got "
                                 f"{type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise BiometryInputError(f"{source}: unknown key '{prefix}{key}'; known keys: "
                                     f"{', '.join(sorted(fields))}")
        kwargs[key] = coerce(value, hints[key], key=f"{prefix}{key}", source=source)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (ValueError, TypeError) as err:
        where = f"{section}: " if section else ""
        raise BiometryInputError(f"{source}: {where}{err}") from None


def coerce(value: Any, hint: Any, *, key: str, source: str) -> Any:
    """``value`` as the annotation ``hint`` asks, or an error naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if type(value) in args and type(value) in (int, str, bool):  # ``float | int``: keep ints
            return value
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise BiometryInputError(f"{source}: '{key}' must be finite but got {value}")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if hint in (tuple, list) and isinstance(value, (list, tuple)):
        return hint(value)
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        item = args[0] if args else Any
        items = [v if item in (Any, Ellipsis) else coerce(v, item, key=key, source=source)
                 for v in value]
        return tuple(items) if origin is tuple else items
    if (origin is dict or hint is dict) and isinstance(value, dict):
        return dict(value)
    if hint is Any:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise BiometryInputError(f"{source}: '{key}' must be {expected} but got "
                             f"{type(value).__name__} {value!r}")
