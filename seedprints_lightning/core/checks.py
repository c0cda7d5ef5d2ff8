"""Argument checks: one message style and one error type for every module.

Every message reads ``"<name> must be <what>[ (<hint>)], got <value>"``, lower case and
without a full stop, and every check raises :class:`~seedprints_lightning.core.errors.InputError`
(a ``ValueError``). ``bool`` is never accepted as a number: ``True`` is an ``int`` to Python,
but never what a user meant by ``every_n_steps=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["check_bool", "check_choice", "check_int", "check_number"]


def _fail(name: str, what: str, value: Any, hint: str | None) -> InputError:
    return InputError(f"{name} must be {what}{f' ({hint})' if hint else ''}, got {value!r}")


def _bound(value: float) -> str:
    # Integers in full (a seed bound of 2**64 - 1 must not print as 1.84467e+19), floats short.
    return str(value) if isinstance(value, (int, np.integer)) else f"{value:g}"


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_bound(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_bound(high)}"
    return ""


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              hint: str | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (numpy integers accepted, bools and floats not)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        raise _fail(name, "an integer" + _range(low, high, False, False), value, hint)
    return int(value)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str | None = None) -> float:
    """``value`` as a finite ``float`` within the bounds (open or closed at each end)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    ok = ok and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        what = "a finite number" if low is None or high is None else "a number"
        raise _fail(name, what + _range(low, high, low_open, high_open), value, hint)
    return float(value)


def check_bool(name: str, value: Any, *, hint: str | None = None) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value, hint)
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], *, hint: str | None = None) -> Any:
    """``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        shown = [repr(c) for c in options]
        what = " or ".join(shown) if len(shown) == 2 else "one of " + ", ".join(shown)
        raise _fail(name, what, value, hint)
    return value
