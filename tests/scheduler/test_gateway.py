"""The stdio gateway's numbering of stdin, against a real fleet."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.client import ApiError, End, FleetClient, StdinAck, Stdio
from shared.localfleet import LocalFleet, local_fleet
from shared.wire import Output
from tests.sandboxes import PROFILES


async def _until_acked(stdio: Stdio, seq: int) -> None:
    async for event in stdio.events():
        if isinstance(event, StdinAck) and event.seq >= seq:
            return


async def _rest(stdio: Stdio) -> tuple[bytes, list[int], End | None]:
    stdout, acks = b"", []
    async for event in stdio.events():
        if isinstance(event, End):
            return stdout, acks, event
        if isinstance(event, StdinAck):
            acks.append(event.seq)
        elif isinstance(event, Output):
            stdout += event.data
    return stdout, acks, None


class TestStdinNumbering:
    async def test_a_message_sent_again_is_written_once(
        self, fleet: LocalFleet
    ) -> None:
        """A numbered message repeated on a new connection reaches the agent
        once; each message, repeated or not, is acknowledged."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("cat-exit")
            first = client.stdio(created["id"], writer="w1", stdin_seq=1)
            async with first:
                await first.send(b"one\n")
                await asyncio.wait_for(_until_acked(first, 1), timeout=30)
            again = client.stdio(created["id"], writer="w1", stdin_seq=1)
            async with again:
                await again.send(b"one\n")
                await again.send(b"two\n")
                await again.send_eof()
                stdout, acks, end = await asyncio.wait_for(_rest(again), timeout=30)

        assert stdout == b"one\ntwo\ndone\n"
        assert acks == [1, 2, 3]
        assert end is not None
        assert end.exit_code == 7

    async def test_data_resent_before_a_written_eof_is_a_repeat(
        self, fleet: LocalFleet
    ) -> None:
        """Data and eof sent again after both reached Redis are repeats, not
        stdin after its end: acknowledged, not refused as stdin_closed."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            # The agent ignores stdin, so the session outlives its eof.
            created = await client.create_session("sleep")
            first = client.stdio(created["id"], writer="w2", stdin_seq=1)
            async with first:
                await first.send(b"one\n")
                await first.send_eof()
                await asyncio.wait_for(_until_acked(first, 2), timeout=30)
            again = client.stdio(created["id"], writer="w2", stdin_seq=1)
            async with again:
                await again.send(b"one\n")
                await again.send_eof()
                await asyncio.wait_for(_until_acked(again, 2), timeout=30)
            view = await client.session(created["id"])
            await client.cancel(created["id"])

        assert view["state"] != "ended"

    async def test_an_unnumbered_client_gets_no_acks(self, fleet: LocalFleet) -> None:
        """Without a writer stdin is written as sent and never acknowledged."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("cat-exit")
            async with client.stdio(created["id"]) as stdio:
                await stdio.send(b"one\n")
                await stdio.send_eof()
                stdout, acks, _ = await asyncio.wait_for(_rest(stdio), timeout=30)

        assert (stdout, acks) == (b"one\ndone\n", [])

    @pytest.mark.parametrize(
        ("writer", "seq"), [("no spaces", 1), ("w", 0), ("x" * 65, 1)]
    )
    async def test_a_bad_numbering_is_refused(
        self, fleet: LocalFleet, writer: str, seq: int
    ) -> None:
        """A writer that is no id, or a seq below 1, closes with 4400."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("cat-exit")
            stdio = client.stdio(created["id"], writer=writer, stdin_seq=seq)
            async with stdio:
                with pytest.raises(ApiError) as refused:
                    await asyncio.wait_for(_rest(stdio), timeout=30)
            await client.cancel(created["id"])

        assert refused.value.code == "invalid_stdin_seq"


class TestStdinAfterTheEnd:
    async def test_late_stdin_does_not_hide_the_end(self, fleet: LocalFleet) -> None:
        """Stdin sent to an ended session is refused, but the client still
        reads the session's output and its end, as a reconnecting one must."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("cat-exit")
            async with client.stdio(created["id"]) as stdio:
                await stdio.send_eof()
                await asyncio.wait_for(_rest(stdio), timeout=30)
            again = client.stdio(created["id"], writer="late", stdin_seq=1)
            async with again:
                await again.send(b"late\n")
                stdout, acks, end = await asyncio.wait_for(_rest(again), timeout=30)

        assert (stdout, acks) == (b"done\n", [])
        assert end is not None
        assert end.exit_code == 7


def _extensions(stdio: Stdio) -> str | None:
    """What the gateway agreed to of the extensions the client offered."""
    assert stdio.ws.response is not None
    return stdio.ws.response.headers.get("Sec-WebSocket-Extensions")


class TestCompression:
    async def test_stdio_is_not_compressed_by_default(self, fleet: LocalFleet) -> None:
        """The client offers per-message deflate; the gateway declines it."""
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("cat-exit")
            async with client.stdio(created["id"]) as stdio:
                agreed = _extensions(stdio)
                await stdio.send_eof()
                _, _, end = await asyncio.wait_for(_rest(stdio), timeout=30)

        assert agreed is None
        assert end is not None

    async def test_compression_is_agreed_when_configured(self, redis_url: str) -> None:
        """With ws_compression on, the gateway takes the client's offer."""
        with local_fleet(
            PROFILES,
            redis_url=redis_url,
            orgs={"acme": {"max_sessions": 4, "sessions_per_minute": 1000}},
            scheduler={"ws_compression": True},
            start_worker=False,
        ) as fleet:
            async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
                created = await client.create_session("cat-exit")
                async with client.stdio(created["id"]) as stdio:
                    agreed = _extensions(stdio)
                await client.cancel(created["id"])

        assert agreed is not None
        assert agreed.startswith("permessage-deflate")
