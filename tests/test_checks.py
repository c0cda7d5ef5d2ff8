"""The shared argument checks: what each accepts, and the one message style."""

from __future__ import annotations

import numpy as np
import pytest

from seedprints_lightning.core.checks import check_bool, check_choice, check_int, check_number
from seedprints_lightning.core.errors import InputError


def test_check_int_accepts_ints_in_range_and_returns_int() -> None:
    assert check_int("n", 3, low=1) == 3
    got = check_int("n", np.int64(5), low=0, high=5)
    assert got == 5 and type(got) is int


@pytest.mark.parametrize("value, kwargs, message", [
    (0, {"low": 1}, r"^n must be an integer >= 1, got 0$"),
    (True, {"low": 0}, r"^n must be an integer >= 0, got True$"),
    (2.0, {}, r"^n must be an integer, got 2.0$"),
    ("3", {"low": 1}, r"^n must be an integer >= 1, got '3'$"),
    (65, {"low": 0, "high": 64, "hint": "0 turns it off"}, r"^n must be an integer in \[0, 64\] \(0 turns it off\), "
                                                           r"got 65$"),
])
def test_check_int_rejects_with_one_message_style(value, kwargs, message) -> None:
    with pytest.raises(InputError, match=message):
        check_int("n", value, **kwargs)


def test_large_integer_bounds_print_in_full() -> None:
    with pytest.raises(InputError, match=r"in \[0, 18446744073709551615\], got -1$"):
        check_int("seed", -1, low=0, high=2**64 - 1)


def test_check_number_bounds_open_and_closed() -> None:
    assert check_number("x", 1, low=0.0) == 1.0
    assert check_number("a", 0.5, low=0.0, high=1.0, low_open=True, high_open=True) == 0.5
    assert check_number("r", 1.0, low=0.0, high=1.0, low_open=True) == 1.0
    with pytest.raises(InputError, match=r"^a must be a number in \(0, 1\), got 1.0$"):
        check_number("a", 1.0, low=0.0, high=1.0, low_open=True, high_open=True)
    with pytest.raises(InputError, match=r"^t must be a finite number > 0, got 0.0$"):
        check_number("t", 0.0, low=0.0, low_open=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "1", None])
def test_check_number_rejects_non_finite_bool_and_text(value) -> None:
    with pytest.raises(InputError, match=r"^x must be a finite number, got "):
        check_number("x", value)


def test_check_bool_and_choice() -> None:
    assert check_bool("flag", False) is False
    with pytest.raises(InputError, match=r"^flag must be True or False, got 1$"):
        check_bool("flag", 1)
    assert check_choice("mode", "base", ("coset", "base")) == "base"
    with pytest.raises(InputError, match=r"^mode must be 'coset' or 'base', got 'both'$"):
        check_choice("mode", "both", ("coset", "base"))
    with pytest.raises(InputError, match=r"^act must be one of 'warn', 'stop', 'raise', got 'x'$"):
        check_choice("act", "x", ("warn", "stop", "raise"))
