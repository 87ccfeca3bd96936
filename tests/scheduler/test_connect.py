"""``acp-fleet connect`` as an editor or a script runs it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from scheduler.client import FleetClient
from scheduler.connect import RECONNECT_MAX_S, Backoff, StdinBuffer
from shared.localfleet import REPO, LocalFleet, free_port, wait_listening
from tests.cli import cli


def connect(
    fleet: LocalFleet, stdin: int | IO[bytes], *args: str
) -> subprocess.CompletedProcess[bytes]:
    """Run connect against ``fleet`` with acme's key."""
    env = {**os.environ, "ACP_FLEET_API_KEY": fleet.api_keys["acme"]}
    return cli("connect", "--url", fleet.url, *args, env=env, stdin=stdin)


class TestConnect:
    def test_stdin_from_a_file_reaches_the_agent(
        self, fleet: LocalFleet, tmp_path: Path
    ) -> None:
        """A file's bytes and its end arrive; connect exits with the agent."""
        source = tmp_path / "in.txt"
        source.write_bytes(b"hello\n")

        with source.open("rb") as stdin:
            done = connect(fleet, stdin, "--profile", "cat-exit")

        assert done.stdout == b"hello\ndone\n"
        assert done.returncode == 7

    def test_stdin_from_dev_null_is_an_immediate_eof(self, fleet: LocalFleet) -> None:
        """With /dev/null as stdin the agent sees EOF at once."""
        done = connect(fleet, subprocess.DEVNULL, "--profile", "cat-exit")

        assert done.stdout == b"done\n"
        assert done.returncode == 7

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--profile", "nope"], b"unknown_profile"),
            (["--session", "0" * 32, "--token", "a.b.c"], b"invalid_token"),
        ],
    )
    def test_refusals_are_one_line_and_exit_2(
        self, fleet: LocalFleet, args: list[str], message: bytes
    ) -> None:
        """A refused request prints its reason, no traceback, and exits 2."""
        done = connect(fleet, subprocess.DEVNULL, *args)

        assert done.returncode == 2
        assert message in done.stderr
        assert b"Traceback" not in done.stderr

    def test_an_unreachable_scheduler_is_reported_plainly(
        self, fleet: LocalFleet
    ) -> None:
        """A scheduler that does not answer is named, without a traceback."""
        env = {**os.environ, "ACP_FLEET_API_KEY": "k"}
        url = "http://127.0.0.1:1"

        done = cli("connect", "--url", url, "--profile", "cat-exit", env=env)

        assert done.returncode == 2
        assert b"cannot reach http://127.0.0.1:1" in done.stderr
        assert b"Traceback" not in done.stderr


class Replica:
    """A scheduler replica of ``fleet`` on a port of its own, to kill."""

    def __init__(self, fleet: LocalFleet, name: str) -> None:
        self.fleet, self.name, self.port = fleet, name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        process = self.fleet.start(self.name, "scheduler", "--port", str(self.port))
        wait_listening(self.port, process, self.name)

    def kill(self) -> None:
        self.fleet.stop(self.name, kill=True)

    def close(self) -> None:
        if self.name in self.fleet.processes:
            self.fleet.stop(self.name)


@pytest.fixture
def replica(fleet: LocalFleet) -> Iterator[Replica]:
    """A second scheduler on the fleet's Redis, stopped afterwards."""
    started = Replica(fleet, "scheduler-connect")
    started.start()
    yield started
    started.close()


