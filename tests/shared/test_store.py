"""Specification of the session store's scripts, on an in-memory Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from unittest.mock import ANY

import pytest
from fakeredis.aioredis import FakeRedis

from shared.errors import LeaseLost
from shared.keys import RATE_WINDOW_MS, RETENTION_MS, Keys
from shared.models import EndCause, Outcome
from shared.store import Admission, Claim, QueuedJob, Quota, Renewal, SessionStore

KEYS = Keys("t")
SLOT_TTL_MS = 600_000
SESSION_TTL_MS = 3_600_000
LEASE_MS = 10_000
EXIT_7 = Outcome(cause=EndCause.AGENT_EXIT, exit_code=7)
CANCELLED = Outcome(cause=EndCause.CANCELLED)


@pytest.fixture
async def store() -> AsyncIterator[SessionStore]:
    """A store on a fresh in-memory Redis."""
    redis = FakeRedis()
    yield SessionStore(redis, keys=KEYS)
    await redis.aclose()


async def admit(
    store: SessionStore,
    session_id: str,
    *,
    org: str = "acme",
    max_sessions: int = 2,
    per_minute: int = 10,
    queue_max: int = 100,
    env: dict[str, str] | None = None,
    job: QueuedJob | None = None,
) -> Admission:
    quota = Quota(
        max_sessions=max_sessions,
        per_minute=per_minute,
        queue_max=queue_max,
        slot_ttl_ms=SLOT_TTL_MS,
        session_ttl_ms=SESSION_TTL_MS,
    )
    return await store.admit(
        session_id,
        org=org,
        quota=quota,
        fields={"profile": "coder"},
        env=env or {},
        audit={"org": org},
        job=job,
    )


async def admitted_and_claimed(
    store: SessionStore, session_id: str, *, lease_ms: int = LEASE_MS
) -> Claim:
    assert (await admit(store, session_id)).admitted
    claim = await store.claim(session_id, node="node-1", lease_ms=lease_ms)
    assert claim is not None
    return claim


class TestAdmit:
    """admit counts a session against its org's quotas and queues it."""

    async def test_writes_env_audit_and_job_in_the_same_step(
        self, store: SessionStore
    ) -> None:
        """An admitted session has its env, its created event and its job."""
        job = QueuedJob(key="arq:job:s1", payload=b"\x80job", score_ms=5, ttl_ms=9000)

        await admit(store, "s1", env={"API_TOKEN": "abc"}, job=job)

        redis = store.redis
        assert await redis.hgetall(KEYS.session_env("s1")) == {b"API_TOKEN": b"abc"}
        assert 0 < await redis.pttl(KEYS.session_env("s1")) <= SLOT_TTL_MS
        assert await store.audit_trail("s1") == [
            {"id": ANY, "event": "created", "org": "acme"}
        ]
        assert await redis.get("arq:job:s1") == b"\x80job"
        assert 0 < await redis.pttl("arq:job:s1") <= 9000
        assert await redis.zrange(KEYS.arq_queue, 0, -1, withscores=True) == [
            (b"s1", 5.0)
        ]

    async def test_a_refusal_writes_nothing(self, store: SessionStore) -> None:
        """A refused session leaves no record, env, audit event or job."""
        await admit(store, "s1", max_sessions=1)
        job = QueuedJob(key="arq:job:s2", payload=b"job", score_ms=5, ttl_ms=9000)

        refused = await admit(
            store, "s2", max_sessions=1, env={"API_TOKEN": "abc"}, job=job
        )

        assert refused.reason == "org_concurrency"
        names = [
            KEYS.session("s2"),
            KEYS.session_env("s2"),
            KEYS.audit("s2"),
            "arq:job:s2",
        ]
        assert await store.redis.exists(*names) == 0
        assert await store.redis.zscore(KEYS.arq_queue, "s2") is None

    async def test_a_session_without_a_job_is_held_back(
        self, store: SessionStore
    ) -> None:
        """Without a job (waiting for an upload) nothing reaches the queue."""
        await admit(store, "s1")

        assert await store.redis.exists(KEYS.arq_queue) == 0
        assert (await store.record("s1") or {})["state"] == "queued"

    async def test_records_queued_session(self, store: SessionStore) -> None:
        """An admitted session is recorded as queued with its org and fields."""
        admission = await admit(store, "s1")

        record = await store.record("s1")
        assert admission.admitted
        assert admission.reason is None
        assert record == {
            "state": "queued",
            "admitted_ms": str(admission.admitted_ms),
            "org": "acme",
            "profile": "coder",
        }
        assert await store.redis.zrange(KEYS.queued, 0, -1) == [b"s1"]

    async def test_concurrency_limit(self, store: SessionStore) -> None:
        """With max_sessions 2 the third session is refused as org_concurrency."""
        await admit(store, "s1")
        await admit(store, "s2")

        third = await admit(store, "s3")

        assert third == Admission(
            admitted=False, reason="org_concurrency", retry_after_ms=1000
        )
        assert await store.record("s3") is None

    async def test_concurrency_is_per_org(self, store: SessionStore) -> None:
        """Another org's sessions do not count against this org."""
        await admit(store, "s1", org="beta")
        await admit(store, "s2", org="beta")

        assert (await admit(store, "s3", org="acme")).admitted

    async def test_rate_limit(self, store: SessionStore) -> None:
        """Past per_minute admissions a minute, org_rate says when to retry."""
        await admit(store, "s1", max_sessions=10, per_minute=2)
        await admit(store, "s2", max_sessions=10, per_minute=2)

        third = await admit(store, "s3", max_sessions=10, per_minute=2)

        assert (third.admitted, third.reason) == (False, "org_rate")
        assert 0 < third.retry_after_ms <= RATE_WINDOW_MS
        assert await store.record("s3") is None

    async def test_queue_depth(self, store: SessionStore) -> None:
        """Past queue_max queued sessions, admission is refused as queue_full."""
        await admit(store, "s1", org="acme", queue_max=2)
        await admit(store, "s2", org="beta", queue_max=2)

        third = await admit(store, "s3", org="gamma", queue_max=2)

        assert third == Admission(
            admitted=False, reason="queue_full", retry_after_ms=1000
        )

    async def test_quota_keys_have_ttls(self, store: SessionStore) -> None:
        """After admission every quota key and the record expire (C12)."""
        await admit(store, "s1")

        ttls = {
            key: await store.redis.pttl(key)
            for key in (
                KEYS.org_slots("acme"),
                KEYS.org_rate("acme"),
                KEYS.queued,
                KEYS.session("s1"),
            )
        }

        assert all(ttl > 0 for ttl in ttls.values()), ttls
        assert ttls[KEYS.org_rate("acme")] <= RATE_WINDOW_MS
        assert ttls[KEYS.queued] <= SLOT_TTL_MS
        assert ttls[KEYS.session("s1")] <= SESSION_TTL_MS

    async def test_slot_ttl_follows_a_longer_lease(self, store: SessionStore) -> None:
        """A claim or renewal past the slot's lapse moves the slot key's TTL (C12)."""
        claim = await admitted_and_claimed(store, "s1", lease_ms=SLOT_TTL_MS * 2)
        after_claim = await store.redis.pttl(KEYS.org_slots("acme"))

        await store.renew(claim, SLOT_TTL_MS * 3)

        after_renew = await store.redis.pttl(KEYS.org_slots("acme"))
        assert SLOT_TTL_MS * 2 < after_claim <= SLOT_TTL_MS * 2 + 1000
        assert SLOT_TTL_MS * 3 < after_renew <= SLOT_TTL_MS * 3 + 1000


