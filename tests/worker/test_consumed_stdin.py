"""Reports of the stdin an agent was given, sent in arrears."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from fakeredis.aioredis import FakeRedis

from shared.keys import Keys
from shared.store import SessionStore
from worker import session
from worker.session import ConsumedStdin

KEYS = Keys("t")


@pytest.fixture
async def store() -> AsyncIterator[SessionStore]:
    redis = FakeRedis()
    await redis.hset(KEYS.session("s1"), mapping={"state": "running"})
    yield SessionStore(redis, keys=KEYS)
    await redis.aclose()


class TestConsumedStdin:
    """Stdin given to the agent, reported in arrears."""

    async def test_writes_between_reports_go_out_as_one(
        self, store: SessionStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Writes made within one report's delay are reported once, in total,
        and free their pending bytes."""
        monkeypatch.setattr(session, "CONSUMED_REPORT_S", 0.3)
        for data in (b"one", b"two", b"three"):
            assert await store.write_stdin("s1", "d", data) > 0
        entries = await store.read_stream(KEYS.stdin("s1"), "0-0", block_ms=10)
        reports: list[tuple[bytes, int]] = []
        report = store.consumed_stdin

        async def counted(session_id: str, cursor: bytes, written: int) -> None:
            reports.append((cursor, written))
            await report(session_id, cursor, written)

        monkeypatch.setattr(store, "consumed_stdin", counted)
        consumed = ConsumedStdin(store, "s1")
        reporting = asyncio.create_task(consumed.report_forever())
        try:
            # Written a moment apart, all within one report's delay.
            for entry_id, fields in entries:
                consumed.add(entry_id, len(fields[b"d"]))
                await asyncio.sleep(0.05)
            assert reports == []
            await asyncio.sleep(0.4)
        finally:
            reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporting

        assert reports == [(entries[-1][0], 11)]
        pending = await store.redis.hget(KEYS.session("s1"), "in_pending_bytes")
        assert pending == b"0"

    async def test_nothing_written_sends_no_report(
        self, store: SessionStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With nothing written, no report is sent."""
        monkeypatch.setattr(session, "CONSUMED_REPORT_S", 0.01)
        reports: list[int] = []

        async def counted(session_id: str, cursor: bytes, written: int) -> None:
            reports.append(written)

        monkeypatch.setattr(store, "consumed_stdin", counted)
        reporting = asyncio.create_task(ConsumedStdin(store, "s1").report_forever())
        await asyncio.sleep(0.1)
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting

        assert reports == []
