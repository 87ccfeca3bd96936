"""A relay loop's own connection to Redis, against a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import store
from shared.keys import Keys
from shared.store import Channel, SessionStore

ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.delete("channel:list", "channel:stream")
    await redis.aclose()


class TestChannel:
    """One relay loop's connection to Redis."""

    async def test_a_stream_read_matches_the_clients(self, client: Redis) -> None:
        """A stream read on a channel gives the same entries as one through the
        client."""
        await client.xadd("channel:stream", {"d": b"one", "n": 3})
        await client.xadd("channel:stream", {"d": b"two"})
        sessions = SessionStore(client, keys=Keys("channel"))
        reads = sessions.blocking_channel()
        try:
            via = await sessions.read_stream(
                "channel:stream", "0-0", block_ms=100, via=reads
            )
        finally:
            await reads.close()

        plain = await sessions.read_stream("channel:stream", "0-0", block_ms=100)
        assert via == plain
        assert [fields for _, fields in via] == [
            {b"d": b"one", b"n": b"3"},
            {b"d": b"two"},
        ]

    async def test_a_timed_out_command_leaves_no_reply_for_the_next(
        self, client: Redis
    ) -> None:
        """A command past its timeout closes the connection, so its late reply
        never answers the next command."""
        channel = Channel(client, timeout_s=0.2)
        try:
            with pytest.raises(RedisTimeoutError, match="BLPOP"):
                await channel.execute("BLPOP", "channel:list", 1)
            # BLPOP's reply would come once the list has an item; the channel
            # reconnected, so nothing of it reaches the next command.
            await client.rpush("channel:list", "late")
            assert await channel.execute("PING") == b"PONG"
            assert await channel.execute("LLEN", "channel:list") == 1
        finally:
            await channel.close()

    @pytest.mark.parametrize("timeout_s", [None, 5.0])
    async def test_a_cancelled_command_leaves_no_reply_for_the_next(
        self, client: Redis, timeout_s: float | None
    ) -> None:
        """A cancelled command, bounded or not, raises CancelledError rather
        than a timeout and closes the connection, so its late reply never
        answers the next command."""
        channel = Channel(client, timeout_s=timeout_s)
        try:
            waiting = asyncio.create_task(channel.execute("BLPOP", "channel:list", 2))
            await asyncio.sleep(0.1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await client.rpush("channel:list", "late")
            assert await channel.execute("LLEN", "channel:list") == 1
        finally:
            await channel.close()

    async def test_a_command_sent_late_in_the_timers_turn_gets_its_whole_bound(
        self, client: Redis
    ) -> None:
        """The channel's one timer, armed by an earlier command, waits on for
        a later one instead of cutting it short."""
        channel = Channel(client, timeout_s=0.3)
        try:
            await channel.execute("PING")
            # The timer armed by PING fires 0.1 s into the next command.
            await asyncio.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError, match="BLPOP"):
                await channel.execute("BLPOP", "channel:list", 1)
            waited_s = time.monotonic() - started
            assert await channel.execute("PING") == b"PONG"
        finally:
            await channel.close()

        # BLPOP itself would have answered nil after 1 s, raising nothing.
        assert waited_s >= 0.29

    async def test_a_connection_the_server_closed_while_idle_is_replaced(
        self, client: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """As Redis' ``timeout`` closes an idle client: the channel's next
        command reconnects instead of failing."""
        monkeypatch.setattr(store, "CHANNEL_IDLE_CHECK_S", 0.0)
        channel = Channel(client, timeout_s=1)
        try:
            own_id = await channel.execute("CLIENT", "ID")
            assert await client.client_kill_filter(_id=own_id) == 1
            await asyncio.sleep(0.05)
            assert await channel.execute("PING") == b"PONG"
            assert await channel.execute("CLIENT", "ID") != own_id
        finally:
            await channel.close()

    async def test_an_error_reply_is_raised_and_the_channel_goes_on(
        self, client: Redis
    ) -> None:
        """An error reply is raised and the same connection answers the next command."""
        channel = Channel(client, timeout_s=1)
        try:
            with pytest.raises(ResponseError, match="unknown command"):
                await channel.execute("NO-SUCH-COMMAND")
            assert await channel.execute("PING") == b"PONG"
        finally:
            await channel.close()

    async def test_a_script_redis_lost_is_loaded_again(self, client: Redis) -> None:
        """A script Redis no longer has is loaded again and run."""
        script = client.register_script(ECHO)
        channel = Channel(client, timeout_s=1)
        try:
            assert await channel.script(script, ["k"], ["v"]) == [b"k", b"v"]
            await client.script_flush()
            assert await channel.script(script, ["k2"], ["v2"]) == [b"k2", b"v2"]
        finally:
            await channel.close()


class TestPrepared:
    """Commands a relay loop sends again and again, packed once."""

    async def test_a_prepared_script_answers_as_the_script_does(
        self, client: Redis
    ) -> None:
        """A prepared call sends its first words and then the call's own."""
        script = client.register_script(ECHO)
        channel = Channel(client, timeout_s=1)
        try:
            call = channel.prepare_script(script, ["k"])
            replies = [await call(b"one"), await call("two")]
            same = channel.prepare_script(script, ["k"]) is call
        finally:
            await channel.close()

        assert replies == [[b"k", b"one"], [b"k", b"two"]]
        assert same

    async def test_a_script_run_for_many_keys_is_not_kept(self, client: Redis) -> None:
        """Only what a loop prepares is kept: a channel that runs one script
        for a thousand keys holds none of those calls."""
        script = client.register_script(ECHO)
        channel = Channel(client, timeout_s=1)
        try:
            for n in range(1000):
                assert await channel.script(script, [f"k{n}"], ["v"]) == [
                    f"k{n}".encode(),
                    b"v",
                ]
            kept = len(channel._prepared)
        finally:
            await channel.close()

        assert kept == 0

    @pytest.mark.parametrize("word", [1.0, True])
    def test_a_word_the_cache_would_confuse_is_refused(
        self, client: Redis, word: float
    ) -> None:
        """1.0 and True equal 1 as keys; a prepared command refuses them."""
        channel = Channel(client, timeout_s=1)

        with pytest.raises(TypeError, match="str, bytes or int"):
            channel.prepare("ECHO", word)


class TestPack:
    """The relay's own encoding of a command, against Redis' reading of it."""

    @pytest.mark.parametrize(
        "value", [b"", b"\x00\r\n\xff" * 3, "é\r\n", 0, -7, 2**63 - 1, 0.25, 1e-300]
    )
    async def test_a_value_reaches_redis_as_redis_py_sends_it(
        self, client: Redis, value: bytes | str | int | float
    ) -> None:
        """A value packed by the relay is stored exactly as redis-py stores it."""
        channel = Channel(client, timeout_s=1)
        try:
            await channel.execute("SET", "channel:list", value)
            ours = await client.get("channel:list")
        finally:
            await channel.close()
        await client.set("channel:list", value)

        assert ours == await client.get("channel:list")

    @pytest.mark.parametrize("value", [True, None, ["a"]])
    def test_a_value_redis_has_no_form_for_is_refused(self, value: object) -> None:
        """A bool, None or list names its type instead of reaching Redis."""
        with pytest.raises(TypeError, match=type(value).__name__):
            store.pack(["SET", "k", value])  # type: ignore[list-item]
