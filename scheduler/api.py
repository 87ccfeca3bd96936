"""The HTTP API: sessions, their stdio WebSocket, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import structlog
from arq.connections import ArqRedis
from fastapi import Depends, FastAPI, Header, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.admission import Admission
from scheduler.auth import Authenticator, Principal, require_session
from scheduler.gateway import (
    CLIENT_SEEN_INTERVAL_S,
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_NOT_FOUND,
    CLOSE_UNAUTHORIZED,
    Numbering,
    relay,
)
from scheduler.heartbeats import HeartbeatAges, watch_forever
from scheduler.limits import BodyLimit
from scheduler.workspace import check_archive, read_body
from shared.errors import (
    AdmissionRefused,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    RequestRefused,
    Unauthorized,
)
from shared.heap import freeze_startup_heap
from shared.keys import Keys
from shared.logs import FailureStreak
from shared.models import (
    AuditEvent,
    AuditTrail,
    CreateSession,
    DrainView,
    EgressRecord,
    EgressView,
    EndCause,
    ErrorBody,
    FleetView,
    NodeView,
    Outcome,
    QueueView,
    RunningSessionView,
    SessionCreated,
    SessionList,
    SessionState,
    SessionView,
    session_view,
)
from shared.settings import FleetSettings
from shared.store import SessionStore, blocking_client, command_client
from shared.telemetry import configure_metrics, scheduler_metrics
from shared.tracing import configure_tracing, shutdown_tracing
from shared.wire import parse_cursor

log = structlog.get_logger("scheduler.api")
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
# One Redis command fails within the sum of these three (4 s), so that
# the API answers 503 within 5 s while Redis hangs. Redis answers in
# microseconds; a command that takes seconds has stalled every client.
_REDIS_TIMEOUT_S = 2.0
_REDIS_CONNECT_TIMEOUT_S = 1.0
_REDIS_POOL_WAIT_S = 1.0
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}
_NODE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_REFUSALS = {
    401: "No credential, or one that is unknown or expired.",
    403: "A valid credential of a kind that does not grant this.",
    404: "No such session or node for this caller.",
    409: "The session's state does not allow this.",
    413: "The body is larger than its bound.",
    422: "The request is malformed or out of range; `field` names what.",
    429: "A quota, rate or queue bound refuses it for now; see Retry-After.",
    503: "The session store is unreachable; see Retry-After.",
}


class Fleet:
    """What every request handler of one replica shares."""

    def __init__(self, settings: FleetSettings, arq: ArqRedis, blocking: Redis) -> None:
        self.settings = settings
        self.arq = arq
        self.store = SessionStore(
            arq, keys=Keys(settings.key_prefix), blocking=blocking
        )
        self.auth = Authenticator(settings)
        self.admission = Admission(
            settings=settings, store=self.store, arq=arq, auth=self.auth
        )


def _refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entries of the refusals a route can answer."""
    return {
        status: {"model": ErrorBody, "description": _REFUSALS[status]}
        for status in statuses
    }


# What every route that checks a credential against Redis can refuse;
# declaring 422 also replaces FastAPI's default validation schema, whose
# body this API never sends.
_GUARDED = (401, 403, 422, 503)


def _error(exc: RequestRefused) -> JSONResponse:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.field:
        body["field"] = exc.field
    headers = {}
    if isinstance(exc, AdmissionRefused):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": body}, status_code=exc.status, headers=headers)


