"""``acp-fleet top``: its frames from a snapshot, and the command on a fleet."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from scheduler.client import ApiError, FleetClient
from scheduler.top import BAR_WIDTH, render, watch
from shared.localfleet import REPO, LocalFleet, local_fleet
from tests.cli import cli
from tests.sandboxes import busybox_profile

BAR = "━"


def node(name: str = "node-a", **fields: Any) -> dict[str, Any]:
    """A node as ``GET /v1/fleet`` answers it, idle and active by default."""
    return {
        "node": name,
        "heartbeat_age_ms": 800,
        "capacity": 8,
        "sessions": 0,
        "draining": False,
        "drain_requested": False,
        "started_ms": 0,
        "pools": {},
        "drain": None,
        "states": {},
        **fields,
    }


def snapshot(
    *nodes: dict[str, Any],
    depth: int = 0,
    oldest_wait_ms: int | None = None,
    sessions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A whole answer of ``GET /v1/fleet``."""
    listed = sessions or []
    return {
        "nodes": list(nodes),
        "queue": {"depth": depth, "oldest_wait_ms": oldest_wait_ms},
        "sessions": listed,
        "sessions_total": len(listed),
    }


def frame(view: dict[str, Any], **kwargs: Any) -> str:
    """The frame as a plain, colourless terminal of 100 columns shows it."""
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None)
    console.print(render(view, **kwargs))
    return out.getvalue()


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


def draining(sessions: int, at_start: int | None) -> dict[str, Any]:
    """A draining node; without ``at_start`` as when SIGTERM stops its worker."""
    drain = None
    if at_start is not None:
        drain = {"requested_ms": 1, "sessions_at_start": at_start}
    return node(
        sessions=sessions,
        draining=True,
        drain_requested=drain is not None,
        drain=drain,
        states={"running": sessions},
    )


class TestRenderNodes:
    def test_a_draining_node_shows_sessions_left_and_progress(self) -> None:
        """Two of five sessions left: 3/5 ended and a bar three fifths long."""
        text = frame(snapshot(draining(sessions=2, at_start=5)))

        line = line_with(text, "draining:")
        assert "node-a draining: 2 sessions left" in line
        assert "3/5 ended" in line
        assert line.count(BAR) == BAR_WIDTH * 3 // 5

    def test_one_session_left_is_singular(self) -> None:
        """The count reads as a sentence: 1 session left."""
        text = frame(snapshot(draining(sessions=1, at_start=2)))

        assert "node-a draining: 1 session left" in text

    def test_a_finished_drain_shows_a_full_bar_and_drained(self) -> None:
        """With no session left the node reads drained and the bar is full."""
        text = frame(snapshot(draining(sessions=0, at_start=4)))

        assert line_with(text, "draining:").count(BAR) == BAR_WIDTH
        assert "4/4 ended" in text
        assert "drained" in line_with(text, "node-a  ")

    def test_a_drain_without_a_recorded_start_has_no_bar(self) -> None:
        """A worker stopping on SIGTERM shows sessions left, with no bar."""
        text = frame(snapshot(draining(sessions=3, at_start=None)))

        line = line_with(text, "draining:")
        assert "node-a draining: 3 sessions left" in line
        assert BAR not in line

    def test_a_requested_drain_not_yet_followed_says_so(self) -> None:
        """Before the worker's next heartbeat the node reads drain requested."""
        request = {"requested_ms": 1, "sessions_at_start": 1}
        waiting = node(sessions=1, drain_requested=True, drain=request)

        text = frame(snapshot(waiting))

        assert "drain requested" in text
        assert "0/1 ended" in text

    def test_sessions_per_state_and_capacity_are_shown(self) -> None:
        """A node's row counts starting and running sessions against capacity."""
        busy = node(sessions=3, states={"starting": 1, "running": 2})

        row = line_with(frame(snapshot(busy)), "node-a  ")

        assert row.split()[1:6] == ["0.8s", "3/8", "1", "2", "active"]

    def test_a_stale_heartbeat_shows_its_age(self) -> None:
        """A node silent for a minute shows 1m00s as its beat."""
        text = frame(snapshot(node(heartbeat_age_ms=60_000)))

        assert "1m00s" in line_with(text, "node-a  ")

    def test_an_empty_fleet_says_what_to_start(self) -> None:
        """With no node the frame says so and names the command to run."""
        text = frame(snapshot())

        assert "No worker node has sent a heartbeat" in text
        assert "acp-fleet worker" in text
        assert "queue: empty" in text