class TestClaim:
    """claim hands a queued session to exactly one worker."""

    async def test_claim_returns_env_and_deletes_it(self, store: SessionStore) -> None:
        """The claim carries the session's env and removes the env key."""
        await admit(store, "s1", env={"API_TOKEN": "abc"})

        claim = await store.claim("s1", node="node-1", lease_ms=LEASE_MS)

        assert claim is not None
        assert (claim.session_id, claim.org, claim.token) == ("s1", "acme", "node-1/1")
        assert claim.env == {"API_TOKEN": "abc"}
        assert claim.record["state"] == "starting"
        assert claim.record["node"] == "node-1"
        assert claim.record["lease"] == "node-1/1"
        assert await store.redis.exists(KEYS.session_env("s1")) == 0
        assert await store.redis.get(KEYS.lease("s1")) == b"node-1/1"
        assert await store.redis.zrange(KEYS.queued, 0, -1) == []

    async def test_claim_takes_the_job_out_of_arqs_queue(
        self, store: SessionStore
    ) -> None:
        """A claimed session's job leaves the queue arq polls; others stay."""
        for session_id in ("s1", "s2"):
            job = QueuedJob(
                key=f"arq:job:{session_id}", payload=b"job", score_ms=1, ttl_ms=9000
            )
            await admit(store, session_id, job=job)

        await store.claim("s1", node="node-1", lease_ms=LEASE_MS)

        assert await store.redis.zrange(KEYS.arq_queue, 0, -1) == [b"s2"]

    async def test_claim_without_env(self, store: SessionStore) -> None:
        """A session with no env is claimed with an empty env."""
        await admit(store, "s1")

        claim = await store.claim("s1", node="node-1", lease_ms=LEASE_MS)

        assert claim is not None
        assert claim.env == {}

    async def test_second_claim_is_refused(self, store: SessionStore) -> None:
        """A session is never claimed twice."""
        first = await admitted_and_claimed(store, "s1")

        second = await store.claim("s1", node="node-2", lease_ms=LEASE_MS)

        assert second is None
        assert await store.redis.get(KEYS.lease("s1")) == first.token.encode()

    async def test_unknown_session(self, store: SessionStore) -> None:
        """A session without a record is not claimable."""
        assert await store.claim("nope", node="node-1", lease_ms=LEASE_MS) is None

    async def test_fencing_tokens_increase(self, store: SessionStore) -> None:
        """Each claim gets a larger fencing token than the last."""
        first = await admitted_and_claimed(store, "s1")

        second = await admitted_and_claimed(store, "s2")

        assert (first.token, second.token) == ("node-1/1", "node-1/2")


