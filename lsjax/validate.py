"""The checks every typed config makes, written once: each failure names the field, the value and
what was expected, as a `ConfigError` raised where the value is given."""

from __future__ import annotations

import dataclasses
from typing import Any

from lsjax.errors import ConfigError


def check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is invalid; expected {expected}", field)


def is_int(value: Any, minimum: int | None = None) -> bool:
    """An int (not a bool), at least `minimum` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_number(value: Any) -> bool:
    """An int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def from_fields(cls, data: Any, what: str):
    """`cls(**data)` for a mapping of known fields only; names the unknown ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} config must be a mapping; got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} config field(s) {unknown}; expected a subset of {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{what} config: {e}") from None