class TestRenderPools:
    def pool(self, ready: int, target: int, **fields: Any) -> dict[str, Any]:
        return {
            "ready": ready,
            "target": target,
            "member_ages_s": list(range(ready)),
            "hits": 0,
            "misses": 0,
            "backing_off": False,
            **fields,
        }

    def test_a_filling_pool_shows_ready_of_target(self) -> None:
        """One of four ready: 1/4, a quarter of a bar, and filling."""
        pools = {"claude": self.pool(1, 4)}

        line = line_with(frame(snapshot(node(pools=pools))), "claude")

        assert "1/4" in line
        assert line.count(BAR) == BAR_WIDTH // 4
        assert "filling" in line

    def test_a_full_pool_reads_ready_with_its_members_ages(self) -> None:
        """A full pool's bar is whole and every member's age is listed."""
        pools = {"claude": self.pool(2, 2, member_ages_s=[5, 75])}

        line = line_with(frame(snapshot(node(pools=pools))), "claude")

        assert line.count(BAR) == BAR_WIDTH
        assert "5s 1m15s" in line
        assert line.rstrip().endswith("ready")

    def test_many_members_show_youngest_and_oldest(self) -> None:
        """Past a few members only the youngest and the oldest age are shown."""
        pools = {"claude": self.pool(5, 5, member_ages_s=[1, 2, 3, 4, 7200])}

        line = line_with(frame(snapshot(node(pools=pools))), "claude")

        assert "1s … 2h00m" in line

    def test_a_pool_backing_off_says_so(self) -> None:
        """A pool whose refills fail shows backing off."""
        pools = {"claude": self.pool(0, 2, backing_off=True)}

        line = line_with(frame(snapshot(node(pools=pools))), "claude")

        assert "backing off" in line


class TestRenderSessionsAndQueue:
    def test_queue_depth_and_oldest_wait_are_shown(self) -> None:
        """Three waiting, the oldest for 12.5 s."""
        text = frame(snapshot(node(), depth=3, oldest_wait_ms=12_500))

        assert "queue: 3 waiting, oldest waiting 12s" in text
        assert "3 queued" in text

    def test_running_sessions_show_org_profile_node_and_age(self) -> None:
        """A session's row has its short id, owner, profile, node, state, age."""
        session = {
            "id": "0123456789abcdef" * 2,
            "org": "acme",
            "profile": "claude",
            "node": "node-a",
            "state": "running",
            "age_ms": 65_000,
            "start": "warm",
        }
        view = snapshot(node(sessions=1), sessions=[session])
        view["sessions_total"] = 7

        text = frame(view)

        assert "sessions (1 of 7, oldest first)" in text
        row = line_with(text, "0123456789ab ")
        assert row.split() == [
            "0123456789ab",
            "acme",
            "claude",
            "node-a",
            "running",
            "1m05s",
            "warm",
        ]

    def test_no_running_session_is_said_plainly(self) -> None:
        """An idle fleet says that no session runs."""
        assert "no sessions running" in frame(snapshot(node()))

    def test_a_notice_heads_the_frame(self) -> None:
        """A failed refresh is shown above the last good frame."""
        text = frame(snapshot(node()), notice="cannot reach x; retrying")

        assert text.splitlines()[0] == "cannot reach x; retrying"


class TestAges:
    @pytest.mark.parametrize(
        ("ms", "shown"),
        [
            (0, "0.0s"),
            (850, "0.8s"),
            (9_940, "9.9s"),
            (42_000, "42s"),
            (185_000, "3m05s"),
            (7_620_000, "2h07m"),
            (-5, "0.0s"),
        ],
    )
    def test_ages_are_short_and_keep_their_unit(self, ms: int, shown: str) -> None:
        """Tenths below 10 s, then seconds, minutes and hours; never negative."""
        view = snapshot(node(), depth=1, oldest_wait_ms=ms)

        assert f"oldest waiting {shown}" in frame(view)


class Stop(Exception):
    """Ends a watch from inside the stub, as q would."""


