"""Timers, crashes and drains of a worker, with short periods to watch them.

The fleet here renews leases every second and lets them lapse after three,
so a dead worker's sessions must end within three seconds.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from scheduler.client import End, FleetClient
from shared.keys import Keys
from shared.localfleet import (
    LocalFleet,
    free_port,
    local_fleet,
    wait_for_worker,
    wait_listening,
)
from shared.wire import Output
from tests.sandboxes import busybox_profile

LEASE_MS = 3000
# Ignores EOF and SIGTERM alike; only SIGKILL ends it.
STUBBORN = "trap '' TERM; while :; do sleep 1; done"


@pytest.fixture(scope="module")
def short_fleet(redis_url: str, docker_images: None) -> Iterator[LocalFleet]:
    """A fleet whose leases, graces and drains take seconds."""
    with local_fleet(
        {
            "sleep": busybox_profile("sleep 600"),
            "stubborn": busybox_profile(STUBBORN),
            "brief": busybox_profile("sleep 1; exit 4"),
            "lines": busybox_profile(
                "i=1; while [ $i -le 20000 ]; do echo line $i; i=$((i+1)); done"
            ),
        },
        redis_url=redis_url,
        orgs={
            "acme": {"max_sessions": 40, "sessions_per_minute": 10_000},
            "pair": {"max_sessions": 2, "sessions_per_minute": 10_000},
        },
        worker={
            "lease_ms": LEASE_MS,
            "heartbeat_ms": 1000,
            "eof_grace_s": 1.0,
            "kill_grace_s": 1.0,
            "drain_grace_s": 3,
        },
    ) as fleet:
        yield fleet


async def wait_state(
    client: FleetClient, session_id: str, state: str, timeout_s: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        view = await client.session(session_id)
        if view["state"] == state or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.05)


def containers_of(session_id: str) -> list[str]:
    return subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=io.acp-fleet.session={session_id}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def created_containers(fleet: LocalFleet, since: float) -> dict[str, int]:
    """Count container creations per session label since ``since``."""
    node = fleet.settings.worker.node
    out = subprocess.run(
        [
            "docker",
            "events",
            "--since",
            str(since),
            "--until",
            str(time.time()),
            "--filter",
            "event=create",
            "--filter",
            f"label=io.acp-fleet.node={node}",
            "--format",
            '{{index .Actor.Attributes "io.acp-fleet.session"}}',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    counts: dict[str, int] = {}
    for session_id in out:
        counts[session_id] = counts.get(session_id, 0) + 1
    return counts


async def slots(fleet: LocalFleet, org: str) -> int:
    redis = Redis.from_url(fleet.redis_url)
    async with redis:
        now_ms = int(time.time() * 1000)
        key = Keys(fleet.settings.key_prefix).org_slots(org)
        return int(await redis.zcount(key, now_ms, "+inf"))


class TestTimers:
    async def test_idle_session_ends_as_idle_timeout(
        self, short_fleet: LocalFleet
    ) -> None:
        """No stdio and no client for the idle timeout ends the session."""
        async with FleetClient(short_fleet.url, short_fleet.api_key) as client:
            created = await client.create_session("sleep", limits={"idle_timeout_s": 2})
            view = await wait_state(client, created["id"], "ended", timeout_s=20)

        assert view["cause"] == "idle_timeout"
        assert view["kill_signal"] == "SIGTERM"
        assert containers_of(created["id"]) == []

    async def test_an_attached_client_keeps_an_idle_session(
        self, short_fleet: LocalFleet
    ) -> None:
        """A silent client that stays attached holds the session open."""
        async with FleetClient(short_fleet.url, short_fleet.api_key) as client:
            created = await client.create_session("sleep", limits={"idle_timeout_s": 2})
            async with client.stdio(created["id"]):
                await asyncio.sleep(5)
                during = await client.session(created["id"])
            after = await wait_state(client, created["id"], "ended", timeout_s=20)

        assert during["state"] == "running"
        assert after["cause"] == "idle_timeout"

    async def test_lifetime_ends_the_session(self, short_fleet: LocalFleet) -> None:
        """A session past its lifetime is stopped and says so."""
        async with FleetClient(short_fleet.url, short_fleet.api_key) as client:
            created = await client.create_session("sleep", limits={"lifetime_s": 2})
            view = await wait_state(client, created["id"], "ended", timeout_s=20)

        assert view["cause"] == "lifetime_exceeded"
        assert view["exit_code"] == 143
        assert view["kill_signal"] == "SIGTERM"

    async def test_an_agent_ignoring_eof_and_sigterm_is_killed(
        self, short_fleet: LocalFleet
    ) -> None:
        """C13: after EOF the fleet sends SIGTERM, then SIGKILL, and records it."""
        async with FleetClient(short_fleet.url, short_fleet.api_key) as client:
            created = await client.create_session("stubborn")
            await wait_state(client, created["id"], "running")
            async with client.stdio(created["id"]) as stdio:
                closed_at = time.monotonic()
                await stdio.send_eof()
                async for _ in stdio.events():
                    pass
            ended_after_s = time.monotonic() - closed_at
            view = await client.session(created["id"])

        assert view["cause"] == "eof_ignored"
        assert view["kill_signal"] == "SIGKILL"
        assert view["exit_code"] == 137
        assert ended_after_s < 5
        assert containers_of(created["id"]) == []


class TestWorkerLoss:
    async def test_sigkill_with_ten_sessions_ends_them_as_worker_lost(
        self, short_fleet: LocalFleet
    ) -> None:
        """C08: killed and restarted, the worker's ten sessions all end
        worker_lost within a lease, slots return, nothing is left, and no
        session ever had a second sandbox."""
        since = time.time()
        async with FleetClient(short_fleet.url, short_fleet.api_key) as client:
            created = [await client.create_session("sleep") for _ in range(10)]
            ids = [session["id"] for session in created]
            for session_id in ids:
                await wait_state(client, session_id, "running")

            short_fleet.stop("worker", kill=True)
            killed_at = time.monotonic()
            short_fleet.start("worker", "worker")
            await asyncio.to_thread(wait_for_worker, short_fleet, starts=2)
            views = [await wait_state(client, i, "ended", timeout_s=10) for i in ids]
            ended_within_s = time.monotonic() - killed_at

        assert [view["cause"] for view in views] == ["worker_lost"] * 10
        assert ended_within_s < LEASE_MS / 1000
        assert await slots(short_fleet, "acme") == 0
        assert [containers_of(session_id) for session_id in ids] == [[]] * 10
        counts = created_containers(short_fleet, since)
        assert [counts.get(session_id) for session_id in ids] == [1] * 10

    async def test_slots_of_a_dead_worker_lapse_within_a_lease(
        self, short_fleet: LocalFleet
    ) -> None:
        """C12: an org at its limit of 2 gets a 3rd session once the lease
        of its dead worker's sessions lapses."""
        async with FleetClient(short_fleet.url, short_fleet.api_keys["pair"]) as client:
            first = await client.create_session("sleep")
            second = await client.create_session("sleep")
            for session in (first, second):
                await wait_state(client, session["id"], "running")
            short_fleet.stop("worker", kill=True)
            killed_at = time.monotonic()

            admitted = None
            while admitted is None and time.monotonic() - killed_at < 10:
                try:
                    admitted = await client.create_session("sleep")
                except Exception:
                    await asyncio.sleep(0.1)
            admitted_after_s = time.monotonic() - killed_at
            short_fleet.start("worker", "worker")
            await asyncio.to_thread(wait_for_worker, short_fleet, starts=3)
            for session in (first, second):
                await wait_state(client, session["id"], "ended")
            await client.cancel(admitted["id"] if admitted else "")

        assert admitted is not None
        assert admitted_after_s < LEASE_MS / 1000 + 1