def create_app(settings: FleetSettings) -> FastAPI:
    """Return the scheduler's ASGI application."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A Redis that hangs must not hang the API: a request stops at its
        # first Redis command that fails, and each fails within a bound.
        arq = command_client(
            settings.redis_url,
            timeout_s=_REDIS_TIMEOUT_S,
            connect_timeout_s=_REDIS_CONNECT_TIMEOUT_S,
            pool_wait_s=_REDIS_POOL_WAIT_S,
        )
        blocking = blocking_client(settings.redis_url)
        app.state.fleet = Fleet(settings, arq, blocking)
        sweeper = asyncio.create_task(_sweep_lapsed(app.state.fleet))
        watcher = asyncio.create_task(_watch_heartbeats(app.state.fleet))
        freeze_startup_heap()
        log.info(
            "scheduler.started",
            host=settings.scheduler.host,
            port=settings.scheduler.port,
            orgs=len(settings.orgs),
            profiles=sorted(settings.profiles),
        )
        try:
            yield
        finally:
            for task in (sweeper, watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await arq.aclose()
            await blocking.aclose()
            shutdown_tracing()

    configure_metrics("acp-fleet-scheduler")
    configure_tracing(settings, "acp-fleet-scheduler")
    app = FastAPI(
        title="ACP Fleet",
        version="1",
        summary="Run ACP coding agents in hardened sandboxes.",
        lifespan=lifespan,
        # FastAPI's own request spans would each start a trace with no
        # session in it; the fleet traces sessions (shared.tracing). Its
        # per-request HTTP metrics cost a sixth of an admission's CPU and
        # say less than the fleet's own admission counters and phase
        # histograms; request latency is the ingress' to measure. Its
        # OpenTelemetry logs would need a log provider the fleet has not:
        # structlog writes the fleet's logs. With all three off, FastAPI
        # skips its telemetry wrapper on every request.
        telemetry={
            "tracing": False,
            "operation_spans": False,
            "metrics": False,
            "logs": False,
        },
    )

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused) -> JSONResponse:
        # Who was refused and why, never with the credential itself.
        fleet: Fleet = request.app.state.fleet
        credential = _bearer(request.headers.get("authorization"))
        log.info(
            "request.refused",
            method=request.method,
            path=request.url.path,
            remote=request.client.host if request.client else "",
            who=fleet.auth.describe(credential),
            code=exc.code,
            status=exc.status,
        )
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = first.get("loc", ())
        # A JSON syntax error's location is a character offset, not a field.
        if first.get("type") == "json_invalid":
            loc = ()
        field = ".".join(str(p) for p in loc if p != "body")
        reason = str(first.get("msg", "invalid request"))
        message = f"{field or 'body'}: {reason.removeprefix('Value error, ')}"
        return _error(InvalidRequest("invalid_request", message, field=field or None))

    @app.exception_handler(RedisError)
    async def unavailable(request: Request, exc: RedisError) -> JSONResponse:
        log.error(
            "redis.unavailable",
            path=request.url.path,
            error_type=type(exc).__name__,
            error=str(exc),
        )
        body = {"code": "unavailable", "message": "Session store unreachable."}
        return JSONResponse(
            {"error": body}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing and body-parsing errors speak the API's error format too.
        if exc.status_code == 400:
            # FastAPI's answer to a body it could not parse, whatever the
            # reason; the reason is its cause. It is malformed input like
            # any broken JSON.
            return _error(_unparsed_body(exc))
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        body = {"code": code, "message": str(exc.detail)}
        return JSONResponse({"error": body}, status_code=exc.status_code)

    for add_routes in (
        _session_routes,
        _workspace_routes,
        _operator_routes,
        _health_routes,
        _stdio_route,
    ):
        add_routes(app)
    app.add_middleware(
        BodyLimit, upload_max_bytes=settings.scheduler.workspace_upload_max_bytes
    )
    return app


def _unparsed_body(exc: StarletteHTTPException) -> InvalidRequest:
    """Say why FastAPI could not parse a body, from the error behind it."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        # Python's JSON parser recurses once per array or object level.
        return InvalidRequest(
            "body_too_deep",
            "body: the JSON is nested too deeply to parse (Python's parser "
            "stops near a thousand levels); no body of this API nests deeper "
            "than three.",
        )
    if isinstance(cause, UnicodeDecodeError):
        return InvalidRequest(
            "invalid_request",
            f"body: is not UTF-8 text (byte {cause.start} cannot be decoded); "
            "send JSON encoded as UTF-8.",
        )
    return InvalidRequest("invalid_request", f"body: {exc.detail}")


