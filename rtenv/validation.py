"""Argument checks shared by every stage: true integers and finite real numbers in a range, and
JSON objects without repeated keys.

Each check raises ``ValueError`` naming the argument, the bad value and the valid range, as every
public function in the toolkit promises. Bools are rejected as numbers (``True`` is an ``int`` in
Python, but never a meaningful count, seed or dose); numpy integers and floats are accepted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_integer(value: Any) -> bool:
    """Whether ``value`` is a Python or numpy integer (not a bool, not an integral float)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a Python or numpy int or float (not a bool, string or complex)."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer in ``[low, high]`` (either end may be open-ended)."""
    if not (is_integer(value) and (low is None or value >= low) and (high is None or value <= high)):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ValueError(f"{name} = {value!r} must be an integer in [{lo}, {hi}]")
    return int(value)


def check_real(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
               low_inclusive: bool = True) -> float:
    """``value`` as a ``float`` if it is a finite real number in the range (``low`` excluded when
    ``low_inclusive`` is false; an integer beyond float range is out of range)."""
    try:
        number = float(value) if is_real(value) else math.nan
    except OverflowError:
        number = math.nan
    above = number >= low if low_inclusive else number > low
    if not (math.isfinite(number) and above and number <= high):
        lower = "(-inf" if math.isinf(low) else f"{'[' if low_inclusive else '('}{low:g}"
        upper = "inf)" if math.isinf(high) else f"{high:g}]"
        where = "" if math.isinf(low) and math.isinf(high) else f" in {lower}, {upper}"
        raise ValueError(f"{name} = {value!r} is invalid; expected a finite number{where}")
    return number


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads(..., object_pairs_hook=unique_keys)``: an object's dict, with ``ValueError``
    on a repeated key (the default keeps the last value silently)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"repeated key {key!r}")
        obj[key] = value
    return obj


def check_density(density: Any) -> None:
    """``ValueError`` unless a relative electron density array is finite and non-negative."""
    if not (np.all(np.isfinite(density)) and np.min(density) >= 0):
        raise ValueError("density (relative electron density) has negative or non-finite values")
