"""The Docker socket proxy: the worker's only way to the Engine.

Whoever holds the Engine's socket is root on the node. The proxy holds it
instead of the worker and carries only the calls the worker makes, on
containers and networks that carry the fleet's label, and refuses a
create that asks for more than the worker ever does (privilege,
capabilities, devices, host namespaces, binds outside the workspaces).
Every refusal is a 403 whose JSON ``message`` names the call and the rule.

Each client connection carries one request; the proxy asks the Engine to
close after its answer, so a kept-alive connection can never slip a second,
unchecked request through. Attach and exec start are hijacked by the Engine
into raw streams; those are piped both ways and each direction's EOF is
passed on by itself, so the agent still reads stdin's EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from shared.errors import DockerCallRefused, SandboxError
from shared.settings import FleetSettings
from worker.docker import LABEL_FLEET

log = structlog.get_logger("worker.socketproxy")

_HEAD_MAX_BYTES = 64 * 1024
_HEAD_TIMEOUT_S = 30.0
_CHUNK_BYTES = 64 * 1024
_CLOSE_WAIT_S = 5.0
# Expired entries are swept once this many are remembered.
_CACHE_MAX_ENTRIES = 4096
_VERSION_PREFIX = re.compile(r"^/v\d+\.\d+(?=/)")
_ID = r"(?P<ref>[A-Za-z0-9][A-Za-z0-9_.-]*)"
# Go's mux would clean these; a path the worker never sends is refused.
_SUSPECT_PATH = re.compile(r"%|//|/\.\.?(/|$)")
# Only origin-form targets: "//host/..." would hide a path from urlsplit.
_ORIGIN_FORM = re.compile(r"/(?!/)[^\s#]*")
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "trailer",
        "expect",
    }
)
_STREAM_TYPES = (
    "application/vnd.docker.raw-stream",
    "application/vnd.docker.multiplexed-stream",
)
# Namespace modes that join the host's, or another container's, namespace.
_NAMESPACE_FIELDS = (
    "NetworkMode",
    "PidMode",
    "IpcMode",
    "UTSMode",
    "UsernsMode",
    "CgroupnsMode",
)
# HostConfig fields the worker never sets and that widen a sandbox.
_FORBIDDEN_FIELDS = (
    "Binds",
    "VolumesFrom",
    "CapAdd",
    "Devices",
    "DeviceRequests",
    "DeviceCgroupRules",
    "Links",
)


@dataclass(frozen=True)
class CreatePolicy:
    """What a container create or exec may ask of the Engine."""

    fleet: str
    # Bind sources allowed: anything strictly below these directories ...
    bind_roots: tuple[str, ...] = ()
    # ... and exactly these files.
    bind_files: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> CreatePolicy:
        """The worker's needs: its workspaces and its egress CA bundle."""
        bundle = settings.worker.egress.ca_bundle
        return cls(
            fleet=settings.fleet,
            bind_roots=(settings.worker.workspace_root,),
            bind_files=(bundle,) if bundle else (),
        )

    def create_refusal(self, body: Mapping[str, Any]) -> str | None:
        """Return why a ``POST /containers/create`` body is refused, or None."""
        labels = body.get("Labels") or {}
        if labels.get(LABEL_FLEET) != self.fleet:
            return f"the container does not carry the label {LABEL_FLEET}={self.fleet}"
        host = body.get("HostConfig") or {}
        if host.get("Privileged"):
            return "privileged containers are not allowed"
        # The worker's own floor: nothing less hardened is ever its call.
        if "ALL" not in (host.get("CapDrop") or []):
            return "HostConfig.CapDrop must include ALL"
        if "no-new-privileges:true" not in (host.get("SecurityOpt") or []):
            return "HostConfig.SecurityOpt must include no-new-privileges:true"

        for name in _FORBIDDEN_FIELDS:
            if host.get(name):
                return f"HostConfig.{name} is not allowed"
        for name in _NAMESPACE_FIELDS:
            mode = str(host.get(name) or "")
            if mode == "host" or mode.startswith("container:"):
                return f"HostConfig.{name} {mode!r} shares a namespace"
        for option in host.get("SecurityOpt") or []:
            if "unconfined" in option or option.replace(":", "=") == "label=disable":
                return f"HostConfig.SecurityOpt {option!r} lifts a confinement"

        return self._mounts_refusal(host.get("Mounts") or [])

    def exec_refusal(self, body: Mapping[str, Any]) -> str | None:
        """Return why a ``POST /containers/{id}/exec`` body is refused, or None."""
        if body.get("Privileged"):
            return "privileged exec is not allowed"
        return None

    def _mounts_refusal(self, mounts: list[Mapping[str, Any]]) -> str | None:
        for mount in mounts:
            kind = mount.get("Type")
            if kind == "tmpfs":
                continue
            source = str(mount.get("Source") or "")
            if kind != "bind" or not self._bind_allowed(source):
                return f"a {kind} mount of {source!r} is not allowed"
        return None

    def _bind_allowed(self, source: str) -> bool:
        # A symlink below a root could point the Engine anywhere on the node.
        if os.path.normpath(source) != source or os.path.realpath(source) != source:
            return False
        if source in self.bind_files:
            return True
        return any(
            source.startswith(root.rstrip("/") + "/") for root in self.bind_roots
        )


