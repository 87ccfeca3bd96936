"""The node's owner key against a real Redis: taken, held, waited out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from shared.errors import NodeBusy
from shared.keys import Keys
from shared.store import SessionStore
from worker.ownership import NodeOwnership, instance_id, surely_dead

HEARTBEAT_MS = 200


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[SessionStore]:
    """A store under a prefix of its own."""
    store = SessionStore(
        Redis.from_url(redis_url), keys=Keys("o" + secrets.token_hex(4))
    )
    yield store
    await store.close()


def _ownership(store: SessionStore) -> NodeOwnership:
    return NodeOwnership(store, node="n1", heartbeat_ms=HEARTBEAT_MS)


def _elsewhere(store: SessionStore) -> NodeOwnership:
    """An ownership that names another live process (the test runner's
    parent), as a worker started beside this one would."""
    ownership = _ownership(store)
    host, _, nonce, space = ownership.instance.split(":")
    ownership.instance = ":".join([host, str(os.getppid()), nonce, space])
    return ownership


class TestNodeOwnership:
    async def test_a_free_node_is_taken_at_once(self, store: SessionStore) -> None:
        """Nobody holds the node: acquiring returns without waiting."""
        ownership = _ownership(store)

        started = time.monotonic()
        await ownership.acquire()

        assert time.monotonic() - started < 0.1
        assert await store.redis.get(store.keys.node_owner("n1")) == (
            ownership.instance.encode()
        )

    async def test_a_renewed_hold_refuses_the_second_process(
        self, store: SessionStore
    ) -> None:
        """A holder that renews is alive: the second process gets NodeBusy
        within about one heartbeat, and the hold stays the first's."""
        first, second = _elsewhere(store), _ownership(store)
        await first.acquire()
        holding = asyncio.create_task(first.hold_forever())
        try:
            started = time.monotonic()
            with pytest.raises(NodeBusy) as refused:
                await second.acquire()
            waited_s = time.monotonic() - started
        finally:
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding

        assert refused.value.holder == first.instance
        assert first.instance in str(refused.value)
        assert waited_s < 2 * HEARTBEAT_MS / 1000
        owner = await store.redis.get(store.keys.node_owner("n1"))
        assert owner == first.instance.encode()

    async def test_a_dead_holder_is_waited_out_within_its_ttl(
        self, store: SessionStore
    ) -> None:
        """A holder that stopped renewing is dead: its successor takes the
        node once the hold lapses, two heartbeats at most."""
        # Alive as a process, but it never renews: as good as dead.
        dead, successor = _elsewhere(store), _ownership(store)
        await dead.acquire()

        started = time.monotonic()
        await successor.acquire()

        waited_s = time.monotonic() - started
        assert HEARTBEAT_MS / 1000 < waited_s < 2 * HEARTBEAT_MS / 1000 + 0.1
        owner = await store.redis.get(store.keys.node_owner("n1"))
        assert owner == successor.instance.encode()

    async def test_a_released_node_is_taken_without_waiting(
        self, store: SessionStore, redis_url: str
    ) -> None:
        """A worker that stopped cleanly gave the node up: the next one
        takes it at once."""
        first = _ownership(store)
        await first.acquire()
        await first.release()
        other = SessionStore(Redis.from_url(redis_url), keys=store.keys)
        successor = _ownership(other)

        started = time.monotonic()
        await successor.acquire()
        await other.close()

        assert time.monotonic() - started < 0.1

    async def test_a_release_takes_the_node_out_of_the_listing(
        self, store: SessionStore, redis_url: str
    ) -> None:
        """A worker that stops cleanly is not listed as a silent node; a
        process that lost the hold leaves the holder's listing alone."""
        stale = _ownership(store)
        await stale.acquire()
        await store.beat_node("n1", {"capacity": "1"}, ttl_ms=10_000)
        # The hold lapses and another process takes the node and beats.
        await store.redis.delete(store.keys.node_owner("n1"))
        other = SessionStore(Redis.from_url(redis_url), keys=store.keys)
        holder = _ownership(other)
        await holder.acquire()
        await other.beat_node("n1", {"capacity": "1"}, ttl_ms=10_000)

        await stale.release()
        still_listed = [n["node"] for n in await other.nodes()]
        await holder.release()
        check = SessionStore(Redis.from_url(redis_url), keys=store.keys)
        after = await check.nodes()
        await check.close()

        assert still_listed == ["n1"]
        assert after == []

    async def test_a_dead_predecessor_on_this_host_is_not_waited_for(
        self, store: SessionStore
    ) -> None:
        """A hold whose pid, in this pid namespace, is gone is taken at once,
        long before its TTL lapses."""
        gone = await asyncio.create_subprocess_exec("true")
        await gone.wait()
        host, _, nonce, space = instance_id().split(":")
        dead = ":".join([host, str(gone.pid), nonce, space])
        await store.redis.set(store.keys.node_owner("n1"), dead, px=60_000)
        successor = _ownership(store)

        started = time.monotonic()
        await successor.acquire()

        assert time.monotonic() - started < 0.1
        owner = await store.redis.get(store.keys.node_owner("n1"))
        assert owner == successor.instance.encode()


class TestSurelyDead:
    def test_a_live_pid_or_another_pid_space_is_not_surely_dead(self) -> None:
        """This very process's parent is alive; a holder from another boot or
        namespace, or a malformed one, may be alive anywhere."""
        host, _, nonce, space = instance_id().split(":")

        assert not surely_dead(":".join([host, str(os.getppid()), nonce, space]))
        assert not surely_dead(":".join([host, "1", nonce, "other-1"]))
        assert not surely_dead("garbage")
