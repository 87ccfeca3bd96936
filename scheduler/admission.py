"""Admission: turn a request for a session into a queued session, or refuse.

Everything that can be checked without Redis is checked first, so a
refused request changes nothing; the quota, rate and queue checks then run
as one atomic script, and only an admitted session is enqueued.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from decimal import Decimal

import structlog
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from scheduler.auth import Authenticator
from shared.errors import AdmissionRefused, InvalidRequest
from shared.keys import SESSION_JOB
from shared.limits import MIB
from shared.models import CreateSession, SessionCreated, SessionState
from shared.settings import AgentProfile, FleetSettings
from shared.store import QueuedJob, Quota, SessionStore
from shared.telemetry import scheduler_metrics, shared_metrics
from shared.tracing import admission_span

log = structlog.get_logger("scheduler.admission")

_LIMIT_NAMES = {
    "memory_bytes": "memory",
    "nano_cpus": "cpus",
    "pids_limit": "pids",
    "lifetime_s": "lifetime_s",
    "idle_timeout_s": "idle_timeout_s",
}
_REFUSALS = {
    "org_concurrency": "The organisation runs as many sessions as it may.",
    "org_rate": "The organisation created sessions faster than it may.",
    "queue_full": "The fleet's queue is full; try again shortly.",
}


class Admission:
    """Validate, admit and enqueue new sessions."""

    def __init__(
        self,
        *,
        settings: FleetSettings,
        store: SessionStore,
        arq: ArqRedis,
        auth: Authenticator,
    ) -> None:
        self.settings = settings
        self.store = store
        self.arq = arq
        self.auth = auth

    async def create(
        self, org: str, request: CreateSession, *, remote: str = ""
    ) -> SessionCreated:
        """Admit a session for ``org`` and enqueue it.

        A session that waits for a workspace archive is enqueued by the
        upload instead (``enqueue``).

        Raises:
            InvalidRequest: unknown profile, disallowed variable or limit.
            AdmissionRefused: a quota, rate or queue bound says no.
        """
        session_id = uuid.uuid4().hex
        attributes = {"fleet.org": org, "fleet.profile": request.profile}
        with admission_span(session_id, **attributes) as trace_fields:
            return await self._admit(
                session_id, org, request, remote=remote, trace_fields=trace_fields
            )

    async def _admit(
        self,
        session_id: str,
        org: str,
        request: CreateSession,
        *,
        remote: str,
        trace_fields: dict[str, str],
    ) -> SessionCreated:
        started = time.perf_counter()
        profile = self._profile(request.profile)
        _check_env(profile, request.env)
        limits = _narrow(profile, request)
        admission = await self.store.admit(
            session_id,
            org=org,
            quota=self._quota(org, profile),
            fields={**_record_fields(request, limits), **trace_fields},
            env=request.env,
            audit=_created_event(org, remote, request, profile, limits),
            job=None if request.workspace.upload else self._job(session_id),
        )
        outcome = "admitted" if admission.admitted else admission.reason or "refused"
        scheduler_metrics().admissions.add(1, {"outcome": outcome, "org": org})
        if not admission.admitted:
            # The API's refusal handler logs who was refused and why.
            reason = admission.reason or "refused"
            raise AdmissionRefused(
                reason,
                _REFUSALS.get(reason, "Admission refused."),
                retry_after_s=max(1, math.ceil(admission.retry_after_ms / 1000)),
            )
        # Only the scheduler sees this phase end; the worker may claim the
        # session before the script's reply is back, so the phase cannot
        # wait for the warm-or-cold label the worker's phases carry.
        shared_metrics().startup.record(
            time.perf_counter() - started,
            {"phase": "admission", "profile": request.profile},
        )
        token, expires_ms = self.auth.mint(session_id, org)
        log.info(
            "session.admitted", session_id=session_id, org=org, profile=request.profile
        )

        return SessionCreated(
            id=session_id,
            state=SessionState.QUEUED,
            token=token,
            token_expires_ms=expires_ms,
        )

    def _profile(self, name: str) -> AgentProfile:
        profile = self.settings.profiles.get(name)
        if profile is None:
            known = ", ".join(sorted(self.settings.profiles)) or "none"
            raise InvalidRequest(
                "unknown_profile",
                f"No agent profile is named {name!r}; configured profiles: {known}.",
                field="profile",
            )
        return profile

    async def enqueue(self, session_id: str) -> None:
        """Hand an admitted session to the workers' queue."""
        await self.arq.enqueue_job(
            SESSION_JOB,
            session_id,
            _job_id=session_id,
            _queue_name=self.store.keys.arq_queue,
        )

    def _quota(self, org: str, profile: AgentProfile) -> Quota:
        scheduler = self.settings.scheduler
        org_config = self.settings.orgs[org]
        slot_ttl_ms = scheduler.queue_slot_ttl_s * 1000
        return Quota(
            max_sessions=org_config.max_sessions,
            per_minute=org_config.sessions_per_minute,
            queue_max=scheduler.queue_max_depth,
            slot_ttl_ms=slot_ttl_ms,
            session_ttl_ms=slot_ttl_ms + profile.limits.lifetime_s * 1000 * 2,
        )

    def _job(self, session_id: str) -> QueuedJob:
        """The session's arq job, as ``enqueue`` would write it."""
        now_ms = timestamp_ms()
        payload = serialize_job(
            SESSION_JOB,
            (session_id,),
            {},
            None,
            now_ms,
            serializer=self.arq.job_serializer,
        )
        return QueuedJob(
            key=job_key_prefix + session_id,
            payload=payload,
            score_ms=now_ms,
            ttl_ms=self.arq.expires_extra_ms,
        )


