"""``acp-fleet connect``: an editor's agent command that runs the agent remotely.

An editor such as Zed launches this as its agent and speaks ACP on its
stdin and stdout; every byte goes to a session's sandbox and back, stderr
carries the agent's logs, and the process exits with the agent.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from dataclasses import dataclass, field

from scheduler.client import End, FleetClient, SlowClient, Stdio
from shared.wire import STDOUT

# Exit status when the session ended for a reason other than the agent's
# own exit (or the editor closing stdin); the cause is written to stderr.
EXIT_FLEET_ENDED = 70
_CLEAN_CAUSES = {"eof_ignored"}
# Chunks read ahead of the WebSocket; a slow fleet slows reading stdin.
_STDIN_QUEUE_CHUNKS = 16


@dataclass(frozen=True)
class Target:
    """Which session to reach: a new one of ``profile``, or an existing one."""

    base_url: str
    credential: str
    profile: str | None = None
    session_id: str | None = None
    env: dict[str, str] = field(default_factory=dict)


async def connect(target: Target) -> int:
    """Relay this process' stdio to the session; return the exit status."""
    async with FleetClient(target.base_url, target.credential) as client:
        session_id, credential = target.session_id, target.credential
        if session_id is None:
            assert target.profile is not None
            created = await client.create_session(target.profile, env=target.env)
            session_id, credential = created["id"], created["token"]
            _note(f"acp-fleet: session {session_id}")
    client = FleetClient(target.base_url, credential)
    async with client, client.stdio(session_id) as stdio:
        return await _relay(stdio)


async def _relay(stdio: Stdio) -> int:
    pump = asyncio.create_task(_pump_stdin(stdio))
    try:
        async for event in stdio.events():
            if isinstance(event, End):
                return _exit_status(event)
            if isinstance(event, SlowClient):
                continue
            stream = sys.stdout.buffer if event.channel == STDOUT else sys.stderr.buffer
            stream.write(event.data)
            stream.flush()
    finally:
        pump.cancel()
    _note("acp-fleet: connection closed before the session ended")
    return EXIT_FLEET_ENDED


async def _pump_stdin(stdio: Stdio) -> None:
    chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=_STDIN_QUEUE_CHUNKS)
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_stdin, args=(loop, chunks), daemon=True).start()
    while data := await chunks.get():
        await stdio.send(data)
    await stdio.send_eof()


def _read_stdin(loop: asyncio.AbstractEventLoop, chunks: asyncio.Queue[bytes]) -> None:
    """Read stdin in a thread: files and /dev/null cannot be polled by the
    event loop, and a daemon thread never holds the process past its end."""
    while True:
        try:
            data = os.read(sys.stdin.fileno(), 64 * 1024)
        except (OSError, ValueError):
            data = b""
        asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
        if not data:
            return


def _exit_status(end: End) -> int:
    if end.cause == "agent_exit" and end.exit_code is not None:
        return end.exit_code
    if end.cause in _CLEAN_CAUSES:
        return 0
    detail = end.message.get("detail", "")
    _note(f"acp-fleet: session ended: {end.cause} {detail}".rstrip())
    return EXIT_FLEET_ENDED


def _note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
