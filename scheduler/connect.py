"""``acp-fleet connect``: an editor's agent command that runs the agent remotely.

An editor such as Zed launches this as its agent and speaks ACP on its
stdin and stdout; every byte goes to a session's sandbox and back, stderr
carries the agent's logs, and the process exits with the agent.

A WebSocket that drops (a scheduler replica killed or restarting, a load
balancer resetting the connection) is opened again, to the same URL, from
the cursor of the last output written: stdout gets each piece of output
once. Stdin waits in a bounded buffer until the fleet acknowledges it, is
sent again after a drop, and is written to the agent once.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from scheduler.client import End, FleetClient, StdinAck, Stdio
from shared.wire import STDOUT, Output

# Exit status when the session ended for a reason other than the agent's
# own exit (or the editor closing stdin); the cause is written to stderr.
EXIT_FLEET_ENDED = 70
_CLEAN_CAUSES = {"eof_ignored"}

# Stdin read and not yet acknowledged, kept across reconnects; at the bound
# reading stdin waits, so the editor feels backpressure and nothing is lost.
STDIN_BUFFER_BYTES = 1024 * 1024
_STDIN_READ_BYTES = 64 * 1024

DEFAULT_RECONNECT_S = 30.0
# The first wait after a drop, doubled after each failed attempt up to the cap.
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 2.0
# A connection that carried output or stayed up this long was a working one:
# its drop opens a new reconnect window. A replica that accepts and fails at
# once does not, or it would keep connect retrying forever.
HEALTHY_S = 1.0


class ConnectionLost(Exception):
    """The stdio WebSocket could not be opened again within the window."""

    def __init__(self, session_id: str, window_s: float, cause: str) -> None:
        super().__init__(
            f"no connection for {window_s:g} s ({cause}); session {session_id} "
            "may still run: attach again with --session"
        )
        self.session_id = session_id
        self.window_s = window_s
        self.cause = cause


@dataclass(frozen=True)
class Target:
    """Which session to reach: a new one of ``profile``, or an existing one."""

    base_url: str
    credential: str
    profile: str | None = None
    session_id: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    reconnect_s: float = DEFAULT_RECONNECT_S


async def connect(target: Target) -> int:
    """Relay this process' stdio to the session; return the exit status.

    Raises:
        ApiError: the fleet refused the session, the credential or the cursor.
        ConnectionLost: the WebSocket stayed down for ``target.reconnect_s``.
    """
    session_id, credential = await _session(target)
    relay = _Relay(StdinBuffer(STDIN_BUFFER_BYTES))
    relay.stdin.read_from_stdin()
    async with FleetClient(target.base_url, credential) as client:
        return await _attach_until_end(client, session_id, relay, target.reconnect_s)


async def _session(target: Target) -> tuple[str, str]:
    """The session to attach to and the credential to attach with."""
    if target.session_id is not None:
        return target.session_id, target.credential
    assert target.profile is not None
    async with FleetClient(target.base_url, target.credential) as client:
        created = await client.create_session(target.profile, env=target.env)
    _note(f"acp-fleet: session {created['id']}")

    return created["id"], created["token"]


async def _attach_until_end(
    client: FleetClient, session_id: str, relay: _Relay, window_s: float
) -> int:
    """Attach, and attach again after each drop, until the session ends."""
    backoff = Backoff(window_s)
    while True:
        opened_at, carried = time.monotonic(), relay.carried
        try:
            async with relay.stdio(client, session_id) as stdio:
                status = await relay.attach(stdio)
            if status is not None:
                return status
            cause = "closed before the session ended"
        except Exception as exc:
            if not is_drop(exc):
                raise
            cause = str(exc) or type(exc).__name__

        if relay.carried > carried or time.monotonic() - opened_at >= HEALTHY_S:
            backoff.reset()
            _note(f"acp-fleet: connection lost ({cause}); reconnecting")
        delay_s = backoff.next_delay_s()
        if delay_s is None:
            raise ConnectionLost(session_id, window_s, cause)
        await asyncio.sleep(delay_s)


def is_drop(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection failure worth another attempt.

    A refusal by the fleet (``ApiError``, after which the gateway closes
    with 4400, 4401, 4403 or 4404) is definitive; so is an HTTP error below 500
    in the handshake, such as a wrong path.
    """
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code >= 500
    return isinstance(exc, OSError | TimeoutError | ConnectionClosed | InvalidMessage)


