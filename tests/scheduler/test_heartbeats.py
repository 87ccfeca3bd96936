"""The heartbeat-age gauge's readings, between reads of Redis and without."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from scheduler.heartbeats import HeartbeatAges


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Store:
    """Redis' clock and the nodes' last beats, or an unreachable Redis."""

    def __init__(self) -> None:
        self.now = 50_000
        self.beats_ms = {"n1": 49_000, "n2": 50_000}
        self.reachable = True

    async def now_ms(self) -> int:
        if not self.reachable:
            raise RedisConnectionError("Connection refused")
        return self.now

    async def nodes(self) -> list[dict[str, Any]]:
        return [{"node": n, "heartbeat_ms": b} for n, b in self.beats_ms.items()]


class TestHeartbeatAges:
    async def test_ages_are_read_against_redis_clock(self) -> None:
        """A node that beat 1 s before Redis' now is 1 s old at the read."""
        clock, store = Clock(), Store()
        ages = HeartbeatAges(clock)
        await ages.refresh(store)  # type: ignore[arg-type]
        assert ages.ages_s() == {"n1": 1.0, "n2": 0.0}
        assert sorted(ages.reading()) == [(0.0, {"node": "n2"}), (1.0, {"node": "n1"})]

    async def test_ages_grow_while_redis_cannot_be_read(self) -> None:
        """Reads failing for 18 s leave every age 18 s older, so that an
        alert on a node's silence fires through an outage of Redis."""
        clock, store = Clock(), Store()
        ages = HeartbeatAges(clock)
        await ages.refresh(store)  # type: ignore[arg-type]
        store.reachable = False
        for _ in range(6):
            clock.now_s += 3
            with pytest.raises(RedisConnectionError):
                await ages.refresh(store)  # type: ignore[arg-type]
        assert ages.ages_s() == {"n1": 19.0, "n2": 18.0}

    async def test_a_new_read_replaces_the_beats(self) -> None:
        """A node that beat again is young again, and a node no longer
        listed leaves the gauge."""
        clock, store = Clock(), Store()
        ages = HeartbeatAges(clock)
        await ages.refresh(store)  # type: ignore[arg-type]
        clock.now_s += 5
        store.now += 5000
        store.beats_ms = {"n1": store.now - 200}
        await ages.refresh(store)  # type: ignore[arg-type]
        assert ages.ages_s() == {"n1": pytest.approx(0.2)}
