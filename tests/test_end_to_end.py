"""A real ACP client speaks to the real claude-code-acp through ``connect``.

Every hop is the production path: HTTP admission, the arq queue, the worker,
the Docker Engine, the hardened sandbox, and the Redis streams back to the
scheduler's WebSocket that ``connect`` relays to its own stdio. A fleet of
its own reaches Redis over a unix socket, as processes on one node may.
"""

from __future__ import annotations

from pathlib import Path

from scheduler.client import FleetClient
from shared.demo import drive_acp
from shared.localfleet import LocalFleet, local_fleet, redis_server
from tests.sandboxes import PROFILES, run_session


class TestAcpThroughTheFleet:
    async def test_initialize_new_session_and_prompt_reach_the_agent(
        self, fleet: LocalFleet
    ) -> None:
        """The agent answers initialize and session/new; the prompt's
        authentication error comes back unchanged; connect exits cleanly."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as backend:
            created = await backend.create_session("claude")

            exchange = await drive_acp(fleet, created["id"], created["token"], "hi")
            view = await backend.session(created["id"])

        assert exchange.agent_name == "@zed-industries/claude-code-acp 0.16.2"
        assert len(exchange.acp_session_id) == 36
        assert exchange.prompt_error is not None
        assert exchange.prompt_error.code == -32000
        assert str(exchange.prompt_error) == "Authentication required"
        assert exchange.connect_exit == 0
        assert view["state"] == "ended"
        assert view["cause"] == "eof_ignored"
        assert view["kill_signal"] in ("SIGTERM", "SIGKILL")
        timings = view["timings"]
        assert (
            timings["admitted_ms"]
            <= timings["claimed_ms"]
            <= timings["sandbox_ready_ms"]
            <= timings["first_byte_ms"]
            <= timings["ended_ms"]
        )


class TestRedisOnAUnixSocket:
    async def test_a_session_runs_with_redis_on_its_socket(
        self, tmp_path: Path, docker_images: None
    ) -> None:
        """A fleet that reaches Redis by a unix:// URL, as on one node,
        admits, runs and ends a session and relays its stdio both ways."""
        with (
            redis_server(unix_socket=tmp_path / "redis.sock") as url,
            local_fleet(
                PROFILES,
                redis_url=url,
                orgs={"acme": {"max_sessions": 4, "sessions_per_minute": 1000}},
            ) as fleet,
        ):
            ran = await run_session(fleet, "cat-exit", stdin=b"over the socket\n")

        assert url == f"unix://{tmp_path / 'redis.sock'}"
        assert ran.stdout == b"over the socket\ndone\n"
        assert ran.end["exit_code"] == 7