async def _sweep_lapsed(fleet: Fleet) -> None:
    """End the sessions of dead workers even when no worker is left to."""
    interval_s = fleet.settings.worker.lease_ms / 2000
    slot_ttl_ms = fleet.settings.scheduler.queue_slot_ttl_s * 1000
    # Admission forgets queue entries as old as a slot; the sweep ends them
    # a few rounds before that, so that none stays queued for good.
    max_wait_ms = max(slot_ttl_ms // 2, slot_ttl_ms - round(3 * interval_s * 1000))
    streak = FailureStreak(log, "sweep.failed")
    while True:
        await asyncio.sleep(interval_s)
        try:
            await fleet.store.end_lapsed()
            await fleet.store.end_stale_queued(max_wait_ms)
        except RedisError as exc:
            streak.failed(exc)
        else:
            streak.succeeded()


async def _watch_heartbeats(fleet: Fleet) -> None:
    """Keep the heartbeat-age gauge as fresh as the workers' heartbeats."""
    ages = HeartbeatAges()
    scheduler_metrics().gauges.watch("heartbeat_age", ages.reading)
    interval_s = fleet.settings.worker.heartbeat_ms / 1000
    await watch_forever(fleet.store, ages, interval_s=interval_s)


async def _fleet(request: Request) -> Fleet:
    # Async on purpose: FastAPI runs a plain function dependency in a
    # thread pool, a thread hop on every request.
    fleet: Fleet = request.app.state.fleet
    return fleet


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


FleetDep = Annotated[Fleet, Depends(_fleet)]
AuthHeader = Annotated[str | None, Header()]
# The OpenAPI entry ``AuthHeader`` gives a route, for one that reads the
# header itself.
_AUTHORIZATION_PARAMETER = {
    "name": "authorization",
    "in": "header",
    "required": False,
    "schema": {
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "title": "Authorization",
    },
}


def _session_routes(app: FastAPI) -> None:
    # The busiest route takes its credential and the fleet straight from
    # the request and answers with the model it built, already serialised:
    # FastAPI's dependency solving and its re-validation of the answer took
    # a tenth of an admission's CPU. The schema still shows both.
    @app.post(
        "/v1/sessions",
        status_code=201,
        response_model=SessionCreated,
        responses=_refusals(*_GUARDED, 413, 429),
        openapi_extra={"parameters": [_AUTHORIZATION_PARAMETER]},
    )
    async def create_session(body: CreateSession, request: Request) -> Response:
        """Admit a session for the calling organisation and queue it."""
        fleet: Fleet = request.app.state.fleet
        org = fleet.auth.org_for_key(_bearer(request.headers.get("authorization")))
        created = await fleet.admission.create(org, body, remote=_remote(request))
        return Response(
            created.model_dump_json(), status_code=201, media_type="application/json"
        )

    @app.get("/v1/sessions", response_model=SessionList, responses=_refusals(*_GUARDED))
    async def list_sessions(
        fleet: FleetDep,
        authorization: AuthHeader = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> SessionList:
        """The calling organisation's newest sessions, and only its own."""
        org = fleet.auth.org_for_key(_bearer(authorization))
        views = []
        for session_id in await fleet.store.org_sessions(org, limit=limit):
            record = await fleet.store.record(session_id)
            if record is not None and record.get("org") == org:
                views.append(session_view(session_id, record))
        return SessionList(sessions=views)

    @app.get(
        "/v1/sessions/{session_id}",
        response_model=SessionView,
        responses=_refusals(*_GUARDED, 404),
    )
    async def get_session(
        session_id: str, fleet: FleetDep, authorization: AuthHeader = None
    ) -> SessionView:
        """State, end cause, exit code and phase timings of a session."""
        principal = fleet.auth.principal(_bearer(authorization))
        record = await _owned_record(fleet, principal, session_id)
        return session_view(session_id, record)

    @app.get(
        "/v1/sessions/{session_id}/egress",
        response_model=EgressView,
        responses=_refusals(*_GUARDED, 404),
    )
    async def get_egress(
        session_id: str, fleet: FleetDep, authorization: AuthHeader = None
    ) -> EgressView:
        """Each connection the agent made through the egress proxy, allowed
        or refused, oldest first; empty for a session without egress."""
        principal = fleet.auth.principal(_bearer(authorization))
        await _owned_record(fleet, principal, session_id)
        entries = await fleet.store.egress_records(session_id)
        records = [EgressRecord.model_validate(entry) for entry in entries]
        return EgressView(id=session_id, records=records)

    @app.delete(
        "/v1/sessions/{session_id}",
        response_model=SessionView,
        responses={
            202: {
                "model": SessionView,
                "description": "Cancellation asked of the running session.",
            },
            **_refusals(*_GUARDED, 404),
        },
    )
    async def cancel_session(
        session_id: str, fleet: FleetDep, authorization: AuthHeader = None
    ) -> Any:
        """Cancel a session, whether it is queued or running."""
        principal = fleet.auth.principal(_bearer(authorization))
        record = await _owned_record(fleet, principal, session_id)
        state = SessionState(record["state"])
        await fleet.store.audit(
            session_id,
            "cancel_requested",
            by=fleet.auth.describe(_bearer(authorization)),
        )
        if state is SessionState.QUEUED:
            outcome = Outcome(cause=EndCause.CANCELLED, detail="cancelled while queued")
            if not await fleet.store.finish(
                session_id, org=record["org"], expect="queued", outcome=outcome
            ):
                # A worker claimed it since it was read: it is cancelled as a
                # running session is, or it has ended meanwhile.
                record = await fleet.store.record(session_id) or record
                state = SessionState(record["state"])
        if state not in (SessionState.QUEUED, SessionState.ENDED):
            await fleet.store.touch(session_id, "cancel_requested_ms")
            await fleet.store.write_stdin(session_id, "cancel")
            view = session_view(session_id, record)
            return JSONResponse(view.model_dump(mode="json"), status_code=202)
        record = await fleet.store.record(session_id) or record
        return session_view(session_id, record)


def _workspace_routes(app: FastAPI) -> None:
    @app.put(
        "/v1/sessions/{session_id}/workspace",
        response_model=SessionView,
        responses=_refusals(*_GUARDED, 404, 409, 413),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/x-tar": {"schema": {"type": "string"}}},
            }
        },
    )
    async def put_workspace(
        session_id: str,
        request: Request,
        fleet: FleetDep,
        authorization: AuthHeader = None,
    ) -> SessionView:
        """Deliver the files a session that waits for them starts with.

        The body is a tar archive (plain or compressed); the session, created
        with ``workspace.upload``, is queued once it has arrived.
        """
        principal = fleet.auth.principal(_bearer(authorization))
        record = await _owned_record(fleet, principal, session_id)
        if record.get("workspace_upload") != "pending":
            raise _upload_conflict(record)
        settings = fleet.settings
        archive = await read_body(
            request.stream(),
            max_bytes=settings.scheduler.workspace_upload_max_bytes,
            timeout_s=settings.scheduler.workspace_upload_timeout_s,
        )
        profile = settings.profiles.get(record["profile"])
        room = profile.limits.workspace_bytes if profile else 0
        files = await asyncio.to_thread(check_archive, archive, max_unpacked_bytes=room)
        taken = await fleet.store.put_upload(
            session_id, archive, settings.scheduler.queue_slot_ttl_s * 1000
        )
        if taken != "ok":
            record = await fleet.store.record(session_id) or record
            raise _upload_conflict(record)
        await fleet.admission.enqueue(session_id)
        await fleet.store.audit(
            session_id,
            "workspace_uploaded",
            by=fleet.auth.describe(_bearer(authorization)),
            remote=_remote(request),
            bytes=str(len(archive)),
            files=str(files),
        )
        record = await fleet.store.record(session_id) or record
        return session_view(session_id, record)

    @app.get(
        "/v1/sessions/{session_id}/workspace",
        response_class=Response,
        responses={
            200: {"content": {"application/x-tar": {}}},
            **_refusals(*_GUARDED, 404, 409),
        },
    )
    async def get_workspace(
        session_id: str, fleet: FleetDep, authorization: AuthHeader = None
    ) -> Response:
        """The files of an ended session's workspace, as a tar archive.

        Kept when the session was created with ``workspace.fetch``, for as
        long as its output.
        """
        principal = fleet.auth.principal(_bearer(authorization))
        record = await _owned_record(fleet, principal, session_id)
        if record["state"] != SessionState.ENDED:
            raise Conflict(
                "session_not_ended",
                "The workspace is archived when the session ends; it has not.",
            )
        archive = await fleet.store.archive(session_id)
        if archive is None:
            status = record.get("workspace_archive") or "not_requested"
            raise NotFound(
                "no_workspace_archive",
                f"No workspace archive is kept for this session ({status}).",
            )
        return Response(archive, media_type="application/x-tar")

    @app.get(
        "/v1/sessions/{session_id}/audit",
        response_model=AuditTrail,
        responses=_refusals(*_GUARDED, 404),
    )
    async def audit_trail(
        session_id: str, fleet: FleetDep, authorization: AuthHeader = None
    ) -> AuditTrail:
        """Who created the session, from where, what it ran with, how it ended.

        Readable by the organisation that owns the session and by operators.
        """
        credential = _bearer(authorization)
        if not fleet.auth.is_operator(credential):
            principal = fleet.auth.principal(credential)
            await _owned_record(fleet, principal, session_id)
        elif not _SESSION_ID.fullmatch(session_id) or not await fleet.store.record(
            session_id
        ):
            raise NotFound("session_not_found", f"No session {session_id}.")
        events = await fleet.store.audit_trail(session_id)
        return AuditTrail(
            session_id=session_id,
            events=[AuditEvent.model_validate(event) for event in events],
        )


