"""The egress proxy: the one way out of a sandbox whose profile allows egress.

Egress sandboxes sit on an internal Docker network with no route out; the
worker listens on that network's gateway address, which the host owns and
the sandboxes can reach. Each session gets credentials of its own in its
proxy URL, so every connection is tied to one session and checked against
that session's allow-list:

- ``CONNECT host:port`` opens a tunnel (HTTPS); TLS is never intercepted;
- ``GET http://host/path`` (any method, absolute URI) is forwarded once,
  with ``Connection: close``.

Names are resolved here, on the host, and the upstream is dialled by the
address that was checked, so a name cannot change its answer in between.
Every connection, allowed or refused, becomes one ``EgressRecord``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from shared.allowlist import AllowList, Match, is_ip_literal
from shared.errors import ConfigError, EgressRefused
from shared.models import EgressRecord, EgressVerdict
from shared.settings import EgressConfig, FleetSettings, NetworkPolicy
from worker.docker import LABEL_FLEET, LABEL_NODE, DockerRuntime, SandboxNetwork

log = structlog.get_logger("worker.egress")

Recorder = Callable[[str, EgressRecord], Awaitable[None]]

# A request head longer than this is not a client talking to a proxy.
_HEAD_MAX_BYTES = 32 * 1024
_HEAD_TIMEOUT_S = 10.0
_CHUNK_BYTES = 64 * 1024
# Hop-by-hop headers end at the proxy; the upstream gets its own.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te"}
)
# What clients must reach without the proxy: nothing else exists inside.
NO_PROXY = "localhost,127.0.0.1"
# Connections still open when their session ends get this long to record.
_CLOSE_WAIT_S = 5.0


@dataclass(frozen=True)
class _Grant:
    session_id: str
    secret: str
    allow: AllowList
    ports: frozenset[int]


@dataclass
class _Request:
    method: str
    version: str
    host: str
    port: int
    # Origin-form target for forwarding; empty for CONNECT.
    path: str
    headers: list[tuple[str, str]]
    authorization: str = ""


@dataclass
class _Traffic:
    """Bytes each way through one connection, and when it last moved."""

    up: int = 0
    down: int = 0
    last_s: float = field(default_factory=time.monotonic)


class EgressProxy:
    """An HTTP forward proxy that carries only what each session may reach."""

    def __init__(self, *, config: EgressConfig, record: Recorder) -> None:
        self.config = config
        self._record = record
        self._grants: dict[str, _Grant] = {}
        self._live: dict[str, set[asyncio.Task[None]]] = {}
        self._server: asyncio.Server | None = None
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``; port 0 picks a free one."""
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=_HEAD_MAX_BYTES
        )
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every connection still open."""
        for session_id in list(self._live):
            await self.unregister(session_id)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def register(self, session_id: str, policy: NetworkPolicy) -> dict[str, str]:
        """Admit ``session_id`` under ``policy``; return the agent's proxy env.

        The URL carries a secret made for this session alone: the proxy
        learns from it which session a connection belongs to.
        """
        secret = secrets.token_urlsafe(24)
        self._grants[session_id] = _Grant(
            session_id=session_id,
            secret=secret,
            allow=AllowList.of(policy.allow),
            ports=frozenset(policy.ports),
        )
        url = f"http://{session_id}:{secret}@{self.host}:{self.port}"
        names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
        env = dict.fromkeys(names, url)

        return env | {"NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY}

    async def unregister(self, session_id: str) -> None:
        """Forget the session's credentials and end its open connections,
        waiting (briefly) until each has been recorded."""
        self._grants.pop(session_id, None)
        tasks = self._live.pop(session_id, set())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_WAIT_S)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await asyncio.wait_for(_read_head(reader), _HEAD_TIMEOUT_S)
        except (EgressRefused, TimeoutError, OSError) as exc:
            status = exc.status if isinstance(exc, EgressRefused) else 400
            await _answer(writer, status, "the proxy could not read a request")
            return
        grant = self._authenticate(request)
        if grant is None:
            log.info("egress.unauthenticated", host=request.host, port=request.port)
            await _answer(writer, 407, "proxy credentials missing or not valid")
            return
        with structlog.contextvars.bound_contextvars(session_id=grant.session_id):
            await self._carry(grant, request, reader, writer)

    def _authenticate(self, request: _Request) -> _Grant | None:
        scheme, _, encoded = request.authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        session_id, _, secret = decoded.partition(":")
        grant = self._grants.get(session_id)
        if grant is None or not hmac.compare_digest(grant.secret, secret):
            return None
        return grant

    async def _carry(
        self,
        grant: _Grant,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Check, connect and relay one connection; record it whatever happens."""
        task = asyncio.current_task()
        assert task is not None
        self._live.setdefault(grant.session_id, set()).add(task)
        started_ms, started_s = int(time.time() * 1000), time.monotonic()
        record = EgressRecord(
            host=request.host,
            port=request.port,
            method=request.method,
            verdict=EgressVerdict.REFUSED,
            reason="",
            started_ms=started_ms,
        )
        traffic = _Traffic()
        try:
            address = await self._admit(grant, request)
            record.address = address
            upstream = await self._dial(address, request.port)
            record.verdict, record.reason = EgressVerdict.ALLOWED, "listed"
            await self._relay(request, reader, writer, upstream, traffic)
        except EgressRefused as exc:
            if exc.status != 403:
                record.verdict = EgressVerdict.FAILED
            record.reason = exc.reason
            await _answer(writer, exc.status, exc.message)
        except asyncio.CancelledError:
            record.reason = record.reason or "session_ended"
        finally:
            writer.transport.abort()
            self._live.get(grant.session_id, set()).discard(task)
            record.duration_ms = round((time.monotonic() - started_s) * 1000)
            record.bytes_up, record.bytes_down = traffic.up, traffic.down
            await self._save(grant.session_id, record)

    async def _admit(self, grant: _Grant, request: _Request) -> str:
        """Apply the session's policy; return the address to dial.

        Raises:
            EgressRefused: the host, port or resolved address is not allowed.
        """
        target = f"{request.host}:{request.port}"
        if request.port not in grant.ports:
            raise EgressRefused(
                "port_not_allowed", f"egress to {target} refused: port not allowed"
            )
        match = grant.allow.match(request.host)
        if match is Match.NONE:
            reason = "ip_not_listed" if is_ip_literal(request.host) else "not_listed"
            raise EgressRefused(
                reason, f"egress to {target} refused: not on this session's list"
            )
        addresses = await self._resolve(request.host, request.port)
        # A wildcard must not lead into the node's own or private networks
        # (loopback, link-local metadata services, RFC 1918); only a name
        # listed exactly, by an operator who meant it, may.
        inner = [a for a in addresses if not ipaddress.ip_address(a).is_global]
        if inner and match is not Match.EXACT:
            raise EgressRefused(
                "non_public_address",
                f"egress to {target} refused: it resolves to a non-public address",
            )

        return addresses[0]

    async def _resolve(self, host: str, port: int) -> list[str]:
        if is_ip_literal(host):
            return [host]
        if host in self.config.hosts:
            return [self.config.hosts[host]]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                self.config.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise EgressRefused(
                "unresolvable", f"{host} does not resolve: {exc}", status=502
            ) from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise EgressRefused("unresolvable", f"{host} has no address", status=502)
        return addresses

    async def _dial(
        self, address: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(address, port), self.config.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise EgressRefused(
                "upstream_unreachable",
                f"{address}:{port} is unreachable: {type(exc).__name__}",
                status=502,
            ) from exc

    async def _relay(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        traffic: _Traffic,
    ) -> None:
        up_reader, up_writer = upstream
        try:
            if request.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                head = _forwarded_head(request)
                up_writer.write(head)
                traffic.up += len(head)
            # Upstream's end is the connection's end; the client's end is
            # passed on as a half-close, so a response can still arrive.
            sending = asyncio.create_task(
                self._pipe(reader, up_writer, traffic, upward=True)
            )
            try:
                await self._pipe(up_reader, writer, traffic, upward=False)
            finally:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
        finally:
            up_writer.transport.abort()

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        traffic: _Traffic,
        *,
        upward: bool,
    ) -> None:
        idle_s = self.config.idle_timeout_s
        try:
            while True:
                try:
                    data = await asyncio.wait_for(source.read(_CHUNK_BYTES), idle_s)
                except TimeoutError:
                    # Idle means no byte either way, not just this way.
                    if time.monotonic() - traffic.last_s < idle_s:
                        continue
                    return
                if not data:
                    break
                sink.write(data)
                await sink.drain()
                traffic.last_s = time.monotonic()
                if upward:
                    traffic.up += len(data)
                else:
                    traffic.down += len(data)
            if upward and sink.can_write_eof():
                sink.write_eof()
        except OSError:
            return

    async def _save(self, session_id: str, record: EgressRecord) -> None:
        log.info(
            "egress.connection",
            host=record.host,
            port=record.port,
            method=record.method,
            verdict=record.verdict.value,
            reason=record.reason,
            bytes_up=record.bytes_up,
            bytes_down=record.bytes_down,
            duration_ms=record.duration_ms,
        )
        try:
            await self._record(session_id, record)
        except Exception:
            # The connection already happened; losing its record must not
            # take the proxy down with it.
            log.exception("egress.record_failed")


