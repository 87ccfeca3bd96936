"""Warm pools: sandboxes started ahead of demand, one profile each.

A member is a hardened container whose agent has not started yet: a
launcher as its command waits for one line on stdin, the session's
environment, then replaces itself with the agent. A claim therefore costs
a write on an open socket instead of a container start, and a session's
secrets never enter a container's configuration (nor Docker's disk).
Each member serves one session and is destroyed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from shared.errors import SandboxError
from shared.settings import AgentProfile, PoolConfig
from shared.telemetry import worker_metrics
from worker.cgroups import known_pids_events
from worker.docker import (
    AttachedStdio,
    DockerRuntime,
    SandboxNetwork,
    SandboxSpec,
    container_config,
)
from worker.workspace import Workspace

log = structlog.get_logger("worker.pool")

# The launcher needs a POSIX shell in the image; it reads exactly one line,
# so the bytes after it stay on stdin for the agent.
LAUNCHER = 'IFS= read -r spec || exit 111; eval "$spec" && exec "$@"'
# C07: the member writes a script into HOME and its workspace and runs it;
# a member that cannot is never handed out.
PROBE = (
    'for d in "$HOME" "$PWD"; do f="$d/.fleet-probe"; '
    'printf \'#!/bin/sh\\nexit 0\\n\' > "$f" && chmod 700 "$f" && "$f" '
    '&& rm -f "$f" || exit 1; done'
)
_PROBE_TIMEOUT_S = 10.0
# Secrets given as files live here, on the sandbox's /run tmpfs.
SECRETS_DIR = "/run/secrets"
_BACKOFF_BASE_S = 1.0


def launch_spec(
    env: Mapping[str, str], files: Mapping[str, str] | None = None
) -> bytes:
    """Return the one line that hands ``env`` to a member's launcher.

    Each of ``files`` is written to ``/run/secrets/NAME``, readable by the
    agent's uid only, and ``NAME_FILE`` names it: a secret given that way
    is in no process's environment. ``printf`` is the shell's builtin, so
    no value appears on a command line either. Values are shell-quoted; a
    newline inside a value is spliced in from a variable, since the line
    itself must not contain one.
    """
    files = files or {}
    if not env and not files:
        return b":\n"
    parts = ["nl=$(printf '\\nx'); nl=${nl%x}"]
    if files:
        parts.append(f"umask 077; mkdir -p {SECRETS_DIR}")
        for name, value in files.items():
            path = f"{SECRETS_DIR}/{name}"
            parts.append(f"printf %s {_quoted(value)} > {path}")
            parts.append(f"export {name}_FILE={path}")
        parts.append("umask 022")
    if env:
        assignments = " ".join(f"{n}={_quoted(v)}" for n, v in env.items())
        parts.append(f"export {assignments}")
    return ("; ".join(parts) + "\n").encode()


def split_secrets(
    profile: AgentProfile, env: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Split per-session values into (environment, files) by the profile."""
    as_files = set(profile.secret_files)
    plain = {name: value for name, value in env.items() if name not in as_files}
    files = {name: value for name, value in env.items() if name in as_files}
    return plain, files


def with_launcher(profile: AgentProfile) -> AgentProfile:
    """The profile whose command first reads the session's spec line."""
    command = ["/bin/sh", "-c", LAUNCHER, "fleet-launch", *profile.command]
    return profile.model_copy(update={"command": command})


def _quoted(value: str) -> str:
    return '"$nl"'.join(shlex.quote(part) for part in value.split("\n"))


@dataclass
class Member:
    """A ready sandbox waiting for its session."""

    container_id: str
    stdio: AttachedStdio
    workspace: Workspace
    born: float = field(default_factory=time.monotonic)
    # The member's pids.events, which the kernel removes with its cgroup
    # when the sandbox dies; None where Docker's layout is not known.
    cgroup_events: Path | None = None

    def known_dead(self) -> bool:
        """True when the member's cgroup is gone: a look with no Docker call."""
        return self.cgroup_events is not None and not self.cgroup_events.exists()