def _upload_conflict(record: dict[str, str]) -> Conflict:
    upload = record.get("workspace_upload")
    if upload == "received":
        return Conflict(
            "already_uploaded", "The workspace archive has arrived already."
        )
    if upload == "pending":
        return Conflict("not_queued", "The session is no longer waiting for files.")
    return Conflict(
        "upload_not_expected",
        "The session was not created with workspace.upload; it takes no archive.",
    )


def _remote(request: Request) -> str:
    return request.client.host if request.client else ""


def _operator_routes(app: FastAPI) -> None:
    @app.get("/v1/fleet", response_model=FleetView, responses=_refusals(*_GUARDED))
    async def fleet_view(
        fleet: FleetDep,
        authorization: AuthHeader = None,
        sessions_limit: Annotated[int, Query(ge=0, le=1000)] = 100,
    ) -> FleetView:
        """Nodes (heartbeat age, capacity, sessions by state, drain state and
        progress, pools), the running sessions (oldest first, at most
        ``sessions_limit``) and the queue."""
        fleet.auth.operator_for_key(_bearer(authorization))
        return await _fleet_view(fleet, sessions_limit=sessions_limit)

    @app.post(
        "/v1/nodes/{node:path}/drain",
        status_code=202,
        response_model=FleetView,
        responses=_refusals(*_GUARDED, 404),
    )
    async def drain_node(
        node: str, fleet: FleetDep, authorization: AuthHeader = None
    ) -> FleetView:
        """Ask a node to stop claiming sessions; running ones finish."""
        return await _set_drain(fleet, node, authorization, drain=True)

    @app.delete(
        "/v1/nodes/{node:path}/drain",
        response_model=FleetView,
        responses=_refusals(*_GUARDED, 404),
    )
    async def undrain_node(
        node: str, fleet: FleetDep, authorization: AuthHeader = None
    ) -> FleetView:
        """Let a drained node claim sessions again."""
        return await _set_drain(fleet, node, authorization, drain=False)


