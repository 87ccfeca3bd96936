"""Start-up latency: POST /v1/sessions to the agent's first byte at the client.

Runs, in one process and on one machine: a bare create-attach-start through
the Docker API with the same hardened container, then sessions through the
whole fleet with cold starts and with a warm pool, each sequentially and as
a burst of concurrent creations. Prints one table.

    .venv/bin/python bench/startup.py [--sessions 50] [--burst 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from arguments import whole
from leftovers import BENCH_FLEET, owned, remove_leftovers
from redis.asyncio import Redis

from scheduler.client import End, FleetClient
from shared.keys import Keys
from shared.localfleet import LocalFleet, local_fleet
from shared.settings import load_settings
from shared.wire import Output
from worker.docker import DockerRuntime, SandboxSpec, container_config, seccomp_profile
from worker.frames import FrameDecoder

IMAGE = "acp-fleet/busybox:test"
# The agent answers at once, so the numbers are the fleet's, not an agent's.
AGENT = ["sh", "-c", "echo ready; cat"]


def profile(pool_size: int) -> dict[str, Any]:
    return {
        "image": IMAGE,
        "command": AGENT,
        "protocol": "raw",
        "limits": {"memory": "64m", "cpus": 1, "pids": 64},
        "pool": {"size": pool_size},
    }


async def bare_start(runtime: DockerRuntime, spec: SandboxSpec, seccomp: str) -> float:
    """Create, attach, start and read the first byte, straight from Docker."""
    config = owned(
        container_config(spec, fleet=BENCH_FLEET, node="bench", seccomp=seccomp)
    )
    started = time.perf_counter()
    container_id = await runtime.create(config, name=f"bench-{time.time_ns()}")
    stdio = await runtime.attach(container_id)
    await runtime.start(container_id)
    decoder = FrameDecoder()
    while not decoder.feed(await stdio.read()):
        pass
    elapsed = time.perf_counter() - started
    stdio.abort()
    await runtime.remove(container_id)
    return elapsed


async def exec_start(runtime: DockerRuntime, container_id: str) -> float:
    """docker exec into a running sandbox and read the first byte: the
    alternative to the warm pool's launcher."""
    container = runtime.docker.containers.container(container_id)
    started = time.perf_counter()
    execution = await container.exec(["sh", "-c", "echo ready"], user="1000:1000")
    async with execution.start(detach=False) as stream:
        await stream.read_out()
    return time.perf_counter() - started


async def exec_starts(
    runtime: DockerRuntime, spec: SandboxSpec, seccomp: str, n: int
) -> list[float]:
    config = container_config(spec, fleet=BENCH_FLEET, node="bench", seccomp=seccomp)
    config = owned({**config, "Cmd": ["sleep", "3600"]})
    container_id = await runtime.create(config, name=f"bench-exec-{time.time_ns()}")
    try:
        await runtime.start(container_id)
        return [await exec_start(runtime, container_id) for _ in range(n)]
    finally:
        await runtime.remove(container_id)


async def fleet_start(client: FleetClient, name: str) -> tuple[float, str]:
    """POST a session, attach, and wait for the agent's first byte.

    The session is then ended and its container removed before this
    returns, as the bare Docker start removes its own: a sequential run
    times starts, not starts racing the previous session's teardown.
    """
    started = time.perf_counter()
    created = await client.create_session(name)
    elapsed = None
    async with client.stdio(created["id"]) as stdio:
        async for event in stdio.events():
            if isinstance(event, Output) and elapsed is None:
                elapsed = time.perf_counter() - started
                await stdio.send_eof()
            elif isinstance(event, End):
                break
    assert elapsed is not None, f"session {created['id']} said nothing"
    return elapsed, created["id"]


async def wait_pool_full(fleet: LocalFleet, name: str, size: int) -> None:
    ops = {"Authorization": f"Bearer {fleet.operator_key}"}
    async with httpx.AsyncClient(base_url=fleet.url, headers=ops) as http:
        for _ in range(1200):
            view = (await http.get("/v1/fleet")).json()
            pools = view["nodes"][0]["pools"] if view["nodes"] else {}
            if pools.get(name, {}).get("ready") == size:
                return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"pool {name} did not fill")


async def starts_of(fleet: LocalFleet, ids: list[str]) -> str:
    redis = Redis.from_url(fleet.redis_url, decode_responses=True)
    keys = Keys(fleet.settings.key_prefix)
    async with redis:
        kinds = [await redis.hget(keys.session(i), "start") for i in ids]
    warm = sum(kind == "warm" for kind in kinds)
    return f"{warm} warm / {len(kinds) - warm} cold"