class Running:
    """A connect process whose stdout and stderr lines are collected live."""

    def __init__(self, fleet: LocalFleet, url: str, *args: str) -> None:
        env = {**os.environ, "ACP_FLEET_API_KEY": fleet.api_keys["acme"]}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "connect", "--url", url, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self._collectors = [
            threading.Thread(target=_collect, args=pipes, daemon=True)
            for pipes in (
                (self.process.stdout, self.stdout),
                (self.process.stderr, self.stderr),
            )
        ]
        for collector in self._collectors:
            collector.start()

    def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def type_lines(self, count: int, every_s: float) -> None:
        """Write ``in 1`` to ``in <count>``, one line each ``every_s``."""
        for i in range(1, count + 1):
            self.write(b"in %d\n" % i)
            time.sleep(every_s)

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def wait_for(
        self, lines: list[bytes], wanted: bytes, timeout_s: float = 30
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(wanted in line for line in lines):
            assert time.monotonic() < deadline, f"no {wanted!r} in {lines[-5:]!r}"
            assert self.process.poll() is None, self.stderr
            time.sleep(0.02)

    def session_id(self) -> str:
        self.wait_for(self.stderr, b"acp-fleet: session ")
        line = next(line for line in self.stderr if b"acp-fleet: session " in line)
        return line.split()[-1].decode()

    def exit_code(self, timeout_s: float = 60) -> int:
        """Wait for the exit, having read all the process wrote."""
        assert self.process.stdin is not None
        if not self.process.stdin.closed:
            self.process.stdin.close()
        code = self.process.wait(timeout=timeout_s)
        for collector in self._collectors:
            collector.join(timeout=5)
        return code


def _collect(pipe: IO[bytes] | None, lines: list[bytes]) -> None:
    assert pipe is not None
    with pipe:
        for line in pipe:
            lines.append(line)


class TestReconnect:
    def test_a_killed_replica_loses_and_repeats_nothing(
        self, fleet: LocalFleet, replica: Replica
    ) -> None:
        """Output made while the replica is down follows once, in order; stdin
        typed before, across and after the kill reaches the agent once each;
        connect exits with the agent."""
        running = Running(fleet, replica.url, "--profile", "ticks-cat")
        running.wait_for(running.stdout, b"tick 5\n")
        typing = threading.Thread(target=running.type_lines, args=(100, 0.03))
        typing.start()

        time.sleep(0.5)
        replica.kill()
        time.sleep(2)
        replica.start()
        typing.join()
        running.close_stdin()
        code = running.exit_code()

        ticks = [b"tick %d\n" % i for i in range(1, 61)]
        typed = [b"in %d\n" % i for i in range(1, 101)]
        assert running.stdout == [*ticks, *typed, b"done\n"]
        assert code == 7
        assert any(b"reconnecting" in line for line in running.stderr)

    def test_the_window_elapsing_ends_connect_with_one_line(
        self, fleet: LocalFleet, replica: Replica
    ) -> None:
        """With its replica gone for good connect gives up after the window,
        naming the URL and the session, and exits 2."""
        running = Running(
            fleet, replica.url, "--profile", "wait-stdin", "--reconnect-s", "1"
        )
        session_id = running.session_id()
        time.sleep(1.5)

        replica.kill()
        started = time.monotonic()
        code = running.exit_code(timeout_s=30)
        took_s = time.monotonic() - started
        asyncio.run(_cancel(fleet, session_id))

        assert code == 2
        assert 1 <= took_s < 1 + 2 * RECONNECT_MAX_S
        last = running.stderr[-1]
        assert last.startswith(b"acp-fleet connect: lost " + replica.url.encode())
        assert b"no connection for 1 s" in last
        assert session_id.encode() in last
        assert not any(b"Traceback" in line for line in running.stderr)

    @pytest.mark.parametrize(
        ("key", "message"),
        [("afk_wrong", b"invalid_credentials"), (None, b"session_not_found")],
    )
    def test_a_refusal_ends_connect_at_once(
        self, fleet: LocalFleet, key: str | None, message: bytes
    ) -> None:
        """A wrong key or an unknown session is not retried: one line, exit 2."""
        env = {**os.environ, "ACP_FLEET_API_KEY": key or fleet.api_keys["acme"]}
        started = time.monotonic()

        done = cli("connect", "--url", fleet.url, "--session", "0" * 32, env=env)

        assert time.monotonic() - started < 5
        assert done.returncode == 2
        assert done.stderr.count(b"\n") == 1
        assert message in done.stderr

    def test_an_ended_session_replays_its_output_and_exits_with_it(
        self, fleet: LocalFleet
    ) -> None:
        """Attaching to a session that has ended gives its output and its end."""
        first = connect(fleet, subprocess.DEVNULL, "--profile", "cat-exit")
        session_id = first.stderr.split()[-1].decode()

        again = connect(fleet, subprocess.DEVNULL, "--session", session_id)

        assert (again.stdout, again.returncode) == (b"done\n", 7)


async def _cancel(fleet: LocalFleet, session_id: str) -> None:
    async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
        await client.cancel(session_id)


class TestBackoff:
    def test_waits_double_up_to_the_cap(self) -> None:
        """The waits start small, double, and stay at the cap."""
        backoff = Backoff(window_s=60)

        delays = [backoff.next_delay_s() for _ in range(8)]

        assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]

    def test_no_wait_is_left_after_the_window(self) -> None:
        """A window of zero gives up at the first drop."""
        backoff = Backoff(window_s=0)

        assert backoff.next_delay_s() is None


class TestStdinBuffer:
    async def test_chunks_leave_in_order_once_acknowledged(self) -> None:
        """Chunks go out oldest first and stay until their number is acked."""
        buffer = StdinBuffer(max_bytes=100)
        for chunk in (b"a", b"b", b""):
            await buffer.put(chunk)

        sent = []
        for _ in range(3):
            sent.append(await buffer.next_unsent())
            buffer.mark_sent()
        buffer.acked(1)

        assert sent == [b"a", b"b", b""]
        assert buffer.rewind() == 2
        assert await buffer.next_unsent() == b"b"

    async def test_a_full_buffer_holds_the_reader_back(self) -> None:
        """A put past the bound waits until an ack frees room; none is dropped."""
        buffer = StdinBuffer(max_bytes=10)
        await buffer.put(b"x" * 8)

        blocked = asyncio.create_task(buffer.put(b"y" * 8))
        await asyncio.sleep(0.05)
        waited = not blocked.done()
        buffer.mark_sent()
        buffer.acked(1)
        await asyncio.wait_for(blocked, timeout=1)

        assert waited
        assert await buffer.next_unsent() == b"y" * 8
        assert buffer.buffered_bytes == 8


class TestOperatorCommands:
    def test_nodes_and_drain_speak_to_the_api(self, fleet: LocalFleet) -> None:
        """'nodes' lists the worker; 'drain' and 'drain --undo' answer 0."""
        env = {**os.environ, "ACP_FLEET_OPERATOR_KEY": fleet.operator_key}
        node = fleet.settings.worker.node

        listing = cli("nodes", "--url", fleet.url, env=env)
        drained = cli("drain", node, "--url", fleet.url, env=env)
        resumed = cli("drain", node, "--undo", "--url", fleet.url, env=env)

        assert listing.returncode == 0, listing.stderr
        assert node.encode() in listing.stdout
        assert b"queue:" in listing.stdout
        assert (drained.returncode, resumed.returncode) == (0, 0)

    def test_nodes_without_an_operator_key_explains(self, fleet: LocalFleet) -> None:
        """Without a key the command says which variable to set."""
        env = {k: v for k, v in os.environ.items() if k != "ACP_FLEET_OPERATOR_KEY"}

        done = cli("nodes", "--url", fleet.url, env=env)

        assert done.returncode == 2
        assert b"ACP_FLEET_OPERATOR_KEY" in done.stderr
