"""A small Python client of the fleet's API, for backends and for ``connect``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosedOK

from shared.models import FleetView
from shared.wire import MAX_STDIN_MESSAGE_BYTES, Output, decode_output

# Acknowledging in steps of this size keeps the relay's backlog well under
# its bound while costing one small message per 256 KiB of output.
ACK_EVERY_BYTES = 256 * 1024


# The HTTP status each refusal on the stdio WebSocket corresponds to.
_WS_REFUSALS = {
    "invalid_credentials": 401,
    "invalid_token": 401,
    "token_expired": 401,
    "org_key_required": 403,
    "session_not_found": 404,
}


class ApiError(Exception):
    """The API refused a call; ``code`` is its machine-readable reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class FleetClient:
    """Create, read and cancel sessions over HTTP.

    Args:
        base_url: the scheduler, e.g. ``http://127.0.0.1:8080``.
        credential: an organisation API key or a session token.
    """

    def __init__(
        self, base_url: str, credential: str, *, timeout_s: float = 30
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credential = credential
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {credential}"},
            timeout=timeout_s,
        )

    async def __aenter__(self) -> FleetClient:
        return self

    async def __aexit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create_session(
        self,
        profile: str,
        *,
        env: dict[str, str] | None = None,
        limits: dict[str, Any] | None = None,
        upload: bool = False,
        fetch: bool = False,
    ) -> dict[str, Any]:
        """Create a session; returns its id, state and session token.

        With ``upload`` the session waits for ``put_workspace``; with
        ``fetch`` its workspace is kept for ``workspace`` when it ends.
        """
        body = {
            "profile": profile,
            "env": env or {},
            "limits": limits or {},
            "workspace": {"upload": upload, "fetch": fetch},
        }
        return await self._call("POST", "/v1/sessions", json=body)

    async def sessions(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """The calling organisation's newest sessions."""
        listed = await self._call("GET", "/v1/sessions", params={"limit": limit})
        sessions: list[dict[str, Any]] = listed["sessions"]
        return sessions

    async def put_workspace(self, session_id: str, archive: bytes) -> dict[str, Any]:
        """Deliver the tar archive a session created with ``upload`` waits for."""
        return await self._call(
            "PUT",
            f"/v1/sessions/{session_id}/workspace",
            content=archive,
            headers={"Content-Type": "application/x-tar"},
        )

    async def workspace(self, session_id: str) -> bytes:
        """The tar archive of an ended session's workspace."""
        response = await self._http.get(f"/v1/sessions/{session_id}/workspace")
        _raise_for_error(response)
        return response.content

    async def audit(self, session_id: str) -> list[dict[str, Any]]:
        """The session's audit trail, oldest event first."""
        trail = await self._call("GET", f"/v1/sessions/{session_id}/audit")
        events: list[dict[str, Any]] = trail["events"]
        return events

    async def session(self, session_id: str) -> dict[str, Any]:
        """Return a session's state, cause and timings."""
        return await self._call("GET", f"/v1/sessions/{session_id}")

    async def egress(self, session_id: str) -> dict[str, Any]:
        """Return the connections the session made through the egress proxy."""
        return await self._call("GET", f"/v1/sessions/{session_id}/egress")

    async def cancel(self, session_id: str) -> dict[str, Any]:
        """Cancel a session, queued or running."""
        return await self._call("DELETE", f"/v1/sessions/{session_id}")

    async def fleet(self, *, sessions_limit: int = 100) -> dict[str, Any]:
        """Operators: nodes, pools, drains, running sessions and the queue.

        Needs an operator key as the credential.

        Raises:
            ValueError: what answered is not a scheduler's view.
        """
        params = {"sessions_limit": sessions_limit}
        answer = await self._call("GET", "/v1/fleet", params=params)
        # A view's readers index into it; another service's JSON would fail
        # there, far from the cause.
        FleetView.model_validate(answer)
        return answer

    def stdio(
        self,
        session_id: str,
        *,
        cursor: str | None = None,
        writer: str | None = None,
        stdin_seq: int = 1,
    ) -> Stdio:
        """Return the session's stdio connection, to use with ``async with``.

        Args:
            cursor: resume output after this one, the last one taken.
            writer: number stdin messages as this writer from ``stdin_seq``
                on; the gateway then acknowledges each (``StdinAck``), and a
                message sent again on a later connection is written once.
                Each ``send`` must then be at most one message.
        """
        ws_base = "ws" + self.base_url.removeprefix("http")
        params: dict[str, str | int] = {"cursor": cursor} if cursor else {}
        if writer is not None:
            params |= {"writer": writer, "seq": stdin_seq}
        query = urlencode(params)
        url = f"{ws_base}/v1/sessions/{session_id}/stdio" + (
            f"?{query}" if query else ""
        )
        return Stdio(url, self.credential)

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # A server may close an idle keep-alive connection just as it is
            # reused; only a request that is safe to repeat is sent again.
            if method == "POST":
                raise
            response = await self._http.request(method, path, **kwargs)
        _raise_for_error(response)
        result: dict[str, Any] = response.json()
        return result


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": response.text}
    raise ApiError(response.status_code, error["code"], error["message"])


@dataclass(frozen=True)
class SlowClient:
    """The relay stopped reading the agent until this client catches up."""

    backlog_bytes: int


@dataclass(frozen=True)
class StdinAck:
    """Stdin messages up to number ``seq`` of a numbering writer are in Redis."""

    seq: int


@dataclass(frozen=True)
class End:
    """The session ended: its cause, exit code and the rest of its outcome."""

    message: dict[str, Any]

    @property
    def cause(self) -> str:
        return str(self.message.get("cause"))

    @property
    def exit_code(self) -> int | None:
        code = self.message.get("exit_code")
        return int(code) if code is not None else None


class Stdio:
    """A session's stdio over its WebSocket."""

    def __init__(self, url: str, credential: str) -> None:
        self.url = url
        self.credential = credential
        self._ws: ClientConnection | None = None

    async def __aenter__(self) -> Stdio:
        self._ws = await websockets.connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self.credential}"},
            max_size=None,
            # With a bounded queue a client that stops reading stops the
            # socket too, and the gateway's close frame then waits behind
            # unread output until the close times out. What the gateway can
            # send is already bounded by the session's backlog.
            max_queue=None,
        )
        return self

    async def __aexit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ws is not None:
            await self._ws.close()

    @property
    def ws(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError("use Stdio with 'async with'")
        return self._ws

    async def send(self, data: bytes) -> None:
        """Write bytes to the agent's stdin.

        Once the session has ended the gateway closes normally; what is
        sent after that has no agent to read it and is not an error.
        """
        with contextlib.suppress(ConnectionClosedOK):
            if 0 < len(data) <= MAX_STDIN_MESSAGE_BYTES:
                await self.ws.send(data)
                return
            for start in range(0, len(data), MAX_STDIN_MESSAGE_BYTES):
                await self.ws.send(data[start : start + MAX_STDIN_MESSAGE_BYTES])

    async def send_eof(self) -> None:
        """Close the agent's stdin."""
        with contextlib.suppress(ConnectionClosedOK):
            await self.ws.send(json.dumps({"type": "eof"}))

    async def events(self) -> AsyncIterator[Output | SlowClient | StdinAck | End]:
        """Yield output as it arrives, then the ``End`` of the session.

        Output is acknowledged once the caller has taken it (when it asks
        for the next event), so the relay can keep the agent running.

        Raises:
            ApiError: the gateway refused the connection or a message.
        """
        unacked_bytes, cursor = 0, None
        ws = self.ws
        while True:
            # recv() itself, not the connection's own async iterator: one
            # generator fewer to step through for every message.
            try:
                message = await ws.recv()
            except ConnectionClosedOK:
                return
            if isinstance(message, bytes):
                output = decode_output(message)
                yield output
                cursor = output.cursor
                unacked_bytes += len(output.data)
                if unacked_bytes >= ACK_EVERY_BYTES:
                    await self.ack(cursor)
                    unacked_bytes = 0
                continue
            control = json.loads(message)
            kind = control.get("type")
            if kind == "end":
                yield End(control)
                return
            if kind == "slow_client":
                if cursor is not None:
                    await self.ack(cursor)
                    unacked_bytes = 0
                yield SlowClient(int(control["backlog_bytes"]))
            elif kind == "stdin_ack":
                yield StdinAck(int(control["seq"]))
            elif kind == "error":
                code, text = control.get("code", "error"), control.get("message", "")
                # Stdin that raced the session's end: the end itself follows
                # on the output stream, after the output still to come.
                if code != "session_ended":
                    raise ApiError(_WS_REFUSALS.get(code, 400), code, text)

    async def ack(self, cursor: str) -> None:
        """Tell the fleet that output up to ``cursor`` has been consumed."""
        with contextlib.suppress(ConnectionClosedOK):
            await self.ws.send(json.dumps({"type": "ack", "cursor": cursor}))
