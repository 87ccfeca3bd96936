"""One session's life on a worker: claim, create, start, relay, finish.

Each step is a method of ``SessionRun``; ``SessionRunner`` turns an arq job
into a run. The first reason to stop a sandbox wins and becomes the
session's end cause; whatever happens, the container is removed and the
outcome is recorded, shielded from the cancellation of a draining worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
from redis.exceptions import RedisError

from shared.errors import FrameError, LeaseLost, RelayError, SandboxError
from shared.keys import RETENTION_MS
from shared.models import EndCause, Outcome
from shared.settings import AgentProfile, FleetSettings
from shared.store import Channel, Claim, Renewal, SessionStore
from shared.telemetry import labels, shared_metrics, worker_metrics
from shared.tracing import SessionTrace, annotate, traced
from worker.acp import AcpGuard
from worker.cgroups import forks_refused, known_pids_events, pids_events_path
from worker.docker import (
    AttachedStdio,
    DockerRuntime,
    ExitState,
    SandboxNetwork,
    SandboxSpec,
    container_config,
)
from worker.egress import Egress
from worker.frames import STDOUT, FrameDecoder, LineBuffer, LineTooLong
from worker.pool import Member, WarmPool, launch_spec, split_secrets, with_launcher
from worker.workspace import ArchiveTooLarge, Spares, Workspace

log = structlog.get_logger("worker.session")

# After the attach stream ends, the exit state is normally known within
# milliseconds; past this the relay reports the Engine as stuck.
_EXIT_WAIT_S = 30.0
METRICS = worker_metrics()
_OUT_LABELS = {
    b"o": labels(direction="out", stream="stdout"),
    b"e": labels(direction="out", stream="stderr"),
}
_IN_LABELS = labels(direction="in", stream="stdin")
# How far behind a worker reports the stdin its agent was given. Writes
# through the relay run at tens of MB/s, so the reports lag the scheduler's
# bound on pending stdin by well under a tenth of it.
CONSUMED_REPORT_S = 0.01
# How often a running sandbox's refused forks are counted; a fork bomb
# holds the limit far longer than this.
_PIDS_CHECK_S = 0.5
# The idle timer looks at most this often; idle timeouts are minutes.
_IDLE_CHECK_S = 5.0


@dataclass
class Images:
    """Image references resolved once per worker, by profile name."""

    refs: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


class SessionRunner:
    """Run the sessions that arq hands this worker."""

    def __init__(
        self,
        *,
        settings: FleetSettings,
        store: SessionStore,
        runtime: DockerRuntime,
        seccomp: str,
        images: Images,
        apparmor: bool = False,
        egress: Egress | None = None,
    ) -> None:
        self.settings = settings
        self.egress = egress
        self.store = store
        self.runtime = runtime
        self.seccomp = seccomp
        self.images = images
        # Whether this node has AppArmor, so profiles' AppArmor names apply.
        self.apparmor = apparmor
        self.pools: dict[str, WarmPool] = {}
        self.spares = Spares(
            settings.worker.workspace_root,
            prefix=f"{settings.fleet}-spare",
            count=settings.worker.workspace_spares,
        )
        self.pool_tasks: list[asyncio.Task[None]] = []
        self.active: dict[str, SessionRun] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, session_id: str) -> str:
        """Run one session to its end; a session already taken is left alone."""
        node = self.settings.worker.node
        with structlog.contextvars.bound_contextvars(session_id=session_id, node=node):
            claim_started_ns = time.time_ns()
            asked_at = time.monotonic()
            claim = await self.store.claim(
                session_id, node=node, lease_ms=self.settings.worker.lease_ms
            )
            if claim is None:
                log.debug("session.claim_refused")
                return "refused"
            claim_s = time.monotonic() - asked_at
            trace = self._trace(claim, claim_started_ns)
            run = SessionRun(self, claim, trace, claim_s=claim_s)
            self.active[session_id] = run
            self._idle.clear()
            try:
                with (
                    structlog.contextvars.bound_contextvars(org=claim.org),
                    trace.activate(),
                ):
                    outcome = await run.run()
            finally:
                del self.active[session_id]
                if not self.active:
                    self._idle.set()

        return outcome.cause.value

    def _trace(self, claim: Claim, claim_started_ns: int) -> SessionTrace:
        return SessionTrace.resume(
            claim.record,
            claim_started_ns=claim_started_ns,
            **{
                "session.id": claim.session_id,
                "fleet.org": claim.org,
                "fleet.node": self.settings.worker.node,
                "fleet.profile": claim.record.get("profile", ""),
            },
        )

    def owns(self, session_id: str, container_id: str) -> bool:
        """True for a container that a run or a pool of this process holds."""
        if session_id in self.active:
            return True
        if any(run.container_id == container_id for run in self.active.values()):
            return True
        return any(pool.owns(container_id) for pool in self.pools.values())

    def workspace_names(self) -> set[str]:
        """Names of every workspace a run or a pool of this process holds."""
        names = {
            run.workspace.dir.name
            for run in self.active.values()
            if run.workspace is not None
        }
        for pool in self.pools.values():
            names |= pool.workspace_names
        names |= self.spares.names
        return names

    async def close_pools(self) -> None:
        """Stop refilling and destroy every waiting member."""
        for task in self.pool_tasks:
            task.cancel()
        await asyncio.gather(*self.pool_tasks, return_exceptions=True)
        for pool in self.pools.values():
            await pool.close()
        await self.spares.close()

    async def wait_idle(self, *, timeout_s: float) -> None:
        """Wait until no session runs here, or ``timeout_s`` has passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self.active:
            log.warning("worker.sessions_left", sessions=len(self.active))


