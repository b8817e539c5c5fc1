"""Helpers for declaring component parameters as frozen, validated attrs classes.

Every component's ``Params`` is an ``attrs.frozen`` class built from :func:`param`.
The help text lives in the field metadata so that ``lsm list-components`` and the
docs can show it, and validators raise :class:`ValueError` with a message that
reads well after ``file [table].key:`` (for example ``must be > 0 (got -1.0)``).
"""

from __future__ import annotations

import math
import typing
from typing import Any, Callable

import attrs

__all__ = [
    "param",
    "positive",
    "non_negative",
    "probability",
    "at_least",
    "in_range",
    "one_of",
    "ParamError",
    "coerce",
    "describe_type",
    "NONE_MARKER",
    "is_none",
]


class ParamError(ValueError):
    """A parameter value is invalid; ``key`` names the offending parameter."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def param(default: Any = attrs.NOTHING, *, help: str = "", validator: Any = None, **kw: Any) -> Any:
    """An attrs field whose help text is kept in its metadata."""
    return attrs.field(default=default, validator=validator, metadata={"help": help}, **kw)


def _check(pred: Callable[[Any], bool], text: str):
    def validate(inst, attribute, value):
        if value is not None and not pred(value):
            raise ParamError(attribute.name, f"must be {text} (got {value!r})")

    return validate


def positive(inst, attribute, value):
    _check(lambda v: v > 0, "> 0")(inst, attribute, value)


def non_negative(inst, attribute, value):
    _check(lambda v: v >= 0, ">= 0")(inst, attribute, value)


def probability(inst, attribute, value):
    _check(lambda v: 0.0 <= v <= 1.0, "in [0, 1]")(inst, attribute, value)


def at_least(lo: float):
    return _check(lambda v: v >= lo, f">= {lo}")


def in_range(lo: float, hi: float):
    return _check(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def one_of(*choices: Any):
    return _check(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


# ----------------------------------------------------------------------------------------
# Type coercion from TOML values: one place decides what a recipe may write for a type.

_NoneType = type(None)


def _fixed_length(tp: Any) -> bool:
    """``tuple[int, float]``: one value per position (a pair), as opposed to ``tuple[int, ...]``."""
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and bool(args) and Ellipsis not in args


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(describe_type(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        if _fixed_length(tp):
            return "[" + ", ".join(describe_type(a) for a in typing.get_args(tp)) + "]"
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {describe_type(args[0])}" if args else "list"
    if tp is _NoneType:
        return "none"
    return getattr(tp, "__name__", str(tp))


#: How a recipe writes "no value" for an ``Optional`` parameter: TOML has no null, and no
#: parameter takes a table, so this inline table cannot be mistaken for a real value
#: (a string such as "none" could be one). ``--unset table.key`` writes it.
NONE_MARKER: dict[str, bool] = {"none": True}
NONE_TOML = "{ none = true }"


def is_none(value: Any) -> bool:
    return value is None or value == NONE_MARKER


def _accepts_none(tp: Any) -> bool:
    return (
        tp is Any
        or tp is None
        or tp is _NoneType
        or (
            typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None))
            and _NoneType in typing.get_args(tp)
        )
    )


def coerce(value: Any, tp: Any) -> Any:
    """Convert a TOML value to ``tp`` or raise ValueError("expected ... (got ...)")."""
    if is_none(value):
        if _accepts_none(tp):
            return None
        raise ValueError(f"cannot be unset: it takes {describe_type(tp)}, and none is not one of its values")
    if tp is Any or tp is None:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"must be one of {describe_type(tp)} (got {value!r})")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(tp):
            if arg is _NoneType:
                continue
            try:
                return coerce(value, arg)
            except ValueError:
                pass
        hint = (
            " (TOML has no null: write none as { none = true }, on the command line --set 'KEY={none=true}')"
            if _accepts_none(tp) and isinstance(value, str) and value.strip().lower() in ("none", "null")
            else ""
        )
        raise ValueError(f"expected {describe_type(tp)} (got {value!r}){hint}")
    if origin in (tuple, list):
        return _coerce_sequence(value, tp, origin)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false (got {value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:
                raise ValueError(f"expected an integer that fits in 64 bits (got {value!r})")
            return value
        raise ValueError(f"expected an integer (got {value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # No setting means infinity or NaN: such a value would pass validation and stop
            # the run later with "loss is not finite" (or never stop).
            number = float(value) if isinstance(value, float) or abs(value) <= 1e308 else math.inf
            if not math.isfinite(number):
                raise ValueError(f"expected a finite number (got {value!r})")
            return number
        raise ValueError(f"expected a number (got {value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string (got {value!r})")
    return value


def _coerce_sequence(value: Any, tp: Any, origin: Any) -> Any:
    """A TOML array as ``tp``: ``tuple[int, ...]`` / ``list[str]`` item by item, ``tuple[int, float]``
    position by position (a pair such as ``[epoch, factor]``)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected {describe_type(tp)} (got {value!r})")
    if _fixed_length(tp):
        kinds = typing.get_args(tp)
        if len(value) != len(kinds):
            raise ValueError(f"expected {describe_type(tp)} (got {value!r})")
        try:
            return tuple(coerce(v, k) for v, k in zip(value, kinds))
        except ValueError:
            raise ValueError(f"expected {describe_type(tp)} (got {value!r})") from None
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    inner = args[0] if args else Any
    items = [coerce(v, inner) for v in value]
    return tuple(items) if origin is tuple else items
