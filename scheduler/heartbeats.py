"""Node heartbeat ages, read from Redis in the background for the gauge.

Prometheus reads gauges synchronously, during a scrape, where Redis cannot
be awaited: a task reads the nodes' heartbeats instead, as often as the
workers send them, and the gauge reports each node's age since the last
beat it read. While Redis cannot be read the ages go on growing, as they
do in Redis itself, where no worker can beat either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping

import structlog
from redis.exceptions import RedisError

from shared.logs import FailureStreak
from shared.store import SessionStore

log = structlog.get_logger("scheduler.heartbeats")


class HeartbeatAges:
    """How long ago every listed node last beat, in seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Each node's last beat, on this process' clock.
        self._beats: dict[str, float] = {}

    async def refresh(self, store: SessionStore) -> None:
        """Read every node's last heartbeat against Redis' clock."""
        now_ms = await store.now_ms()
        nodes = await store.nodes()
        read_at = self._clock()
        self._beats = {
            record["node"]: read_at - (now_ms - int(record["heartbeat_ms"])) / 1000
            for record in nodes
        }

    def ages_s(self) -> dict[str, float]:
        """Each node's age since its last beat read, now."""
        now = self._clock()
        return {node: now - beat for node, beat in self._beats.items()}

    def reading(self) -> Iterable[tuple[float, Mapping[str, str]]]:
        """The gauge's observations: one age per node."""
        return [(age_s, {"node": node}) for node, age_s in self.ages_s().items()]


async def watch_forever(
    store: SessionStore, ages: HeartbeatAges, *, interval_s: float
) -> None:
    """Refresh ``ages`` every ``interval_s`` until cancelled."""
    streak = FailureStreak(log, "heartbeats.read_failed")
    while True:
        try:
            await ages.refresh(store)
        except RedisError as exc:
            # The beats read last stay, their ages growing, and the log
            # says why.
            streak.failed(exc)
        else:
            streak.succeeded()
        await asyncio.sleep(interval_s)
