"""What an agent can reach from inside its sandbox: as little as possible."""

from __future__ import annotations

import asyncio

from shared.localfleet import LocalFleet
from tests.sandboxes import run_session


class TestSandboxFromInside:
    async def test_no_capabilities_no_privilege_gain_no_network(
        self, fleet: LocalFleet
    ) -> None:
        """Capabilities are zero, NoNewPrivs is 1, seccomp filters, the root
        filesystem refuses writes, loopback is the only interface, and the
        agent runs as uid 1000."""
        ran = await run_session(fleet, "inspect")

        lines = ran.stdout.decode().splitlines()
        status = dict(line.split(":\t") for line in lines[:5])
        assert status["CapPrm"] == status["CapEff"] == "0000000000000000"
        assert status["CapBnd"] == "0000000000000000"
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"
        assert lines[5:] == [
            "lo",
            "touch: /root-write: Read-only file system",
            "unshare refused",
            "1000",
        ]

    async def test_a_fork_bomb_stops_at_the_pids_limit(self, fleet: LocalFleet) -> None:
        """A fork bomb is held at the limit; another session runs meanwhile."""
        bomb = asyncio.create_task(run_session(fleet, "fork-bomb", timeout_s=60))
        await asyncio.sleep(1)

        bystander = await run_session(fleet, "cat-exit", stdin=b"fine\n")
        ran = await bomb

        assert bystander.stdout == b"fine\ndone\n"
        assert b"Resource temporarily unavailable" in ran.stderr
        assert ran.stdout == b"survived\n"
        assert (ran.end["cause"], ran.end["exit_code"]) == ("agent_exit", 0)
