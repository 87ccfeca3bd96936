"""Specification of the stdio WebSocket's binary output format and cursors."""

from __future__ import annotations

import struct

import pytest

from shared.wire import (
    STDERR,
    STDOUT,
    Output,
    decode_output,
    encode_output,
    parse_cursor,
)


class TestOutputMessages:
    """encode_output and decode_output are inverse for every payload."""

    @pytest.mark.parametrize(
        ("field", "channel"), [(b"o", STDOUT), (b"e", STDERR)], ids=["out", "err"]
    )
    @pytest.mark.parametrize(
        "payload",
        [b"", b"hello\n", bytes(range(256)), "€".encode() * 3],
        ids=["empty", "line", "binary", "utf8"],
    )
    def test_round_trip(self, field: bytes, channel: int, payload: bytes) -> None:
        """Channel, cursor and payload survive encoding and decoding."""
        message = encode_output(field, b"1700000000000-5", payload)

        assert decode_output(message) == Output(
            channel=channel, cursor="1700000000000-5", data=payload
        )

    def test_header_layout(self) -> None:
        """The header is the channel byte and the id as two big-endian uint64."""
        message = encode_output(b"e", b"1700000000000-5", b"x")

        assert message == b"\x02" + struct.pack(">QQ", 1700000000000, 5) + b"x"

    @pytest.mark.parametrize("length", [0, 1, 16])
    def test_too_short(self, length: int) -> None:
        """A message shorter than the 17-byte header is refused."""
        with pytest.raises(ValueError, match=f"output message of {length} bytes"):
            decode_output(b"\x01" * length)

    @pytest.mark.parametrize("channel", [0, 3, 255])
    def test_unknown_channel(self, channel: int) -> None:
        """A message naming a stream other than 1 or 2 is refused."""
        message = bytes([channel]) + struct.pack(">QQ", 1, 2) + b"data"

        with pytest.raises(ValueError, match=f"unknown stream {channel}"):
            decode_output(message)


class TestParseCursor:
    """parse_cursor validates a client's resume point."""

    @pytest.mark.parametrize(
        ("text", "cursor"),
        [
            ("", "0-0"),
            (None, "0-0"),
            ("12-3", "12-3"),
            ("1700000000000-5", "1700000000000-5"),
            ("007-01", "7-1"),
            (
                "18446744073709551615-18446744073709551615",
                "18446744073709551615-18446744073709551615",
            ),
        ],
    )
    def test_accepted(self, text: str | None, cursor: str) -> None:
        """An absent cursor starts at 0-0; <millis>-<seq> is normalised."""
        assert parse_cursor(text) == cursor

    @pytest.mark.parametrize(
        "text", ["abc", "12", "-1-2", "12-", "-3", "1-2-3", "1.5-2", " 1-2", "1-+2"]
    )
    def test_refused(self, text: str) -> None:
        """Anything but two decimal numbers joined by a dash is refused."""
        with pytest.raises(ValueError, match="is not of the form <millis>-<seq>"):
            parse_cursor(text)

    @pytest.mark.parametrize(
        "text", ["18446744073709551616-0", "0-18446744073709551616"]
    )
    def test_refused_above_64_bits(self, text: str) -> None:
        """A part that does not fit a Redis stream id's 64 bits is refused."""
        with pytest.raises(ValueError, match="cursor"):
            parse_cursor(text)
