"""Warm pools against the real Docker Engine."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from scheduler.client import End, FleetClient
from shared.keys import Keys
from shared.localfleet import LocalFleet, local_fleet, redis_process
from shared.wire import Output
from tests.sandboxes import busybox_profile

POOL = {"size": 3, "max_age_s": 600}
NOSH_IMAGE = "acp-fleet/nosh:test"


@pytest.fixture(scope="module")
def pooled(redis_url: str, docker_images: None) -> Iterator[LocalFleet]:
    """A worker with a healthy pool, and one whose members cannot start."""
    echo = busybox_profile('echo "ready $GREETING"; cat')
    nosh = {
        **busybox_profile(""),
        "image": NOSH_IMAGE,
        "command": ["/bin/busybox", "echo", "cold and fine"],
        "pool": {"size": 2, "failures_before_backoff": 2, "backoff_max_s": 30},
    }
    with local_fleet(
        {
            "echo": {**echo, "env_allowed": ["GREETING"], "pool": POOL},
            "nosh": nosh,
        },
        redis_url=redis_url,
        orgs={"acme": {"max_sessions": 20, "sessions_per_minute": 10_000}},
        worker={"heartbeat_ms": 500, "lease_ms": 3000},
    ) as fleet:
        yield fleet


async def pool_state(fleet: LocalFleet, name: str) -> dict[str, Any]:
    ops = {"Authorization": f"Bearer {fleet.operator_key}"}
    async with httpx.AsyncClient(base_url=fleet.url, headers=ops) as http:
        view = (await http.get("/v1/fleet")).json()
    node = fleet.settings.worker.node
    # A node is listed from its first heartbeat on, which may follow the
    # worker's start-up line by a moment.
    ours = next((entry for entry in view["nodes"] if entry["node"] == node), None)
    state: dict[str, Any] = ours["pools"].get(name, {}) if ours else {}
    return state


async def wait_pool(
    fleet: LocalFleet, name: str, ready: int, *, hits: int = 0
) -> dict[str, Any]:
    """Wait for a heartbeat showing ``ready`` members after ``hits`` claims
    (a heartbeat from before the last claim would show a full pool too)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = await pool_state(fleet, name)
        if state.get("ready") == ready and state.get("hits", 0) >= hits:
            return state
        await asyncio.sleep(0.2)
    raise AssertionError(f"pool {name} never had {ready} ready: {state}")


async def session_field(fleet: LocalFleet, session_id: str, name: str) -> str:
    redis = Redis.from_url(fleet.redis_url, decode_responses=True)
    async with redis:
        key = Keys(fleet.settings.key_prefix).session(session_id)
        return str(await redis.hget(key, name))


