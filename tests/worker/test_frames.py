"""Specification of the attach-stream decoder and the line buffer (C01, C14)."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest

from shared.errors import FrameError
from worker.frames import (
    MAX_FRAME_BYTES,
    STDERR,
    STDOUT,
    FrameDecoder,
    LineBuffer,
    LineTooLong,
)

# Docker cuts what a container writes into frames of at most 32 KiB.
DOCKER_FRAME_BYTES = 32 * 1024
MIB = 1024**2

STDOUT_LINE = (b"0123456789abcdef" * 12_500)[:199_999] + b"\n"
STDERR_LINE = (b"warning: disk is slow; " * 3_044)[:69_999] + b"\n"
EURO_LINE = "€".encode() * 50_000
C01_WRITES = [(STDOUT, STDOUT_LINE), (STDERR, STDERR_LINE), (STDOUT, EURO_LINE)]


def frame(stream: int, payload: bytes) -> bytes:
    """Return one frame as Docker writes it: stream, padding, length, payload."""
    return struct.pack(">B3xL", stream, len(payload)) + payload


def docker_stream(writes: list[tuple[int, bytes]]) -> bytes:
    """Return the attach stream for ``writes``, each cut into 32 KiB frames."""
    frames = []
    for stream, data in writes:
        for start in range(0, len(data), DOCKER_FRAME_BYTES):
            frames.append(frame(stream, data[start : start + DOCKER_FRAME_BYTES]))
    return b"".join(frames)


def fixed_chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def random_chunks(data: bytes, seed: int) -> Iterator[bytes]:
    # Chunk sizes only; nothing here needs unpredictable numbers.
    rng = random.Random(seed)  # noqa: S311
    start = 0
    while start < len(data):
        size = rng.choice([1, 2, 7, 8, 9, rng.randint(1, 70_000)])
        yield data[start : start + size]
        start += size


def demux(chunks: Iterator[bytes]) -> dict[int, bytes]:
    decoder = FrameDecoder()
    received = {STDOUT: bytearray(), STDERR: bytearray()}
    for chunk in chunks:
        for stream, data in decoder.feed(chunk):
            received[stream] += data
    assert decoder.idle
    return {stream: bytes(data) for stream, data in received.items()}


C01_STREAM = docker_stream(C01_WRITES)
CHUNKINGS = {
    "1-byte": lambda: fixed_chunks(C01_STREAM, 1),
    "7-byte": lambda: fixed_chunks(C01_STREAM, 7),
    "8-byte": lambda: fixed_chunks(C01_STREAM, 8),
    "random-seed-1": lambda: random_chunks(C01_STREAM, 1),
    "random-seed-2": lambda: random_chunks(C01_STREAM, 2),
    "whole": lambda: iter([C01_STREAM]),
}


@pytest.fixture(scope="module", params=list(CHUNKINGS))
def received(request: pytest.FixtureRequest) -> dict[int, bytes]:
    """The C01 stream demultiplexed under one chunking; computed once each."""
    return demux(CHUNKINGS[request.param]())


class TestFrameDecoder:
    """FrameDecoder separates stdout and stderr whatever the chunking (C01)."""

    def test_streams_arrive_identical_and_separate(
        self, received: dict[int, bytes]
    ) -> None:
        """stdout and stderr are byte-identical to what the agent wrote."""
        assert received[STDOUT] == STDOUT_LINE + EURO_LINE
        assert received[STDERR] == STDERR_LINE

    def test_stdout_decodes_without_replacement(
        self, received: dict[int, bytes]
    ) -> None:
        """The reassembled stdout is valid UTF-8 with no U+FFFD and no headers."""
        stdout = received[STDOUT].decode("utf-8", errors="replace")

        assert "\ufffd" not in stdout
        assert "\0" not in stdout
        assert stdout.endswith("€" * 50_000)
        assert len(stdout) == 200_000 + 50_000

    def test_euro_signs_straddle_frames(self) -> None:
        """The C01 stream really cuts a '€' between two frames."""
        cut = DOCKER_FRAME_BYTES

        assert EURO_LINE[cut - 1 : cut + 1] == "€".encode()[1:]

    def test_empty_frame_yields_nothing(self) -> None:
        """A zero-length frame is skipped and the next frame still decodes."""
        decoder = FrameDecoder()

        pieces = decoder.feed(frame(STDOUT, b"") + frame(STDERR, b"oops\n"))

        assert pieces == [(STDERR, b"oops\n")]
        assert decoder.idle

    def test_neighbouring_pieces_merge(self) -> None:
        """Frames of one stream in one chunk come out as one piece."""
        decoder = FrameDecoder()

        pieces = decoder.feed(frame(STDOUT, b"ab") + frame(STDOUT, b"c\n"))

        assert pieces == [(STDOUT, b"abc\n")]

    def test_not_idle_inside_a_frame(self) -> None:
        """The decoder is not idle while a header or payload is incomplete."""
        decoder = FrameDecoder()
        whole = frame(STDOUT, b"hello\n")

        decoder.feed(whole[:3])
        in_header = decoder.idle
        decoder.feed(whole[3:10])
        in_payload = decoder.idle
        decoder.feed(whole[10:])

        assert (in_header, in_payload, decoder.idle) == (False, False, True)

    @pytest.mark.parametrize(
        "header",
        [
            struct.pack(">B3xL", 3, 5),
            struct.pack(">B3xL", 0, 5),
            b"\x01\x00\x01\x00" + struct.pack(">L", 5),
            b"\x02\x00\x00\x07" + struct.pack(">L", 5),
            struct.pack(">B3xL", STDOUT, MAX_FRAME_BYTES + 1),
            struct.pack(">B3xL", STDERR, 0xFFFFFFFF),
        ],
        ids=["stream-3", "stream-0", "padding", "last-padding", "max+1", "4GiB"],
    )
    def test_malformed_header_whole(self, header: bytes) -> None:
        """A malformed header raises FrameError instead of returning data."""
        decoder = FrameDecoder()

        with pytest.raises(FrameError, match="frame"):
            decoder.feed(frame(STDOUT, b"ok\n") + header + b"data!")

    def test_malformed_header_bytewise(self) -> None:
        """Fed a byte at a time, a bad header raises on its last byte, no data."""
        decoder = FrameDecoder()
        bad = struct.pack(">B3xL", 3, 5)
        received = b"".join(
            piece
            for byte in fixed_chunks(frame(STDOUT, b"ok\n") + bad[:7], 1)
            for _, piece in decoder.feed(byte)
        )

        with pytest.raises(FrameError, match="malformed frame header 0300000000000005"):
            decoder.feed(bad[7:])

        assert received == b"ok\n"

    def test_largest_length_accepted(self) -> None:
        """A header announcing exactly MAX_FRAME_BYTES is not an error."""
        decoder = FrameDecoder()

        pieces = decoder.feed(struct.pack(">B3xL", STDOUT, MAX_FRAME_BYTES) + b"x")

        assert pieces == [(STDOUT, b"x")]
        assert not decoder.idle


class TestLineBuffer:
    """LineBuffer releases whole lines only, within a cap (C14)."""

    def test_releases_whole_lines_and_keeps_tail(self) -> None:
        """Only complete lines come out; the unfinished tail waits."""
        buffer = LineBuffer(cap_bytes=4096)

        released = [buffer.feed(b"a\nb"), buffer.feed(b"c"), buffer.feed(b"d\ne\nf")]

        assert released == [b"a\n", b"", b"bcd\ne\n"]

    def test_flush_returns_last_line(self) -> None:
        """flush returns the last line without a newline, then nothing."""
        buffer = LineBuffer(cap_bytes=4096)
        buffer.feed(b"done\nexit 7")

        assert (buffer.flush(), buffer.flush()) == (b"exit 7", b"")

    def test_line_at_cap_passes(self) -> None:
        """A line of exactly the cap, plus its newline, is released whole."""
        buffer = LineBuffer(cap_bytes=4096)
        line = b"x" * 4096 + b"\n"

        assert buffer.feed(line) == line

    def test_unterminated_line_past_cap(self) -> None:
        """5000 bytes without a newline under a 4096 cap raise LineTooLong."""
        buffer = LineBuffer(cap_bytes=4096)

        with pytest.raises(LineTooLong) as caught:
            buffer.feed(b"x" * 5000)

        assert caught.value.cap_bytes == 4096
        assert "4096" in str(caught.value)

    def test_unterminated_line_past_cap_in_chunks(self) -> None:
        """The line is refused by the chunk that takes it past the cap."""
        buffer = LineBuffer(cap_bytes=4096)
        for _ in range(4):
            assert buffer.feed(b"x" * 1000) == b""

        with pytest.raises(LineTooLong):
            buffer.feed(b"x" * 1000)

    @pytest.mark.parametrize(
        "data",
        [
            b"x" * 4097 + b"\n",
            b"a\n" + b"x" * 4097 + b"\nb\n",
            b"a\n" + b"x" * 4097,
        ],
        ids=["first", "middle", "tail"],
    )
    def test_terminated_line_past_cap(self, data: bytes) -> None:
        """A line past the cap raises wherever it sits in the chunk."""
        buffer = LineBuffer(cap_bytes=4096)

        with pytest.raises(LineTooLong):
            buffer.feed(data)

    def test_pending_plus_first_line_past_cap(self) -> None:
        """Held bytes count towards the line the next chunk finishes."""
        buffer = LineBuffer(cap_bytes=4096)
        buffer.feed(b"x" * 4000)

        with pytest.raises(LineTooLong):
            buffer.feed(b"y" * 100 + b"\n")

    def test_large_line_then_small_line(self) -> None:
        """A 1 MiB line under a 16 MiB cap arrives intact, then a small one."""
        buffer = LineBuffer(cap_bytes=16 * MIB)
        big = b'{"method":"session/update","pad":"' + b"p" * MIB + b'"}\n'
        small = b'{"method":"session/update"}\n'
        released = bytearray()

        for chunk in fixed_chunks(big + small, 64 * 1024):
            released += buffer.feed(chunk)

        assert bytes(released).splitlines(keepends=True) == [big, small]
        assert buffer.flush() == b""