class Hang:
    """A scheduler that never answers; this process gets SIGTERM meanwhile,
    as an operator's ``kill`` would send it."""


class StubClient:
    """Answers ``fleet`` from a script: a snapshot, an exception to raise,
    or a hang."""

    base_url = "http://fleet.test"

    def __init__(self, *answers: dict[str, Any] | Exception | Hang) -> None:
        self.answers = list(answers)

    async def fleet(self, *, sessions_limit: int) -> dict[str, Any]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, Hang):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.Future()
        assert isinstance(answer, dict)
        return answer


class TestWatch:
    async def watch(self, client: StubClient, *, terminal: bool = True) -> str:
        out = io.StringIO()
        console = Console(
            file=out, width=100, color_system=None, force_terminal=terminal
        )
        with pytest.raises(Stop):
            await watch(
                client,  # type: ignore[arg-type]
                interval_s=0.01,
                sessions_limit=20,
                console=console,
            )
        return out.getvalue()

    async def test_a_lost_scheduler_is_shown_over_the_last_frame(self) -> None:
        """A refresh that cannot connect keeps the last frame and says why."""
        client = StubClient(
            snapshot(node("node-a")),
            httpx.ConnectError("connection refused"),
            Stop(),
        )

        text = await self.watch(client)

        assert re.search(
            r"cannot reach http://fleet.test: connection refused; retrying;"
            r" shown as read at \d\d:\d\d:\d\d",
            text,
        )
        assert "node-a" in text

    async def test_a_scheduler_error_is_retried_and_a_refusal_ends_it(self) -> None:
        """A 503 becomes a notice; a 401 afterwards ends the watch."""
        client = StubClient(
            snapshot(node("node-a")),
            ApiError(503, "unavailable", "Redis is unreachable"),
            snapshot(node("node-b")),
            ApiError(401, "operator_required", "no"),
        )

        with pytest.raises(ApiError) as refused:
            await watch(
                client,  # type: ignore[arg-type]
                interval_s=0.01,
                sessions_limit=20,
                console=Console(file=io.StringIO(), color_system=None),
            )

        assert refused.value.status == 401
        assert client.answers == []

    async def test_another_service_answering_is_retried_as_a_notice(self) -> None:
        """A refresh answered by something that is not a scheduler keeps the
        last frame and says so, rather than ending the watch."""
        client = StubClient(
            snapshot(node("node-a")), ValueError("not a fleet view"), Stop()
        )

        text = await self.watch(client)

        assert "http://fleet.test does not answer as a scheduler; retrying" in text
        assert "node-a" in text

    async def test_refreshes_show_the_newest_answer(self) -> None:
        """Each tick renders what the scheduler answered last."""
        client = StubClient(snapshot(node("node-a")), snapshot(node("node-b")), Stop())

        text = await self.watch(client)

        assert "node-b" in text
        assert "cannot reach" not in text

    @pytest.mark.parametrize("terminal", [True, False])
    async def test_sigterm_quits_without_waiting_for_the_answer(
        self, terminal: bool
    ) -> None:
        """SIGTERM while the scheduler is slow to answer ends the watch at
        once, as q does, leaving the last frame shown."""
        client = StubClient(snapshot(node("node-a")), Hang())
        out = io.StringIO()
        console = Console(
            file=out, width=100, color_system=None, force_terminal=terminal
        )

        await asyncio.wait_for(
            watch(
                client,  # type: ignore[arg-type]
                interval_s=0.01,
                sessions_limit=20,
                console=console,
            ),
            timeout=5,
        )

        assert client.answers == []
        assert "node-a" in out.getvalue()

    async def test_off_a_terminal_each_frame_follows_the_last(self) -> None:
        """Into a pipe or a file every frame is printed whole, in the order
        read, with no cursor movement."""
        client = StubClient(
            snapshot(node("node-a")),
            snapshot(node("node-b")),
            httpx.ConnectError("connection refused"),
            Stop(),
        )

        text = await self.watch(client, terminal=False)

        assert text.count("queue: empty") == 3
        assert len(re.findall(r"^at \d\d:\d\d:\d\d$", text, re.MULTILINE)) == 3
        first, second, third = (
            text.index(needle)
            for needle in ("node-a", "node-b", "cannot reach http://fleet.test")
        )
        assert first < second < third
        assert "\x1b" not in text