class SessionRun:
    """The life of one claimed session on this worker."""

    def __init__(
        self,
        runner: SessionRunner,
        claim: Claim,
        trace: SessionTrace,
        *,
        claim_s: float = 0.0,
    ) -> None:
        self.runner = runner
        self.claim = claim
        self.trace = trace
        self.settings = runner.settings
        self.store = runner.store
        self.runtime = runner.runtime
        self.session_id = claim.session_id
        self.profile_name = claim.record["profile"]
        self.container_id: str | None = None
        self.stdio: AttachedStdio | None = None
        self.workspace: Workspace | None = None
        self._via_launcher = False
        self._stop_cause: EndCause | None = None
        self._stop_detail: str | None = None
        self._kill_signal: str | None = None
        self._lease_lost = False
        self._first_byte = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_stdio = time.monotonic()
        self._started = False
        self._start_kind = "cold"
        self._claimed_at = time.monotonic()
        self._ready_at = self._claimed_at
        self._claim_s = claim_s
        self._created_at: float | None = None
        self._phase_ms: dict[str, int] = {}
        self._formatting: asyncio.Task[None] | None = None
        # The cgroup's pids.events, found once the sandbox runs.
        self._pids_events: Path | None = None
        self._forks_refused = 0
        self.backlog_bytes = 0
        # The agent's output goes to Redis on a connection of its own.
        self._output = self.store.command_channel()
        # The proxy variables of an egress session; its credentials live in
        # the proxy from the spec until cleanup.
        self._proxy_env: dict[str, str] = {}

    async def run(self) -> Outcome:
        """Run the sandbox and return how the session ended."""
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        outcome = Outcome(cause=EndCause.START_FAILED)
        try:
            outcome = await self._run_sandbox()
        except asyncio.CancelledError:
            outcome = Outcome(cause=EndCause.DRAINED, detail="worker stopped")
            raise
        except (RedisError, OSError) as exc:
            # The one place that decides: a fault before the agent ran is a
            # failed start, one after it is a failed relay.
            log.exception("session.failed")
            cause = EndCause.RELAY_FAILED if self._started else EndCause.START_FAILED
            outcome = Outcome(cause=cause, detail=f"{type(exc).__name__}: {exc}")
        finally:
            heartbeat.cancel()
            await self._cancel_tasks()
            await _shielded(self._cleanup(outcome))

        return outcome

    async def _run_sandbox(self) -> Outcome:
        try:
            warm = await self._start_sandbox()
        except SandboxError as exc:
            log.exception("session.start_failed", docker_status=exc.status)
            return Outcome(cause=EndCause.START_FAILED, detail=str(exc))
        except LeaseLost:
            return Outcome(cause=EndCause.WORKER_LOST, detail="lease lost")
        log.info("session.started", warm=warm)

        exit_state = await self._relay()

        return self._outcome(exit_state)

    @traced("sandbox_ready")
    async def _start_sandbox(self) -> bool:
        """Get the agent running, warm or cold; True for a warm start."""
        spec = self._spec()
        member = await self._warm_member()
        if member is not None:
            await self._fill_workspace()
            await self._start_warm(member)
        else:
            await self._start_cold(spec)

        return member is not None

    async def _supervised(self, coro: Awaitable[None], name: str) -> None:
        """Run a helper of the relay; its failure ends the session, loudly."""
        try:
            await coro
        except RelayError as exc:
            log.warning("session.relay_refused", task=name, error=str(exc))
            await self._stop(EndCause.RELAY_FAILED, str(exc), graceful=False)
        except Exception as exc:
            log.exception("session.task_failed", task=name)
            detail = f"{name} failed: {type(exc).__name__}"
            await self._stop(EndCause.RELAY_FAILED, detail, graceful=False)

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spec(self) -> SandboxSpec:
        profile = self.settings.profiles.get(self.profile_name)
        if profile is None:
            raise SandboxError(f"profile {self.profile_name!r} is not configured here")
        narrowed = json.loads(self.claim.record.get("limits", "{}"))
        # The scheduler already parsed and bounded these; no second parse.
        limits = profile.limits.model_copy(update=narrowed)
        self.limits = limits
        self.profile = profile
        network = self._network(profile)

        return SandboxSpec(
            session_id=self.session_id,
            profile_name=self.profile_name,
            profile=profile,
            limits=limits,
            image=self.runner.images.refs.get(self.profile_name, profile.image),
            env=self._agent_env(),
            network=network,
        )

    def _uid_gid(self) -> tuple[int, int]:
        uid, gid = self.profile.user.split(":")
        return int(uid), int(gid)

    async def _start_cold(self, spec: SandboxSpec) -> None:
        """Create a sandbox on a spare workspace, or on one formatted
        meanwhile, then start it.

        Docker resolves a bind mount when the container starts, not when it
        is created, so without a spare, formatting and mounting (tens of
        milliseconds) overlap the Engine's create and attach.
        """
        uid, gid = self._uid_gid()
        size_bytes = self.limits.workspace_bytes
        self.workspace = self.runner.spares.take(size_bytes, uid=uid, gid=gid)
        if self.workspace is None:
            name = f"{self.settings.fleet}-{self.session_id}"
            self.workspace = Workspace(self.settings.worker.workspace_root, name)
            # The directories exist before the create that names them.
            self.workspace.make_dirs()
            self._formatting = asyncio.create_task(
                self.workspace.format(size_bytes, uid=uid, gid=gid)
            )
        await self._create(spec)
        # Attach before start, so not one byte of early output is missed.
        self.stdio = await self.runtime.attach(self.container_id or "")
        if self._formatting is not None:
            await self._formatting
        await self._fill_workspace()
        await self._start()

    async def _fill_workspace(self) -> None:
        """Unpack the archive the session waited for, before the agent runs."""
        if self.claim.record.get("workspace_upload") != "received":
            return
        assert self.workspace is not None
        archive = await self.store.take_upload(self.session_id)
        if archive is None:
            raise SandboxError("the uploaded workspace archive is gone")
        uid, gid = self._uid_gid()
        files = await self.workspace.put(archive, uid=uid, gid=gid)
        log.info("session.workspace_filled", files=files, bytes=len(archive))

    def _launch(self) -> bytes:
        """The launcher's line: per-session variables and secret files."""
        plain, files = split_secrets(self.profile, self._agent_env())
        return launch_spec(plain, files)

    def _network(self, profile: AgentProfile) -> SandboxNetwork:
        """Admit an egress session to the proxy; return the network to join."""
        if profile.network.mode == "none":
            return SandboxNetwork()
        egress = self.runner.egress
        if egress is None:
            raise SandboxError(
                f"profile {self.profile_name!r} asks for egress, but this "
                "worker runs no egress proxy"
            )
        self._proxy_env = egress.proxy.register(self.session_id, profile.network)
        return egress.network

    def _agent_env(self) -> dict[str, str]:
        # The proxy's variables come last: a session's own cannot replace them.
        return {**self.claim.env, **self._proxy_env}

    @traced("pool.claim")
    async def _warm_member(self) -> Member | None:
        """A ready sandbox of the profile, unless the session narrowed limits
        (members run with the profile's) or the pool has none."""
        pool = self.runner.pools.get(self.profile_name)
        if pool is None or self.limits != self.profile.limits:
            annotate(**{"fleet.pool.outcome": "none"})
            return None
        member = pool.take()
        # The socket shows a member's death only once its end is read; its
        # cgroup, or else one look at Docker, keeps a dead one from use.
        while member is not None and not await self._alive(member):
            pool.discard(member)
            member = pool.take()
        if member is not None:
            self.workspace = member.workspace
            pool.handed_out(member)
        outcome = "miss" if member is None else "hit"
        METRICS.pool_claims.add(1, {"pool": self.profile_name, "outcome": outcome})
        annotate(**{"fleet.pool.outcome": outcome})
        return member

    async def _alive(self, member: Member) -> bool:
        if member.cgroup_events is not None:
            return not member.known_dead()
        return await self.runtime.running(member.container_id)

    async def _start_warm(self, member: Member) -> None:
        self.container_id, self.stdio = member.container_id, member.stdio
        self._created_at = member.born
        digest = self.runner.images.digests.get(self.profile_name, "")
        structlog.contextvars.bind_contextvars(
            container_id=self.container_id[:12], image_digest=digest
        )
        # The launcher reads this one line, then becomes the agent; the
        # record is written once, after, to keep the warm path to one call.
        await self.stdio.write(self._launch())
        await self._mark_running(
            "warm", container_id=self.container_id, image_digest=digest
        )

    async def _mark_running(self, start: str, **fields: str) -> None:
        self._started = True
        self._start_kind = start
        self._ready_at = time.monotonic()
        self.trace.sandbox_ready(start)
        await self._update(
            {**fields, "start": start, "state": "running", "sandbox_ready_ms": "now"}
        )
        METRICS.starts.add(1, {"start": start, "profile": self.profile_name})
        METRICS.running.add(1, self._running_attributes())
        await self._audit_start(start)
        self._record_phases()

    def _record_phases(self) -> None:
        """Time each start-up phase before the agent's first byte."""
        record = self.claim.record
        queue_s = (int(record["claimed_ms"]) - int(record["admitted_ms"])) / 1000
        self._phase("queue_wait", queue_s)
        self._phase("claim", self._claim_s)
        self._phase("sandbox_ready", self._ready_at - self._claimed_at)
        METRICS.queue_wait.record(
            queue_s, {"profile": self.profile_name, "start": self._start_kind}
        )

    def _running_attributes(self) -> dict[str, str]:
        return {"org": self.claim.org, "node": self.settings.worker.node}

    async def _audit_start(self, start: str) -> None:
        profile, limits = self.profile, self.limits
        workdir = f"{profile.workdir}=ext4:{limits.workspace_bytes}"
        tmpfs = f"/tmp:{limits.tmp_bytes},/run,{profile.home}:{limits.home_bytes}"  # noqa: S108
        await self.store.audit(
            self.session_id,
            "started",
            node=self.settings.worker.node,
            start=start,
            container_id=self.container_id or "",
            image_digest=self.runner.images.digests.get(self.profile_name, ""),
            mounts=f"{workdir},{tmpfs}",
            network=profile.network.mode,
            user=profile.user,
            limits=limits.model_dump_json(),
            secrets_as_files=",".join(
                sorted(set(profile.secret_files) & set(self.claim.env))
            ),
        )

    def _phase(self, phase: str, seconds: float) -> None:
        self._phase_ms[f"{phase}_ms"] = round(seconds * 1000)
        attributes = {"phase": phase, "start": self._start_kind}
        shared_metrics().startup.record(seconds, attributes)

    async def _create(self, spec: SandboxSpec) -> None:
        assert self.workspace is not None
        spec = replace(spec, workspace=str(self.workspace.mount))
        self._via_launcher = bool(spec.env)
        if self._via_launcher:
            # Per-session values go through the launcher, as in a warm
            # start, so that none is written into the container's config.
            spec = replace(spec, profile=with_launcher(spec.profile), env={})
        config = container_config(
            spec,
            fleet=self.settings.fleet,
            node=self.settings.worker.node,
            seccomp=self.runner.seccomp,
            apparmor=self.profile.apparmor_profile if self.runner.apparmor else None,
        )
        name = f"{self.settings.fleet}-{self.session_id}"
        self.container_id = await self.runtime.create(config, name=name)
        self._created_at = time.monotonic()
        digest = self.runner.images.digests.get(self.profile_name, "")
        structlog.contextvars.bind_contextvars(
            container_id=self.container_id[:12], image_digest=digest
        )
        await self._update({"container_id": self.container_id, "image_digest": digest})

    async def _start(self) -> None:
        assert self.container_id is not None
        assert self.stdio is not None
        await self.runtime.start(self.container_id)
        if self._via_launcher:
            await self.stdio.write(self._launch())
        await self._mark_running("cold")

    @traced("relay")
    async def _relay(self) -> ExitState | None:
        """Carry stdio both ways until the sandbox stops; return its exit."""
        assert self.container_id is not None
        self._tasks += [
            asyncio.create_task(self._supervised(self._pump_in(), "stdin")),
            asyncio.create_task(self._supervised(self._lifetime(), "lifetime")),
            asyncio.create_task(self._supervised(self._idle(), "idle")),
            asyncio.create_task(self._supervised(self._watch_pids(), "pids")),
        ]
        try:
            try:
                await self._pump_out()
            finally:
                await self._output.close()
            # The cgroup may outlive the attach stream by a moment: one more
            # look catches a fork refused just before the end.
            self._count_refused_forks()
            return await asyncio.wait_for(
                self.runtime.wait_exit(self.container_id), _EXIT_WAIT_S
            )
        except (SandboxError, TimeoutError) as exc:
            log.exception("session.exit_unknown")
            self._note_stop(EndCause.RELAY_FAILED, f"exit state unknown: {exc}")
            return None
        finally:
            await self._cancel_tasks()

    async def _pump_out(self) -> None:
        """Relay the agent's stdout and stderr into the session's stream."""
        assert self.stdio is not None
        decoder = FrameDecoder()
        lines: LineBuffer | None = LineBuffer(self.profile.max_line_bytes)
        while chunk := await self.stdio.read():
            try:
                pieces = decoder.feed(chunk)
            except FrameError as exc:
                self._stop_soon(EndCause.RELAY_FAILED, str(exc))
                return
            entries: list[tuple[bytes, bytes]] = []
            for stream, data in pieces:
                if stream != STDOUT:
                    entries.append((b"e", data))
                    continue
                if lines is None:
                    continue
                try:
                    ready = lines.feed(data)
                except LineTooLong as exc:
                    # Earlier lines are already delivered; the long one is
                    # dropped whole and the rest of stdout is discarded.
                    lines = None
                    self._stop_soon(EndCause.LINE_TOO_LONG, str(exc))
                    continue
                if ready:
                    entries.append((b"o", ready))
            await self._emit(entries)
        if lines is not None:
            await self._emit([(b"o", lines.flush())])

    async def _emit(self, entries: list[tuple[bytes, bytes]]) -> None:
        entries = [(name, data) for name, data in entries if data]
        if not entries or self._lease_lost:
            return
        self._last_stdio = time.monotonic()
        try:
            backlog = await self.store.append(
                self.claim, entries, RETENTION_MS, via=self._output
            )
        except LeaseLost:
            self._lose_lease()
            return
        self.backlog_bytes = backlog
        await self._wait_for_client(backlog)
        for name, data in entries:
            METRICS.relayed_bytes.add(len(data), _OUT_LABELS[name])
            METRICS.relayed_messages.add(_messages(name, data), _OUT_LABELS[name])
        if not self._first_byte and any(name == b"o" for name, _ in entries):
            self._first_byte = True
            self._phase("first_byte", time.monotonic() - self._ready_at)
            self.trace.first_byte()
            await self._update({"first_byte_ms": "now"})

    async def _wait_for_client(self, backlog_bytes: int) -> None:
        """Stop reading the agent's output while the client lags too far.

        The agent then blocks on a full pipe: backpressure instead of
        memory. A stop under way ends the wait, since Docker's kill needs
        the output drained.
        """
        bound = self.settings.worker.backlog_bytes
        if backlog_bytes <= bound or self._stop_cause is not None:
            return
        log.info("session.slow_client", backlog_bytes=backlog_bytes)
        METRICS.slow_clients.add(1)
        notice = [(b"slow", str(backlog_bytes).encode())]
        await self.store.append(self.claim, notice, RETENTION_MS, via=self._output)
        # Resume at half the bound, so a client reading steadily does not
        # make the relay stop and start on every acknowledgement.
        while backlog_bytes > bound // 2 and self._stop_cause is None:
            await asyncio.sleep(0.05)
            backlog_bytes = await self.store.backlog(self.session_id)
            self.backlog_bytes = backlog_bytes
        log.info("session.client_caught_up", backlog_bytes=backlog_bytes)

    async def _pump_in(self) -> None:
        """Relay the client's stdin, EOF and cancellation to the sandbox."""
        assert self.stdio is not None
        guard = None
        if self.profile.protocol == "acp":
            guard = AcpGuard(
                workdir=self.profile.workdir,
                allow_fs=self.profile.allow_fs,
                max_line_bytes=self.profile.max_line_bytes,
            )
        consumed = ConsumedStdin(self.store, self.session_id)
        reporting = asyncio.create_task(
            self._supervised(consumed.report_forever(), "stdin_consumed")
        )
        self._tasks.append(reporting)
        reads = self.store.blocking_channel()
        try:
            await self._relay_stdin(reads, consumed, guard)
        finally:
            await reads.close()

    async def _relay_stdin(
        self, reads: Channel, consumed: ConsumedStdin, guard: AcpGuard | None
    ) -> None:
        key = self.store.keys.stdin(self.session_id)
        cursor = b"0-0"
        while True:
            entries = await self.store.read_stream(key, cursor, block_ms=0, via=reads)
            for entry_id, fields in entries:
                cursor = entry_id
                if b"cancel" in fields:
                    await self._stop(
                        EndCause.CANCELLED, "cancelled by client", graceful=False
                    )
                    return
                if b"eof" in fields:
                    await self._deliver_eof(guard)
                    return
                data = fields.get(b"d", b"")
                self._last_stdio = time.monotonic()
                await self._write(guard.feed(data) if guard else data)
                consumed.add(cursor, len(data))
                METRICS.relayed_bytes.add(len(data), _IN_LABELS)
                METRICS.relayed_messages.add(data.count(b"\n"), _IN_LABELS)

    async def _write(self, data: bytes) -> None:
        assert self.stdio is not None
        if data:
            with contextlib.suppress(ConnectionError):
                await self.stdio.write(data)

    async def _deliver_eof(self, guard: AcpGuard | None) -> None:
        assert self.stdio is not None
        if guard is not None:
            await self._write(guard.flush())
        self.stdio.close_stdin()
        log.info("session.stdin_closed")
        # Agents that hold a session do not exit on EOF; the fleet ends them.
        await asyncio.sleep(self.settings.worker.eof_grace_s)
        await self._stop(
            EndCause.EOF_IGNORED,
            f"agent still running {self.settings.worker.eof_grace_s} s after EOF",
            graceful=True,
        )

    async def _lifetime(self) -> None:
        await asyncio.sleep(self.limits.lifetime_s)
        await self._stop(
            EndCause.LIFETIME_EXCEEDED,
            f"lifetime of {self.limits.lifetime_s} s exceeded",
            graceful=True,
        )

    async def _watch_pids(self) -> None:
        """Note forks refused at the pids limit while the sandbox runs."""
        if self.limits.pids_limit <= 0 or self.container_id is None:
            return
        # Not at once: a burst of starts needs the CPU more than this does.
        await asyncio.sleep(_PIDS_CHECK_S)
        self._pids_events = known_pids_events(self.container_id)
        if self._pids_events is None:
            pid = await self.runtime.init_pid(self.container_id)
            self._pids_events = pids_events_path(pid) if pid else None
        # Polled: the kernel sends no inotify event for pids.events on v1.
        while True:
            if not self._count_refused_forks():
                return
            await asyncio.sleep(_PIDS_CHECK_S)

    def _count_refused_forks(self) -> bool:
        """Read the counter; False once the cgroup is gone."""
        if self._pids_events is None:
            return False
        refused = forks_refused(self._pids_events)
        if refused is None:
            return False
        self._forks_refused = max(self._forks_refused, refused)
        return True

    async def _idle(self) -> None:
        """End the session once neither stdio nor a client has been seen."""
        idle_s = self.limits.idle_timeout_s
        while True:
            await asyncio.sleep(min(idle_s / 4, _IDLE_CHECK_S))
            quiet_s = time.monotonic() - self._last_stdio
            if quiet_s < idle_s:
                continue
            record = await self.store.record(self.session_id) or {}
            seen_ms = int(record.get("client_seen_ms") or 0)
            if await self.store.now_ms() - seen_ms >= idle_s * 1000:
                break
        await self._stop(
            EndCause.IDLE_TIMEOUT,
            f"no stdio and no client for {idle_s} s",
            graceful=True,
        )

    async def _heartbeat(self) -> None:
        """Renew the lease; stop the sandbox as soon as it is lost."""
        worker = self.settings.worker
        interval_s, lease_s = worker.heartbeat_ms / 1000, worker.lease_ms / 1000
        # The lease is known to hold until this local deadline; past it this
        # worker cannot prove it owns the session, so it must stop, even if
        # Redis never answers to say so.
        held_until = self._claimed_at + lease_s
        while True:
            await asyncio.sleep(interval_s)
            sent_at = time.monotonic()
            try:
                renewal = await asyncio.wait_for(
                    self.store.renew(self.claim, worker.lease_ms), interval_s
                )
            except (RedisError, TimeoutError):
                log.warning("session.heartbeat_failed", exc_info=True)
                if time.monotonic() >= held_until:
                    self._lose_lease()
                    return
                continue
            held_until = sent_at + lease_s
            if renewal is Renewal.LOST:
                self._lose_lease()
                return
            if renewal is Renewal.CANCEL_REQUESTED:
                # The stdin stream carries cancel fast, but behind stdin the
                # agent is not reading; the record reaches the worker anyway.
                self._stop_soon(EndCause.CANCELLED, "cancelled by client")

    def _lose_lease(self) -> None:
        if self._lease_lost:
            return
        self._lease_lost = True
        log.warning("session.lease_lost")
        self._stop_soon(EndCause.WORKER_LOST, "lease lost")

    def _note_stop(self, cause: EndCause, detail: str) -> bool:
        if self._stop_cause is not None:
            return False
        self._stop_cause, self._stop_detail = cause, detail
        return True

    def _stop_soon(self, cause: EndCause, detail: str) -> None:
        """Kill the sandbox without waiting, for the output pump.

        Docker's kill waits until the container has stopped, and a container
        only stops once its output is drained: the pump that reads the
        output must keep reading while the kill is under way.
        """
        self._tasks.append(
            asyncio.create_task(self._stop(cause, detail, graceful=False), name="stop")
        )

    async def _stop(self, cause: EndCause, detail: str, *, graceful: bool) -> None:
        """Stop the sandbox for ``cause`` unless another cause came first."""
        if not self._note_stop(cause, detail) or self.container_id is None:
            return
        log.info("session.stopping", cause=cause.value, graceful=graceful)
        if graceful:
            self._kill_signal = "SIGTERM"
            running = await self.runtime.kill(self.container_id, "SIGTERM")
            if not running:
                return
            await asyncio.sleep(self.settings.worker.kill_grace_s)
        self._kill_signal = "SIGKILL"
        await self.runtime.kill(self.container_id, "SIGKILL")

    def _outcome(self, exit_state: ExitState | None) -> Outcome:
        code = exit_state.exit_code if exit_state else None
        oom = bool(exit_state and exit_state.oom_killed)
        cause = self._stop_cause
        if cause is EndCause.EOF_IGNORED and code is not None and code < 128:
            # Exiting after EOF is what the agent was meant to do; a status of
            # its own, not a death by the fleet's signal, means it did so,
            # though later than the grace (a loaded node reports exits late).
            cause = None
        if cause is None:
            cause = EndCause.OOM_KILLED if oom else EndCause.AGENT_EXIT
        if cause is EndCause.AGENT_EXIT and code and self._forks_refused:
            # The agent failed after the kernel refused it processes.
            cause = EndCause.PIDS_EXHAUSTED
        if cause is EndCause.AGENT_EXIT and code and self._workspace_full():
            # The agent failed with its workspace full: the disk is why.
            cause = EndCause.DISK_FULL
        return Outcome(
            cause=cause,
            exit_code=code,
            oom_killed=oom,
            kill_signal=self._kill_signal,
            detail=self._stop_detail
            or (exit_state.error if exit_state else "")
            or self._refused_forks_detail()
            or None,
        )

    def _refused_forks_detail(self) -> str:
        if not self._forks_refused:
            return ""
        return (
            f"{self._forks_refused} forks refused at the pids limit of "
            f"{self.limits.pids_limit}"
        )

    def _workspace_full(self) -> bool:
        return self.workspace is not None and self.workspace.full()

    async def _update(self, fields: dict[str, str]) -> None:
        if not await self.store.update(self.claim, fields):
            raise LeaseLost(self.session_id)

    @traced("removal")
    async def _cleanup(self, outcome: Outcome) -> None:
        """Remove the sandbox, then its workspace, then record the end."""
        annotate(**{"fleet.cause": outcome.cause.value})
        # The end itself is counted where it is recorded (SessionStore.finish).
        if self._started:
            METRICS.running.add(-1, self._running_attributes())
        removed = await self._remove_container()
        extra = {} if self._lease_lost else await self._keep_workspace()
        await self._remove_workspace(container_gone=removed)
        if self._proxy_env and self.runner.egress is not None:
            # Before the end is recorded, so a reader who sees the session
            # ended also sees every one of its connections.
            await self.runner.egress.proxy.unregister(self.session_id)
        if self._lease_lost:
            log.info("session.ended", cause="worker_lost", recorded_by="another")
            return
        await self._record_end(outcome, extra)

    async def _remove_container(self) -> bool:
        """Remove the sandbox; True once no container of the session is left."""
        if self.stdio is not None:
            self.stdio.abort()
        if self.container_id is None:
            return True
        try:
            await self.runtime.remove(self.container_id)
        except SandboxError:
            log.exception("session.remove_failed")
            return False
        self._container_removed()
        return True

    async def _remove_workspace(self, *, container_gone: bool) -> None:
        if self._formatting is not None:
            # A create that failed must not race the mount still being made.
            await asyncio.gather(self._formatting, return_exceptions=True)
        if self.workspace is None or not container_gone:
            return
        # Only now is no sandbox left holding the workspace.
        try:
            await self.workspace.remove()
        except SandboxError:
            log.exception("session.workspace_remove_failed")

    async def _record_end(self, outcome: Outcome, extra: dict[str, str]) -> None:
        try:
            await self.store.audit(
                self.session_id,
                "ended",
                node=self.settings.worker.node,
                cause=outcome.cause.value,
                exit_code="" if outcome.exit_code is None else str(outcome.exit_code),
                oom_killed=str(int(outcome.oom_killed)),
                kill_signal=outcome.kill_signal or "",
            )
            ended = await self.store.finish(
                self.session_id,
                org=self.claim.org,
                expect=self.claim.token,
                outcome=outcome,
                extra=extra,
            )
        except RedisError:
            # The lease lapses without heartbeats; a sweep then ends the
            # session as worker_lost.
            log.exception("session.finish_failed", cause=outcome.cause.value)
            return
        # The one summary line per session: how it ended and how long each
        # phase took.
        log.info(
            "session.ended",
            ended=ended,
            cause=outcome.cause.value,
            exit_code=outcome.exit_code,
            oom_killed=outcome.oom_killed,
            kill_signal=outcome.kill_signal,
            start=self._start_kind if self._started else None,
            **self._phase_ms,
            life_ms=round((time.monotonic() - self._claimed_at) * 1000),
            forks_refused=self._forks_refused,
        )

    def _container_removed(self) -> None:
        if self._created_at is None:
            return
        attributes = {"profile": self.profile_name, "start": self._start_kind}
        lifetime_s = time.monotonic() - self._created_at
        METRICS.container_lifetime.record(lifetime_s, attributes)

    async def _keep_workspace(self) -> dict[str, str]:
        """Archive the workspace for the client when the session asked."""
        if self.workspace is None or self.claim.record.get("workspace_fetch") != "1":
            return {}
        limit = self.settings.worker.workspace_archive_max_bytes
        try:
            archive = await self.workspace.archive(limit)
            if not await self.store.put_archive(self.claim, archive):
                return {}
        except ArchiveTooLarge as exc:
            log.warning("session.workspace_too_large", error=str(exc))
            return {"workspace_archive": "too_large"}
        except (SandboxError, OSError, RedisError):
            log.exception("session.workspace_archive_failed")
            return {"workspace_archive": "failed"}
        return {"workspace_archive": "stored"}


