"""The stdio gateway: a client's WebSocket joined to a session's streams.

Any replica can serve any session: output is read from the session's Redis
stream from the client's cursor on, and stdin is appended to the session's
input stream, where the worker that runs the agent picks it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import structlog
from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from shared.store import SessionStore
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


async def relay(
    ws: WebSocket,
    store: SessionStore,
    session_id: str,
    cursor: str,
    *,
    seen_every_s: float = CLIENT_SEEN_INTERVAL_S,
) -> None:
    """Relay until the session ends or the client leaves."""
    outbound = asyncio.create_task(_outbound(ws, store, session_id, cursor))
    inbound = asyncio.create_task(_inbound(ws, store, session_id))
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
    key = store.keys.stdout(session_id)
    position: bytes | str = cursor
    while True:
        entries = await store.read_stream(key, position, block_ms=0)
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


async def _inbound(ws: WebSocket, store: SessionStore, session_id: str) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes"):
            await _stdin(ws, store, session_id, message["bytes"])
        elif message.get("text") is not None:
            await _control(ws, store, session_id, message["text"])


async def _stdin(
    ws: WebSocket, store: SessionStore, session_id: str, data: bytes
) -> None:
    # While the worker lags, this client's socket is not read: the client
    # feels the backpressure and Redis holds a bounded backlog.
    # The worker announces nothing when it catches up: the write is retried.
    pending = await store.write_stdin(session_id, "d", data)
    while pending == -2:
        await asyncio.sleep(STDIN_RETRY_S)
        pending = await store.write_stdin(session_id, "d", data)
    if pending == -1:
        await _refuse_message(
            ws, "session_ended", "The session has ended; its agent reads no stdin."
        )
    elif pending == -3:
        await _refuse_message(
            ws,
            "stdin_closed",
            'Stdin was closed by {"type": "eof"}; the agent reads no more of it.',
        )


async def _control(
    ws: WebSocket, store: SessionStore, session_id: str, text: str
) -> None:
    try:
        message = json.loads(text)
        kind = message.get("type")
    except (ValueError, AttributeError):
        kind = None
    if kind == "eof":
        await store.write_stdin(session_id, "eof")
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