# The top tests' own fleet: a pool to watch fill, sessions that wait, and
# heartbeats often enough that a drain shows within a second.
POOL_SIZE = 2


@pytest.fixture(scope="module")
def watched(redis_url: str, docker_images: None) -> Iterator[LocalFleet]:
    """A worker with a warm pool and a profile whose sessions stay running."""
    with local_fleet(
        {
            "pooled": {**busybox_profile("cat"), "pool": {"size": POOL_SIZE}},
            "sleep": busybox_profile("sleep 600"),
        },
        redis_url=redis_url,
        orgs={"acme": {"max_sessions": 8, "sessions_per_minute": 10_000}},
        worker={"heartbeat_ms": 300, "lease_ms": 3000, "kill_grace_s": 1.0},
    ) as fleet:
        yield fleet


def operator_env(fleet: LocalFleet) -> dict[str, str]:
    return {**os.environ, "ACP_FLEET_OPERATOR_KEY": fleet.operator_key}


async def until(
    fleet: LocalFleet, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the fleet view until ``check`` holds for it (or fail)."""
    deadline = time.monotonic() + 30
    async with FleetClient(fleet.url, fleet.operator_key) as ops:
        while True:
            view = await ops.fleet()
            if check(view):
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"the fleet never got there: {view}")
            await asyncio.sleep(0.1)


def read_until(fd: int, needle: bytes, timeout_s: float = 20) -> bytes:
    """Read a terminal's output until ``needle`` shows (or fail)."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while needle not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"never shown: {needle!r} in {seen[-2000:]!r}")
        readable, _, _ = select.select([fd], [], [], 0.1)
        if readable:
            seen += os.read(fd, 65536)
    return seen


def drain_until_exit(
    fd: int, process: subprocess.Popen[bytes], timeout_s: float = 10
) -> None:
    """Read and drop a terminal's output until ``process`` exits (or fail)."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError("the view did not quit")
        readable, _, _ = select.select([fd], [], [], 0.1)
        if readable:
            os.read(fd, 65536)


@dataclass
class Terminal:
    """``acp-fleet top`` on a pseudo-terminal, and the terminal's settings
    from before it started."""

    controller: int
    terminal: int
    before: list[Any]
    process: subprocess.Popen[bytes]
    err: bytes = b""


@contextlib.contextmanager
def top_on_a_terminal(fleet: LocalFleet) -> Iterator[Terminal]:
    """``acp-fleet top`` refreshing every 0.2 s on a new pseudo-terminal;
    killed, if still running, and its stderr kept on the way out."""
    controller, terminal = pty.openpty()
    before = termios.tcgetattr(terminal)
    args = ["top", "--interval-s", "0.2", "--url", fleet.url]
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *args],
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env={**operator_env(fleet), "TERM": "xterm", "COLUMNS": "100"},
        cwd=REPO,
    )
    view = Terminal(controller, terminal, before, process)
    try:
        yield view
    finally:
        process.kill()
        _, view.err = process.communicate(timeout=10)
        os.close(controller)
        os.close(terminal)


def wait_for_state(pid: int, state: str, timeout_s: float = 10) -> None:
    """Wait until the kernel reports process ``pid`` in ``state`` (or fail)."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != state:
        assert time.monotonic() < deadline, f"process {pid} never reached {state}"
        time.sleep(0.02)


def piped_top(fleet: LocalFleet) -> subprocess.Popen[bytes]:
    """``acp-fleet top`` refreshing every 0.2 s into pipes, stdin closed."""
    args = ["top", "--interval-s", "0.2", "--url", fleet.url]
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=operator_env(fleet),
        cwd=REPO,
    )


def ours(fleet: LocalFleet, view: dict[str, Any]) -> dict[str, Any]:
    """The worker's node in ``view``; a node without a first heartbeat yet
    is listed as one with nothing in it."""
    name = fleet.settings.worker.node
    empty = {"pools": {}, "sessions": 0, "draining": False}
    found: dict[str, Any] = next((n for n in view["nodes"] if n["node"] == name), empty)
    return found


