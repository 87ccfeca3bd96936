"""``acp-fleet top``: the operators' live view of nodes, pools, sessions, queue.

Rendering is a pure function of one ``GET /v1/fleet`` answer, so it can be
checked without a terminal; the loop around it only fetches, renders and
waits for the next tick or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import time
import tty
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import httpx
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from scheduler.client import ApiError, FleetClient

# Wide enough to read a fraction at a glance, narrow enough for 80 columns.
BAR_WIDTH = 12
# Pool members listed one by one up to this many; beyond, youngest and oldest.
AGES_LISTED = 3
# A heartbeat older than this many of its usual 2 s periods looks stale.
STALE_BEAT_MS = 3 * 2000
# An id prefix of this length is unique among the sessions one screen shows.
SHORT_ID = 12

Snapshot = Mapping[str, Any]
T = TypeVar("T")


def render(view: Snapshot, *, notice: str | None = None) -> RenderableType:
    """Return one frame of the view of ``GET /v1/fleet``'s answer ``view``.

    Args:
        view: the answer, as JSON.
        notice: a line to show above the frame, such as a failed refresh.
    """
    parts: list[RenderableType] = []
    if notice:
        parts.append(Text(notice, style="bold red"))
    parts.append(_summary(view))
    if not view["nodes"]:
        parts.append(
            Text(
                "No worker node has sent a heartbeat: start 'acp-fleet worker' "
                "on each node (with the same redis_url and key_prefix).",
                style="yellow",
            )
        )
    else:
        parts.extend(_node_sections(view))
    parts.append(_queue(view["queue"]))

    return Group(*parts)


def _summary(view: Snapshot) -> Text:
    nodes = view["nodes"]
    capacity = sum(node["capacity"] for node in nodes)
    running = sum(node["sessions"] for node in nodes)
    return Text(
        f"ACP Fleet: {len(nodes)} node(s), {running}/{capacity} sessions, "
        f"{view['queue']['depth']} queued",
        style="bold",
    )


def _node_sections(view: Snapshot) -> list[RenderableType]:
    sections: list[RenderableType] = [_nodes_table(view["nodes"])]
    drains = [_drain_line(node) for node in view["nodes"] if _is_draining(node)]
    sections.extend(drains)
    if any(node["pools"] for node in view["nodes"]):
        sections.append(_pools_table(view["nodes"]))
    sections.append(_sessions_table(view))

    return sections


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = _table("nodes")
    table.add_column("node", no_wrap=True)
    table.add_column("beat", justify="right")
    table.add_column("sessions", justify="right")
    table.add_column("starting", justify="right")
    table.add_column("running", justify="right")
    table.add_column("state", no_wrap=True)
    for node in nodes:
        stale = node["heartbeat_age_ms"] > STALE_BEAT_MS
        states = node.get("states", {})
        table.add_row(
            node["node"],
            Text(_age(node["heartbeat_age_ms"]), style="red" if stale else ""),
            f"{node['sessions']}/{node['capacity']}",
            str(states.get("starting", 0)),
            str(states.get("running", 0)),
            _node_state(node),
        )
    return table


def _node_state(node: Mapping[str, Any]) -> Text:
    if not _is_draining(node):
        return Text("active", style="green")
    if node["sessions"] == 0 and node["draining"]:
        return Text("drained", style="cyan")
    if not node["draining"]:
        # The worker follows a request at its next heartbeat.
        return Text("drain requested", style="yellow")
    return Text("draining", style="yellow")


def _is_draining(node: Mapping[str, Any]) -> bool:
    return bool(node["draining"] or node["drain_requested"])


def _drain_line(node: Mapping[str, Any]) -> RenderableType:
    """ "draining: N sessions left", with a bar from the count at its start
    when operators asked for it (a worker stopped by a signal has none)."""
    left = node["sessions"]
    noun = "session" if left == 1 else "sessions"
    text = Text(f"{node['node']} draining: {left} {noun} left")
    at_start = (node.get("drain") or {}).get("sessions_at_start")
    if at_start is None:
        return text

    # Heartbeats lag the request, so the count may briefly exceed its start.
    total = max(at_start, left)
    row = Table.grid(padding=(0, 1))
    row.add_row(text, _bar(total - left, total), f"{total - left}/{total} ended")
    return row


def _pools_table(nodes: list[dict[str, Any]]) -> Table:
    table = _table("warm pools")
    table.add_column("node", no_wrap=True)
    table.add_column("pool", no_wrap=True)
    table.add_column("ready/target", no_wrap=True)
    table.add_column("member ages", no_wrap=True)
    table.add_column("hit/miss", justify="right")
    table.add_column("state", no_wrap=True)
    for node in nodes:
        for name, pool in node["pools"].items():
            table.add_row(
                node["node"],
                name,
                _fraction(pool["ready"], pool["target"]),
                _member_ages(pool),
                f"{pool.get('hits', 0)}/{pool.get('misses', 0)}",
                _pool_state(pool),
            )
    return table


def _member_ages(pool: Mapping[str, Any]) -> str:
    ages_s = pool.get("member_ages_s")
    if ages_s is None:
        # A worker older than this view reports its oldest member only.
        oldest_s = pool.get("oldest_age_s", 0)
        return f"oldest {_seconds(oldest_s)}" if pool["ready"] else "-"
    ages = [_seconds(age_s) for age_s in ages_s]
    if len(ages) > AGES_LISTED:
        return f"{ages[0]} … {ages[-1]}"
    return " ".join(ages) or "-"


def _pool_state(pool: Mapping[str, Any]) -> Text:
    if pool.get("backing_off"):
        return Text("backing off", style="red")
    if pool["ready"] < pool["target"]:
        return Text("filling", style="yellow")
    return Text("ready", style="green")


def _sessions_table(view: Snapshot) -> RenderableType:
    sessions = view.get("sessions", [])
    total = view.get("sessions_total", len(sessions))
    if not sessions:
        return Text("no sessions running")

    table = _table(f"sessions ({len(sessions)} of {total}, oldest first)")
    for name in ("id", "org", "profile", "node", "state", "age", "start"):
        table.add_column(name, no_wrap=name in ("id", "node"))
    for session in sessions:
        table.add_row(
            session["id"][:SHORT_ID],
            session["org"],
            session["profile"],
            session["node"],
            session["state"],
            _age(session["age_ms"]),
            session.get("start") or "-",
        )
    return table


def _queue(queue: Mapping[str, Any]) -> Text:
    if not queue["depth"]:
        return Text("queue: empty")
    wait_ms = queue["oldest_wait_ms"]
    oldest = "" if wait_ms is None else f", oldest waiting {_age(wait_ms)}"
    return Text(f"queue: {queue['depth']} waiting{oldest}", style="bold")


def _fraction(done: int, total: int) -> Table:
    """``done/total`` followed by a bar of it."""
    cell = Table.grid(padding=(0, 1))
    cell.add_row(Text(f"{done}/{total}", justify="right"), _bar(done, total))
    return cell


def _bar(done: int, total: int) -> ProgressBar:
    # An empty target (a pool of size 0) counts as complete.
    return ProgressBar(
        total=max(total, 1), completed=done if total else 1, width=BAR_WIDTH
    )


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))


def _seconds(age_s: int) -> str:
    """Whole seconds (as pools report them) as a short age."""
    return f"{age_s}s" if age_s < 60 else _age(age_s * 1000)


def _age(ms: int) -> str:
    """Milliseconds as a short age: ``0.8s``, ``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(ms, 0) / 1000
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