class TestRenew:
    """renew extends a lease only for its owner."""

    async def test_owner_renews(self, store: SessionStore) -> None:
        """The owner's token renews the lease."""
        claim = await admitted_and_claimed(store, "s1")

        assert await store.renew(claim, LEASE_MS * 2) is Renewal.KEPT
        assert LEASE_MS < await store.redis.pttl(KEYS.lease("s1")) <= LEASE_MS * 2

    async def test_wrong_token(self, store: SessionStore) -> None:
        """A token that does not own the session renews nothing."""
        claim = await admitted_and_claimed(store, "s1")
        stale = Claim("s1", "acme", "node-9/99", claim.record, {})

        assert await store.renew(stale, LEASE_MS) is Renewal.LOST

    async def test_renewal_reports_a_cancel_request(self, store: SessionStore) -> None:
        """Once a client asks to cancel, the owner's renewal says so."""
        claim = await admitted_and_claimed(store, "s1")
        await store.touch("s1", "cancel_requested_ms")

        assert await store.renew(claim, LEASE_MS) is Renewal.CANCEL_REQUESTED
        assert await store.redis.get(KEYS.lease("s1")) == b"node-1/1"


class TestAppend:
    """append writes output only while the caller owns the session."""

    async def test_owner_appends(self, store: SessionStore) -> None:
        """Entries land in order with their running byte count, with a TTL."""
        claim = await admitted_and_claimed(store, "s1")

        backlog = await store.append(
            claim, [(b"o", b"hello\n"), (b"e", b"\xffraw")], ttl_ms=60_000
        )

        entries = await store.redis.xrange(KEYS.stdout("s1"))
        assert [fields for _, fields in entries] == [
            {b"o": b"hello\n", b"n": b"6"},
            {b"e": b"\xffraw", b"n": b"10"},
        ]
        assert backlog == 10
        assert 0 < await store.redis.pttl(KEYS.stdout("s1")) <= 60_000

    async def test_stale_token(self, store: SessionStore) -> None:
        """A stale lease token raises LeaseLost and writes nothing."""
        claim = await admitted_and_claimed(store, "s1")
        stale = Claim("s1", "acme", "node-1/0", claim.record, {})

        with pytest.raises(LeaseLost) as caught:
            await store.append(stale, [(b"o", b"late\n")], ttl_ms=60_000)

        assert caught.value.session_id == "s1"
        assert await store.redis.exists(KEYS.stdout("s1")) == 0