def _health_routes(app: FastAPI) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """This replica's metrics, in Prometheus' text format."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", responses=_refusals(503))
    async def readyz(fleet: FleetDep) -> dict[str, str]:
        """The process can reach Redis."""
        await fleet.store.redis.ping()
        return {"status": "ready"}


def _stdio_route(app: FastAPI) -> None:
    @app.websocket("/v1/sessions/{session_id}/stdio")
    async def stdio(
        ws: WebSocket,
        session_id: str,
        cursor: Annotated[str | None, Query()] = None,
        token: Annotated[str | None, Query()] = None,
        writer: Annotated[str | None, Query()] = None,
        seq: Annotated[str | None, Query()] = None,
    ) -> None:
        """The agent's stdio: binary output frames out, stdin and EOF in."""
        fleet: Fleet = ws.app.state.fleet
        await ws.accept()
        credential = token or _bearer(ws.headers.get("authorization"))
        try:
            principal = fleet.auth.principal(credential)
            record = await _owned_record(fleet, principal, session_id)
            start = parse_cursor(cursor)
            await _check_cursor(fleet.store, session_id, start)
        except Unauthorized as exc:
            await _refuse(ws, CLOSE_UNAUTHORIZED, exc.code, exc.message)
            return
        except Forbidden as exc:
            await _refuse(ws, CLOSE_FORBIDDEN, exc.code, exc.message)
            return
        except NotFound as exc:
            await _refuse(ws, CLOSE_NOT_FOUND, exc.code, exc.message)
            return
        except ValueError as exc:
            await _refuse(ws, CLOSE_BAD_REQUEST, "invalid_cursor", str(exc))
            return
        try:
            numbering = Numbering.parse(writer, seq)
        except ValueError as exc:
            await _refuse(ws, CLOSE_BAD_REQUEST, "invalid_stdin_seq", str(exc))
            return
        seen_every_s = _seen_interval_s(fleet.settings, record)
        await relay(
            ws,
            fleet.store,
            session_id,
            start,
            seen_every_s=seen_every_s,
            numbering=numbering,
        )


