"""Relay cost: the fleet's stdio path against a direct Docker attach.

Round trip of a 200-byte line through ``cat`` in a sandbox, and throughput
of 64 MiB of agent output, each measured through the whole fleet (client
WebSocket, scheduler, Redis streams, worker) and straight over an attach
socket to a container of the same image, in one run. The round trip is
also measured through the floor (``floor.py``): the fleet's hops with the
least code, which tells what the fleet's own work costs above them.
Both reach a Redis of their own by its unix socket, or with
``--redis-tcp`` over loopback TCP.

    .venv/bin/python bench/relay.py [--round-trips 500] [--mib 64] [--redis-tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop
from arguments import whole
from floor import floor_path
from leftovers import BENCH_FLEET, owned, remove_leftovers

from scheduler.client import ApiError, End, FleetClient
from shared.localfleet import local_fleet, redis_server, scratch_folder
from shared.settings import load_settings
from shared.wire import STDOUT, Output
from worker import frames
from worker.docker import (
    DockerRuntime,
    SandboxError,
    SandboxSpec,
    container_config,
    seccomp_profile,
)
from worker.frames import FrameDecoder

IMAGE = "acp-fleet/busybox:test"
LINE = b"x" * 199 + b"\n"
# Each path's round trips are taken in this many turns.
BLOCKS = 10

# Sends LINE along one path and waits until it is back.
Trip = Callable[[], Awaitable[None]]

# How this machine's idle CPUs wait. On a KVM guest with the haltpoll
# driver, an idle vCPU polls for up to guest_halt_poll_ns before it halts,
# and waking a halted one costs each hand-off between processes an exit to
# the host: the fleet's path has more than twice the direct attach's hand-offs.
CPUIDLE_DRIVER = Path("/sys/devices/system/cpu/cpuidle/current_driver")
HALT_POLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
KERNEL_HALT_POLL_NS = 200_000


def flood(size: int) -> str:
    """ACP-like output: ``size`` bytes in 200-byte lines."""
    return f"yes {'x' * 199} | head -c {size}"


def profile(script: str) -> dict[str, Any]:
    return {
        "image": IMAGE,
        "command": ["sh", "-c", script],
        "protocol": "raw",
        "limits": {"memory": "256m", "cpus": 1, "pids": 64},
    }


def sandbox_config(spec: SandboxSpec, script: str) -> dict[str, Any]:
    """The Engine API body of a hardened container that runs ``script``."""
    config = container_config(
        spec, fleet=BENCH_FLEET, node="bench", seccomp=seccomp_profile()
    )
    return owned({**config, "Cmd": ["sh", "-c", script]})


async def direct(
    runtime: DockerRuntime, spec: SandboxSpec, script: str
) -> tuple[Any, str]:
    config = sandbox_config(spec, script)
    # Docker removes the container once it exits, so that a benchmark
    # killed outright leaves none: its attach closes, and so stdin.
    config["HostConfig"] = {**config["HostConfig"], "AutoRemove": True}
    container_id = await runtime.create(config, name=f"bench-relay-{time.time_ns()}")
    try:
        stdio = await runtime.attach(container_id)
        await runtime.start(container_id)
    except BaseException:
        await discard(runtime, container_id)
        raise
    return stdio, container_id


async def discard(runtime: DockerRuntime, container_id: str) -> None:
    """Remove a direct container, which Docker may be removing already."""
    try:
        await runtime.remove(container_id)
    except SandboxError as exc:
        if exc.status != 409:
            raise


@contextlib.asynccontextmanager
async def direct_path(runtime: DockerRuntime, spec: SandboxSpec) -> AsyncIterator[Trip]:
    """A ``cat`` sandbox over a direct attach; yield one round trip."""
    stdio, container_id = await direct(runtime, spec, "cat")
    decoder = FrameDecoder()

    async def round_trip() -> None:
        await stdio.write(LINE)
        got = 0
        while got < len(LINE):
            got += sum(len(d) for _, d in decoder.feed(await stdio.read()))

    try:
        yield round_trip
    finally:
        stdio.abort()
        await discard(runtime, container_id)


async def direct_throughput(
    runtime: DockerRuntime, spec: SandboxSpec, size: int
) -> float:
    stdio, container_id = await direct(runtime, spec, flood(size))
    decoder, got, started = FrameDecoder(), 0, None
    try:
        while chunk := await stdio.read():
            for stream, data in decoder.feed(chunk):
                if stream == frames.STDOUT:
                    # Timed from the first byte of stdout, as through the fleet.
                    started = started or time.perf_counter()
                    got += len(data)
    finally:
        stdio.abort()
        await discard(runtime, container_id)
    assert got == size, f"read {got} of {size} bytes of stdout"
    assert started is not None
    return size / (time.perf_counter() - started)


@contextlib.asynccontextmanager
async def fleet_path(client: FleetClient) -> AsyncIterator[Trip]:
    """A ``cat`` session through the fleet; yield one round trip."""
    created = await client.create_session("cat")
    try:
        async with client.stdio(created["id"]) as stdio:
            events = stdio.events()

            async def round_trip() -> None:
                await stdio.send(LINE)
                got = 0
                while got < len(LINE):
                    event = await anext(events)
                    if isinstance(event, Output):
                        got += len(event.data)

            yield round_trip
    finally:
        await _end(client, created["id"])


async def _end(client: FleetClient, session_id: str) -> None:
    """Cancel the session, so that a benchmark stopped midway leaves its
    worker nothing to drain."""
    with contextlib.suppress(ApiError):
        await client.cancel(session_id)


async def interleaved(trips: list[Trip], n: int) -> list[list[float]]:
    """Time ``n`` round trips on each path, the paths taking turns in
    blocks, so that a slow spell of the machine falls on all of them."""
    samples: list[list[float]] = [[] for _ in trips]
    # One untimed trip each first: a path's first line also opens what the
    # rest reuse.
    for trip in trips:
        await trip()
    for block in range(BLOCKS):
        # The first n % BLOCKS blocks take one more, making n in all.
        count = n // BLOCKS + (block < n % BLOCKS)
        for trip, timed in zip(trips, samples, strict=True):
            for _ in range(count):
                started = time.perf_counter()
                await trip()
                timed.append(time.perf_counter() - started)
    return samples


async def fleet_throughput(client: FleetClient, size: int) -> float:
    created = await client.create_session("flood")
    got, started = 0, None
    try:
        async with client.stdio(created["id"]) as stdio:
            async for event in stdio.events():
                if isinstance(event, Output) and event.channel == STDOUT:
                    started = started or time.perf_counter()
                    got += len(event.data)
                elif isinstance(event, End):
                    break
    finally:
        await _end(client, created["id"])
    assert got == size, f"read {got} of {size} bytes of stdout"
    assert started is not None
    return size / (time.perf_counter() - started)


async def measure(fleet: Any, n: int, size: int) -> list[str]:
    settings = load_settings(fleet.config_path)
    runtime = DockerRuntime(settings.worker.docker_url)
    await runtime.open()
    await remove_leftovers(runtime)
    cat = settings.profiles["cat"]
    spec = SandboxSpec("bench", "cat", cat, cat.limits, IMAGE)
    try:
        direct_mbs = await direct_throughput(runtime, spec, size) / 1e6
        async with FleetClient(fleet.url, fleet.api_key) as client:
            async with (
                direct_path(runtime, spec) as direct_trip,
                floor_path(
                    fleet.redis_url,
                    settings.worker.docker_url,
                    sandbox_config(spec, "cat"),
                    LINE,
                ) as floor_trip,
                fleet_path(client) as fleet_trip,
            ):
                direct_rt, floor_rt, fleet_rt = await interleaved(
                    [direct_trip, floor_trip, fleet_trip], n
                )
            fleet_mbs = await fleet_throughput(client, size) / 1e6
    finally:
        await runtime.close()
    direct_ms, floor_ms, fleet_ms = (
        statistics.median(samples) * 1000 for samples in (direct_rt, floor_rt, fleet_rt)
    )
    ratio = fleet_mbs / direct_mbs
    added_ms = fleet_ms - direct_ms
    return [
        f"{'200-byte line round trip, median':<40}{direct_ms:>10.3f} ms"
        f"{floor_ms:>10.3f} ms{fleet_ms:>10.3f} ms   added {added_ms:.3f}"
        f" ms (floor {floor_ms - direct_ms:.3f} ms)",
        f"{f'{size >> 20} MiB of output, 200-byte lines':<40}"
        f"{direct_mbs:>7.1f} MB/s{'':>13}{fleet_mbs:>7.1f} MB/s   ratio {ratio:.2f}",
        f"targets: added median latency < 0.5 ms ({_verdict(added_ms < 0.5)});"
        f" throughput ratio >= 0.5 ({_verdict(ratio >= 0.5)})",
    ]


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def cpu_idle() -> str:
    """The machine's CPU idle settings, which move every round trip."""
    try:
        driver = CPUIDLE_DRIVER.read_text().strip()
    except OSError:
        return "CPU idle: no cpuidle driver found"
    if driver != "haltpoll":
        return f"CPU idle: driver {driver}"
    try:
        poll_us = int(HALT_POLL_NS.read_text()) / 1000
    except (OSError, ValueError):
        return "CPU idle: haltpoll, its polling time unreadable"
    return (
        f"CPU idle: haltpoll, a vCPU polls {poll_us:g} µs before it halts"
        f" (the kernel's default is {KERNEL_HALT_POLL_NS / 1000:g} µs)"
    )