async def top(
    url: str,
    operator_key: str,
    *,
    once: bool,
    interval_s: float,
    sessions_limit: int,
) -> None:
    """Show the fleet at ``url`` on stdout: one frame, or live until quit.

    Raises:
        scheduler.client.ApiError: the scheduler refused the key.
        httpx.HTTPError: the scheduler could not be reached.
    """
    console = Console()
    # A scheduler that does not answer within a few refreshes is reported
    # rather than waited for.
    async with FleetClient(url, operator_key, timeout_s=5) as client:
        if once:
            console.print(render(await client.fleet(sessions_limit=sessions_limit)))
            return
        await watch(
            client,
            interval_s=interval_s,
            sessions_limit=sessions_limit,
            console=console,
        )


async def watch(
    client: FleetClient,
    *,
    interval_s: float,
    sessions_limit: int,
    console: Console,
) -> None:
    """Refresh the view in place every ``interval_s`` until ``q`` or Ctrl-C;
    on a console that is not a terminal, print each new frame after the last.

    The first read's errors reach the caller, so a wrong URL or key stops
    at once; a later failure to reach the scheduler (or a 5xx from it) is
    shown above the last frame and retried at the next tick.

    Raises:
        scheduler.client.ApiError: the scheduler refused the call.
        httpx.HTTPError: the first read did not reach the scheduler.
    """
    view: Snapshot = await client.fleet(sessions_limit=sessions_limit)
    # Keys are read from before the first frame, so a q typed as soon as
    # the view shows is not lost in the switch of terminal modes.
    with _quit_key() as quit_pressed, _quit_on_signals(quit_pressed):

        async def refresh_until_quit(show: Callable[[RenderableType], object]) -> None:
            last, read_at = view, _clock()
            while not await _wait(quit_pressed, interval_s):
                # A quit does not wait for a scheduler slow to answer.
                read = await _unless_set(
                    quit_pressed, _refresh(client, last, sessions_limit)
                )
                if read is None:
                    return
                last, notice = read
                if notice is None:
                    read_at = _clock()
                else:
                    notice += f"; shown as read at {read_at}"
                show(render(last, notice=notice))

        if console.is_terminal:
            with Live(render(view), console=console, auto_refresh=False) as live:
                await refresh_until_quit(lambda frame: live.update(frame, refresh=True))
        else:
            # A pipe or a file cannot be redrawn: each frame follows the
            # last, printed as it is read, under the time it was printed.
            def print_frame(frame: RenderableType) -> None:
                console.print(Text(f"at {_clock()}", style="dim"))
                console.print(frame)

            print_frame(render(view))
            await refresh_until_quit(print_frame)


