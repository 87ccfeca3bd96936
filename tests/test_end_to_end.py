"""A real ACP client speaks to the real claude-code-acp through ``connect``.

Every hop is the production path: HTTP admission, the arq queue, the worker,
the Docker Engine, the hardened sandbox, and the Redis streams back to the
scheduler's WebSocket that ``connect`` relays to its own stdio.
"""

from __future__ import annotations

from scheduler.client import FleetClient
from shared.demo import drive_acp
from shared.localfleet import LocalFleet


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