async def heartbeat_field(fleet: LocalFleet, name: str) -> str:
    """A field of the node's last heartbeat record."""
    redis = Redis.from_url(fleet.redis_url, decode_responses=True)
    async with redis:
        key = Keys(fleet.settings.key_prefix).node(fleet.settings.worker.node)
        return str(await redis.hget(key, name))  # type: ignore[misc]


def container_running(container_id: str) -> bool:
    return (
        subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Running}}", container_id],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        == "true"
    )


class TestOneWorkerPerNode:
    async def test_a_second_worker_of_a_live_node_refuses_to_start(
        self, short_fleet: LocalFleet
    ) -> None:
        """A worker started with a live worker's node name exits 2 with one
        line saying so, and the live worker's session runs on untouched."""
        node = short_fleet.settings.worker.node
        async with FleetClient(short_fleet.url, short_fleet.api_key) as client:
            created = await client.create_session("sleep")
            await wait_state(client, created["id"], "running")
            before = containers_of(created["id"])
            live = await heartbeat_field(short_fleet, "instance")

            second = short_fleet.start("worker-2", "worker")
            started = time.monotonic()
            code = await asyncio.to_thread(second.wait, 30)
            refused_after_s = time.monotonic() - started
            short_fleet.processes.pop("worker-2")
            await asyncio.sleep(1)
            view = await client.session(created["id"])
            after = containers_of(created["id"])
            running = container_running(before[0])
            await client.cancel(created["id"])

        output = short_fleet.log("worker-2")
        refusals = [line for line in output.splitlines() if "cannot start" in line]
        assert code == 2
        assert refusals == [
            f"acp-fleet: worker cannot start: node {node!r} is run by another "
            f"live worker ({live}): one worker per node; stop that one first, "
            "or give this one another worker.node"
        ]
        assert "worker.started" not in output
        assert "reconcile" not in output
        assert refused_after_s < 10
        assert view["state"] == "running"
        assert after == before
        assert running