def _clock() -> str:
    """The time of day, as the operator's frames show it."""
    return time.strftime("%H:%M:%S")


async def _refresh(
    client: FleetClient, last: Snapshot, sessions_limit: int
) -> tuple[Snapshot, str | None]:
    """Return a new answer, or the last one with why it could not be read.

    A scheduler restarting or its Redis briefly gone should not end an
    operator's watch; a refused key should, and propagates.
    """
    try:
        return await client.fleet(sessions_limit=sessions_limit), None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        return last, f"cannot reach {client.base_url}: {reason}; retrying"
    except ApiError as exc:
        if exc.status < 500:
            raise
        return last, f"{client.base_url} answered {str(exc).rstrip('.')}; retrying"
    except ValueError:
        # Something else answers there now, perhaps while the scheduler is
        # replaced.
        return last, f"{client.base_url} does not answer as a scheduler; retrying"


async def _unless_set(event: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if ``event`` is set first (``work`` is
    then cancelled)."""
    running = asyncio.ensure_future(work)
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if not running.done():
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        return None
    return running.result()


@contextlib.contextmanager
def _quit_on_signals(quit_requested: asyncio.Event) -> Iterator[None]:
    """Take SIGTERM and SIGHUP as a quit, so that the terminal is restored
    as on q; the signals' handlers are given back on the way out."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGHUP)
    for signum in signals:
        loop.add_signal_handler(signum, quit_requested.set)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; return whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
    return event.is_set()


@contextlib.contextmanager
def _quit_key() -> Iterator[asyncio.Event]:
    """An event set when ``q`` is typed on a terminal's stdin.

    The terminal is put in cbreak mode (keys arrive unbuffered and are not
    echoed; Ctrl-C still interrupts) and restored on the way out, and
    while the view is suspended with Ctrl-Z.
    """
    pressed = asyncio.Event()
    if not sys.stdin.isatty():
        yield pressed
        return

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def read_key() -> None:
        key = os.read(fd, 1)
        if key in (b"q", b"Q"):
            pressed.set()
        elif not key:
            # The terminal hung up: it would be readable forever.
            loop.remove_reader(fd)

    def suspend() -> None:
        # Ctrl-Z: the shell gets its terminal back as it was, cursor shown,
        # then this stops as it would have without the handler.
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        _show_cursor(True)
        os.kill(os.getpid(), signal.SIGSTOP)

    def resume() -> None:
        # fg: the shell set the terminal as it likes; take it back.
        tty.setcbreak(fd, termios.TCSANOW)
        _show_cursor(False)

    # TCSANOW: the default TCSAFLUSH would drop keys typed before this.
    tty.setcbreak(fd, termios.TCSANOW)
    loop.add_reader(fd, read_key)
    loop.add_signal_handler(signal.SIGTSTP, suspend)
    loop.add_signal_handler(signal.SIGCONT, resume)
    try:
        yield pressed
    finally:
        loop.remove_signal_handler(signal.SIGCONT)
        loop.remove_signal_handler(signal.SIGTSTP)
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _show_cursor(shown: bool) -> None:
    """Show or hide the cursor of a terminal on stdout; the live view hides
    it while it draws. Written to the descriptor itself: the live view
    stands in for ``sys.stdout`` and would print the escape as text."""
    if os.isatty(1):
        os.write(1, b"\x1b[?25h" if shown else b"\x1b[?25l")