async def _owned_record(
    fleet: Fleet, principal: Principal, session_id: str
) -> dict[str, str]:
    record = None
    if _SESSION_ID.fullmatch(session_id):
        record = await fleet.store.record(session_id)
    require_session(principal, session_id, record.get("org") if record else None)
    assert record is not None
    return record


async def _check_cursor(store: SessionStore, session_id: str, cursor: str) -> None:
    """Refuse a cursor past the last output, which would wait forever."""
    if cursor == "0-0":
        return
    last = await store.last_id(store.keys.stdout(session_id))
    if last is None or _id_key(cursor) > _id_key(last):
        raise ValueError(f"cursor {cursor} is past the session's last output")


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


async def _set_drain(
    fleet: Fleet, node: str, authorization: str | None, *, drain: bool
) -> FleetView:
    operator = fleet.auth.operator_for_key(_bearer(authorization))
    if not _NODE_NAME.fullmatch(node) or not await fleet.store.node_known(node):
        raise NotFound("node_not_found", f"No node {node!r} has sent a heartbeat.")
    await fleet.store.set_drain(node, drain=drain)
    log.info("node.drain_set", node=node, drain=drain, operator=operator)
    return await _fleet_view(fleet)


async def _fleet_view(fleet: Fleet, *, sessions_limit: int = 100) -> FleetView:
    now_ms = await fleet.store.now_ms()
    running = [
        _running_view(row, now_ms) for row in await fleet.store.running_sessions()
    ]
    nodes = [
        await _node_view(fleet, record, running, now_ms)
        for record in await fleet.store.nodes()
    ]
    depth, oldest_ms = await fleet.store.queue_stats()
    wait_ms = None if oldest_ms is None else now_ms - oldest_ms

    return FleetView(
        nodes=nodes,
        queue=QueueView(depth=depth, oldest_wait_ms=wait_ms),
        sessions=running[:sessions_limit],
        sessions_total=len(running),
    )


async def _node_view(
    fleet: Fleet,
    record: dict[str, str],
    running: list[RunningSessionView],
    now_ms: int,
) -> NodeView:
    request = await fleet.store.drain_request(record["node"])
    states = Counter(row.state for row in running if row.node == record["node"])
    return NodeView(
        node=record["node"],
        heartbeat_age_ms=now_ms - int(record["heartbeat_ms"]),
        capacity=int(record.get("capacity", 0)),
        sessions=int(record.get("sessions", 0)),
        draining=record.get("draining") == "1",
        drain_requested=request is not None,
        started_ms=int(record.get("started_ms", 0)),
        pools=json.loads(record.get("pools", "{}")),
        drain=None if request is None else DrainView(**request),
        states=dict(states),
    )


def _running_view(row: dict[str, str], now_ms: int) -> RunningSessionView:
    return RunningSessionView(
        id=row["id"],
        org=row.get("org", ""),
        profile=row.get("profile", ""),
        node=row.get("node", ""),
        state=row["state"],
        age_ms=now_ms - int(row.get("claimed_ms", now_ms)),
        start=row.get("start"),
    )


def _seen_interval_s(settings: FleetSettings, record: dict[str, str]) -> float:
    """How often to record an attached client: thrice per idle timeout."""
    narrowed = json.loads(record.get("limits", "{}"))
    profile = settings.profiles.get(record.get("profile", ""))
    idle_s = narrowed.get("idle_timeout_s") or (
        profile.limits.idle_timeout_s if profile else CLIENT_SEEN_INTERVAL_S * 3
    )
    return float(min(CLIENT_SEEN_INTERVAL_S, idle_s / 3))


async def _refuse(ws: WebSocket, code: int, reason: str, message: str) -> None:
    await ws.send_json({"type": "error", "code": reason, "message": message})
    await ws.close(code=code, reason=reason)