def kill_members(fleet: LocalFleet, pool: str) -> list[str]:
    """SIGKILL every waiting member of ``pool`` behind the worker's back."""
    node = fleet.settings.worker.node
    listed = subprocess.run(
        [
            "docker",
            "ps",
            "-q",
            "--filter",
            f"label=io.acp-fleet.node={node}",
            "--filter",
            f"label=io.acp-fleet.pool={pool}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    members = listed.stdout.split()
    subprocess.run(["docker", "kill", *members], capture_output=True, check=True)
    return members


async def talk(fleet: LocalFleet, env: dict[str, str]) -> tuple[str, bytes, Any]:
    async with FleetClient(fleet.url, fleet.api_key) as client:
        created = await client.create_session("echo", env=env)
        output, end = b"", None
        async with client.stdio(created["id"]) as stdio:
            await stdio.send(b"over\n")
            await stdio.send_eof()
            async for event in stdio.events():
                if isinstance(event, End):
                    end = event
                    break
                if isinstance(event, Output):
                    output += event.data
    return created["id"], output, end


class TestWarmPool:
    async def test_a_warm_claim_runs_the_agent_with_the_sessions_env(
        self, pooled: LocalFleet
    ) -> None:
        """A pooled sandbox gets the session's variables, newline included."""
        await wait_pool(pooled, "echo", ready=3)

        session_id, output, end = await talk(pooled, {"GREETING": "multi\nline 'q'"})

        assert await session_field(pooled, session_id, "start") == "warm"
        assert output == b"ready multi\nline 'q'\nover\n"
        assert (end.cause, end.exit_code) == ("agent_exit", 0)

    async def test_the_pool_refills_after_claims(self, pooled: LocalFleet) -> None:
        """Three claims empty the pool; it is full again shortly after."""
        await wait_pool(pooled, "echo", ready=3, hits=1)

        results = await asyncio.gather(*(talk(pooled, {}) for _ in range(3)))
        starts = [await session_field(pooled, sid, "start") for sid, _, _ in results]
        state = await wait_pool(pooled, "echo", ready=3, hits=4)

        assert starts == ["warm"] * 3
        assert state["hits"] >= 4
        assert state["refill_failures"] == 0

    async def test_a_member_killed_from_outside_is_never_handed_out(
        self, pooled: LocalFleet
    ) -> None:
        """Members killed behind the pool's back do not fail the next session."""
        await wait_pool(pooled, "echo", ready=3, hits=4)
        members = kill_members(pooled, "echo")

        _, output, end = await talk(pooled, {"GREETING": "again"})

        assert len(members) >= 3
        assert output == b"ready again\nover\n"
        assert (end.cause, end.exit_code) == ("agent_exit", 0)

    async def test_a_narrowed_session_starts_cold(self, pooled: LocalFleet) -> None:
        """Members run with the profile's limits; a narrower session does not
        take one."""
        async with FleetClient(pooled.url, pooled.api_key) as client:
            created = await client.create_session("echo", limits={"memory": "32m"})
            async with client.stdio(created["id"]) as stdio:
                await stdio.send_eof()
                async for event in stdio.events():
                    if isinstance(event, End):
                        break

        assert await session_field(pooled, created["id"], "start") == "cold"

    async def test_failing_members_back_off_and_sessions_start_cold(
        self, pooled: LocalFleet
    ) -> None:
        """A pool whose members cannot start backs off; sessions still run."""
        deadline = time.monotonic() + 30
        state = await pool_state(pooled, "nosh")
        while not state.get("backing_off") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            state = await pool_state(pooled, "nosh")

        async with FleetClient(pooled.url, pooled.api_key) as client:
            created = await client.create_session("nosh")
            output = b""
            async with client.stdio(created["id"]) as stdio:
                async for event in stdio.events():
                    if isinstance(event, End):
                        break
                    if isinstance(event, Output):
                        output += event.data

        assert state["backing_off"] is True
        assert state["refill_failures"] >= 2
        assert state["ready"] == 0
        assert output == b"cold and fine\n"
        assert await session_field(pooled, created["id"], "start") == "cold"


def node_containers(node: str) -> list[str]:
    """Every container, running or not, labelled as ``node``'s."""
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=io.acp-fleet.node={node}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout.split()


def mounts_under(folder: Path) -> list[str]:
    """The mount points below ``folder``."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    return [point for point in points if point.startswith(f"{folder}/")]


class TestStoppedWithoutRedis:
    async def test_a_worker_stopped_while_redis_is_gone_removes_its_spares(
        self, docker_images: None
    ) -> None:
        """SIGTERM to a worker whose Redis has died still closes its pool:
        no member and no spare workspace mount outlives it."""
        echo = busybox_profile("cat")
        with (
            redis_process() as (url, redis),
            local_fleet(
                {"echo": {**echo, "pool": {"size": 2, "max_age_s": 600}}},
                redis_url=url,
                worker={"heartbeat_ms": 500},
            ) as fleet,
        ):
            node = fleet.settings.worker.node
            await wait_pool(fleet, "echo", 2)
            members = node_containers(node)
            redis.kill()
            redis.wait()
            fleet.stop("worker")
            left = node_containers(node)
            mounted = mounts_under(fleet.workdir)

        assert len(members) == 2
        assert left == []
        assert mounted == []
