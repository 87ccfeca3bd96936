"""Sessions through the whole fleet against the real Docker Engine.

Each test runs busybox agents whose behaviour is one field case, and checks
what the client receives and how the session is recorded to have ended.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest
from redis.asyncio import Redis

from scheduler.client import FleetClient, SlowClient
from shared.keys import Keys
from shared.localfleet import LocalFleet
from shared.store import STDIN_PENDING_BYTES
from shared.wire import Output
from tests.sandboxes import MIB, run_session

pytestmark = pytest.mark.docker


def container_of(session_id: str) -> dict[str, Any]:
    """Inspect the container that runs ``session_id``."""
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=io.acp-fleet.session={session_id}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(ids) == 1, f"expected one container for {session_id}, found {ids}"
    out = subprocess.run(
        ["docker", "inspect", ids[0]], capture_output=True, text=True, check=True
    ).stdout
    info: dict[str, Any] = json.loads(out)[0]
    return info


def _worker_status_mib(fleet: LocalFleet, field: str) -> int:
    pid = fleet.processes["worker"].pid
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) // 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def worker_peak_rss_mib(fleet: LocalFleet) -> int:
    """The worker process' peak resident memory so far."""
    return _worker_status_mib(fleet, "VmHWM")


def worker_rss_mib(fleet: LocalFleet) -> int:
    """The worker process' resident memory now."""
    return _worker_status_mib(fleet, "VmRSS")


async def wait_running(fleet: LocalFleet, session_id: str) -> dict[str, Any]:
    async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
        for _ in range(200):
            view = await client.session(session_id)
            if view["state"] == "running":
                return view
            await asyncio.sleep(0.05)
    raise AssertionError(f"session {session_id} never ran: {view}")


class TestStdioRelay:
    async def test_demultiplexes_large_lines_byte_identically(
        self, fleet: LocalFleet
    ) -> None:
        """C01: stdout and stderr arrive separate and byte-identical."""
        ran = await run_session(fleet, "c01")

        expected_out = b"x" * 200_000 + b"\n" + "€".encode() * 50_000
        assert ran.stdout == expected_out
        assert ran.stderr == b"y" * 70_000 + b"\n"
        assert "\ufffd" not in ran.stdout.decode("utf-8")
        assert ran.end["cause"] == "agent_exit"
        assert ran.end["exit_code"] == 0

    async def test_stdin_eof_reaches_the_agent(self, fleet: LocalFleet) -> None:
        """C02: the client gets exactly hello and done, and exit code 7."""
        ran = await run_session(fleet, "cat-exit", stdin=b"hello\n", timeout_s=5)

        assert ran.stdout == b"hello\ndone\n"
        assert ran.end["cause"] == "agent_exit"
        assert ran.end["exit_code"] == 7
        assert ran.view["exit_code"] == 7

    async def test_stdin_past_the_pending_bound_reaches_the_agent_whole(
        self, fleet: LocalFleet
    ) -> None:
        """Three times the stdin a worker may fall behind by: the gateway
        holds the client back until the worker's reports of what the agent
        was given free room, and every byte arrives."""
        size = 3 * STDIN_PENDING_BYTES
        ran = await run_session(fleet, "count-stdin", stdin=b"x" * size, timeout_s=60)

        assert int(ran.stdout) == size
        assert ran.end["cause"] == "agent_exit"

    async def test_stdin_sent_before_the_agent_runs_arrives_in_order_once(
        self, fleet: LocalFleet
    ) -> None:
        """300 stdin messages sent while the session waits for a worker are
        delivered in order, each once."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("cat-exit")
            async with client.stdio(created["id"]) as stdio:
                for index in range(300):
                    await stdio.send(f"{index}\n".encode())
                await stdio.send_eof()
                output = b""
                async for event in stdio.events():
                    if isinstance(event, Output):
                        output += event.data

        expected = "".join(f"{index}\n" for index in range(300)) + "done\n"
        assert output.decode() == expected

    async def test_huge_lines_arrive_and_endless_lines_end_the_session(
        self, fleet: LocalFleet
    ) -> None:
        """C14: a 1 MiB line and a small one arrive; 80 MiB unbroken ends it."""
        ran = await run_session(fleet, "c14", timeout_s=90)

        first, second, rest = ran.stdout.split(b"\n", 2)
        assert len(first) > MIB
        assert json.loads(first)["params"]["t"] == "a" * MIB
        assert json.loads(second) == {"jsonrpc": "2.0", "method": "small"}
        assert rest == b""
        assert ran.end["cause"] == "line_too_long"
        assert str(16 * MIB) in ran.end["detail"]
        assert ran.end["kill_signal"] == "SIGKILL"
        peak_mib = worker_peak_rss_mib(fleet)
        assert peak_mib < 200, f"worker peaked at {peak_mib} MiB"


class TestBackpressure:
    async def test_a_stalled_client_blocks_the_agent_not_the_worker(
        self, fleet: LocalFleet
    ) -> None:
        """An unread client stops the agent at the backlog bound; reading
        resumes it, and the client is told it was the slow side."""
        bound = fleet.settings.worker.backlog_bytes
        redis = Redis.from_url(fleet.redis_url)
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("yes")
            key = Keys(fleet.settings.key_prefix).session(created["id"])
            async with client.stdio(created["id"]) as stdio:
                await asyncio.sleep(3)
                stalled = int(await redis.hget(key, "out_bytes") or 0)
                await asyncio.sleep(1)
                still = int(await redis.hget(key, "out_bytes") or 0)
                rss_mib = worker_rss_mib(fleet)

                received, told = 0, False
                async for event in stdio.events():
                    if isinstance(event, SlowClient):
                        told = True
                    elif isinstance(event, Output):
                        received += len(event.data)
                    if received > 2 * bound and told:
                        break
            await client.cancel(created["id"])
        await redis.aclose()

        assert bound <= stalled <= bound + MIB
        assert still == stalled
        assert rss_mib < 200
        assert told
        assert received > 2 * bound


class TestExitCauses:
    async def test_short_lived_containers_always_report_their_exit(
        self, fleet: LocalFleet
    ) -> None:
        """C03: 200 runs of exit 3 give 200 exit codes of 3, never an error."""
        gate = asyncio.Semaphore(24)

        async def one() -> tuple[str, int | None]:
            async with gate:
                ran = await run_session(fleet, "exit3")
            return ran.end["cause"], ran.end.get("exit_code")

        results = await asyncio.gather(*(one() for _ in range(200)))

        assert results == [("agent_exit", 3)] * 200

    async def test_oom_kill_of_a_child_is_reported_though_pid1_exits_0(
        self, fleet: LocalFleet
    ) -> None:
        """C04: a child killed by the OOM killer makes the cause oom_killed."""
        ran = await run_session(fleet, "oom")

        assert ran.end["cause"] == "oom_killed"
        assert ran.end["exit_code"] == 0
        assert ran.end["oom_killed"] is True

    async def test_a_kill_by_the_fleet_is_not_an_oom(self, fleet: LocalFleet) -> None:
        """C04: a cancelled sleep exits 137 with no OOM and names the kill."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("sleep")
            await wait_running(fleet, created["id"])

            answer = await client.cancel(created["id"])
            for _ in range(100):
                view = await client.session(created["id"])
                if view["state"] == "ended":
                    break
                await asyncio.sleep(0.05)

        assert answer["state"] in ("running", "starting")
        assert view["cause"] == "cancelled"
        assert view["exit_code"] == 137
        assert view["oom_killed"] is False
        assert view["kill_signal"] == "SIGKILL"


