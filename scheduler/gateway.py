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
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from shared.store import SessionStore
from shared.wire import encode_output

log = structlog.get_logger("scheduler.gateway")

# Close codes in the range reserved for applications.
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_BAD_REQUEST = 4400


async def relay(
    ws: WebSocket, store: SessionStore, session_id: str, cursor: str
) -> None:
    """Relay until the session ends or the client leaves."""
    outbound = asyncio.create_task(_outbound(ws, store, session_id, cursor))
    inbound = asyncio.create_task(_inbound(ws, store, session_id))
    done, pending = await asyncio.wait(
        {outbound, inbound}, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if (exc := task.exception()) is not None and not isinstance(
            exc, WebSocketDisconnect
        ):
            log.error("stdio.relay_failed", session_id=session_id, exc_info=exc)
    if ws.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code=1000)


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
            for name in (b"o", b"e"):
                if name in fields:
                    await ws.send_bytes(encode_output(name, entry_id, fields[name]))


async def _inbound(ws: WebSocket, store: SessionStore, session_id: str) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes"):
            await store.write_stdin(session_id, "d", message["bytes"])
        elif message.get("text") is not None:
            await _control(ws, store, session_id, message["text"])


async def _control(
    ws: WebSocket, store: SessionStore, session_id: str, text: str
) -> None:
    try:
        kind = json.loads(text).get("type")
    except (ValueError, AttributeError):
        kind = None
    if kind == "eof":
        await store.write_stdin(session_id, "eof")
        return
    await ws.send_text(
        json.dumps(
            {
                "type": "error",
                "code": "unknown_message",
                "message": 'Text messages must be JSON {"type": "eof"}; '
                "send stdin as binary messages.",
            }
        )
    )
