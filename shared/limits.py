"""Resource-limit grammar: memory sizes, CPU counts and pids limits.

Memory follows the Docker CLI's grammar, so an operator can paste what they
would give `docker run --memory`. Every parser raises ``ValueError`` with a
sentence naming the accepted forms; pydantic prefixes it with the field.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MIB = 1024**2
# Docker refuses a memory limit below 6 MiB at container creation; saying so
# at validation turns a late start failure into an early config error.
MIN_MEMORY_BYTES = 6 * MIB
# The Engine keeps limits in signed 64-bit integers and refuses anything
# larger when the container is created, long after validation could say so.
MAX_MEMORY_BYTES = 2**63 - 1
# More CPUs than Linux can address (NR_CPUS tops out at 8192); it also keeps
# huge decimals such as 1e999999 from overflowing the conversion.
MAX_CPUS = 8192
UNLIMITED_PIDS = -1

_MEMORY_FORMS = (
    "a size such as 512m, 512M, 1g, 1Gi, 1GB, 2 GiB or 2.5g (a number, "
    "at most one space, then b, k, m, g, t or p, optionally followed by i "
    "and/or b; the units are powers of 1024)"
)
_MEMORY_RE = re.compile(
    r"(?P<number>\d+(?:\.\d+)?) ?(?:(?P<unit>[kmgtp])i?b?|b)?", re.IGNORECASE
)
_UNIT_EXPONENT = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_memory_bytes(value: object) -> int:
    """Return the byte count of a Docker-style memory size.

    Integers are taken as bytes. Raises ``ValueError`` for anything outside
    the grammar or below Docker's 6 MiB floor.
    """
    if isinstance(value, bool):
        raise ValueError(f"a boolean is not a memory size; expected {_MEMORY_FORMS}")
    if not isinstance(value, int | str):
        raise ValueError(f"expected {_MEMORY_FORMS}")
    memory_bytes = value if isinstance(value, int) else _memory_string_bytes(value)
    if memory_bytes < MIN_MEMORY_BYTES:
        raise ValueError(
            f"{value!r} is below the minimum of 6 MiB that Docker accepts; "
            f"give {_MEMORY_FORMS}"
        )
    if memory_bytes > MAX_MEMORY_BYTES:
        raise ValueError(
            f"{_shown(value)} is above the 8 EiB that Docker can hold; "
            f"give {_MEMORY_FORMS}"
        )

    return memory_bytes


def _memory_string_bytes(text: str) -> int:
    match = _MEMORY_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a memory size; expected {_MEMORY_FORMS}")
    unit = (match["unit"] or "").lower()
    # Longer numbers are above any limit, and past a million digits the
    # exact product below would overflow the decimal context.
    if len(match["number"]) > 40:
        return MAX_MEMORY_BYTES + 1
    exact = Decimal(match["number"]) * 1024 ** _UNIT_EXPONENT[unit]
    return int(exact)


def _shown(value: object) -> str:
    """``repr`` of a value cut short, so a huge one cannot flood a message."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def parse_nano_cpus(value: object) -> int:
    """Return Docker's ``NanoCpus`` for a positive decimal CPU count."""
    forms = "a positive decimal number of CPUs such as 0.5, 1 or 2.25"
    if isinstance(value, bool):
        raise ValueError(f"a boolean is not a CPU count; expected {forms}")
    if not isinstance(value, int | float | str):
        raise ValueError(f"expected {forms}")
    try:
        cpus = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number; expected {forms}") from None
    if not cpus.is_finite() or cpus <= 0:
        raise ValueError(f"{_shown(value)} is not positive; expected {forms}")
    if cpus > MAX_CPUS:
        raise ValueError(
            f"{_shown(value)} is more than the {MAX_CPUS} CPUs Linux can address; "
            f"expected {forms}"
        )
    nano_cpus = int(cpus * 1_000_000_000)
    # Below a thousandth of a CPU the CFS quota Docker derives is meaningless.
    if nano_cpus < 1_000_000:
        raise ValueError(f"{value!r} is below 0.001 CPUs; expected {forms}")

    return nano_cpus


def parse_pids_limit(value: object) -> int:
    """Return Docker's ``PidsLimit``: a positive count, or -1 for unlimited.

    Zero is refused: Docker reads it as "unlimited" on some versions and as
    "unchanged" on others, so an operator must say ``unlimited``.
    """
    forms = "a positive whole number of processes, or 'unlimited' (or -1)"
    if isinstance(value, bool):
        raise ValueError(f"a boolean is not a pids limit; expected {forms}")
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return UNLIMITED_PIDS
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{value!r} is not a pids limit; expected {forms}")
    if value == 0:
        raise ValueError(f"0 is ambiguous for a pids limit; expected {forms}")
    if value < UNLIMITED_PIDS:
        raise ValueError(f"{value!r} is negative; expected {forms}")

    return value
