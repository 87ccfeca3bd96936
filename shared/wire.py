"""The stdio WebSocket's wire format, shared by the gateway and its clients.

Agent output travels in binary messages: one byte naming the stream
(1 stdout, 2 stderr), the 16-byte cursor of the entry (two big-endian
64-bit numbers, as in a Redis stream id), then the bytes themselves. A
client that reconnects passes the last cursor it holds and resumes after
it. Control messages are JSON text: ``{"type": "end", ...}`` from the
gateway when the session has ended, ``{"type": "error", ...}`` for a
refused message, ``{"type": "stdin_ack", "seq": n}`` for a client that
numbers its stdin, and ``{"type": "eof"}`` from the client to close stdin.
Client binary messages are stdin bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# The largest WebSocket message a client may send; bigger stdin is split.
MAX_STDIN_MESSAGE_BYTES = 1024 * 1024
STDOUT = 1
STDERR = 2
_HEADER = struct.Struct(">BQQ")
_CHANNELS = {b"o": STDOUT, b"e": STDERR}


@dataclass(frozen=True)
class Output:
    """One piece of agent output as a client receives it."""

    channel: int
    cursor: str
    data: bytes


def encode_output(field: bytes, entry_id: bytes, data: bytes) -> bytes:
    """Frame a stdout (``o``) or stderr (``e``) stream entry for a client."""
    millis, _, seq = entry_id.partition(b"-")
    return _HEADER.pack(_CHANNELS[field], int(millis), int(seq or 0)) + data


def decode_output(message: bytes) -> Output:
    """Split a binary message from the gateway into its parts.

    Raises:
        ValueError: the message is shorter than its header or names no stream.
    """
    if len(message) < _HEADER.size:
        raise ValueError(f"output message of {len(message)} bytes has no header")
    channel, millis, seq = _HEADER.unpack_from(message)
    if channel not in (STDOUT, STDERR):
        raise ValueError(f"output message names unknown stream {channel}")
    return Output(
        channel=channel, cursor=f"{millis}-{seq}", data=message[_HEADER.size :]
    )


def parse_cursor(text: str | None) -> str:
    """Validate a client's cursor; an absent one starts from the beginning.

    Raises:
        ValueError: the cursor is not ``<millis>-<seq>``.
    """
    if not text:
        return "0-0"
    millis, dash, seq = text.partition("-")
    if not (
        millis.isascii()
        and millis.isdigit()
        and dash
        and seq.isascii()
        and seq.isdigit()
        and max(int(millis), int(seq)) < 2**64
    ):
        raise ValueError(
            f"cursor {text!r} is not of the form <millis>-<seq> with two 64-bit numbers"
        )
    return f"{int(millis)}-{int(seq)}"