class TestAck:
    """ack records what a client consumed and trims it from the stream."""

    async def test_ack_trims_and_lowers_the_backlog(self, store: SessionStore) -> None:
        """Acknowledging the second of three entries leaves one entry's bytes."""
        claim = await admitted_and_claimed(store, "s1")
        await store.append(
            claim, [(b"o", b"a" * 10), (b"o", b"b" * 20), (b"e", b"c" * 5)], 60_000
        )
        ids = [entry_id for entry_id, _ in await store.redis.xrange(KEYS.stdout("s1"))]

        left = await store.ack("s1", ids[1].decode())

        assert left == 5
        assert await store.backlog("s1") == 5
        kept = [entry_id for entry_id, _ in await store.redis.xrange(KEYS.stdout("s1"))]
        assert kept == ids[1:]

    async def test_an_older_ack_changes_nothing(self, store: SessionStore) -> None:
        """A late ack of an earlier cursor never raises the backlog again."""
        claim = await admitted_and_claimed(store, "s1")
        await store.append(claim, [(b"o", b"a" * 10), (b"o", b"b" * 20)], 60_000)
        ids = [entry_id for entry_id, _ in await store.redis.xrange(KEYS.stdout("s1"))]
        await store.ack("s1", ids[1].decode())

        left = await store.ack("s1", ids[0].decode())

        assert left in (0, -1)
        assert await store.backlog("s1") == 0

    async def test_an_unknown_cursor_is_reported(self, store: SessionStore) -> None:
        """A cursor naming no kept entry answers -1."""
        await admitted_and_claimed(store, "s1")

        assert await store.ack("s1", "1-0") == -1

    async def test_notices_do_not_count_as_output(self, store: SessionStore) -> None:
        """A slow-client notice adds no bytes to the backlog."""
        claim = await admitted_and_claimed(store, "s1")

        await store.append(claim, [(b"o", b"x" * 7), (b"slow", b"123")], 60_000)

        assert await store.backlog("s1") == 7


class TestWriteStdin:
    """write_stdin appends what the client sends while the agent may read it."""

    async def test_data_is_counted_as_pending(self, store: SessionStore) -> None:
        """Data the worker has not consumed is reported as pending bytes."""
        await admitted_and_claimed(store, "s1")

        assert await store.write_stdin("s1", "d", b"hello") == 5
        assert await store.write_stdin("s1", "d", b"!") == 6

    async def test_data_after_eof_is_refused(self, store: SessionStore) -> None:
        """Data after an eof is -3 and never joins the stream."""
        await admitted_and_claimed(store, "s1")
        await store.write_stdin("s1", "d", b"before")
        await store.write_stdin("s1", "eof")

        refused = await store.write_stdin("s1", "d", b"after")

        entries = await store.redis.xrange(KEYS.stdin("s1"))
        assert refused == -3
        assert [fields for _, fields in entries] == [{b"d": b"before"}, {b"eof": b""}]

    async def test_a_cancel_after_eof_still_goes(self, store: SessionStore) -> None:
        """Closing stdin does not stop a client from cancelling the session."""
        await admitted_and_claimed(store, "s1")
        await store.write_stdin("s1", "eof")

        assert await store.write_stdin("s1", "cancel") >= 0

        entries = await store.redis.xrange(KEYS.stdin("s1"))
        assert [fields for _, fields in entries][-1] == {b"cancel": b""}