def _created_event(
    org: str,
    remote: str,
    request: CreateSession,
    profile: AgentProfile,
    limits: dict[str, int],
) -> dict[str, str]:
    return {
        "org": org,
        "remote": remote,
        "profile": request.profile,
        "image": profile.image,
        "limits": json.dumps({**profile.limits.model_dump(mode="json"), **limits}),
        "network": profile.network.model_dump_json(),
        "env_names": ",".join(sorted(request.env)),
        "workspace": request.workspace.model_dump_json(),
    }


def _record_fields(request: CreateSession, limits: dict[str, int]) -> dict[str, str]:
    fields = {"profile": request.profile, "limits": json.dumps(limits)}
    if request.workspace.upload:
        fields["workspace_upload"] = "pending"
    if request.workspace.fetch:
        fields["workspace_fetch"] = "1"
    return fields


def _check_env(profile: AgentProfile, env: dict[str, str]) -> None:
    refused = sorted(set(env) - set(profile.env_allowed))
    if refused:
        allowed = ", ".join(profile.env_allowed) or "none"
        raise InvalidRequest(
            "env_not_allowed",
            f"The profile does not allow the variables {', '.join(refused)}; "
            f"allowed: {allowed}.",
            field="env",
        )


def _narrow(profile: AgentProfile, request: CreateSession) -> dict[str, int]:
    """Return the session's limits; each may only narrow the profile's."""
    asked = request.limits.parsed()
    ceiling = profile.limits.model_dump()
    for name, value in asked.items():
        cap = ceiling[name]
        if _wider(name, value, cap):
            field = f"limits.{_LIMIT_NAMES[name]}"
            raise InvalidRequest(
                "limit_exceeds_profile",
                f"{field}: {_shown(name, value)} is wider than the profile's "
                f"{_shown(name, cap)}; a session may only narrow its limits.",
                field=field,
            )

    return asked


def _shown(name: str, value: int) -> str:
    """A limit in the words a request gives it, not Docker's units."""
    if name == "pids_limit":
        return "unlimited" if value < 0 else f"{value} processes"
    if name == "nano_cpus":
        return f"{Decimal(value) / 1_000_000_000:f} CPUs"
    if name == "memory_bytes":
        return f"{value // MIB} MiB" if value % MIB == 0 else f"{value} bytes"
    return f"{value} s"


def _wider(name: str, value: int, cap: int) -> bool:
    if name == "pids_limit":
        # -1 is unlimited: wider than any cap, and within an unlimited one.
        return cap > 0 and (value < 0 or value > cap)
    return value > cap
