"""Blocking stream reads against a real Redis (field case C11)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.store import SessionStore


@pytest.fixture
async def short_timeout_store(redis_url: str) -> AsyncIterator[SessionStore]:
    """A store whose blocking client has a 5 s socket timeout."""
    blocking = Redis.from_url(redis_url, socket_timeout=5)
    store = SessionStore(Redis.from_url(redis_url), keys=Keys("c11"), blocking=blocking)
    yield store
    await store.redis.delete("c11:idle", "c11:late")
    await store.close()


class TestBlockingReads:
    async def test_long_waits_outlast_the_socket_timeout(
        self, short_timeout_store: SessionStore
    ) -> None:
        """C11: a 30 s wait on an idle stream returns empty, a forever wait
        returns the entry that arrives after 20 s; neither raises. The same
        holds for the relay's reads on channels of their own."""
        store = short_timeout_store
        reads = [store.blocking_channel() for _ in range(2)]

        async def late_entry() -> None:
            await asyncio.sleep(20)
            await store.redis.xadd("c11:late", {"d": b"late"})

        started = time.monotonic()
        try:
            idle, late, idle_via, late_via, _ = await asyncio.gather(
                store.read_stream("c11:idle", "0-0", block_ms=30_000),
                store.read_stream("c11:late", "0-0", block_ms=0),
                store.read_stream("c11:idle", "0-0", block_ms=30_000, via=reads[0]),
                store.read_stream("c11:late", "0-0", block_ms=0, via=reads[1]),
                late_entry(),
            )
        finally:
            for channel in reads:
                await channel.close()
        elapsed_s = time.monotonic() - started

        assert idle == idle_via == []
        assert [fields for _, fields in late] == [{b"d": b"late"}]
        assert late_via == late
        assert 29.5 <= elapsed_s < 40
