"""The benchmarks' command-line values, refused before any work when out of
the range a run can use."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        if text.isascii() and text.isdecimal() and low <= int(text) <= high:
            return int(text)
        raise argparse.ArgumentTypeError(
            f"expected a whole number from {low} to {high}, not {text!r}"
        )

    return parse


def seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: from ``low`` to ``high`` seconds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if low <= value <= high:
            return value
        raise argparse.ArgumentTypeError(
            f"expected from {low:g} to {high:g} seconds, not {text!r}"
        )

    return parse