class Backoff:
    """Waits that double from ``RECONNECT_FIRST_S`` within a bounded window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self._deadline = time.monotonic() + self.window_s
        self._delay_s = RECONNECT_FIRST_S

    def next_delay_s(self) -> float | None:
        """How long to wait before the next attempt; None once out of time."""
        left_s = self._deadline - time.monotonic()
        if left_s <= 0:
            return None
        delay_s = min(self._delay_s, left_s)
        self._delay_s = min(self._delay_s * 2, RECONNECT_MAX_S)

        return delay_s


class _Relay:
    """What outlives one connection: the output cursor and unacknowledged stdin."""

    def __init__(self, stdin: StdinBuffer) -> None:
        self.stdin = stdin
        self.cursor: str | None = None
        self.carried = 0
        self.writer = secrets.token_urlsafe(12)

    def stdio(self, client: FleetClient, session_id: str) -> Stdio:
        """A connection resuming output after the cursor and stdin at the
        oldest message the fleet has not acknowledged."""
        first_seq = self.stdin.rewind()
        return client.stdio(
            session_id, cursor=self.cursor, writer=self.writer, stdin_seq=first_seq
        )

    async def attach(self, stdio: Stdio) -> int | None:
        """Relay over one connection; the exit status, or None if it dropped."""
        pump = asyncio.create_task(self._pump_stdin(stdio))
        try:
            async for event in stdio.events():
                if isinstance(event, End):
                    return _exit_status(event)
                if isinstance(event, StdinAck):
                    self.stdin.acked(event.seq)
                elif isinstance(event, Output):
                    self._write(event)
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        return None

    def _write(self, output: Output) -> None:
        out = sys.stdout if output.channel == STDOUT else sys.stderr
        out.buffer.write(output.data)
        out.buffer.flush()
        # Written and then remembered with no await between: a drop can
        # never make the next connection repeat or skip output.
        self.cursor = output.cursor
        self.carried += 1

    async def _pump_stdin(self, stdio: Stdio) -> None:
        while True:
            chunk = await self.stdin.next_unsent()
            self.stdin.mark_sent()
            try:
                await (stdio.send(chunk) if chunk else stdio.send_eof())
            except ConnectionClosed:
                return


class StdinBuffer:
    """Stdin the fleet has not acknowledged yet, in order, bounded.

    Chunks are numbered from 1 as they are read; an empty chunk is the end
    of stdin. A chunk leaves when the gateway acknowledges its number, so
    after a drop every chunk whose fate is unknown is sent again, and the
    fleet, which writes each number once, keeps it exactly once. ``put``
    waits while the chunks would pass ``max_bytes``.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._next_seq = 1
        # How many chunks at the front the current connection has sent.
        self._sent = 0
        self._readable = asyncio.Event()
        self._space = asyncio.Event()

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    async def put(self, chunk: bytes) -> None:
        """Append a chunk, waiting while it would pass the bound."""
        while self._bytes and self._bytes + len(chunk) > self.max_bytes:
            self._space.clear()
            await self._space.wait()
        self._chunks.append((self._next_seq, chunk))
        self._next_seq += 1
        self._bytes += len(chunk)
        self._readable.set()

    async def next_unsent(self) -> bytes:
        """The oldest chunk this connection has not sent, waiting for one."""
        while self._sent >= len(self._chunks):
            self._readable.clear()
            await self._readable.wait()
        return self._chunks[self._sent][1]

    def mark_sent(self) -> None:
        """The chunk ``next_unsent`` returned went to the socket."""
        self._sent += 1

    def acked(self, seq: int) -> None:
        """Drop the chunks up to number ``seq``: they are in Redis."""
        while self._chunks and self._chunks[0][0] <= seq:
            _, chunk = self._chunks.popleft()
            self._bytes -= len(chunk)
            self._sent = max(self._sent - 1, 0)
        self._space.set()

    def rewind(self) -> int:
        """Send every unacknowledged chunk again; return the first one's number."""
        self._sent = 0
        return self._chunks[0][0] if self._chunks else self._next_seq

    def read_from_stdin(self) -> None:
        """Fill the buffer from this process' stdin in a daemon thread."""
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), daemon=True).start()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read stdin in a thread: files and /dev/null cannot be polled by the
        event loop, and a daemon thread never holds the process past its end."""
        while True:
            try:
                data = os.read(sys.stdin.fileno(), _STDIN_READ_BYTES)
            except (OSError, ValueError):
                data = b""
            asyncio.run_coroutine_threadsafe(self.put(data), loop).result()
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
