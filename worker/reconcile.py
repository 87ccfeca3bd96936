"""Reconciliation: what Redis says is running against what Docker runs.

At start-up and on a timer the worker removes every container of its node
that no session of this process owns, then every workspace that none
holds, and ends as ``worker_lost`` every session whose owner stopped
renewing its lease, on any node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from shared.errors import SandboxError
from shared.models import EndCause, Outcome
from shared.store import SessionStore
from worker.docker import LABEL_FLEET, LABEL_NODE, LABEL_SESSION, DockerRuntime
from worker.workspace import leftovers

log = structlog.get_logger("worker.reconcile")


class Reconciler:
    """Heal the traces of dead workers, on this node and in Redis."""

    def __init__(
        self,
        *,
        store: SessionStore,
        runtime: DockerRuntime,
        fleet: str,
        node: str,
        owns: Callable[[str, str], bool],
        workspaces: str,
        live_workspaces: Callable[[], set[str]],
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.labels = {LABEL_FLEET: fleet, LABEL_NODE: node}
        self.node = node
        # Whether this process holds a container (by session and id): its
        # runs' and its pools' containers are never touched.
        self.owns = owns
        self.workspaces = workspaces
        self.fleet = fleet
        self.live_workspaces = live_workspaces

    async def run_once(self) -> tuple[int, int]:
        """Return (containers removed, sessions ended as lost)."""
        removed = await self.remove_orphans()
        pruned = await self.prune_workspaces()
        lost = await self.end_lapsed_sessions()
        if removed or lost or pruned:
            log.info(
                "reconcile.healed",
                containers_removed=removed,
                workspaces_pruned=pruned,
                sessions_lost=lost,
            )
        return removed, lost

    async def prune_workspaces(self) -> int:
        """Remove this fleet's workspaces that no run or pool member holds.

        Called after the orphaned containers are gone, so that none of
        these is still bound into a sandbox.
        """
        found = [
            workspace
            for workspace in leftovers(self.workspaces, set())
            if workspace.dir.name.startswith(f"{self.fleet}-")
        ]
        # Read after the listing: a workspace created meanwhile is live.
        live = self.live_workspaces()
        pruned = 0
        for workspace in found:
            if workspace.dir.name in live:
                continue
            try:
                await workspace.remove()
            except SandboxError:
                log.exception("reconcile.workspace_busy", workspace=str(workspace.dir))
                continue
            pruned += 1
        return pruned

    async def remove_orphans(self) -> int:
        """Remove this node's labelled containers that no live run owns."""
        orphans = [
            container
            for container in await self.runtime.labelled(self.labels)
            if not self.owns(_session_of(container), container["Id"])
        ]
        # Every session ends before any container goes: an end is one
        # script, a removal tens of milliseconds, and a restarted worker's
        # sessions must all end within a lease.
        for container in orphans:
            await self._end_own_orphan(_session_of(container))
        removed = 0
        for container in orphans:
            # Asked again: a pool may have taken up a member meanwhile.
            if self.owns(_session_of(container), container["Id"]):
                continue
            try:
                await self.runtime.remove(container["Id"])
            except SandboxError:
                log.exception("reconcile.remove_failed", container_id=container["Id"])
                continue
            removed += 1

        return removed

    async def _end_own_orphan(self, session_id: str) -> None:
        # A lease held under this node's name but by no run of this process
        # belongs to an earlier incarnation of this worker: it is dead.
        if not session_id:
            return
        record = await self.store.record(session_id)
        if record is None or record.get("state") == "ended":
            return
        lease = record.get("lease", "")
        if lease.startswith(f"{self.node}/"):
            await self.store.finish(
                session_id,
                org=record["org"],
                expect=lease,
                outcome=Outcome(cause=EndCause.WORKER_LOST, detail="worker restarted"),
            )

    async def end_lapsed_sessions(self) -> int:
        """End every claimed session whose lease has lapsed, on any node."""
        return await self.store.end_lapsed()


def _session_of(container: dict[str, Any]) -> str:
    return str(container.get("Labels", {}).get(LABEL_SESSION, ""))