async def until_terminated(work: Coroutine[Any, Any, list[str]]) -> list[str]:
    """Run ``work``, cancelling it on SIGTERM as on Ctrl-C, so that what it
    started is removed either way."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def terminate(signum: int, frame: object) -> None:
    """Outside the event loop, end on SIGTERM as on Ctrl-C: through the
    fleet's clean-up, which a second signal then does not cut short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--round-trips",
        type=whole(BLOCKS, 1_000_000),
        default=500,
        help=f"round trips on each path, taken in {BLOCKS} turns; {BLOCKS} to"
        " 1000000 (default: 500)",
    )
    parser.add_argument(
        "--mib",
        type=whole(1, 4096),
        default=64,
        help="MiB of output, 1 to 4096 (default: 64)",
    )
    parser.add_argument(
        "--redis-tcp",
        action="store_true",
        help="reach Redis over loopback TCP, as from another node, instead of "
        "its unix socket, as on one node",
    )
    args = parser.parse_args()
    size = args.mib << 20
    profiles = {"cat": profile("cat"), "flood": profile(flood(size))}
    signal.signal(signal.SIGTERM, terminate)
    try:
        rows = run(profiles, args.round_trips, size, tcp=args.redis_tcp)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    redis = "loopback TCP" if args.redis_tcp else "a unix socket"
    print(f"\nrelay, Redis on {redis}\n{cpu_idle()}")
    print(f"{'':<40}{'direct':>13}{'floor':>13}{'fleet':>13}")
    print("\n".join(rows))


def run(profiles: dict[str, Any], n: int, size: int, *, tcp: bool) -> list[str]:
    with contextlib.ExitStack() as stack:
        if tcp:
            url = stack.enter_context(redis_server())
        else:
            folder = stack.enter_context(scratch_folder())
            url = stack.enter_context(redis_server(unix_socket=folder / "sock"))
        fleet = stack.enter_context(
            local_fleet(
                profiles,
                redis_url=url,
                orgs={"bench": {"max_sessions": 10, "sessions_per_minute": 1000}},
            )
        )
        # The harness runs on uvloop, as the fleet's processes do, so that
        # the client's own cost stays small beside what it measures.
        try:
            rows = uvloop.run(until_terminated(measure(fleet, n, size)))
        except asyncio.CancelledError:
            # SIGTERM, taken by the loop: clean up as terminate() does.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise SystemExit(128 + signal.SIGTERM) from None
        # The loop gave SIGTERM back to the default as it closed.
        signal.signal(signal.SIGTERM, terminate)
        return rows


if __name__ == "__main__":
    main()
