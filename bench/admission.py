"""Admission: how many session creations one scheduler process answers.

A scheduler with no worker (so admitted sessions stay queued) takes
creations from many concurrent clients for a while, first for an org with
room (every request admitted) and then for an org at its limit (every
request refused by the quota script); then a steady 500 requests a second
for the latency at that load. The load generator runs in this process on
the other core.

    .venv/bin/python bench/admission.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from arguments import seconds

from shared.localfleet import LocalFleet, local_fleet

PROFILE = {
    "image": "acp-fleet/busybox:test",
    "command": ["true"],
    "protocol": "raw",
    "limits": {"memory": "64m", "cpus": 1, "pids": 8},
}


async def post(http: aiohttp.ClientSession, key: str) -> tuple[float, int]:
    started = time.perf_counter()
    async with http.post(
        "/v1/sessions",
        data=b'{"profile": "p"}',
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    ) as response:
        await response.read()
        return time.perf_counter() - started, response.status


async def closed_loop(
    http: aiohttp.ClientSession, key: str, seconds: float, clients: int
) -> tuple[float, list[float], set[int]]:
    """As many requests as ``clients`` concurrent callers can make."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    statuses: set[int] = set()

    async def caller() -> None:
        while time.perf_counter() < deadline:
            latency, status = await post(http, key)
            latencies.append(latency)
            statuses.add(status)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    return len(latencies) / (time.perf_counter() - started), latencies, statuses


async def open_loop(
    http: aiohttp.ClientSession, key: str, seconds: float, rate: int
) -> list[float]:
    """Requests sent at ``rate`` a second whatever the answers take."""
    tasks = []
    started = time.perf_counter()
    for index in range(int(seconds * rate)):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(http, key)))
    return [latency for latency, _ in await asyncio.gather(*tasks)]


def p99_ms(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000


async def measure(fleet: LocalFleet, seconds: float) -> list[str]:
    # aiohttp, not httpx: the load generator must outrun the server.
    connector = aiohttp.TCPConnector(limit=128)
    async with aiohttp.ClientSession(fleet.url, connector=connector) as http:
        await post(http, fleet.api_keys["full"])  # takes the full org's one slot
        rows, rates = [], []
        for name, key, expected in (
            ("admitted", fleet.api_keys["roomy"], {201}),
            ("refused (org at its limit)", fleet.api_keys["full"], {429}),
        ):
            rate, latencies, statuses = await closed_loop(http, key, seconds, 64)
            assert statuses == expected, statuses
            rates.append(rate)
            median_ms = statistics.median(latencies) * 1000
            rows.append(
                f"{name:<32}{rate:>9.0f}/s{median_ms:>10.1f}{p99_ms(latencies):>10.1f}"
            )
        steady = await open_loop(http, fleet.api_keys["roomy"], seconds, 500)
        median_ms, steady_p99_ms = statistics.median(steady) * 1000, p99_ms(steady)
        rows.append(
            f"{'steady 500/s, admitted':<32}{500:>9}/s{median_ms:>10.1f}"
            f"{steady_p99_ms:>10.1f}"
        )
    rate_met = "met" if min(rates) >= 1500 else "missed"
    p99_met = "met" if steady_p99_ms < 20 else "missed"
    rows.append(
        f"targets: >= 1,500/s on one core ({rate_met});"
        f" p99 < 20 ms at 500/s ({p99_met})"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=seconds(1, 600),
        default=10,
        help="how long each load runs, 1 to 600 (default: 10)",
    )
    args = parser.parse_args()
    with local_fleet(
        {"p": PROFILE},
        orgs={
            "roomy": {"max_sessions": 100_000, "sessions_per_minute": 1_000_000},
            "full": {"max_sessions": 1, "sessions_per_minute": 1_000_000},
        },
        scheduler={"queue_max_depth": 1_000_000},
        start_worker=False,
    ) as fleet:
        rows = asyncio.run(measure(fleet, args.seconds))
    print(f"\n{'POST /v1/sessions':<32}{'rate':>11}{'median ms':>10}{'p99 ms':>10}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