def row(name: str, samples: list[float], note: str = "") -> str:
    ordered = sorted(samples)
    median = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000
    return f"{name:<34}{len(samples):>5}{median:>10.1f}{p99:>10.1f}   {note}"


async def sequential(
    n: int, start: Callable[[], Awaitable[tuple[float, str]]]
) -> tuple[list[float], list[str]]:
    results = [await start() for _ in range(n)]
    return [r[0] for r in results], [r[1] for r in results]


async def burst(
    n: int, start: Callable[[], Awaitable[tuple[float, str]]]
) -> tuple[list[float], list[str]]:
    results = await asyncio.gather(*(start() for _ in range(n)))
    return [r[0] for r in results], [r[1] for r in results]


async def measure(fleet: LocalFleet, sessions: int, size: int) -> list[str]:
    settings = load_settings(fleet.config_path)
    runtime = DockerRuntime(settings.worker.docker_url)
    await runtime.open()
    await remove_leftovers(runtime)
    spec = SandboxSpec(
        session_id="bench",
        profile_name="cold",
        profile=settings.profiles["cold"],
        limits=settings.profiles["cold"].limits,
        image=IMAGE,
    )
    seccomp = seccomp_profile()
    rows = []
    # A filling pool starts containers too; every phase runs without it.
    await wait_pool_full(fleet, "warm", size_pool(sessions, size))
    try:
        bare = [await bare_start(runtime, spec, seccomp) for _ in range(sessions)]
        bare_burst = await asyncio.gather(
            *(bare_start(runtime, spec, seccomp) for _ in range(size))
        )
        execs = await exec_starts(runtime, spec, seccomp, sessions)
    finally:
        await runtime.close()
    rows.append(row("docker create+attach+start", bare))
    rows.append(row("docker exec in a running sandbox", execs, "no fleet hops"))
    async with FleetClient(fleet.url, fleet.api_key) as client:
        cold, ids = await sequential(sessions, lambda: fleet_start(client, "cold"))
        rows.append(row("fleet cold", cold, await starts_of(fleet, ids)))
        await wait_pool_full(fleet, "warm", size_pool(sessions, size))
        warm, ids = await sequential(sessions, lambda: fleet_start(client, "warm"))
        rows.append(row("fleet warm", warm, await starts_of(fleet, ids)))
        rows.append(row(f"docker burst of {size}", list(bare_burst)))
        await wait_pool_full(fleet, "warm", size_pool(sessions, size))
        cold_b, ids = await burst(size, lambda: fleet_start(client, "cold"))
        note = await starts_of(fleet, ids)
        rows.append(row(f"fleet cold burst of {size}", cold_b, note))
        await wait_pool_full(fleet, "warm", size_pool(sessions, size))
        warm_b, ids = await burst(size, lambda: fleet_start(client, "warm"))
        note = await starts_of(fleet, ids)
        rows.append(row(f"fleet warm burst of {size}", warm_b, note))
    ratio = statistics.median(cold) / statistics.median(bare)
    rows.append(f"\ncold median / bare docker median: {ratio:.2f} (target <= 1.30)")
    rows.append("targets: warm median < 25 ms, warm p99 < 60 ms")
    return rows


def size_pool(sessions: int, burst_size: int) -> int:
    """A pool that serves every session of a phase without a refill."""
    return max(sessions, burst_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The fleet below admits 200 sessions at once and runs 64.
    parser.add_argument(
        "--sessions",
        type=whole(1, 200),
        default=50,
        help="sessions started one at a time, cold and warm; 1 to 200 (default: 50)",
    )
    parser.add_argument(
        "--burst",
        type=whole(1, 64),
        default=32,
        help="sessions started at once; 1 to 64 (default: 32)",
    )
    args = parser.parse_args()
    pool_size = size_pool(args.sessions, args.burst)
    print(f"starting a fleet with a warm pool of {pool_size} ...", flush=True)
    with local_fleet(
        {"cold": profile(0), "warm": profile(pool_size)},
        orgs={"bench": {"max_sessions": 200, "sessions_per_minute": 100_000}},
        worker={"max_sessions": 64},
    ) as fleet:
        rows = asyncio.run(measure(fleet, args.sessions, args.burst))
    print(f"\n{'POST -> first agent byte':<34}{'n':>5}{'median ms':>10}{'p99 ms':>10}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
