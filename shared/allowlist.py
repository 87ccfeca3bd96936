"""Egress allow-lists: which host names a sandbox may reach through the proxy.

An entry is an exact host name (``api.example.com``), a wildcard that covers
every name below a domain (``*.example.com``, not ``example.com`` itself) or
an IP literal. Settings validate entries with ``parse_host_pattern``; the
egress proxy asks an ``AllowList`` about each connection it is given.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_NAME_MAX = 253


class Match(StrEnum):
    """How a host matched an allow-list, if at all."""

    EXACT = "exact"
    WILDCARD = "wildcard"
    NONE = "none"


def is_ip_literal(host: str) -> bool:
    """True for an IPv4 or IPv6 address written as such."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalise_host(host: str) -> str:
    """Lower-case a host and drop one trailing dot, as DNS compares names."""
    return host.strip().lower().removesuffix(".")


def parse_host_pattern(entry: str) -> str:
    """Return ``entry`` in its canonical form, or raise ``ValueError``.

    The message names the accepted forms, since an operator reads it in a
    configuration error.
    """
    pattern = normalise_host(entry)
    if is_ip_literal(pattern):
        return str(ipaddress.ip_address(pattern))
    name = pattern.removeprefix("*.")
    if "*" in name or not _is_host_name(name):
        raise ValueError(
            f"{entry!r} is not a host name, a wildcard or an IP address; "
            "accepted: 'api.example.com', '*.example.com' (every name below "
            "example.com) or '203.0.113.7'"
        )
    # One label after the star would cover a whole top-level domain.
    if pattern.startswith("*.") and "." not in name:
        raise ValueError(
            f"{entry!r} would allow a whole top-level domain; a wildcard "
            "needs at least two labels after '*.', such as '*.example.com'"
        )
    return pattern


def _is_host_name(name: str) -> bool:
    if not name or len(name) > _NAME_MAX:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


@dataclass(frozen=True)
class AllowList:
    """The hosts one session may reach, from its profile's validated entries."""

    exact: frozenset[str]
    suffixes: tuple[str, ...]

    @classmethod
    def of(cls, entries: Iterable[str]) -> AllowList:
        """Build the list from entries that ``parse_host_pattern`` accepted."""
        exact, suffixes = set(), []
        for entry in entries:
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                exact.add(entry)
        return cls(exact=frozenset(exact), suffixes=tuple(suffixes))

    def match(self, host: str) -> Match:
        """How ``host`` is listed; an IP literal matches only when listed."""
        host = normalise_host(host)
        if is_ip_literal(host):
            # Written forms differ ("::1" and "0::1"); compare the addresses.
            host = str(ipaddress.ip_address(host))
            return Match.EXACT if host in self.exact else Match.NONE
        if not _is_host_name(host):
            return Match.NONE
        if host in self.exact:
            return Match.EXACT
        if any(host.endswith(suffix) for suffix in self.suffixes):
            return Match.WILDCARD
        return Match.NONE