async def _read_head(reader: asyncio.StreamReader) -> _Request:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise EgressRefused("bad_request", "head too long", status=431) from exc
    except asyncio.IncompleteReadError as exc:
        raise EgressRefused("bad_request", "no request", status=400) from exc
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise EgressRefused("bad_request", "not an HTTP/1 request", status=400)
    method, target, version = parts
    headers = [_header(line) for line in lines[1:] if line]
    request = _target(method.upper(), target, version, headers)
    for name, value in headers:
        if name.lower() == "proxy-authorization":
            request.authorization = value

    return request


def _header(line: str) -> tuple[str, str]:
    name, colon, value = line.partition(":")
    if not colon or not name or name != name.strip():
        raise EgressRefused("bad_request", "malformed header", status=400)
    return name, value.strip()


def _target(
    method: str, target: str, version: str, headers: list[tuple[str, str]]
) -> _Request:
    """Split the request target into host, port and origin-form path."""
    try:
        if method == "CONNECT":
            split = urlsplit("//" + target)
            port, path = split.port, ""
        else:
            split = urlsplit(target)
            if split.scheme.lower() != "http":
                raise ValueError("only http:// URLs are forwarded; use CONNECT")
            port = split.port or 80
            path = split.path or "/"
            if split.query:
                path += "?" + split.query
    except ValueError as exc:
        raise EgressRefused("bad_request", f"bad target: {exc}", status=400) from exc
    if not split.hostname or port is None:
        raise EgressRefused(
            "bad_request", "the target names no host and port", status=400
        )
    return _Request(
        method=method,
        version=version,
        host=split.hostname,
        port=port,
        path=path,
        headers=headers,
    )