class ConsumedStdin:
    """What the agent has been given of its stdin, reported in arrears.

    A report trims the stdin stream and frees room under the scheduler's
    bound on pending stdin (``STDIN_PENDING_BYTES``). It is no part of
    getting a message to the agent, so it stays off that path: one report
    at most every ``CONSUMED_REPORT_S`` carries all written since the last.
    """

    def __init__(self, store: SessionStore, session_id: str) -> None:
        self.store = store
        self.session_id = session_id
        self._cursor = b"0-0"
        self._bytes = 0
        self._due = asyncio.Event()

    def add(self, cursor: bytes, written_bytes: int) -> None:
        """Note the entries up to ``cursor`` as written to the agent."""
        self._cursor = cursor
        self._bytes += written_bytes
        self._due.set()

    async def report_forever(self) -> None:
        """Send what was noted, in arrears, until cancelled."""
        while True:
            await self._due.wait()
            await asyncio.sleep(CONSUMED_REPORT_S)
            self._due.clear()
            cursor, written, self._bytes = self._cursor, self._bytes, 0
            await self.store.consumed_stdin(self.session_id, cursor, written)


def _messages(name: bytes, data: bytes) -> int:
    """Lines in an output entry. A stdout entry ends at a line's end or at
    the agent's last byte, which is a message too; stderr is free-form."""
    lines = data.count(b"\n")
    if name == b"o" and not data.endswith(b"\n"):
        lines += 1
    return lines


async def _shielded(coro: Awaitable[None]) -> None:
    """Await ``coro`` to its end even if the caller is being cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
