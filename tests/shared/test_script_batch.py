"""Coalesced script calls: one pipeline per turn of the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakeredis.aioredis import FakeRedis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared.localfleet import free_port
from shared.store import ScriptBatch

# Counts its calls in KEYS[1]; refuses an ARGV[1] of "bad".
COUNT = """
if ARGV[1] == 'bad' then
  return redis.error_reply('ERR refused ' .. ARGV[1])
end
return redis.call('INCR', KEYS[1])
"""


@pytest.fixture
async def redis() -> AsyncIterator[FakeRedis]:
    client = FakeRedis()
    yield client
    await client.aclose()


def counting_pipelines(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record, for each pipeline the client makes, how many commands it ran."""
    sizes: list[int] = []
    make = redis.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make(*args, **kwargs)
        execute = pipe.execute

        async def counted(**options: Any) -> Any:
            sizes.append(len(pipe.command_stack))
            return await execute(**options)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(redis, "pipeline", pipeline)
    return sizes


async def loaded_batch(
    redis: FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> tuple[ScriptBatch, list[int]]:
    """A batch of COUNT, already loaded, and the sizes of its pipelines."""
    script = redis.register_script(COUNT)
    await redis.script_load(COUNT)
    return ScriptBatch(redis, script), counting_pipelines(redis, monkeypatch)


class TestScriptBatch:
    """Calls of one script, coalesced per turn of the event loop."""

    async def test_calls_in_one_turn_share_one_pipeline(
        self, redis: FakeRedis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Five calls made in one turn go to Redis as one pipeline of five, each
        answered in its order."""
        batch, sizes = await loaded_batch(redis, monkeypatch)

        replies = await asyncio.gather(
            *(batch(keys=["calls"], args=["ok"]) for _ in range(5))
        )

        assert replies == [1, 2, 3, 4, 5]
        assert sizes == [5]

    async def test_calls_in_later_turns_go_in_later_pipelines(
        self, redis: FakeRedis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A call awaited before the next is made goes out in a pipeline of its own."""
        batch, sizes = await loaded_batch(redis, monkeypatch)

        first = await batch(keys=["calls"], args=["ok"])
        second = await batch(keys=["calls"], args=["ok"])

        assert (first, second) == (1, 2)
        assert sizes == [1, 1]

    async def test_an_error_reply_fails_only_its_own_call(
        self, redis: FakeRedis
    ) -> None:
        """A script error fails the call that caused it; its neighbours in the
        batch get their replies."""
        batch = ScriptBatch(redis, redis.register_script(COUNT))

        replies = await asyncio.gather(
            batch(keys=["calls"], args=["ok"]),
            batch(keys=["calls"], args=["bad"]),
            batch(keys=["calls"], args=["ok"]),
            return_exceptions=True,
        )

        assert replies[0] == 1
        assert isinstance(replies[1], ResponseError)
        assert "refused bad" in str(replies[1])
        assert replies[2] == 2

    async def test_a_call_cancelled_before_its_batch_left_changes_nothing(
        self,
        redis: FakeRedis,
    ) -> None:
        """A caller that stops waiting before its batch is sent leaves Redis
        untouched."""
        batch = ScriptBatch(redis, redis.register_script(COUNT))
        cancelled = asyncio.create_task(batch(keys=["cancelled"], args=["ok"]))
        # One turn: the task queues its call, and this test resumes before the
        # batch is sent, which asyncio schedules after both.
        await asyncio.sleep(0)
        cancelled.cancel()

        assert await batch(keys=["kept"], args=["ok"]) == 1
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await redis.get("cancelled") is None
        assert await redis.get("kept") == b"1"

    async def test_scripts_that_redis_lost_are_loaded_again(
        self, redis: FakeRedis
    ) -> None:
        """After SCRIPT FLUSH the batch loads the script again and answers every
        call."""
        batch = ScriptBatch(redis, redis.register_script(COUNT))
        assert await batch(keys=["calls"], args=["ok"]) == 1

        await redis.script_flush()
        replies = await asyncio.gather(
            batch(keys=["calls"], args=["ok"]), batch(keys=["calls"], args=["ok"])
        )

        assert replies == [2, 3]

    async def test_a_batch_that_cannot_be_sent_fails_every_call(self) -> None:
        """A Redis that cannot be reached fails every call of the batch with its
        error."""
        # Nothing listens on the port: every call of the batch sees the error.
        unreachable = Redis(port=free_port(), socket_connect_timeout=1)
        batch = ScriptBatch(unreachable, unreachable.register_script(COUNT))
        try:
            replies = await asyncio.gather(
                batch(keys=["calls"], args=["ok"]),
                batch(keys=["calls"], args=["ok"]),
                return_exceptions=True,
            )
        finally:
            await unreachable.aclose()

        assert all(isinstance(reply, RedisConnectionError) for reply in replies), (
            replies
        )
