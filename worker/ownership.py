"""One worker per node: the node's owner key, taken first and held.

A worker takes its node before it touches anything: its start-up
reconcile removes every container of the node that it does not own,
which would include a live worker's. The key names one worker process
and lapses two heartbeats after that process stops renewing it, so a
worker restarted after a crash waits at most that long (not at all when
its predecessor ran in the same pid namespace and its pid is gone), and
one started beside a live worker sees the key renewed and refuses to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from pathlib import Path

import structlog
from redis.exceptions import RedisError

from shared.errors import NodeBusy
from shared.logs import FailureStreak
from shared.store import SessionStore

log = structlog.get_logger("worker.ownership")

# The hold lapses this many heartbeats after its last renewal: one late
# renewal does not lose it, and a dead worker's successor waits little.
OWNER_TTL_HEARTBEATS = 2
# How often a waiting worker looks again; a look is one short script.
_POLL_S = 0.05
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_PID_NAMESPACE = "/proc/self/ns/pid"


def instance_id() -> str:
    """Name this worker process: host, pid, a nonce, and where its pid means
    something (the kernel's boot and the pid namespace)."""
    parts = [socket.gethostname(), str(os.getpid()), secrets.token_hex(4)]
    return ":".join([*parts, _pid_space()])


def _pid_space() -> str:
    try:
        boot = Path(_BOOT_ID).read_text().strip()[:8]
        namespace = os.stat(_PID_NAMESPACE).st_ino
    except OSError:
        return "unknown"
    return f"{boot}-{namespace}"


def surely_dead(holder: str) -> bool:
    """True when ``holder`` ran in this process's pid space and its pid is
    gone, or is this process's own: a predecessor killed on this node.

    Anything else (another host, container or boot, or a pid in use)
    could be alive and is waited out instead.
    """
    parts = holder.split(":")
    if len(parts) < 4:
        return False
    pid, space = parts[-3], parts[-1]
    if space != _pid_space() or space == "unknown" or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class NodeOwnership:
    """This process's hold on its node: take it, renew it, give it up."""

    def __init__(self, store: SessionStore, *, node: str, heartbeat_ms: int) -> None:
        self.store = store
        self.node = node
        self.instance = instance_id()
        self.renew_every_s = heartbeat_ms / 1000
        self.ttl_ms = heartbeat_ms * OWNER_TTL_HEARTBEATS

    async def acquire(self) -> None:
        """Take the node, waiting out the hold of a holder that is dead.

        Returns once this process holds the node: at once when nobody held
        it, or when the previous holder's hold lapses unrenewed.

        Raises:
            NodeBusy: the holder renewed its hold while this one waited,
                so it is alive.
        """
        holder, left_ms = await self._own()
        if holder == self.instance:
            return
        if surely_dead(holder):
            # Restarted on the same host: no need to wait for the lapse.
            dead = holder
            await self.store.release_node(self.node, dead)
            holder, left_ms = await self._own()
            if holder == self.instance:
                log.info("node.taken_over", previous=dead, waited=False)
                return

        log.info("node.owner_waiting", holder=holder, left_ms=left_ms)
        # A hold with no expiry (set by hand) never lapses: give up then.
        deadline = time.monotonic() + (self.ttl_ms / 1000) + self.renew_every_s
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
            seen = holder, left_ms
            holder, left_ms = await self._own()
            if holder == self.instance:
                log.info("node.taken_over", previous=seen[0])
                return
            if holder != seen[0] or left_ms > seen[1]:
                break
        raise NodeBusy(self.node, holder)

    async def hold_forever(self) -> None:
        """Renew the hold once a heartbeat until cancelled."""
        streak = FailureStreak(log, "node.owner_renew_failed")
        while True:
            await asyncio.sleep(self.renew_every_s)
            try:
                holder, _ = await self._own()
            except RedisError as exc:
                streak.failed(exc)
                continue
            streak.succeeded()
            if holder != self.instance:
                # Only after two missed renewals and a start beside this
                # process; its sessions stay fenced by their own leases.
                log.error("node.owner_lost", holder=holder)

    async def release(self) -> None:
        """Give the node up, so that the next worker need not wait, and
        close the store's client."""
        with contextlib.suppress(RedisError):
            await self.store.release_node(self.node, self.instance)
        await self.store.close()

    async def _own(self) -> tuple[str, int]:
        return await self.store.own_node(self.node, self.instance, self.ttl_ms)