class TestFinish:
    """finish ends a session exactly once and frees its quota."""

    async def test_owner_finishes_once(self, store: SessionStore) -> None:
        """The owner's finish ends the session; a second finish does nothing."""
        claim = await admitted_and_claimed(store, "s1")

        first = await store.finish("s1", org="acme", expect=claim.token, outcome=EXIT_7)
        second = await store.finish(
            "s1", org="acme", expect=claim.token, outcome=EXIT_7
        )

        record = await store.record("s1")
        assert (first, second) == (True, False)
        assert record is not None
        assert (record["state"], record["cause"], record["exit_code"]) == (
            "ended",
            "agent_exit",
            "7",
        )
        assert await store.redis.exists(KEYS.lease("s1")) == 0
        assert await store.redis.zscore(KEYS.running, "s1") is None

    async def test_finish_frees_the_slot(self, store: SessionStore) -> None:
        """After a finish the org's freed slot admits a new session."""
        claim = await admitted_and_claimed(store, "s1")
        await admit(store, "s2")
        assert not (await admit(store, "s3")).admitted

        await store.finish("s1", org="acme", expect=claim.token, outcome=EXIT_7)

        assert (await admit(store, "s4")).admitted
        assert await store.redis.zcard(KEYS.org_slots("acme")) == 2

    async def test_finish_drops_unread_stdin(self, store: SessionStore) -> None:
        """Stdin no agent will read is deleted when the session ends."""
        claim = await admitted_and_claimed(store, "s1")
        await store.write_stdin("s1", "d", b"never read")

        await store.finish("s1", org="acme", expect=claim.token, outcome=EXIT_7)

        assert await store.redis.exists(KEYS.stdin("s1")) == 0

    async def test_finish_closes_stdout(self, store: SessionStore) -> None:
        """One end entry carrying the outcome closes the stdout stream."""
        claim = await admitted_and_claimed(store, "s1")
        await store.append(claim, [(b"o", b"done\n")], ttl_ms=60_000)

        await store.finish("s1", org="acme", expect=claim.token, outcome=EXIT_7)
        await store.finish("s1", org="acme", expect=claim.token, outcome=EXIT_7)

        entries = [fields for _, fields in await store.redis.xrange(KEYS.stdout("s1"))]
        assert entries[0] == {b"o": b"done\n", b"n": b"5"}
        assert len(entries) == 2
        assert json.loads(entries[1][b"end"]) == {
            "type": "end",
            "cause": "agent_exit",
            "exit_code": 7,
            "oom_killed": False,
        }
        assert 0 < await store.redis.pttl(KEYS.stdout("s1")) <= RETENTION_MS

    async def test_wrong_token(self, store: SessionStore) -> None:
        """A token that does not own the session ends nothing."""
        await admitted_and_claimed(store, "s1")

        ended = await store.finish("s1", org="acme", expect="node-2/7", outcome=EXIT_7)

        assert ended is False
        assert (await store.record("s1") or {})["state"] == "starting"

    async def test_cancel_queued(self, store: SessionStore) -> None:
        """expect='queued' ends an unclaimed session and frees its slot."""
        await admit(store, "s1")
        await admit(store, "s2")

        ended = await store.finish("s1", org="acme", expect="queued", outcome=CANCELLED)

        assert ended is True
        assert (await store.record("s1") or {})["state"] == "ended"
        assert await store.redis.zrange(KEYS.queued, 0, -1) == [b"s2"]
        assert await store.redis.zrange(KEYS.org_slots("acme"), 0, -1) == [b"s2"]
        assert await store.claim("s1", node="node-1", lease_ms=LEASE_MS) is None

    async def test_cancel_queued_refuses_claimed(self, store: SessionStore) -> None:
        """expect='queued' does not end a session a worker has claimed."""
        await admitted_and_claimed(store, "s1")

        ended = await store.finish("s1", org="acme", expect="queued", outcome=CANCELLED)

        assert ended is False

    async def test_lapsed_lease_frees_slot(self, store: SessionStore) -> None:
        """When the owner's lease lapses, the slot frees and 'lapsed' ends it."""
        for session_id in ("s1", "s2"):
            await admit(store, session_id)
            await store.claim(session_id, node="node-1", lease_ms=50)
        await asyncio.sleep(0.1)

        third = await admit(store, "s3")
        ended = await store.finish(
            "s1",
            org="acme",
            expect="lapsed",
            outcome=Outcome(cause=EndCause.WORKER_LOST),
        )

        assert third.admitted
        assert ended is True
        assert (await store.record("s1") or {})["cause"] == "worker_lost"


