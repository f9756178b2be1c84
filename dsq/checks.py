"""Small checks every layer shares: what counts as a number, a count, a reason.

Each raises ``InvalidArgument`` with one line that names the value; nothing here imports torch or numpy
(numpy's scalars count as numbers through the ``numbers`` ABCs they register with).
"""

from __future__ import annotations

import math
import numbers

from dsq.errors import InvalidArgument


def is_real(value) -> bool:
    """A real number (Python's or numpy's), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int when it is an integer >= ``minimum`` (a bool is not one)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise InvalidArgument(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def finite(name: str, value, rule=lambda v: v > 0, words: str = "> 0") -> float:
    """``value`` as a float when it is a finite real number for which ``rule`` holds."""
    if not is_real(value) or not math.isfinite(value) or not rule(value):
        raise InvalidArgument(f"{name} must be a finite number {words}, got {value!r}")
    return float(value)


def probability(name: str, value) -> float:
    """``value`` as a float in the open interval (0, 1), as alpha must be."""
    if not is_real(value) or not 0 < value < 1:
        raise InvalidArgument(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def first_line(error: BaseException | str, limit: int | None = None) -> str:
    """The first non-blank line of an error's message (its type's name when it says nothing), cut at ``limit``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else (type(error).__name__ if isinstance(error, BaseException) else "")
    return line[:limit] if limit else line