class TestTopCommand:
    async def test_once_shows_the_node_its_pool_and_the_queue(
        self, watched: LocalFleet
    ) -> None:
        """One frame names the worker's node, its full pool and the queue."""
        await until(
            watched,
            lambda v: (
                ours(watched, v)["pools"].get("pooled", {}).get("ready") == POOL_SIZE
            ),
        )

        done = cli("top", "--once", "--url", watched.url, env=operator_env(watched))

        text = done.stdout.decode()
        assert done.returncode == 0, done.stderr
        node = watched.settings.worker.node
        assert "active" in line_with(text, node + " ")
        pool = line_with(text, "pooled")
        assert node in pool
        assert f"{POOL_SIZE}/{POOL_SIZE}" in pool
        assert "queue: empty" in text

    async def test_a_drain_shows_its_progress_and_the_waiting_queue(
        self, watched: LocalFleet
    ) -> None:
        """While draining: sessions left of those at its start, and the queue."""
        node = watched.settings.worker.node
        env = operator_env(watched)
        async with FleetClient(watched.url, watched.api_key) as client:
            running = await client.create_session("sleep")
            await until(
                watched,
                lambda v: (
                    [s["state"] for s in v["sessions"]] == ["running"]
                    and ours(watched, v)["sessions"] == 1
                ),
            )
            try:
                assert cli("drain", node, "--url", watched.url, env=env).returncode == 0
                await until(watched, lambda v: ours(watched, v)["draining"])
                waiting = await client.create_session("sleep")
                await until(watched, lambda v: v["queue"]["depth"] == 1)
                during = cli("top", "--once", "--url", watched.url, env=env)

                await client.cancel(running["id"])
                await until(watched, lambda v: ours(watched, v)["sessions"] == 0)
                after = cli("top", "--once", "--url", watched.url, env=env)
            finally:
                cli("drain", node, "--undo", "--url", watched.url, env=env)
            await client.cancel(waiting["id"])

        text = during.stdout.decode()
        assert during.returncode == 0, during.stderr
        assert f"{node} draining: 1 session left" in text
        assert "0/1 ended" in text
        assert "queue: 1 waiting, oldest waiting" in text
        row = line_with(text, running["id"][:12])
        assert row.split()[1:5] == ["acme", "sleep", node, "running"]
        assert "1/1 ended" in after.stdout.decode()
        assert "drained" in line_with(after.stdout.decode(), node + " ")

    def test_the_live_view_refreshes_and_quits_on_ctrl_c(
        self, watched: LocalFleet
    ) -> None:
        """Refreshing every 0.2 s, Ctrl-C ends it with status 0, no traceback."""
        live = piped_top(watched)
        time.sleep(2)
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=30)

        assert live.returncode == 0, err
        assert b"Traceback" not in err
        assert watched.settings.worker.node.encode() in out

    def test_into_a_pipe_frames_stream_until_the_reader_leaves(
        self, watched: LocalFleet
    ) -> None:
        """Piped, the view prints frame after frame at once, and ends quietly
        with status 1 when the reader closes the pipe, as ``| head`` does."""
        live = piped_top(watched)
        assert live.stdout is not None
        assert live.stderr is not None
        try:
            shown = b""
            deadline = time.monotonic() + 20
            while shown.count(b"queue:") < 3:
                assert time.monotonic() < deadline, f"not three frames: {shown!r}"
                readable, _, _ = select.select([live.stdout], [], [], 0.1)
                if readable:
                    chunk = os.read(live.stdout.fileno(), 65536)
                    assert chunk, "the view ended before three frames"
                    shown += chunk
            live.stdout.close()
            status = live.wait(timeout=10)
        finally:
            live.kill()
        err = live.stderr.read()
        live.stderr.close()

        assert watched.settings.worker.node.encode() in shown
        assert status == 1, err
        assert err == b""

    @pytest.mark.parametrize("how", ["q", "SIGTERM", "SIGHUP"])
    def test_q_or_a_signal_on_a_terminal_quits_and_restores_it(
        self, watched: LocalFleet, how: str
    ) -> None:
        """On a terminal, q, SIGTERM or SIGHUP ends the view with 0 and the
        terminal is as it was, echo included."""
        with top_on_a_terminal(watched) as view:
            shown = read_until(view.controller, watched.settings.worker.node.encode())
            if how == "q":
                os.write(view.controller, b"q")
            else:
                view.process.send_signal(getattr(signal, how))
            # The view writes on: reading on keeps it from blocking on a full
            # terminal before it sees the key.
            drain_until_exit(view.controller, view.process)
            after = termios.tcgetattr(view.terminal)

        assert watched.settings.worker.node.encode() in shown
        assert view.process.returncode == 0, view.err
        assert b"Traceback" not in view.err
        assert after[3] & termios.ECHO
        assert after == view.before

    def test_ctrl_z_gives_the_terminal_back_and_fg_takes_it_again(
        self, watched: LocalFleet
    ) -> None:
        """Suspended, the view leaves the terminal as it found it, cursor
        shown; continued, it reads keys again, so q still quits."""
        with top_on_a_terminal(watched) as view:
            read_until(view.controller, watched.settings.worker.node.encode())
            view.process.send_signal(signal.SIGTSTP)
            shown = read_until(view.controller, b"\x1b[?25h")
            wait_for_state(view.process.pid, "T")
            while_stopped = termios.tcgetattr(view.terminal)
            view.process.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 10
            while termios.tcgetattr(view.terminal)[3] & termios.ECHO:
                assert time.monotonic() < deadline, "the view never took keys again"
                time.sleep(0.05)
            os.write(view.controller, b"q")
            drain_until_exit(view.controller, view.process)
            after = termios.tcgetattr(view.terminal)

        assert b"\x1b[?25h" in shown
        assert while_stopped == view.before
        assert view.process.returncode == 0, view.err
        assert after == view.before

    def test_a_wrong_operator_key_is_one_line_and_exit_2(
        self, watched: LocalFleet
    ) -> None:
        """An organisation's key is refused with the API's reason, no traceback."""
        env = {**os.environ, "ACP_FLEET_OPERATOR_KEY": watched.api_key}

        done = cli("top", "--once", "--url", watched.url, env=env)

        assert done.returncode == 2
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("acp-fleet: top: 403 operator_required: ")
        assert done.stdout == b""