class TestLimits:
    async def test_memory_limit_reaches_the_container(self, fleet: LocalFleet) -> None:
        """C05: HostConfig.Memory equals the parsed value, swap included."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session(
                "wait-stdin", limits={"memory": "512m"}
            )
            await wait_running(fleet, created["id"])
            host = container_of(created["id"])["HostConfig"]
            await client.cancel(created["id"])

        assert host["Memory"] == 536_870_912
        assert host["MemorySwap"] == 536_870_912

    async def test_pids_limit_stops_forks_and_keeps_the_agent(
        self, fleet: LocalFleet
    ) -> None:
        """C06: with 64 pids, forks fail with EAGAIN and the agent lives on."""
        ran = await run_session(fleet, "forks", stdin=b"still here\n", timeout_s=30)

        assert b"Resource temporarily unavailable" in ran.stderr
        assert ran.stdout == b"alive\n64\nstill here\n"
        assert ran.end["cause"] == "agent_exit"
        assert ran.end["exit_code"] == 0

    async def test_an_agent_that_fails_after_refused_forks_ends_pids_exhausted(
        self, fleet: LocalFleet
    ) -> None:
        """Exit 1 after the kernel refused forks is pids_exhausted, not exit."""
        ran = await run_session(fleet, "pids-out", timeout_s=30)

        assert (ran.end["cause"], ran.end["exit_code"]) == ("pids_exhausted", 1)
        assert ran.view["cause"] == "pids_exhausted"
        refused = int(ran.view["detail"].split()[0])
        assert refused >= 1

    @pytest.mark.parametrize("profile", ["pids-unlimited", "pids-minus-one"])
    async def test_unlimited_pids_give_an_unlimited_cgroup(
        self, fleet: LocalFleet, profile: str
    ) -> None:
        """C06: 'unlimited' and -1 both leave pids.max at max."""
        ran = await run_session(fleet, profile)

        assert ran.stdout == b"max\n"


class TestFilesystem:
    async def test_tmpfs_mounts_are_writable_by_the_agent_with_stated_modes(
        self, fleet: LocalFleet
    ) -> None:
        """C07: both probes succeed on mounts the agent's uid owns.

        The image has each mount point as root 0755; runc 1.1 gives a tmpfs
        the mode of the directory it covers, whatever ``mode=`` says, so
        the stated mode there is 755 and ownership is what makes it usable.
        """
        ran = await run_session(fleet, "probe")

        probe = (
            b"/tmp 755 1000:1000\n/home/agent 755 1000:1000\n"
            b"/workspace 755 1000:1000\n"
            b"ran in /home/agent\nran in /workspace\nroot read-only\n"
        )
        assert ran.stdout == probe * 2
        assert ran.end["exit_code"] == 0