@dataclass
class Request:
    """One client request, read whole (head and body) before it is judged."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    @property
    def path(self) -> str:
        """The path without the API version prefix, as the rules name it."""
        return _VERSION_PREFIX.sub("", urlsplit(self.target).path)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    @property
    def call(self) -> str:
        """The call as a refusal names it, e.g. ``GET /info``."""
        return f"{self.method} {self.path}"

    def header(self, name: str) -> str | None:
        """The first value of header ``name``; names are case-insensitive."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def json_body(self) -> dict[str, Any]:
        """The body as a JSON object; a refusal when it is not one."""
        try:
            body = json.loads(self.body or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise DockerCallRefused(self.call, "the body is not a JSON object")
        return body


Check = Callable[["SocketProxy", Request, "re.Match[str]"], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    """One allowed call: a method, a path pattern, and what it must satisfy."""

    method: str
    pattern: re.Pattern[str]
    check: Check | None = None
    # The Engine may turn the connection into a raw stream for this call.
    hijacks: bool = False


async def _container_labelled(
    proxy: SocketProxy, request: Request, match: re.Match[str]
) -> None:
    await proxy.require_labelled_container(request, match["ref"])


async def _create_allowed(
    proxy: SocketProxy, request: Request, match: re.Match[str]
) -> None:
    reason = proxy.policy.create_refusal(request.json_body())
    if reason:
        raise DockerCallRefused(request.call, reason)


async def _exec_allowed(
    proxy: SocketProxy, request: Request, match: re.Match[str]
) -> None:
    reason = proxy.policy.exec_refusal(request.json_body())
    if reason:
        raise DockerCallRefused(request.call, reason)
    await proxy.require_labelled_container(request, match["ref"])


async def _exec_labelled(
    proxy: SocketProxy, request: Request, match: re.Match[str]
) -> None:
    info = await proxy.inspect(request, f"/exec/{match['ref']}/json")
    await proxy.require_labelled_container(request, str(info.get("ContainerID")))


async def _list_filtered(
    proxy: SocketProxy, request: Request, match: re.Match[str]
) -> None:
    wanted = f"{LABEL_FLEET}={proxy.policy.fleet}"
    try:
        filters = json.loads(request.query.get("filters", ["{}"])[0])
        labels = filters.get("label", [])
    except (ValueError, AttributeError):
        labels = []
    # The filter may be a list or Docker's older {"value": true} map.
    if wanted not in labels:
        raise DockerCallRefused(request.call, f"list only with the filter {wanted}")


async def _network_create_labelled(
    proxy: SocketProxy, request: Request, match: re.Match[str]
) -> None:
    labels = request.json_body().get("Labels") or {}
    if labels.get(LABEL_FLEET) != proxy.policy.fleet:
        raise DockerCallRefused(request.call, proxy.missing_label("the network"))


async def _network_labelled(
    proxy: SocketProxy, request: Request, match: re.Match[str]
) -> None:
    info = await proxy.inspect(request, f"/networks/{match['ref']}")
    if (info.get("Labels") or {}).get(LABEL_FLEET) != proxy.policy.fleet:
        raise DockerCallRefused(request.call, proxy.missing_label("the network"))


def _route(method: str, path: str, check: Check | None = None, **kw: bool) -> Route:
    return Route(method, re.compile(f"^{path}$"), check, **kw)


# Every call the worker makes (worker/docker.py), and nothing else.
ROUTES: tuple[Route, ...] = (
    _route("GET", "/_ping"),
    _route("HEAD", "/_ping"),
    _route("GET", "/version"),
    # Image names hold slashes, a tag and a digest; inspection reads only.
    _route("GET", r"/images/[A-Za-z0-9][A-Za-z0-9_./:@-]*/json"),
    _route("POST", "/containers/create", _create_allowed),
    _route("GET", "/containers/json", _list_filtered),
    _route("GET", f"/containers/{_ID}/json", _container_labelled),
    _route("POST", f"/containers/{_ID}/attach", _container_labelled, hijacks=True),
    _route("POST", f"/containers/{_ID}/start", _container_labelled),
    _route("POST", f"/containers/{_ID}/wait", _container_labelled),
    _route("POST", f"/containers/{_ID}/kill", _container_labelled),
    _route("DELETE", f"/containers/{_ID}", _container_labelled),
    # The warm pool's readiness check runs through exec.
    _route("POST", f"/containers/{_ID}/exec", _exec_allowed),
    _route("POST", f"/exec/{_ID}/start", _exec_labelled, hijacks=True),
    _route("GET", f"/exec/{_ID}/json", _exec_labelled),
    _route("POST", "/networks/create", _network_create_labelled),
    _route("GET", f"/networks/{_ID}", _network_labelled),
    _route("DELETE", f"/networks/{_ID}", _network_labelled),
)


class _Answered(Exception):
    """The Engine answered an inspection with an error; pass it on as is."""

    def __init__(self, head: bytes, body: bytes) -> None:
        super().__init__("answered by the Engine")
        self.head = head
        self.body = body


@dataclass
class SocketProxy:
    """An allow-listing HTTP proxy in front of the Docker Engine's socket."""

    policy: CreatePolicy
    upstream_url: str
    label_cache_s: float = 5.0
    max_body_bytes: int = 4 * 1024**2
    routes: tuple[Route, ...] = ROUTES
    _labelled: dict[str, float] = field(default_factory=dict)
    _server: asyncio.AbstractServer | None = None
    _path: str | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, path: str, *, mode: int = 0o660) -> None:
        """Listen on the unix socket ``path``, replacing a stale one."""
        _clear_socket_path(Path(path))
        self._path = path
        self._server = await asyncio.start_unix_server(
            self._serve, path, limit=_HEAD_MAX_BYTES
        )
        Path(path).chmod(mode)  # noqa: ASYNC240 - one local syscall at start
        log.info("socketproxy.started", listen_path=path, upstream=self.upstream_url)

    async def close(self) -> None:
        """Stop listening and end every connection still open."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._path is not None:
            # Python 3.11 leaves the socket file behind.
            _clear_socket_path(Path(self._path))

    def missing_label(self, what: str) -> str:
        """The reason given when ``what`` lacks the fleet's label."""
        return f"{what} does not carry the label {LABEL_FLEET}={self.policy.fleet}"

    async def require_labelled_container(self, request: Request, ref: str) -> None:
        """Refuse ``request`` unless container ``ref`` carries the fleet label."""
        expiry = self._labelled.get(ref)
        if expiry is not None and expiry > time.monotonic():
            return
        info = await self.inspect(request, f"/containers/{ref}/json")
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_FLEET) != self.policy.fleet:
            raise DockerCallRefused(request.call, self.missing_label("the container"))
        # Only full ids are remembered: a name can be given to another
        # container once this one is gone, an id never is.
        if ref == info.get("Id"):
            self._remember(ref)

    def _remember(self, container_id: str) -> None:
        now = time.monotonic()
        if len(self._labelled) >= _CACHE_MAX_ENTRIES:
            self._labelled = {
                known: expiry
                for known, expiry in self._labelled.items()
                if expiry > now
            }
        self._labelled[container_id] = now + self.label_cache_s

    async def inspect(self, request: Request, path: str) -> dict[str, Any]:
        """GET ``path`` from the Engine for a check; its errors pass on as is."""
        reader, writer = await self._open_upstream()
        try:
            ask = f"GET {path} HTTP/1.1\r\nHost: docker\r\nConnection: close"
            writer.write(ask.encode() + b"\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read()
        finally:
            writer.close()
        if _status(head) != 200:
            # Head and body as received, so their framing still agrees.
            raise _Answered(head, body)
        info = json.loads(_dechunk(head, body))
        if not isinstance(info, dict):
            raise DockerCallRefused(
                request.call, "the Engine's answer is not an object"
            )
        return info

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            # The client went away or sent garbage; there is no one to tell.
            log.debug("socketproxy.client_lost")
        except TimeoutError:
            log.debug("socketproxy.head_timeout")
        except asyncio.CancelledError:
            # Only close() cancels these tasks, and nothing awaits them but
            # close(); asyncio's server would report a cancelled one as a
            # failure, so the cancellation ends here.
            log.debug("socketproxy.connection_closed")
        finally:
            self._handlers.discard(task)
            await _close(writer)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT_S):
                request = await self._read_request(reader, writer)
            if request is None:
                log.warning("socketproxy.malformed")
                await _answer(writer, 400, "the request is not HTTP/1.1")
                return
            route = await self._judge(request)
        except DockerCallRefused as refused:
            log.warning("socketproxy.refused", call=refused.call, reason=refused.reason)
            await _answer(writer, refused.status, str(refused))
            return
        except _Answered as answered:
            writer.write(_closing(answered.head) + answered.body)
            await writer.drain()
            return
        except SandboxError as exc:
            await _answer(writer, 502, str(exc))
            return

        await self._forward(request, route, reader, writer)

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return None
        # A bare CR or LF would end a line for the Engine but not for us.
        if any("\r" in line or "\n" in line for line in lines):
            return None
        headers = [
            (name.strip(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        ]
        request = Request(method=parts[0], target=parts[1], headers=headers)
        if (request.header("expect") or "").lower() == "100-continue":
            # The Engine never sees the Expect: the body is read here first.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            request.body = await self._read_body(request, reader)
        except ValueError as exc:
            raise DockerCallRefused(
                request.call, "a malformed body length", status=400
            ) from exc

        return request

    async def _read_body(self, request: Request, reader: asyncio.StreamReader) -> bytes:
        length = request.header("content-length")
        chunked = "chunked" in (request.header("transfer-encoding") or "").lower()
        if chunked and length is not None:
            raise DockerCallRefused(request.call, "both a length and chunks")
        if chunked:
            return await _read_chunks(reader, self.max_body_bytes, request.call)
        size = int(length or 0)
        if not 0 <= size <= self.max_body_bytes:
            raise DockerCallRefused(request.call, f"a body of {size} bytes", status=413)
        return await reader.readexactly(size)

    async def _judge(self, request: Request) -> Route:
        """Return the route that allows ``request``, or refuse it."""
        path = request.path
        if not _ORIGIN_FORM.fullmatch(request.target) or _SUSPECT_PATH.search(path):
            raise DockerCallRefused(request.call, "the path is not in canonical form")
        for route in self.routes:
            match = route.pattern.match(path)
            if route.method == request.method and match:
                if route.check is not None:
                    await route.check(self, request, match)
                return route
        raise DockerCallRefused(request.call, "the call is not on the allow-list")

    async def _forward(
        self,
        request: Request,
        route: Route,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        upgrade = route.hijacks and request.header("upgrade") is not None
        up_reader, up_writer = await self._open_upstream()
        try:
            up_writer.write(_upstream_head(request, upgrade=upgrade) + request.body)
            await up_writer.drain()
            head = await up_reader.readuntil(b"\r\n\r\n")
            if route.hijacks and _hijacked(head):
                writer.write(head)
                await _pipe_both(reader, writer, up_reader, up_writer)
                return
            writer.write(_closing(head))
            if upgrade:
                # The Engine keeps an upgrade request's error answer alive.
                await _copy_framed(head, up_reader, writer)
            else:
                await _copy_until_either_ends(up_reader, writer, reader)
        finally:
            up_writer.transport.abort()

    async def _open_upstream(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        split = urlsplit(self.upstream_url)
        try:
            if split.scheme == "unix":
                return await asyncio.open_unix_connection(split.path)
            return await asyncio.open_connection(split.hostname, split.port)
        except OSError as exc:
            raise SandboxError(
                f"Docker Engine unreachable at {self.upstream_url}: {exc}"
            ) from exc


def _clear_socket_path(path: Path) -> None:
    # A socket left by a proxy that was killed would make the bind fail.
    if path.is_socket():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)


def _status(head: bytes) -> int:
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _head_value(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _hijacked(head: bytes) -> bool:
    content_type = (_head_value(head, b"content-type") or b"").decode("latin-1")
    return _status(head) == 101 or content_type.startswith(_STREAM_TYPES)


def _closing(head: bytes) -> bytes:
    """``head`` telling the client that this connection ends after it."""
    lines = [
        line
        for line in head.rstrip(b"\r\n").split(b"\r\n")
        if line.partition(b":")[0].strip().lower() not in (b"connection", b"keep-alive")
    ]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


def _upstream_head(request: Request, *, upgrade: bool) -> bytes:
    lines = [f"{request.method} {request.target} HTTP/1.1"]
    lines += [
        f"{name}: {value}"
        for name, value in request.headers
        if name.lower() not in _HOP_HEADERS
        and name.lower() not in ("content-length", "transfer-encoding")
    ]
    if request.body or request.method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(request.body)}")
    # Only a hijacking call keeps its upgrade; every other connection ends
    # with its answer, so no second request can follow on it unchecked.
    lines += (
        ["Connection: Upgrade", "Upgrade: tcp"] if upgrade else ["Connection: close"]
    )

    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _dechunk(head: bytes, body: bytes) -> bytes:
    if b"chunked" not in (_head_value(head, b"transfer-encoding") or b"").lower():
        return body
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


async def _read_chunks(reader: asyncio.StreamReader, limit: int, call: str) -> bytes:
    body = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return body
        if len(body) + size > limit:
            raise DockerCallRefused(call, f"a body over {limit} bytes", status=413)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    body = json.dumps({"message": message}).encode()
    reasons = {
        400: "Bad Request",
        403: "Forbidden",
        413: "Too Large",
        502: "Bad Gateway",
    }
    writer.write(
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after what was written is flushed; drop a peer that stalls."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_WAIT_S)
    except (OSError, TimeoutError):
        # A reset or a stalled peer: nothing left to deliver to it.
        writer.transport.abort()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``writer``: EOF travels on alone."""
    while data := await reader.read(_CHUNK_BYTES):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Relay a hijacked stream both ways until both directions ended.

    A reset on either side ends both: a client that dropped the connection
    must not leave the agent's stdin open behind it.
    """
    directions = [
        asyncio.ensure_future(_copy(reader, up_writer)),
        asyncio.ensure_future(_copy(up_reader, writer)),
    ]
    try:
        for finished in asyncio.as_completed(directions):
            await finished
    finally:
        for direction in directions:
            direction.cancel()
        await asyncio.gather(*directions, return_exceptions=True)


async def _copy_framed(
    head: bytes, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    length = _head_value(head, b"content-length")
    body = await (up_reader.readexactly(int(length)) if length else up_reader.read())
    writer.write(body)
    await writer.drain()


async def _copy_until_either_ends(
    up_reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    reader: asyncio.StreamReader,
) -> None:
    """Relay the Engine's answer; stop early when the client hangs up.

    A wait or an event stream can last a session's life; a client gone
    must not leave it open on the Engine.
    """
    answer = asyncio.ensure_future(_copy(up_reader, writer))
    # Any byte or EOF from the client ends it: it asked for one answer only.
    hangup = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait((answer, hangup), return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            await answer
    finally:
        for task in (answer, hangup):
            task.cancel()
        await asyncio.gather(answer, hangup, return_exceptions=True)


async def serve(settings: FleetSettings, *, listen_path: str | None = None) -> None:
    """Run the proxy of ``settings.docker_proxy`` until cancelled."""
    config = settings.docker_proxy
    proxy = SocketProxy(
        policy=CreatePolicy.from_settings(settings),
        upstream_url=config.upstream_url,
        label_cache_s=config.label_cache_s,
        max_body_bytes=config.max_body_bytes,
    )
    await proxy.start(
        listen_path or config.listen_path, mode=int(config.listen_mode, 8)
    )
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await proxy.close()