@dataclass
class PoolStats:
    """Counters operators read from the node's heartbeat."""

    hits: int = 0
    misses: int = 0
    refill_failures: int = 0


class WarmPool:
    """Keep ``config.size`` ready members of one profile on this node."""

    def __init__(
        self,
        *,
        name: str,
        profile: AgentProfile,
        image: str,
        runtime: DockerRuntime,
        fleet: str,
        node: str,
        seccomp: str,
        workspaces: str,
        apparmor: str | None = None,
        network: SandboxNetwork | None = None,
    ) -> None:
        self.name = name
        # Egress members join the internal network from birth: until the
        # launcher reads the proxy's variables they hold no credentials,
        # and the proxy answers nothing without them.
        self.network = network or SandboxNetwork()
        self.profile = profile
        self.config: PoolConfig = profile.pool
        self.image = image
        self.runtime = runtime
        self.fleet = fleet
        self.node = node
        self.seccomp = seccomp
        self.workspaces = workspaces
        self.apparmor = apparmor
        self.ready: deque[Member] = deque()
        self.stats = PoolStats()
        self.creating: set[str] = set()
        # Workspaces of members being created or waiting, by name.
        self.workspace_names: set[str] = set()
        self._wanted = asyncio.Event()
        self._failures = 0
        self._backoff_until = 0.0
        self._last_claim = 0.0

    @property
    def backing_off(self) -> bool:
        """True while refills are paused after repeated failures."""
        return time.monotonic() < self._backoff_until

    def take(self) -> Member | None:
        """Hand out a healthy member, or None when the pool has none."""
        self._last_claim = time.monotonic()
        while self.ready:
            member = self.ready.popleft()
            if self._usable(member):
                self.stats.hits += 1
                self._wanted.set()
                return member
            self.discard(member)
        self.stats.misses += 1
        self._wanted.set()
        return None

    def owns(self, container_id: str) -> bool:
        """True for members waiting here or being created."""
        return container_id in self.creating or any(
            m.container_id == container_id for m in self.ready
        )

    def snapshot(self) -> dict[str, object]:
        """Sizes, ages and counters for the node's heartbeat."""
        now = time.monotonic()
        return {
            "ready": len(self.ready),
            "target": self.config.size,
            "oldest_age_s": round(max((now - m.born for m in self.ready), default=0)),
            "member_ages_s": sorted(round(now - m.born) for m in self.ready),
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "refill_failures": self.stats.refill_failures,
            "backing_off": self.backing_off,
        }

    async def fill_forever(self) -> None:
        """Refill one member at a time, so refills never crowd out claims."""
        while True:
            self._retire_aged()
            if self.backing_off:
                await asyncio.sleep(self._backoff_until - time.monotonic())
                continue
            if len(self.ready) >= self.config.size:
                self._wanted.clear()
                await self._wait_for_want()
                continue
            if (pause_s := self._claims_recent_s()) > 0:
                await asyncio.sleep(pause_s)
                continue
            await self._refill_one()

    def _claims_recent_s(self) -> float:
        """How long to hold a refill back because claims are under way."""
        if len(self.ready) * 4 < self.config.size:
            return 0.0
        quiet_s = self.config.refill_quiet_ms / 1000
        return max(0.0, self._last_claim + quiet_s - time.monotonic())

    async def close(self) -> None:
        """Destroy every waiting member."""
        while self.ready:
            member = self.ready.popleft()
            member.stdio.abort()
            await self._remove(member)

    async def _wait_for_want(self) -> None:
        # Wake for a claim, or in time to retire the oldest member.
        timeout_s = float(self.config.max_age_s)
        if self.ready:
            timeout_s = self.ready[0].born + self.config.max_age_s - time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wanted.wait(), max(timeout_s, 0.01))

    async def _refill_one(self) -> None:
        try:
            member = await self._start_member()
        except (SandboxError, OSError) as exc:
            self._failed(exc)
            return
        self._failures = 0
        self.ready.append(member)

    def _failed(self, exc: Exception) -> None:
        self.stats.refill_failures += 1
        worker_metrics().pool_refill_failures.add(1, {"pool": self.name})
        self._failures += 1
        if self._failures < self.config.failures_before_backoff:
            log.warning("pool.refill_failed", pool=self.name, error=str(exc))
            return
        # The exponent is capped, since 2 ** exponent would overflow a float
        # after a thousand failures.
        exponent = min(self._failures - self.config.failures_before_backoff, 30)
        delay_s = min(self.config.backoff_max_s, _BACKOFF_BASE_S * 2**exponent)
        self._backoff_until = time.monotonic() + delay_s
        log.warning(
            "pool.backing_off", pool=self.name, error=str(exc), backoff_s=delay_s
        )

    async def _start_member(self) -> Member:
        name = f"{self.fleet}-pool-{self.name}-{secrets.token_hex(4)}"
        workspace = Workspace(self.workspaces, name)
        self.workspace_names.add(name)
        container_id = ""
        try:
            uid, gid = (int(part) for part in self.profile.user.split(":"))
            await workspace.create(
                self.profile.limits.workspace_bytes, uid=uid, gid=gid
            )
            config = self._member_config(str(workspace.mount))
            container_id = await self.runtime.create(config, name=name)
            self.creating.add(container_id)
            stdio = await self.runtime.attach(container_id)
            try:
                await self.runtime.start(container_id)
                await self._probe(container_id)
            except BaseException:
                stdio.abort()
                raise
        except BaseException:
            await self._remove_parts(container_id, workspace)
            raise
        finally:
            self.creating.discard(container_id)

        return Member(
            container_id=container_id,
            stdio=stdio,
            workspace=workspace,
            cgroup_events=known_pids_events(container_id),
        )

    def _member_config(self, workspace: str) -> dict[str, object]:
        spec = SandboxSpec(
            session_id="",
            profile_name=self.name,
            profile=with_launcher(self.profile),
            limits=self.profile.limits,
            image=self.image,
            workspace=workspace,
            network=self.network,
        )
        return container_config(
            spec,
            fleet=self.fleet,
            node=self.node,
            seccomp=self.seccomp,
            apparmor=self.apparmor,
        )

    def handed_out(self, member: Member) -> None:
        """The member's session holds its workspace from now on; until this
        call the pool still counts it as its own."""
        self.workspace_names.discard(member.workspace.dir.name)

    async def _probe(self, container_id: str) -> None:
        code = await self.runtime.run_check(
            container_id,
            ["/bin/sh", "-c", PROBE],
            user=self.profile.user,
            timeout_s=_PROBE_TIMEOUT_S,
        )
        if code != 0:
            raise SandboxError(
                f"health probe exited {code} in {container_id}",
                container_id=container_id,
            )

    def _usable(self, member: Member) -> bool:
        young = time.monotonic() - member.born < self.config.max_age_s
        return young and member.stdio.alive

    def _retire_aged(self) -> None:
        while self.ready and not self._usable(self.ready[0]):
            self.discard(self.ready.popleft())

    def discard(self, member: Member) -> None:
        """Destroy a member found unusable."""
        member.stdio.abort()
        task = asyncio.create_task(self._remove(member))
        task.add_done_callback(lambda _: None)

    async def _remove(self, member: Member) -> None:
        await self._remove_parts(member.container_id, member.workspace)

    async def _remove_parts(self, container_id: str, workspace: Workspace) -> None:
        # The container first: its workspace is unmounted only once no
        # sandbox holds it.
        try:
            if container_id:
                await self.runtime.remove(container_id)
            await workspace.remove()
        except SandboxError:
            log.exception("pool.remove_failed", container_id=container_id)
        finally:
            self.workspace_names.discard(workspace.dir.name)