class TestDrain:
    async def test_sigterm_lets_short_sessions_finish_and_drains_the_rest(
        self, short_fleet: LocalFleet
    ) -> None:
        """A short session ends on its own; a long one ends as drained."""
        async with FleetClient(short_fleet.url, short_fleet.api_key) as client:
            brief = await client.create_session("brief")
            long = await client.create_session("sleep")
            for session in (brief, long):
                await wait_state(client, session["id"], "running")

            short_fleet.stop("worker")
            brief_view = await client.session(brief["id"])
            long_view = await client.session(long["id"])
            short_fleet.start("worker", "worker")
            await asyncio.to_thread(wait_for_worker, short_fleet, starts=4)
            await asyncio.sleep(1)
            long_again = await client.session(long["id"])

        assert (brief_view["cause"], brief_view["exit_code"]) == ("agent_exit", 4)
        assert long_view["cause"] == "drained"
        assert long_again == long_view
        assert containers_of(long["id"]) == []


class TestResume:
    async def test_reconnecting_through_another_replica_loses_and_repeats_nothing(
        self, short_fleet: LocalFleet
    ) -> None:
        """20,000 lines read 1,000 at a time, alternating between two
        scheduler replicas and resuming from the cursor, arrive once each."""
        port = free_port()
        second = short_fleet.start("scheduler-2", "scheduler", "--port", str(port))
        await asyncio.to_thread(wait_listening, port, second, "scheduler-2")
        replicas = [short_fleet.url, f"http://127.0.0.1:{port}"]
        async with FleetClient(short_fleet.url, short_fleet.api_key) as backend:
            created = await backend.create_session("lines")

        lines: list[bytes] = []
        pending, cursor, end = b"", None, None
        for turn in range(100):
            client = FleetClient(replicas[turn % 2], created["token"])
            async with client, client.stdio(created["id"], cursor=cursor) as stdio:
                target = len(lines) + 1000
                async for event in stdio.events():
                    if isinstance(event, End):
                        end = event
                        break
                    if not isinstance(event, Output):
                        continue
                    cursor = event.cursor
                    *complete, pending = (pending + event.data).split(b"\n")
                    lines += complete
                    if len(lines) >= target:
                        await stdio.ack(cursor)
                        break
            if end is not None:
                break
        short_fleet.stop("scheduler-2")

        assert lines == [f"line {i}".encode() for i in range(1, 20_001)]
        assert pending == b""
        assert end is not None
        assert (end.cause, end.exit_code) == ("agent_exit", 0)


class TestOperators:
    async def test_a_drained_node_claims_nothing_until_resumed(
        self, short_fleet: LocalFleet
    ) -> None:
        """Drain stops claims and shows in the fleet view; undo resumes them."""
        node = short_fleet.settings.worker.node
        ops = {"Authorization": f"Bearer {short_fleet.operator_key}"}
        async with httpx.AsyncClient(base_url=short_fleet.url, headers=ops) as http:
            drained = await http.post(f"/v1/nodes/{node}/drain")
            await asyncio.sleep(1.5)
            async with FleetClient(short_fleet.url, short_fleet.api_key) as client:
                created = await client.create_session("brief")
                await asyncio.sleep(1.5)
                waiting = await client.session(created["id"])
                view = (await http.get("/v1/fleet")).json()
                resumed = await http.delete(f"/v1/nodes/{node}/drain")
                ended = await wait_state(client, created["id"], "ended")

        assert drained.status_code == 202
        assert waiting["state"] == "queued"
        ours = next(entry for entry in view["nodes"] if entry["node"] == node)
        assert ours["draining"] is True
        assert ours["drain_requested"] is True
        assert ours["heartbeat_age_ms"] < 3000
        assert view["queue"]["depth"] >= 1
        assert view["queue"]["oldest_wait_ms"] >= 1000
        assert resumed.status_code == 200
        assert (ended["cause"], ended["exit_code"]) == ("agent_exit", 4)

    async def test_the_fleet_view_needs_an_operator_key(
        self, short_fleet: LocalFleet
    ) -> None:
        """An organisation's key cannot list nodes or drain them."""
        org = {"Authorization": f"Bearer {short_fleet.api_key}"}
        async with httpx.AsyncClient(base_url=short_fleet.url, headers=org) as http:
            listing = await http.get("/v1/fleet")
            drain = await http.post("/v1/nodes/any/drain")

        assert listing.status_code == 403
        assert listing.json()["error"]["code"] == "operator_required"
        assert drain.status_code == 403

    async def test_draining_an_unknown_node_is_refused(
        self, short_fleet: LocalFleet
    ) -> None:
        """A node that never sent a heartbeat is a 404, not a silent drain."""
        ops = {"Authorization": f"Bearer {short_fleet.operator_key}"}
        async with httpx.AsyncClient(base_url=short_fleet.url, headers=ops) as http:
            refused = await http.post("/v1/nodes/typo-node/drain")

        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "node_not_found"
