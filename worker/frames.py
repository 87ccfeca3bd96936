"""Decoding and line-splitting of a Docker attach stream.

Without a TTY, Docker multiplexes stdout and stderr on one connection as
frames: one byte naming the stream, three zero bytes, a big-endian 32-bit
length, then the payload. Chunks of the connection may cut a frame, or its
header, anywhere; the decoder keeps what it has not yet placed.
"""

from __future__ import annotations

import struct

from shared.errors import FrameError

STDOUT = 1
STDERR = 2
_HEADER = struct.Struct(">B3xL")
# Docker writes at most 32 KiB per frame today; a far larger length means
# the stream lost its framing, and trusting it would buffer without bound.
MAX_FRAME_BYTES = 64 * 1024 * 1024


class FrameDecoder:
    """Turn arbitrary chunks of an attach stream into (stream, bytes) pieces.

    Payload bytes are handed out as soon as they arrive, so a frame never
    has to be held whole, and a header is only ever read in full.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._stream = 0
        self._remaining = 0

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        """Return the payload pieces completed by ``chunk``, in order.

        Raises:
            FrameError: a header names an unknown stream, has non-zero
                padding, or announces an impossible length.
        """
        pieces: list[tuple[int, bytes]] = []
        start = 0
        if not self._header and not self._remaining:
            start = _whole_frames(chunk, pieces)
            if start == len(chunk):
                return pieces
        view = memoryview(chunk)[start:]
        while view:
            if self._remaining:
                take = view[: self._remaining]
                self._remaining -= len(take)
                _append(pieces, self._stream, bytes(take))
                view = view[len(take) :]
                continue
            need = _HEADER.size - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == _HEADER.size:
                self._start_frame()

        return pieces

    @property
    def idle(self) -> bool:
        """True when the stream stopped at a frame boundary."""
        return not self._header and not self._remaining

    def _start_frame(self) -> None:
        header = bytes(self._header)
        self._header.clear()
        self._stream, self._remaining = _parse_header(header, 0)


def _parse_header(data: bytes, at: int) -> tuple[int, int]:
    """Return the stream and length of the frame header at ``at``."""
    if data[at + 1 : at + 4] != b"\0\0\0" or data[at] not in (STDOUT, STDERR):
        raise FrameError(f"malformed frame header {data[at : at + 8].hex()}")
    stream, length = _HEADER.unpack_from(data, at)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
    return stream, length


def _whole_frames(chunk: bytes, pieces: list[tuple[int, bytes]]) -> int:
    """Place the frames that lie whole at the start of ``chunk``; return
    where they end. A chunk is most often one or more whole frames, which
    this takes without copying a header byte by byte."""
    at, size = 0, len(chunk)
    while at + _HEADER.size <= size:
        stream, length = _parse_header(chunk, at)
        end = at + _HEADER.size + length
        if end > size:
            break
        if length:
            _append(pieces, stream, chunk[at + _HEADER.size : end])
        at = end
    return at


def _append(pieces: list[tuple[int, bytes]], stream: int, data: bytes) -> None:
    # Neighbouring pieces of one stream merge, so a read yields few entries.
    if pieces and pieces[-1][0] == stream:
        pieces[-1] = (stream, pieces[-1][1] + data)
    else:
        pieces.append((stream, data))


class LineTooLong(Exception):
    """Raised by ``LineBuffer`` when a line grows past its cap."""

    def __init__(self, cap_bytes: int) -> None:
        super().__init__(f"a stdout line exceeds {cap_bytes} bytes")
        self.cap_bytes = cap_bytes


class LineBuffer:
    """Release stdout in whole lines, holding at most ``cap_bytes`` back.

    ACP frames one message per line, so a client never needs part of one;
    holding the unfinished line bounds memory by the cap and means a line
    that breaks the cap is never delivered in part.
    """

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._pending = bytearray()

    def feed(self, data: bytes) -> bytes:
        """Return the complete lines that ``data`` finishes.

        Raises:
            LineTooLong: the unfinished line is longer than the cap.
        """
        if not self._pending and data.endswith(b"\n") and len(data) <= self.cap_bytes:
            # Whole lines, none longer than the cap: all of it is ready.
            return data
        cut = data.rfind(b"\n")
        if cut < 0:
            self._pending += data
            self._check()
            return b""
        first = data.find(b"\n")
        self._check(len(self._pending) + first)
        if len(data) > self.cap_bytes:
            self._check_lines(data[first + 1 : cut + 1])
        ready = bytes(self._pending) + data[: cut + 1]
        self._pending = bytearray(data[cut + 1 :])
        self._check()

        return ready

    def flush(self) -> bytes:
        """Return the last line, which has no newline, at end of stream."""
        rest = bytes(self._pending)
        self._pending.clear()
        return rest

    def _check(self, length: int | None = None) -> None:
        if (len(self._pending) if length is None else length) > self.cap_bytes:
            raise LineTooLong(self.cap_bytes)

    def _check_lines(self, lines: bytes) -> None:
        start = 0
        while (end := lines.find(b"\n", start)) >= 0:
            self._check(end - start)
            start = end + 1
