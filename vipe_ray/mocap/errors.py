"""Errors raised by the motion-capture parsers."""

from __future__ import annotations

import math


class MocapFormatError(ValueError):
    """A raw motion-capture file is malformed.

    The message always has the form ``<path>:<line>: <what is wrong, quoting the value>``
    where ``<line>`` is 1-based (0 when the problem is not tied to one line, e.g. a
    missing section detected at end of file is reported at the last line instead).
    """

    def __init__(self, path: str, line: int, message: str):
        self.path = str(path)
        self.line = int(line)
        self.detail = message
        super().__init__(f"{self.path}:{self.line}: {message}")

    def __reduce__(self):  # keep picklable (e.g. across process pools)
        return (type(self), (self.path, self.line, self.detail))


def finite_float(token: str, path: str, line: int, what: str) -> float:
    """Parse one number of a raw file; non-numeric or non-finite values raise :class:`MocapFormatError`."""
    try:
        value = float(token)
    except ValueError:
        raise MocapFormatError(path, line, f"{what}: non-numeric value {token!r}") from None
    if not math.isfinite(value):
        raise MocapFormatError(path, line, f"{what}: non-finite value {token!r}")
    return value