class TestTopCommandAlone:
    def test_an_unreachable_scheduler_is_one_line_and_exit_2(self) -> None:
        """A scheduler that does not answer is named in one line."""
        env = {**os.environ, "ACP_FLEET_OPERATOR_KEY": "afo_x"}

        done = cli("top", "--once", "--url", "http://127.0.0.1:1", env=env)

        assert done.returncode == 2
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("acp-fleet: top: cannot reach http://127.0.0.1:1")

    def test_without_an_operator_key_it_names_the_variable(self) -> None:
        """With no key set the command says which variable to set."""
        env = {k: v for k, v in os.environ.items() if k != "ACP_FLEET_OPERATOR_KEY"}

        done = cli("top", "--once", env=env)

        assert done.returncode == 2
        assert b"ACP_FLEET_OPERATOR_KEY" in done.stderr

    def test_help_explains_the_view_and_its_options(self) -> None:
        """--help says what is shown, how to quit, and names every option."""
        done = cli("top", "--help", env=dict(os.environ))

        text = " ".join(done.stdout.decode().split())
        assert done.returncode == 0
        for words in ("--interval-s", "--once", "--url", "--sessions"):
            assert words in text
        assert "Press q or Ctrl-C to quit" in text
        assert "ACP_FLEET_OPERATOR_KEY" in text

    @pytest.mark.parametrize("interval", ["0", "-1", "0.05", "soon", "nan", "inf"])
    def test_an_interval_under_a_tenth_or_not_a_number_is_refused(
        self, interval: str
    ) -> None:
        """--interval-s takes a tenth of a second or more and says so."""
        env = {**os.environ, "ACP_FLEET_OPERATOR_KEY": "afo_x"}

        done = cli("top", "--interval-s", interval, env=env)

        assert done.returncode == 2
        assert b"expected at least 0.1 seconds" in done.stderr

    @pytest.mark.parametrize("count", ["0", "-1", "many", "2.5"])
    def test_a_session_count_that_is_not_positive_is_refused(self, count: str) -> None:
        """--sessions takes a positive whole number and names the flag."""
        env = {**os.environ, "ACP_FLEET_OPERATOR_KEY": "afo_x"}

        done = cli("top", "--once", "--sessions", count, env=env)

        assert done.returncode == 2
        stderr = done.stderr.decode()
        assert "argument --sessions: expected a positive whole number" in stderr
        assert done.stdout == b""
