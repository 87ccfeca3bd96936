"""The session's vocabulary: states, end causes, records and API bodies."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from shared.errors import InvalidRequest
from shared.limits import parse_memory_bytes, parse_nano_cpus, parse_pids_limit

_LIMIT_PARSERS = {
    "memory": ("memory_bytes", parse_memory_bytes),
    "cpus": ("nano_cpus", parse_nano_cpus),
    "pids": ("pids_limit", parse_pids_limit),
}


class SessionState(StrEnum):
    """Where a session is in its life; it only ever moves forward."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"


class EndCause(StrEnum):
    """The one explicit reason each session ended."""

    AGENT_EXIT = "agent_exit"
    OOM_KILLED = "oom_killed"
    PIDS_EXHAUSTED = "pids_exhausted"
    DISK_FULL = "disk_full"
    IDLE_TIMEOUT = "idle_timeout"
    LIFETIME_EXCEEDED = "lifetime_exceeded"
    EOF_IGNORED = "eof_ignored"
    LINE_TOO_LONG = "line_too_long"
    RELAY_FAILED = "relay_failed"
    CANCELLED = "cancelled"
    DRAINED = "drained"
    WORKER_LOST = "worker_lost"
    START_FAILED = "start_failed"


class LimitsRequest(BaseModel):
    """Limits a session asks for; each must be within its profile's."""

    model_config = ConfigDict(extra="forbid")

    memory: str | int | None = None
    cpus: float | str | None = None
    pids: int | str | None = None
    lifetime_s: int | None = Field(None, gt=0, strict=True)
    idle_timeout_s: int | None = Field(None, gt=0, strict=True)

    @field_validator("memory", "cpus", "pids", mode="before")
    @classmethod
    def _no_booleans(cls, value: object, info: ValidationInfo) -> object:
        # JSON true would otherwise pass as the number 1 (one process, one
        # CPU, one byte); the grammar's own parser says why it is refused.
        if isinstance(value, bool):
            _stored_as, parse = _LIMIT_PARSERS[str(info.field_name)]
            parse(value)
        return value

    def parsed(self) -> dict[str, int]:
        """Return the given limits in the units the profile stores.

        Raises:
            InvalidRequest: a limit is outside its grammar; names the field.
        """
        parsed: dict[str, int] = {}
        for name, (stored_as, parse) in _LIMIT_PARSERS.items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                parsed[stored_as] = parse(value)
            except ValueError as exc:
                field = f"limits.{name}"
                raise InvalidRequest(
                    "invalid_limit", f"{field}: {exc}", field=field
                ) from exc
        for name in ("lifetime_s", "idle_timeout_s"):
            if (seconds := getattr(self, name)) is not None:
                parsed[name] = seconds

        return parsed


class WorkspaceRequest(BaseModel):
    """What a session's workspace starts with and what becomes of it."""

    model_config = ConfigDict(extra="forbid")

    # Hold the session until ``PUT /v1/sessions/{id}/workspace`` has
    # delivered a tar archive of the files it starts with.
    upload: bool = Field(False, strict=True)
    # Keep the workspace's files as a tar archive when the session ends,
    # for ``GET /v1/sessions/{id}/workspace``.
    fetch: bool = Field(False, strict=True)


