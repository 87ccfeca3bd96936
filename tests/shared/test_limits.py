"""Specification of the resource-limit grammar (field cases C05 and C06)."""

from __future__ import annotations

import pytest

from shared.limits import parse_memory_bytes, parse_nano_cpus, parse_pids_limit


class TestParseMemoryBytes:
    """Docker-style memory sizes become byte counts."""

    @pytest.mark.parametrize(
        ("text", "memory_bytes"),
        [
            ("512m", 536870912),
            ("512M", 536870912),
            ("1g", 1073741824),
            ("1Gi", 1073741824),
            ("1GB", 1073741824),
            ("2 GiB", 2147483648),
            ("2.5g", 2684354560),
            ("0.5g", 536870912),
        ],
    )
    def test_field_case_sizes(self, text: str, memory_bytes: int) -> None:
        """Each C05 size parses to its exact byte count in powers of 1024."""
        assert parse_memory_bytes(text) == memory_bytes

    def test_integer_is_bytes(self) -> None:
        """An integer is taken as a count of bytes."""
        assert parse_memory_bytes(7 * 1024**2) == 7340032

    def test_below_docker_floor(self) -> None:
        """5m is refused as below the 6 MiB Docker accepts."""
        with pytest.raises(ValueError, match="6 MiB"):
            parse_memory_bytes("5m")

    @pytest.mark.parametrize("text", ["", "1.2.3g", "-1g", "10x", "2  GiB"])
    def test_malformed_sizes(self, text: str) -> None:
        """A string outside the grammar is refused naming the accepted forms."""
        with pytest.raises(ValueError, match="is not a memory size; expected a size"):
            parse_memory_bytes(text)

    @pytest.mark.parametrize("value", [2**63, "8193p", "9" * 2_000_000])
    def test_above_what_docker_holds(self, value: object) -> None:
        """A size beyond Docker's 64-bit limit is refused, however long."""
        with pytest.raises(ValueError, match="above the 8 EiB") as refused:
            parse_memory_bytes(value)

        assert len(str(refused.value)) < 400

    @pytest.mark.parametrize("value", [1.5, None])
    def test_other_types(self, value: object) -> None:
        """A float or None is not a memory size."""
        with pytest.raises(ValueError, match=r"^expected a size such as 512m"):
            parse_memory_bytes(value)

    @pytest.mark.parametrize("value", [True, False])
    def test_booleans_refused(self, value: bool) -> None:
        """A boolean is refused as one, not taken as 1 or 0 bytes."""
        with pytest.raises(ValueError, match=r"^a boolean is not a memory size"):
            parse_memory_bytes(value)


class TestParseNanoCpus:
    """CPU counts become Docker's NanoCpus."""

    @pytest.mark.parametrize(
        ("value", "nano_cpus"),
        [("0.5", 500000000), ("1", 1000000000), (2.25, 2250000000), (3, 3000000000)],
    )
    def test_positive_decimals(self, value: object, nano_cpus: int) -> None:
        """A positive decimal count is that many billionths of a CPU."""
        assert parse_nano_cpus(value) == nano_cpus

    @pytest.mark.parametrize(
        "value", ["0", 0, "-1", -0.5, "abc", "NaN", float("nan"), "inf", True]
    )
    def test_refused(self, value: object) -> None:
        """Zero, negatives, non-numbers, NaN and infinity are refused."""
        with pytest.raises(ValueError, match="positive decimal number of CPUs"):
            parse_nano_cpus(value)

    @pytest.mark.parametrize("value", [True, False])
    def test_booleans_refused(self, value: bool) -> None:
        """A boolean is refused as one, not taken as 1 CPU or none."""
        with pytest.raises(ValueError, match=r"^a boolean is not a CPU count"):
            parse_nano_cpus(value)

    @pytest.mark.parametrize("value", ["8193", 1e300, "1e999999999", "1e99999"])
    def test_more_than_linux_addresses(self, value: object) -> None:
        """A count past 8192 CPUs is refused, never overflowing the decimal."""
        with pytest.raises(ValueError, match="more than the 8192 CPUs"):
            parse_nano_cpus(value)


class TestParsePidsLimit:
    """Pids limits are positive counts or -1 for unlimited (C06)."""

    @pytest.mark.parametrize("value", [0, "0"])
    def test_zero_refused(self, value: object) -> None:
        """Zero is refused with a message that points to 'unlimited'."""
        with pytest.raises(ValueError, match="'unlimited'"):
            parse_pids_limit(value)

    @pytest.mark.parametrize(
        ("value", "pids_limit"),
        [
            (-1, -1),
            ("-1", -1),
            ("unlimited", -1),
            ("Unlimited", -1),
            (64, 64),
            ("64", 64),
        ],
    )
    def test_accepted(self, value: object, pids_limit: int) -> None:
        """-1 and 'unlimited' mean unlimited; 64 means 64."""
        assert parse_pids_limit(value) == pids_limit

    @pytest.mark.parametrize("value", [-2, "many", 6.4, True])
    def test_other_values_refused(self, value: object) -> None:
        """Other negatives and non-integers are refused."""
        with pytest.raises(ValueError, match="positive whole number of processes"):
            parse_pids_limit(value)

    @pytest.mark.parametrize("value", [True, False])
    def test_booleans_refused(self, value: bool) -> None:
        """A boolean is refused as one, not taken as a limit of 1 process."""
        with pytest.raises(ValueError, match=r"^a boolean is not a pids limit"):
            parse_pids_limit(value)
