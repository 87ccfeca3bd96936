"""Node heartbeat ages, read from Redis in the background for the gauge.

Prometheus reads gauges synchronously, during a scrape, where Redis cannot
be awaited: a task reads the nodes' heartbeats instead, as often as the
workers send them, and the gauge reports what it read last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import structlog
from redis.exceptions import RedisError

from shared.logs import FailureStreak
from shared.store import SessionStore

log = structlog.get_logger("scheduler.heartbeats")


class HeartbeatAges:
    """The last heartbeat age of every listed node, in seconds."""

    def __init__(self) -> None:
        self.ages_s: dict[str, float] = {}

    async def refresh(self, store: SessionStore) -> None:
        """Read every node's last heartbeat against Redis' clock."""
        now_ms = await store.now_ms()
        self.ages_s = {
            record["node"]: (now_ms - int(record["heartbeat_ms"])) / 1000
            for record in await store.nodes()
        }

    def reading(self) -> Iterable[tuple[float, Mapping[str, str]]]:
        """The gauge's observations: one age per node."""
        return [(age_s, {"node": node}) for node, age_s in self.ages_s.items()]


async def watch_forever(
    store: SessionStore, ages: HeartbeatAges, *, interval_s: float
) -> None:
    """Refresh ``ages`` every ``interval_s`` until cancelled."""
    streak = FailureStreak(log, "heartbeats.read_failed")
    while True:
        try:
            await ages.refresh(store)
        except RedisError as exc:
            # The ages read last stay: they only grow stale, never wrong
            # by more than the outage, and the log says why.
            streak.failed(exc)
        else:
            streak.succeeded()
        await asyncio.sleep(interval_s)
