"""The stdio gateway: a client's WebSocket joined to a session's streams.

Any replica can serve any session: output is read from the session's Redis
stream from the client's cursor on, and stdin is appended to the session's
input stream, where the worker that runs the agent picks it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from shared.store import Channel, SessionStore
from shared.wire import encode_output, parse_cursor

log = structlog.get_logger("scheduler.gateway")

# How often an attached client is recorded as present at most; a session
# with a short idle timeout is touched thrice per timeout instead.
CLIENT_SEEN_INTERVAL_S = 5.0

# How soon a refused stdin write is tried again while the worker catches up.
STDIN_RETRY_S = 0.02

# Close codes in the range reserved for applications.
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_BAD_REQUEST = 4400

_WRITER = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class Numbering:
    """How a client numbers its stdin messages, so that one sent again is not
    written twice: ``?writer=<id>&seq=<n>``, n being this connection's first.

    Without a writer nothing is numbered and nothing is acknowledged.
    """

    writer: str = ""
    next_seq: int = 0

    @classmethod
    def parse(cls, writer: str | None, seq: str | None) -> Numbering:
        """Raises: ValueError: a writer that is no id, or no seq from 1."""
        if writer is None:
            return cls()
        if not _WRITER.fullmatch(writer) or not (seq or "").isdigit():
            raise ValueError(
                "a stdin writer is 1 to 64 letters, digits, '-' or '_', "
                "with seq=<n>, the number of the connection's first message"
            )
        if not 1 <= int(seq or 0) < 2**53:
            raise ValueError(f"seq {seq} is not a number from 1 to 2**53")
        return cls(writer, int(seq or 0))

    def take(self) -> int:
        """The number of the next message; 0 when nothing is numbered."""
        if not self.writer:
            return 0
        self.next_seq += 1
        return self.next_seq - 1


async def relay(
    ws: WebSocket,
    store: SessionStore,
    session_id: str,
    cursor: str,
    *,
    seen_every_s: float = CLIENT_SEEN_INTERVAL_S,
    numbering: Numbering | None = None,
) -> None:
    """Relay until the session ends or the client leaves."""
    numbering = numbering or Numbering()
    outbound = asyncio.create_task(_outbound(ws, store, session_id, cursor))
    inbound = asyncio.create_task(_inbound(ws, store, session_id, numbering))
    attached = asyncio.create_task(_attached(store, session_id, seen_every_s))
    done, pending = await asyncio.wait(
        {outbound, inbound}, return_when=asyncio.FIRST_COMPLETED
    )
    for task in (*pending, attached):
        task.cancel()
    await asyncio.gather(*pending, attached, return_exceptions=True)
    # The last sight of the client starts the session's idle clock.
    with contextlib.suppress(RedisError):
        await store.touch(session_id, "client_seen_ms")
    for task in done:
        if (exc := task.exception()) is not None and not isinstance(
            exc, WebSocketDisconnect
        ):
            log.error("stdio.relay_failed", session_id=session_id, exc_info=exc)
    if ws.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code=1000)


async def _attached(store: SessionStore, session_id: str, every_s: float) -> None:
    """Tell the worker, while the client stays, that the session is in use."""
    while True:
        await store.touch(session_id, "client_seen_ms")
        await asyncio.sleep(every_s)


async def _outbound(
    ws: WebSocket, store: SessionStore, session_id: str, cursor: str
) -> None:
    reads = store.blocking_channel()
    try:
        await _send_output(ws, store, reads, session_id, cursor)
    finally:
        await reads.close()


async def _send_output(
    ws: WebSocket, store: SessionStore, reads: Channel, session_id: str, cursor: str
) -> None:
    key = store.keys.stdout(session_id)
    position: bytes | str = cursor
    while True:
        entries = await store.read_stream(key, position, block_ms=0, via=reads)
        for entry_id, fields in entries:
            position = entry_id
            if b"end" in fields:
                await ws.send_text(fields[b"end"].decode())
                return
            if b"slow" in fields:
                backlog = int(fields[b"slow"])
                notice = {"type": "slow_client", "backlog_bytes": backlog}
                await ws.send_text(json.dumps(notice))
            for name in (b"o", b"e"):
                if name in fields:
                    await ws.send_bytes(encode_output(name, entry_id, fields[name]))


async def _inbound(
    ws: WebSocket, store: SessionStore, session_id: str, numbering: Numbering
) -> None:
    writes = store.command_channel()
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes"):
                await _stdin(ws, store, writes, session_id, message["bytes"], numbering)
            elif message.get("text") is not None:
                await _control(
                    ws, store, writes, session_id, message["text"], numbering
                )
    finally:
        await writes.close()


async def _stdin(
    ws: WebSocket,
    store: SessionStore,
    writes: Channel,
    session_id: str,
    data: bytes,
    numbering: Numbering,
) -> None:
    # While the worker lags, this client's socket is not read: the client
    # feels the backpressure and Redis holds a bounded backlog.
    # The worker announces nothing when it catches up: the write is retried.
    seq, writer = numbering.take(), numbering.writer
    pending = await store.write_stdin(
        session_id, "d", data, writer=writer, seq=seq, via=writes
    )
    while pending == -2:
        await asyncio.sleep(STDIN_RETRY_S)
        pending = await store.write_stdin(
            session_id, "d", data, writer=writer, seq=seq, via=writes
        )
    if pending == -1:
        await _refuse_message(
            ws, "session_ended", "The session has ended; its agent reads no stdin."
        )
        return
    if pending == -3:
        await _refuse_message(
            ws,
            "stdin_closed",
            'Stdin was closed by {"type": "eof"}; the agent reads no more of it.',
        )
        return
    await _ack_stdin(ws, seq)


async def _ack_stdin(ws: WebSocket, seq: int) -> None:
    """Tell a numbering client its message is in Redis: it need not resend it."""
    if seq:
        await ws.send_text(json.dumps({"type": "stdin_ack", "seq": seq}))


async def _control(
    ws: WebSocket,
    store: SessionStore,
    writes: Channel,
    session_id: str,
    text: str,
    numbering: Numbering,
) -> None:
    try:
        message = json.loads(text)
        kind = message.get("type")
    except (ValueError, AttributeError):
        kind = None
    if kind == "eof":
        seq = numbering.take()
        written = await store.write_stdin(
            session_id, "eof", writer=numbering.writer, seq=seq, via=writes
        )
        if written >= 0:
            await _ack_stdin(ws, seq)
        return
    if kind == "ack":
        await _ack(ws, store, session_id, message.get("cursor"))
        return
    await _refuse_message(
        ws,
        "unknown_message",
        'Text messages must be JSON {"type": "eof"} or {"type": "ack", '
        '"cursor": "<millis>-<seq>"}; send stdin as binary messages.',
    )


async def _ack(
    ws: WebSocket, store: SessionStore, session_id: str, cursor: object
) -> None:
    if not isinstance(cursor, str) or not cursor:
        await _refuse_message(ws, "invalid_cursor", 'An ack needs a "cursor".')
        return
    try:
        position = parse_cursor(cursor)
    except ValueError as exc:
        await _refuse_message(ws, "invalid_cursor", str(exc))
        return
    if await store.ack(session_id, position) < 0:
        await _refuse_message(
            ws, "unknown_cursor", f"No output entry {position} is kept to acknowledge."
        )


async def _refuse_message(ws: WebSocket, code: str, message: str) -> None:
    await ws.send_text(json.dumps({"type": "error", "code": code, "message": message}))