class TestDrainRequest:
    """Operators' drain request and what it records for progress."""

    async def test_a_request_records_the_sessions_at_its_start(
        self, store: SessionStore
    ) -> None:
        """The node's heartbeat count is kept with the request's time."""
        await store.beat_node("node-1", {"sessions": "3"}, ttl_ms=10_000)

        await store.set_drain("node-1", drain=True)
        request = await store.drain_request("node-1")

        assert request is not None
        assert request["sessions_at_start"] == 3
        assert request["requested_ms"] > 0

    async def test_a_repeated_request_keeps_the_first(
        self, store: SessionStore
    ) -> None:
        """Asking again while draining does not restart the progress."""
        await store.beat_node("node-1", {"sessions": "3"}, ttl_ms=10_000)
        await store.set_drain("node-1", drain=True)
        await store.beat_node("node-1", {"sessions": "1"}, ttl_ms=10_000)

        await store.set_drain("node-1", drain=True)

        assert (await store.drain_request("node-1") or {})["sessions_at_start"] == 3

    async def test_undo_withdraws_the_request(self, store: SessionStore) -> None:
        """After undo there is no request and the worker sees none."""
        await store.set_drain("node-1", drain=True)

        await store.set_drain("node-1", drain=False)

        assert await store.drain_request("node-1") is None
        assert await store.beat_node("node-1", {}, ttl_ms=10_000) is False

    async def test_a_bare_request_has_no_start(self, store: SessionStore) -> None:
        """A request stored as the bare flag reads as one without a start."""
        await store.redis.set(KEYS.node_drain("node-1"), "1")

        assert await store.drain_request("node-1") == {}


class TestRunningSessions:
    """The claimed sessions operators see."""

    async def test_claimed_sessions_are_listed_oldest_first(
        self, store: SessionStore
    ) -> None:
        """Each claimed session shows its org, profile, node and state."""
        await admitted_and_claimed(store, "s1")
        await asyncio.sleep(0.01)
        await admitted_and_claimed(store, "s2")
        assert (await admit(store, "s3", max_sessions=3)).admitted

        running = await store.running_sessions()

        assert [row["id"] for row in running] == ["s1", "s2"]
        assert running[0]["org"] == "acme"
        assert running[0]["profile"] == "coder"
        assert running[0]["node"] == "node-1"
        assert running[0]["state"] == "starting"
        assert int(running[1]["claimed_ms"]) >= int(running[0]["claimed_ms"])

    async def test_an_ended_session_is_not_listed(self, store: SessionStore) -> None:
        """A finished session leaves the listing."""
        claim = await admitted_and_claimed(store, "s1")

        await store.finish("s1", org="acme", expect=claim.token, outcome=EXIT_7)

        assert await store.running_sessions() == []

    async def test_a_record_ended_between_reads_is_skipped(
        self, store: SessionStore
    ) -> None:
        """A session still in the running set but recorded as ended is left out."""
        await admitted_and_claimed(store, "s1")
        await store.redis.hset(KEYS.session("s1"), "state", "ended")

        assert await store.running_sessions() == []