def _forwarded_head(request: _Request) -> bytes:
    """The request as an origin server expects it, for one exchange."""
    named = {
        part.strip().lower()
        for name, value in request.headers
        if name.lower() == "connection"
        for part in value.split(",")
    }
    authority = request.host if request.port == 80 else f"{request.host}:{request.port}"
    if ":" in request.host:
        authority = f"[{request.host}]:{request.port}"
    lines = [f"{request.method} {request.path} {request.version}"]
    lines.append(f"Host: {authority}")
    for name, value in request.headers:
        lowered = name.lower()
        # The Host the client sent might name another site on the same
        # server; the one that was checked is the one sent.
        if lowered in _HOP_HEADERS or lowered in named or lowered == "host":
            continue
        lines.append(f"{name}: {value}")
    lines.append("Connection: close")

    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    """Tell the client why, then close; the client may already be gone."""
    reasons = {
        400: "Bad Request",
        403: "Forbidden",
        407: "Proxy Authentication Required",
        431: "Request Header Fields Too Large",
        502: "Bad Gateway",
    }
    body = (message + "\n").encode()
    head = [
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 407:
        head.append('Proxy-Authenticate: Basic realm="acp-fleet"')
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await asyncio.wait_for(writer.drain(), _HEAD_TIMEOUT_S)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.transport.abort()


@dataclass
class Egress:
    """The node's egress: its internal network and the proxy on its gateway."""

    proxy: EgressProxy
    network: SandboxNetwork


def egress_network_name(settings: FleetSettings) -> str:
    """The internal network of this node's egress sandboxes."""
    configured = settings.worker.egress.network
    return configured or f"{settings.fleet}-egress-{settings.worker.node}"


async def start_egress(
    settings: FleetSettings,
    runtime: DockerRuntime,
    *,
    record: Recorder,
) -> Egress | None:
    """Create the internal network and start the proxy, if a profile needs them.

    Raises:
        ConfigError: the configured CA bundle is not a file on this node.
        SandboxError: Docker refused the network.
    """
    if all(p.network.mode == "none" for p in settings.profiles.values()):
        return None
    config = settings.worker.egress
    _check_ca_bundle(config.ca_bundle)
    name = egress_network_name(settings)
    labels = {LABEL_FLEET: settings.fleet, LABEL_NODE: settings.worker.node}
    gateway = await runtime.ensure_internal_network(name, labels=labels)
    proxy = EgressProxy(config=config, record=record)
    await proxy.start(gateway, config.proxy_port)
    log.info("egress.started", network=name, proxy_host=gateway, proxy_port=proxy.port)
    return Egress(
        proxy=proxy, network=SandboxNetwork(name=name, ca_bundle=config.ca_bundle)
    )


def _check_ca_bundle(path: str | None) -> None:
    # Docker would create a missing bind source as an empty directory.
    if path and not Path(path).is_file():
        raise ConfigError(f"worker.egress.ca_bundle: {path} is not a file on this node")


async def stop_egress(egress: Egress, runtime: DockerRuntime) -> None:
    """Stop the proxy; remove the network unless sandboxes still use it."""
    await egress.proxy.close()
    if not await runtime.remove_network(egress.network.name):
        log.warning("egress.network_in_use", network=egress.network.name)