class CreateSession(BaseModel):
    """Body of ``POST /v1/sessions``."""

    model_config = ConfigDict(extra="forbid")

    profile: str = Field(min_length=1, max_length=63)
    env: dict[
        Annotated[str, Field(max_length=256)],
        Annotated[str, Field(max_length=32 * 1024)],
    ] = Field(default_factory=dict, max_length=64)
    limits: LimitsRequest = Field(default_factory=LimitsRequest)
    workspace: WorkspaceRequest = Field(default_factory=WorkspaceRequest)

    @field_validator("env")
    @classmethod
    def _no_nul(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if "\0" in name or "\0" in value:
                raise ValueError(
                    f"env {name!r} contains a NUL byte, which no environment can hold"
                )
        return env


class SessionCreated(BaseModel):
    """Answer to an admitted ``POST /v1/sessions``."""

    id: str
    state: SessionState
    token: str
    token_expires_ms: int


class SessionTimings(BaseModel):
    """Wall-clock milliseconds (Redis' clock) at each phase boundary."""

    admitted_ms: int | None = None
    claimed_ms: int | None = None
    sandbox_ready_ms: int | None = None
    first_byte_ms: int | None = None
    ended_ms: int | None = None


class SessionView(BaseModel):
    """What ``GET /v1/sessions/{id}`` answers."""

    id: str
    org: str
    profile: str
    state: SessionState
    cause: EndCause | None = None
    exit_code: int | None = None
    oom_killed: bool | None = None
    kill_signal: str | None = None
    detail: str | None = None
    node: str | None = None
    image_digest: str | None = None
    limits: dict[str, int] = Field(default_factory=dict)
    # "pending" until an awaited archive arrives, then "received"; at the
    # end "stored", "too_large" or "failed" when a fetch was asked for.
    workspace_upload: str | None = None
    workspace_archive: str | None = None
    timings: SessionTimings


def session_view(session_id: str, record: dict[str, str]) -> SessionView:
    """Build the public view of a session from its Redis hash."""

    def number(name: str) -> int | None:
        value = record.get(name)
        return int(value) if value not in (None, "") else None

    oom = record.get("oom_killed")
    timings = SessionTimings(
        **{name: number(name) for name in SessionTimings.model_fields}
    )
    return SessionView(
        id=session_id,
        org=record["org"],
        profile=record["profile"],
        state=SessionState(record["state"]),
        cause=EndCause(record["cause"]) if record.get("cause") else None,
        exit_code=number("exit_code"),
        oom_killed=None if oom is None else oom == "1",
        kill_signal=record.get("kill_signal") or None,
        detail=record.get("detail") or None,
        node=record.get("node") or None,
        image_digest=record.get("image_digest") or None,
        limits=json.loads(record.get("limits", "{}")),
        workspace_upload=record.get("workspace_upload") or None,
        workspace_archive=record.get("workspace_archive") or None,
        timings=timings,
    )


class ErrorDetail(BaseModel):
    """What was refused: a stable code, a sentence and, for input, the field."""

    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Body of every refusal the API answers, whatever its status."""

    error: ErrorDetail


class SessionList(BaseModel):
    """The calling organisation's newest sessions."""

    sessions: list[SessionView]


class AuditEvent(BaseModel):
    """One entry of a session's audit trail; fields depend on the event."""

    model_config = ConfigDict(extra="allow")

    id: str
    event: str


class AuditTrail(BaseModel):
    """Who created the session, from where, and what it ran with."""

    session_id: str
    events: list[AuditEvent]


class EgressVerdict(StrEnum):
    """What the egress proxy did with one connection."""

    ALLOWED = "allowed"
    REFUSED = "refused"
    # Allowed by the policy, but the upstream could not be reached.
    FAILED = "failed"


class EgressRecord(BaseModel):
    """One connection through the egress proxy, as recorded for its session."""

    host: str
    port: int
    method: str
    verdict: EgressVerdict
    reason: str
    address: str | None = None
    started_ms: int
    duration_ms: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def stream_fields(self) -> dict[str, str]:
        """Return the record as the flat strings of a Redis stream entry."""
        return {
            name: str(value)
            for name, value in self.model_dump(mode="json").items()
            if value is not None
        }


class EgressView(BaseModel):
    """What ``GET /v1/sessions/{id}/egress`` answers: records, oldest first."""

    id: str
    records: list[EgressRecord]


class DrainView(BaseModel):
    """Operators' standing request to drain a node: when it was made and
    how many sessions the node ran then (unknown for older requests)."""

    requested_ms: int | None = None
    sessions_at_start: int | None = None


class NodeView(BaseModel):
    """One worker node as operators see it."""

    node: str
    heartbeat_age_ms: int
    capacity: int
    sessions: int
    draining: bool
    drain_requested: bool
    started_ms: int
    pools: dict[str, dict[str, Any]] = Field(default_factory=dict)
    drain: DrainView | None = None
    states: dict[str, int] = Field(default_factory=dict)


class RunningSessionView(BaseModel):
    """A claimed, not yet ended session, as operators see it."""

    id: str
    org: str
    profile: str
    node: str
    state: str
    age_ms: int
    start: str | None = None


class QueueView(BaseModel):
    """The shared queue: how deep, and how long its oldest entry has waited."""

    depth: int
    oldest_wait_ms: int | None


class FleetView(BaseModel):
    """What ``GET /v1/fleet`` answers."""

    nodes: list[NodeView]
    queue: QueueView
    sessions: list[RunningSessionView] = Field(default_factory=list)
    sessions_total: int = 0


class Outcome(BaseModel):
    """How a session ended, as the worker records it and the client sees it."""

    cause: EndCause
    exit_code: int | None = None
    oom_killed: bool = False
    kill_signal: str | None = None
    detail: str | None = None

    def record_fields(self) -> dict[str, str]:
        """Return the fields to write into the session's hash."""
        fields = {"cause": self.cause.value, "oom_killed": str(int(self.oom_killed))}
        if self.exit_code is not None:
            fields["exit_code"] = str(self.exit_code)
        if self.kill_signal:
            fields["kill_signal"] = self.kill_signal
        if self.detail:
            fields["detail"] = self.detail

        return fields

    def end_message(self) -> dict[str, Any]:
        """Return the ``end`` control message clients receive."""
        return {"type": "end", **self.model_dump(mode="json", exclude_none=True)}
