"""A worker holding more sandboxes at once than aiohttp's default pool.

aiohttp allows 100 connections per client by default; a worker that used
it for Docker would block for good once 100 long calls were open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from scheduler.client import End, FleetClient
from shared.localfleet import LocalFleet, local_fleet
from shared.wire import Output
from tests.sandboxes import busybox_profile

SESSIONS = 110


@pytest.fixture(scope="module")
def big_node(redis_url: str, docker_images: None) -> Iterator[LocalFleet]:
    """A worker allowed more concurrent sessions than the pool's default."""
    with local_fleet(
        {"echo": busybox_profile("cat", memory="16m", pids=8)},
        redis_url=redis_url,
        orgs={"acme": {"max_sessions": SESSIONS, "sessions_per_minute": 10_000}},
        # A loaded node takes seconds to carry EOF through; only the count
        # of sandboxes is under test here.
        worker={"max_sessions": SESSIONS, "eof_grace_s": 60},
    ) as fleet:
        yield fleet


async def wait_all_running(client: FleetClient, ids: list[str]) -> None:
    for _ in range(600):
        views = await asyncio.gather(*(client.session(i) for i in ids))
        if all(view["state"] == "running" for view in views):
            return
        await asyncio.sleep(0.1)
    states = sorted(view["state"] for view in views)
    raise AssertionError(f"not all sessions ran: {states}")


class TestManySandboxes:
    async def test_110_sessions_run_at_once_and_all_finish(
        self, big_node: LocalFleet
    ) -> None:
        """110 sandboxes run together; each echoes its own line and exits 0."""
        async with FleetClient(big_node.url, big_node.api_key) as client:
            created = await asyncio.gather(
                *(client.create_session("echo") for _ in range(SESSIONS))
            )
            ids = [session["id"] for session in created]
            await wait_all_running(client, ids)

            async def talk(index: int, session_id: str) -> tuple[bytes, str]:
                output = b""
                async with client.stdio(session_id) as stdio:
                    await stdio.send(f"ping {index}\n".encode())
                    await stdio.send_eof()
                    async for event in stdio.events():
                        if isinstance(event, End):
                            return output, f"{event.cause}:{event.exit_code}"
                        if isinstance(event, Output):
                            output += event.data
                return output, "no end"

            results = await asyncio.gather(
                *(talk(index, session_id) for index, session_id in enumerate(ids))
            )

        assert results == [
            (f"ping {index}\n".encode(), "agent_exit:0") for index in range(SESSIONS)
        ]
