"""Specification of egress allow-list entries and of matching hosts to them."""

from __future__ import annotations

import pytest

from shared.allowlist import AllowList, Match, parse_host_pattern

LISTED = AllowList.of(
    parse_host_pattern(entry)
    for entry in ("api.example.com", "*.pypi.org", "203.0.113.7", "2001:db8::1")
)


class TestParseHostPattern:
    """parse_host_pattern accepts names, '*.' wildcards and IP literals."""

    @pytest.mark.parametrize(
        ("entry", "canonical"),
        [
            ("Api.Example.COM", "api.example.com"),
            ("files.example.com.", "files.example.com"),
            ("*.Example.com", "*.example.com"),
            ("2001:DB8:0::1", "2001:db8::1"),
            ("localhost", "localhost"),
        ],
    )
    def test_canonical_forms(self, entry: str, canonical: str) -> None:
        """Entries are lower-cased, lose a trailing dot, addresses compressed."""
        assert parse_host_pattern(entry) == canonical

    @pytest.mark.parametrize(
        "entry",
        ["", "*", "*.com", "a.*.com", "*a.example.com", "exa mple.com", "-x.com"],
    )
    def test_refused_entries(self, entry: str) -> None:
        """Anything else is refused with a message naming the entry."""
        with pytest.raises(ValueError, match=r"example\.com") as refused:
            parse_host_pattern(entry)

        assert repr(entry) in str(refused.value)


class TestAllowListMatch:
    """AllowList.match says whether, and how, a host is listed."""

    @pytest.mark.parametrize(
        ("host", "expected"),
        [
            ("api.example.com", Match.EXACT),
            ("API.example.com.", Match.EXACT),
            ("example.com", Match.NONE),
            ("evil-api.example.com", Match.NONE),
            ("files.pypi.org", Match.WILDCARD),
            ("a.b.pypi.org", Match.WILDCARD),
            ("pypi.org", Match.NONE),
            ("notpypi.org", Match.NONE),
            ("pypi.org.evil.test", Match.NONE),
        ],
    )
    def test_names(self, host: str, expected: Match) -> None:
        """Exact names match themselves; '*.d' matches names below d only."""
        assert LISTED.match(host) is expected

    @pytest.mark.parametrize(
        ("host", "expected"),
        [
            ("203.0.113.7", Match.EXACT),
            ("2001:db8:0:0::1", Match.EXACT),
            ("203.0.113.8", Match.NONE),
            ("127.0.0.1", Match.NONE),
            ("169.254.169.254", Match.NONE),
        ],
    )
    def test_ip_literals_match_only_when_listed(
        self, host: str, expected: Match
    ) -> None:
        """An address matches only an entry of the same address."""
        assert LISTED.match(host) is expected

    def test_malformed_host_matches_nothing(self) -> None:
        """A host that is not a name cannot slip under a wildcard."""
        assert LISTED.match("x y.pypi.org") is Match.NONE
