"""The one module that talks to Redis about sessions.

It runs the scripts of ``shared.keys``, reads and writes the stdio streams,
and turns redis-py's errors into the fleet's. Two clients are used: one for
short commands, with a socket timeout, and one for blocking stream reads,
whose reads are cut into slices shorter than any socket timeout it has.
The relay's loops each take a ``Channel`` of their own from one of them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool, Connection, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from shared.errors import LeaseLost
from shared.keys import (
    ACK,
    ADMIT,
    APPEND,
    AUDIT_MAX_EVENTS,
    CLAIM,
    FINISH,
    OUTPUT_RETENTION_MS,
    OWN_NODE,
    PUT_ARCHIVE,
    RELEASE_NODE,
    RENEW,
    RETENTION_MS,
    STDIN,
    STDIN_CONSUMED,
    TOUCH,
    UPDATE,
    UPLOAD,
    Keys,
)
from shared.models import EndCause, Outcome
from shared.telemetry import shared_metrics

StreamEntry = tuple[bytes, dict[bytes, bytes]]
# What a prepared command starts with: no bool or float, which its
# channel's cache would take for the int it equals.
Word = str | bytes | int

# A blocking read is cut into slices this much shorter than the client's
# socket timeout, so the reply always lands before the socket gives up.
_SOCKET_MARGIN_S = 1.0
# Client-to-agent bytes a worker may fall behind by; past it the gateway
# stops reading the client's socket until the agent has read its stdin.
STDIN_PENDING_BYTES = 8 * 1024**2
# Redis treats BLOCK 0 as "forever"; one slice of a forever read is this long.
_FOREVER_SLICE_MS = 60_000
# A channel unused for longer than this checks its connection before a
# command: a closed one is replaced instead of failing the command.
CHANNEL_IDLE_CHECK_S = 1.0
# More short commands than this at once in one process wait for a free
# connection; far above what a replica's requests and timers hold.
_POOL_CONNECTIONS = 512


class _BoundedSetUp(AbstractConnection):
    """A connection whose whole set-up, handshake replies included, ends
    within its ``socket_connect_timeout``.

    redis-py reads the replies of its set-up commands (``CLIENT SETINFO``,
    ``AUTH``, ``SELECT``) with the socket timeout, on top of the connect
    timeout; against a hung Redis a new connection would then cost both.
    """

    async def connect(self) -> None:
        """Connect and shake hands within the connect timeout, or fail."""
        if self.is_connected:
            return
        try:
            async with asyncio.timeout(self.socket_connect_timeout):
                await super().connect()  # type: ignore[no-untyped-call]
        except TimeoutError as exc:
            # Cut off mid-handshake: replies may still be on their way, so
            # the socket must never carry a command.
            await self.disconnect(nowait=True)
            raise RedisTimeoutError(
                f"Timeout connecting to {self._host_error()}"
            ) from exc


class BoundedConnection(_BoundedSetUp, Connection):
    """A TCP connection with its set-up bounded."""


class BoundedUnixConnection(_BoundedSetUp, UnixDomainSocketConnection):
    """A unix socket connection with its set-up bounded."""


class BoundedSSLConnection(_BoundedSetUp, SSLConnection):
    """A TLS connection with its set-up bounded."""


# Each kind of connection a Redis URL names, and its bounded variant.
_BOUNDED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: BoundedConnection,
    UnixDomainSocketConnection: BoundedUnixConnection,
    SSLConnection: BoundedSSLConnection,
}


def command_client(
    url: str, *, timeout_s: float, connect_timeout_s: float, pool_wait_s: float
) -> ArqRedis:
    """Return a client for short commands, each bounded in time.

    One command fails within ``pool_wait_s + connect_timeout_s + timeout_s``
    whether Redis refuses, hangs or never answers a connect. The pool makes
    new connections outside its lock (redis-py's default pool connects
    under it, so one hung connect stalls every other caller), and a
    connection's set-up sends no command it would wait for unless the URL
    asks for a password or a database.
    """
    options: dict[str, Any] = {
        "max_connections": _POOL_CONNECTIONS,
        "timeout": pool_wait_s,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "lib_name": None,
        "lib_version": None,
    }
    # The URL's own options win, as in redis-py's from_url; the kind of
    # connection it names (TCP, unix socket, TLS) is kept, bounded.
    options.update(parse_url(url))
    options["connection_class"] = _BOUNDED[options.get("connection_class", Connection)]
    client = ArqRedis(BlockingConnectionPool(**options))
    # The client owns the pool it was given, and closes it with itself.
    client.auto_close_connection_pool = True
    return client


def blocking_client(url: str) -> Redis:
    """Return a client for blocking stream reads: no socket timeout, since
    ``SessionStore.read_stream`` waits in slices of its own."""
    client: Redis = Redis.from_url(url, socket_timeout=None)
    return client


class Renewal(IntEnum):
    """What a lease renewal found."""

    LOST = 0
    KEPT = 1
    CANCEL_REQUESTED = 2


@dataclass(frozen=True)
class Admission:
    """Outcome of the admission script."""

    admitted: bool
    reason: str | None = None
    retry_after_ms: int = 0
    admitted_ms: int = 0


@dataclass(frozen=True)
class Quota:
    """The bounds one admission is checked against."""

    max_sessions: int
    per_minute: int
    queue_max: int
    # How long a queued session holds its slot, and its record lives.
    slot_ttl_ms: int
    session_ttl_ms: int


class Channel:
    """A connection of its own for one relay loop: a session's stdin or its
    output, on one side of Redis.

    Such a loop sends one command at a time and waits for its reply, so it
    needs no pool, no pool lock and none of the client's per-call wrappers,
    which cost half the CPU of a command through redis-py's client; on the
    relay's path every message pays them. The connection takes the
    settings of ``client``'s pool, and each command ends within
    ``timeout_s`` (None: as the Redis command itself bounds it). A command
    that times out, fails on the socket or is cancelled closes the
    connection, whose reply could otherwise arrive for the next command;
    an error reply leaves it open. The next command opens it again, and a
    connection idle for a while is checked first, as the pool checks one it
    hands out, since Redis' ``timeout`` or a proxy may have closed it.

    The bound is kept by one timer for the channel, not one per command: a
    loop that sends a command per message would arm and cancel thousands a
    second. The timer looks at the command in flight when it fires, and
    fires again when that one would be due.
    """

    def __init__(self, client: Redis, *, timeout_s: float | None) -> None:
        pool = client.connection_pool
        self._connection: AbstractConnection = pool.connection_class(
            **{**pool.connection_kwargs, "socket_timeout": None}
        )
        self._timeout_s = timeout_s
        self._used_at_s = 0.0
        self._prepared: dict[tuple[Word, ...], Prepared] = {}
        # The command in flight: when it was sent, and the task awaiting it.
        self._sent_at_s: float | None = None
        self._waiting: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    async def execute(self, *args: EncodableT) -> Any:
        """Send one command and return its reply, unparsed."""
        return await self._call(pack(args), args[0])

    async def script(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[EncodableT]
    ) -> Any:
        """Run a registered script, loading it first if Redis lost it."""
        # Not kept: a caller may run a script here for many keys.
        words: tuple[Word, ...] = ("EVALSHA", script.sha, len(keys), *keys)
        return await Prepared(self, words, script)(*args)

    def prepare(self, *leading: Word) -> Prepared:
        """The command that starts with ``leading``, packed once for this
        channel: a loop that sends it per message packs only what follows."""
        prepared = self._prepared.get(leading)
        if prepared is None:
            prepared = self._prepared[leading] = Prepared(self, leading)
        return prepared

    def prepare_script(
        self, script: AsyncScript, keys: Sequence[str], *leading: Word
    ) -> Prepared:
        """As ``prepare``, for a registered script with ``keys`` and its
        first arguments ``leading``; it is loaded again if Redis lost it."""
        name = (script.sha, len(keys), *keys, *leading)
        prepared = self._prepared.get(name)
        if prepared is None:
            words = ("EVALSHA", script.sha, len(keys), *keys, *leading)
            prepared = self._prepared[name] = Prepared(self, words, script)
        return prepared

    async def _call(self, command: bytes, name: EncodableT) -> Any:
        connection = self._connection
        now = time.monotonic()
        if now - self._used_at_s > CHANNEL_IDLE_CHECK_S and connection.is_connected:
            await self._drop_if_closed()
        self._used_at_s = now
        if self._timeout_s is not None:
            self._sent_at_s, self._waiting = now, asyncio.current_task()
            if self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._timeout_s, self._look)
        try:
            await connection.send_packed_command(command, check_health=False)
            return await connection.read_response()
        except ResponseError:
            raise
        except asyncio.CancelledError:
            await connection.disconnect(nowait=True)
            task = asyncio.current_task()
            if self._expired and task is not None and task.uncancel() == 0:
                raise RedisTimeoutError(f"no reply from Redis to {name!r}") from None
            raise
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            self._sent_at_s = self._waiting = None
            self._expired = False

    def _look(self) -> None:
        """Cancel the command in flight if it is due; else wait until the
        one in flight would be. With none in flight the timer stops, and
        the next command starts it again."""
        self._timer = None
        if self._sent_at_s is None or self._waiting is None or self._timeout_s is None:
            return
        left_s = self._sent_at_s + self._timeout_s - time.monotonic()
        if left_s <= 0:
            self._expired = True
            self._waiting.cancel()
        else:
            self._timer = asyncio.get_running_loop().call_later(left_s, self._look)

    async def _drop_if_closed(self) -> None:
        """Disconnect a connection the server closed, or that holds data no
        command asked for, so that the next command reconnects."""
        try:
            stale = await self._connection.can_read_destructive()  # type: ignore[no-untyped-call]
        except (RedisConnectionError, OSError):
            stale = True
        if stale:
            await self._connection.disconnect(nowait=True)

    async def close(self) -> None:
        """Close the connection; a later command opens it again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._connection.disconnect(nowait=True)


class Prepared:
    """A command of one channel whose first arguments are packed once."""

    def __init__(
        self,
        channel: Channel,
        leading: Sequence[Word],
        script: AsyncScript | None = None,
    ) -> None:
        if any(isinstance(word, bool | float) for word in leading):
            # The channel's cache would take True for 1 and 1.0 for 1.
            raise TypeError("a prepared command's first words are str, bytes or int")
        self._channel = channel
        self._name = leading[0]
        self._count = len(leading)
        self._head = _bulk_strings(leading)
        self._head_of_one = b"*%d\r\n" % (self._count + 1) + self._head
        self._script = script

    async def __call__(self, *args: EncodableT) -> Any:
        """Send the command with ``args`` after its first arguments."""
        if len(args) == 1 and type(args[0]) is bytes:
            # A message's bytes alone: the relay's own case, in one step.
            value = args[0]
            command = self._head_of_one + b"$%d\r\n%s\r\n" % (len(value), value)
        else:
            command = b"*%d\r\n" % (self._count + len(args)) + self._head
            command += _bulk_strings(args)
        if self._script is None:
            return await self._channel._call(command, self._name)
        try:
            return await self._channel._call(command, self._name)
        except NoScriptError:
            await self._channel.execute("SCRIPT", "LOAD", self._script.script)
            return await self._channel._call(command, self._name)


def pack(args: Sequence[EncodableT]) -> bytes:
    """One command in RESP, Redis' wire format: an array of bulk strings.

    The relay sends a command per message, and redis-py's general encoder,
    with its checks for every type, costs several times this.
    """
    return b"*%d\r\n" % len(args) + _bulk_strings(args)


def _bulk_strings(args: Sequence[EncodableT]) -> bytes:
    parts = []
    for arg in args:
        if type(arg) is bytes:
            value = arg
        elif isinstance(arg, str):
            value = arg.encode()
        elif isinstance(arg, bytes | bytearray | memoryview):
            value = bytes(arg)
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            value = repr(arg).encode()
        else:
            raise TypeError(f"{type(arg).__name__} is no Redis argument")
        parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(parts)


class ScriptBatch:
    """Calls of one Lua script, coalesced: every call made in one turn of
    the event loop goes to Redis in one pipeline.

    Under load many requests reach the same script in the same turn, and
    one write and one read for all of them cost a fraction of a round trip
    each; a lone call waits for the end of its turn, no longer. A call
    whose caller was cancelled before its batch went out is dropped, so it
    changes nothing in Redis.
    """

    def __init__(self, redis: Redis, script: AsyncScript) -> None:
        self._redis = redis
        self._script = script
        self._pending: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, *, keys: Sequence[str], args: Sequence[EncodableT]) -> Any:
        """Run the script with ``keys`` and ``args``; return its reply."""
        loop = asyncio.get_running_loop()
        call = _Call(keys, args, loop.create_future())
        self._pending.append(call)
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await call.reply

    def _flush(self) -> None:
        batch = [call for call in self._pending if not call.reply.cancelled()]
        self._pending = []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command(
                "EVALSHA", self._script.sha, len(call.keys), *call.keys, *call.args
            )
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for call in batch:
                _settle(call.reply, exc)
            return
        except asyncio.CancelledError:
            for call in batch:
                call.reply.cancel()
            raise
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError) and not call.reply.done():
                # Redis lost its scripts (restarted, or flushed): the script
                # object loads it again and runs this call alone.
                try:
                    reply = await self._script(keys=call.keys, args=call.args)
                except Exception as exc:
                    reply = exc
            _settle(call.reply, reply)


@dataclass(frozen=True)
class _Call:
    keys: Sequence[str]
    args: Sequence[EncodableT]
    reply: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    """Give ``future`` its reply, or the error in its place, unless its
    caller stopped waiting."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass(frozen=True)
class QueuedJob:
    """An arq job, serialized by arq, for the admission script to queue."""

    key: str
    payload: bytes
    score_ms: int
    ttl_ms: int


@dataclass(frozen=True)
class Claim:
    """A worker's ownership of a session, proven by its lease token."""

    session_id: str
    org: str
    token: str
    record: dict[str, str]
    env: dict[str, str]


class SessionStore:
    """Session records, leases, quotas and stdio streams in Redis."""

    def __init__(self, redis: Redis, *, keys: Keys, blocking: Redis | None = None):
        self.redis = redis
        self.blocking = blocking or redis
        self.keys = keys
        # Admissions arrive many at a time; they share round trips.
        self._admit = ScriptBatch(redis, redis.register_script(ADMIT))
        self._claim = redis.register_script(CLAIM)
        self._renew = redis.register_script(RENEW)
        self._append = redis.register_script(APPEND)
        self._update = redis.register_script(UPDATE)
        self._finish = redis.register_script(FINISH)
        self._ack = redis.register_script(ACK)
        self._touch = redis.register_script(TOUCH)
        self._stdin = redis.register_script(STDIN)
        self._stdin_consumed = redis.register_script(STDIN_CONSUMED)
        self._upload = redis.register_script(UPLOAD)
        self._put_archive = redis.register_script(PUT_ARCHIVE)
        self._own_node = redis.register_script(OWN_NODE)
        self._release_node = redis.register_script(RELEASE_NODE)

    async def admit(
        self,
        session_id: str,
        *,
        org: str,
        quota: Quota,
        fields: Mapping[str, str],
        env: Mapping[str, str],
        audit: Mapping[str, str],
        job: QueuedJob | None,
    ) -> Admission:
        """Count the session against its org's quotas; if there is room,
        record it as queued with its environment and first audit event, and
        queue ``job`` for the workers, all in one atomic step.

        ``job`` is None for a session that waits for its workspace archive;
        the upload enqueues it later.
        """
        k = self.keys
        lists = [
            _flat({"org": org, **fields}),
            _flat(env),
            _flat({"event": "created", **audit}),
        ]
        reply = await self._admit(
            keys=[
                k.org_slots(org),
                k.org_rate(org),
                k.queued,
                k.session(session_id),
                k.org_sessions(org),
                k.session_env(session_id),
                k.audit(session_id),
                job.key if job else "",
                k.arq_queue,
            ],
            args=[
                session_id,
                quota.max_sessions,
                quota.per_minute,
                quota.queue_max,
                quota.slot_ttl_ms,
                quota.session_ttl_ms,
                *(len(items) for items in lists),
                job.payload if job else b"",
                job.score_ms if job else 0,
                job.ttl_ms if job else 0,
                *(item for items in lists for item in items),
            ],
        )
        verdict = _text(reply[0])
        if verdict == "ok":
            return Admission(admitted=True, admitted_ms=int(reply[1]))

        return Admission(admitted=False, reason=verdict, retry_after_ms=int(reply[1]))

    async def record(self, session_id: str) -> dict[str, str] | None:
        """Return the session's record, or None when there is none."""
        key = self.keys.session(session_id)
        # redis-py types its asyncio client's replies as maybe-awaitable.
        raw: dict[bytes, bytes] = await self.redis.hgetall(key)  # type: ignore[misc]
        if not raw:
            return None
        return {_text(name): _text(value) for name, value in raw.items()}

    async def claim(self, session_id: str, *, node: str, lease_ms: int) -> Claim | None:
        """Take a queued session for this node; None if it is not claimable."""
        k = self.keys
        org = await self.redis.hget(k.session(session_id), "org")  # type: ignore[misc]
        if org is None:
            return None
        org = _text(org)
        reply = await self._claim(
            keys=[
                k.session(session_id),
                k.lease(session_id),
                k.queued,
                k.org_slots(org),
                k.fence,
                k.session_env(session_id),
                k.running,
                k.arq_queue,
            ],
            args=[session_id, node, lease_ms],
        )
        if _text(reply[0]) != "ok":
            return None

        return Claim(
            session_id=session_id,
            org=org,
            token=_text(reply[1]),
            record=_pairs(reply[3]),
            env=_pairs(reply[2]),
        )

    async def renew(self, claim: Claim, lease_ms: int) -> Renewal:
        """Extend the lease and the quota slot, and learn of cancellation."""
        k = self.keys
        sid = claim.session_id
        reply = await self._renew(
            keys=[k.lease(sid), k.org_slots(claim.org), k.running, k.session(sid)],
            args=[claim.token, lease_ms, sid],
        )
        return Renewal(int(reply))

    async def append(
        self,
        claim: Claim,
        entries: Sequence[tuple[bytes, bytes]],
        ttl_ms: int,
        *,
        via: Channel | None = None,
    ) -> int:
        """Add stdout/stderr entries, fenced by the lease; a relay loop sends
        them ``via`` its own channel.

        Returns:
            The bytes of output that no client has acknowledged yet.

        Raises:
            LeaseLost: another owner holds the session now.
        """
        pairs: list[EncodableT] = [item for entry in entries for item in entry]
        k = self.keys
        sid = claim.session_id
        keys = [k.lease(sid), k.stdout(sid), k.session(sid)]
        try:
            if via is None:
                args: list[EncodableT] = [claim.token, ttl_ms, *pairs]
                _, backlog = await self._append(keys=keys, args=args)
            elif len(entries) == 1:
                # Most often one entry: prepared up to its field, by field.
                (field, value), token = entries[0], claim.token
                call = via.prepare_script(self._append, keys, token, ttl_ms, field)
                _, backlog = await call(value)
            else:
                call = via.prepare_script(self._append, keys, claim.token, ttl_ms)
                _, backlog = await call(*pairs)
        except ResponseError as exc:
            if "LEASE_LOST" in str(exc):
                raise LeaseLost(sid) from exc
            raise
        return int(backlog)

    async def backlog(self, session_id: str) -> int:
        """Return the output bytes of a session that are not acknowledged."""
        out, acked = await self.redis.hmget(  # type: ignore[misc]
            self.keys.session(session_id), ["out_bytes", "acked_bytes"]
        )
        return int(out or 0) - int(acked or 0)

    async def end_lapsed(self) -> int:
        """End as ``worker_lost`` every claimed session whose lease lapsed.

        Any worker or scheduler replica may call this; each session is
        ended once, by whichever call comes first.
        """
        lapsed = await self.redis.zrangebyscore(
            self.keys.running, "-inf", await self.now_ms()
        )
        ended = 0
        for raw in lapsed:
            session_id = _text(raw)
            record = await self.record(session_id)
            if record is None:
                await self.redis.zrem(self.keys.running, session_id)
                continue
            outcome = Outcome(cause=EndCause.WORKER_LOST, detail="lease lapsed")
            ended += await self.finish(
                session_id, org=record["org"], expect="lapsed", outcome=outcome
            )

        return ended

    async def touch(self, session_id: str, field: str) -> int:
        """Stamp Redis' clock into ``field``; returns it, or 0 if no session."""
        now_ms = await self._touch(keys=[self.keys.session(session_id)], args=[field])
        return int(now_ms)

    async def now_ms(self) -> int:
        """Return Redis' clock in milliseconds, the fleet's common time."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def ack(self, session_id: str, cursor: str) -> int:
        """Record that a client consumed output up to ``cursor``; trim it.

        Returns:
            The backlog left, or -1 when ``cursor`` names no kept entry.
        """
        k = self.keys
        left = await self._ack(
            keys=[k.session(session_id), k.stdout(session_id)], args=[cursor]
        )
        return int(left)

    async def update(self, claim: Claim, fields: Mapping[str, str]) -> bool:
        """Write fields of the session's record while owning it.

        A value of ``"now"`` is replaced by Redis' clock in milliseconds.
        """
        flat = [item for pair in fields.items() for item in pair]
        k = self.keys
        written = await self._update(
            keys=[k.lease(claim.session_id), k.session(claim.session_id)],
            args=[claim.token, *flat],
        )
        return bool(written)

    async def finish(
        self,
        session_id: str,
        *,
        org: str,
        expect: str,
        outcome: Outcome,
        extra: Mapping[str, str] | None = None,
    ) -> bool:
        """End the session once: record the outcome, free its slot, close stdout.

        Args:
            expect: the owner's lease token; ``"queued"`` to end a session no
                worker claimed; ``"lapsed"`` to end one whose owner died.

        Returns:
            True when this call ended the session, False when it was not
            (or no longer) the caller's to end.
        """
        k = self.keys
        fields = {**outcome.record_fields(), **(extra or {})}
        flat = [item for pair in fields.items() for item in pair]
        ended = await self._finish(
            keys=[
                k.lease(session_id),
                k.session(session_id),
                k.org_slots(org),
                k.running,
                k.queued,
                k.stdout(session_id),
                k.stdin(session_id),
                k.upload(session_id),
                k.egress(session_id),
            ],
            args=[
                expect,
                session_id,
                RETENTION_MS,
                json.dumps(outcome.end_message()),
                *flat,
            ],
        )
        # Counted here, where the script decides, so that each session's
        # end is counted once by whichever process recorded it.
        if ended:
            shared_metrics().ends.add(1, {"cause": outcome.cause.value})
        return bool(ended)

    async def write_stdin(
        self,
        session_id: str,
        field: str,
        value: bytes = b"",
        *,
        max_pending_bytes: int = STDIN_PENDING_BYTES,
        writer: str = "",
        seq: int = 0,
        via: Channel | None = None,
    ) -> int:
        """Append client-to-agent data (``d``), ``eof`` or ``cancel``; a
        relay loop writes ``via`` its own channel.

        A ``writer`` numbers its messages with ``seq`` from 1; one it sends
        again after a lost connection is taken as written and not repeated.

        Returns:
            The stdin bytes the worker has not consumed yet; -1 when the
            session has ended; -2 when that backlog is full and nothing was
            written (try again once the worker has caught up); -3 when data
            follows an ``eof`` and nothing was written.
        """
        k = self.keys
        keys = [k.session(session_id), k.stdin(session_id)]
        common: list[Word] = [max_pending_bytes, RETENTION_MS, writer, field]
        if via is None:
            args = [*common, seq, value]
            return int(await self._stdin(keys=keys, args=args))
        if not writer:
            # Unnumbered, every message of the loop differs in its bytes alone.
            return int(await via.prepare_script(self._stdin, keys, *common, 0)(value))
        return int(await via.prepare_script(self._stdin, keys, *common)(seq, value))

    async def consumed_stdin(
        self, session_id: str, entry_id: bytes, consumed_bytes: int
    ) -> None:
        """Drop stdin entries up to ``entry_id`` once written to the agent."""
        k = self.keys
        await self._stdin_consumed(
            keys=[k.session(session_id), k.stdin(session_id)],
            args=[entry_id, consumed_bytes],
        )

    async def add_egress_record(
        self, session_id: str, fields: Mapping[str, str], *, max_entries: int
    ) -> None:
        """Append one proxy connection record to the session's egress log.

        Not fenced by the lease: a record states what this node's proxy did
        carry, which stays true whoever owns the session afterwards.
        """
        key = self.keys.egress(session_id)
        entry: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, entry, maxlen=max_entries, approximate=False)
            pipe.pexpire(key, RETENTION_MS)
            await pipe.execute()

    async def egress_records(self, session_id: str) -> list[dict[str, str]]:
        """Return the session's egress records, oldest first."""
        entries = await self.redis.xrange(self.keys.egress(session_id))
        return [
            {_text(name): _text(value) for name, value in fields.items()}
            for _, fields in entries
        ]

    async def last_id(self, key: str) -> str | None:
        """Return the id of a stream's last entry, or None when it is empty."""
        last = await self.redis.xrevrange(key, "+", "-", count=1)
        return _text(last[0][0]) if last else None

    async def read_stream(
        self,
        key: str,
        cursor: bytes | str,
        *,
        block_ms: int,
        count: int = 512,
        via: Channel | None = None,
    ) -> list[StreamEntry]:
        """Read entries after ``cursor``, waiting up to ``block_ms`` (0: forever).

        Returns an empty list when the wait ends with nothing new. The wait
        never fails on the blocking client's socket timeout, however long.
        A relay loop reads ``via`` its own channel (``blocking_channel``).
        """
        deadline = None if block_ms == 0 else time.monotonic() + block_ms / 1000
        slice_ms = self._slice_ms()
        while True:
            wait_ms = slice_ms
            if deadline is not None:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    return []
                wait_ms = min(slice_ms, left_ms)
            if via is not None:
                command = ("XREAD", "COUNT", count, "BLOCK", wait_ms, "STREAMS", key)
                if deadline is None:
                    # Forever's slices are alike: their command is packed once.
                    raw = await via.prepare(*command)(cursor)
                else:
                    raw = await via.execute(*command, cursor)
                if raw:
                    # One stream was read: RESP2 answers [[key, entries]],
                    # RESP3 {key: entries}.
                    entries = (
                        next(iter(raw.values())) if isinstance(raw, dict) else raw[0][1]
                    )
                    return [
                        (entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                        for entry_id, flat in entries
                    ]
                continue
            reply = await self.blocking.xread({key: cursor}, count=count, block=wait_ms)
            if reply:
                return [(bytes(i), dict(f)) for i, f in reply[0][1]]

    def command_channel(self) -> Channel:
        """A channel of its own for a relay loop's writes, each bounded in
        time as the command client's are."""
        timeout_s = self.redis.connection_pool.connection_kwargs.get("socket_timeout")
        return Channel(self.redis, timeout_s=timeout_s)

    def blocking_channel(self) -> Channel:
        """A channel of its own for a relay loop's blocking reads."""
        return Channel(self.blocking, timeout_s=None)

    def _slice_ms(self) -> int:
        timeout_s = self.blocking.connection_pool.connection_kwargs.get(
            "socket_timeout"
        )
        if timeout_s is None:
            return _FOREVER_SLICE_MS
        return max(100, int((float(timeout_s) - _SOCKET_MARGIN_S) * 1000))

    async def beat_node(
        self, node: str, fields: Mapping[str, str], ttl_ms: int
    ) -> bool:
        """Record a worker's heartbeat; returns whether operators want it drained."""
        k = self.keys
        now_ms = await self.now_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(k.node(node), mapping={**fields, "heartbeat_ms": str(now_ms)})
            pipe.pexpire(k.node(node), ttl_ms)
            pipe.zadd(k.nodes, {node: now_ms})
            pipe.zremrangebyscore(k.nodes, "-inf", now_ms - ttl_ms)
            pipe.exists(k.node_drain(node))
            *_, drain = await pipe.execute()
        return bool(drain)

    async def own_node(self, node: str, instance: str, ttl_ms: int) -> tuple[str, int]:
        """Take or keep ``node`` for worker process ``instance`` for ``ttl_ms``.

        Returns:
            The holder (``instance`` when this call took or kept it) and the
            milliseconds its hold has left.
        """
        holder, left_ms = await self._own_node(
            keys=[self.keys.node_owner(node)], args=[instance, ttl_ms]
        )
        return _text(holder), int(left_ms)

    async def release_node(self, node: str, instance: str) -> None:
        """Give ``node`` up, so that a worker started next need not wait,
        and take it out of the node listing."""
        k = self.keys
        await self._release_node(
            keys=[k.node_owner(node), k.node(node), k.nodes], args=[instance, node]
        )

    async def nodes(self) -> list[dict[str, str]]:
        """Return each node's last heartbeat record, most recent first."""
        names = await self.redis.zrevrange(self.keys.nodes, 0, -1)
        records = []
        for raw in names:
            node = _text(raw)
            record = await self.redis.hgetall(self.keys.node(node))  # type: ignore[misc]
            if record:
                records.append(
                    {"node": node, **{_text(k): _text(v) for k, v in record.items()}}
                )
        return records

    async def queue_stats(self) -> tuple[int, int | None]:
        """Return the queue's depth and its oldest entry's admission time."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.queued)
            pipe.zrange(self.keys.queued, 0, 0, withscores=True)
            depth, oldest = await pipe.execute()
        return int(depth), (int(oldest[0][1]) if oldest else None)

    async def node_known(self, node: str) -> bool:
        """True when ``node`` has sent a heartbeat recently enough to list."""
        return await self.redis.zscore(self.keys.nodes, node) is not None

    async def set_drain(self, node: str, *, drain: bool) -> None:
        """Ask a node to stop claiming sessions, or to resume; the request
        stands until an operator withdraws it."""
        key = self.keys.node_drain(node)
        if not drain:
            await self.redis.delete(key)
            return

        sessions = await self.redis.hget(self.keys.node(node), "sessions")  # type: ignore[misc]
        request = {
            "requested_ms": await self.now_ms(),
            "sessions_at_start": int(sessions or 0),
        }
        # A repeated request keeps the first one, so that progress is
        # measured from the sessions the node ran when the drain began.
        await self.redis.set(key, json.dumps(request), nx=True)

    async def drain_request(self, node: str) -> dict[str, int] | None:
        """Return the operators' standing drain request of ``node``, if any:
        when it was made and how many sessions the node then ran."""
        raw = await self.redis.get(self.keys.node_drain(node))
        if raw is None:
            return None
        try:
            request = json.loads(raw)
        except ValueError:
            request = None
        # A request written before its start was recorded is the bare "1".
        if not isinstance(request, dict):
            return {}
        return {name: int(value) for name, value in request.items()}

    async def running_sessions(self) -> list[dict[str, str]]:
        """Return every claimed session that has not ended, oldest claim first,
        with its id, org, profile, node, state, claim time and start kind."""
        names = [
            _text(raw) for raw in await self.redis.zrange(self.keys.running, 0, -1)
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in names:
                pipe.hmget(self.keys.session(session_id), list(_RUNNING_FIELDS))
            rows = await pipe.execute()
        sessions = []
        for session_id, values in zip(names, rows, strict=True):
            fields = dict(zip(_RUNNING_FIELDS, values, strict=True))
            # A record can expire or end between the two reads.
            if fields["state"] is None or _text(fields["state"]) == "ended":
                continue
            row = {k: _text(v) for k, v in fields.items() if v is not None}
            sessions.append({"id": session_id, **row})
        sessions.sort(key=lambda row: int(row.get("claimed_ms", 0)))

        return sessions

    async def put_upload(self, session_id: str, archive: bytes, ttl_ms: int) -> str:
        """Keep the workspace archive a queued session waits for.

        Returns "ok", or why it was not taken: "not_queued", "not_expected"
        or "already_uploaded".
        """
        k = self.keys
        reply = await self._upload(
            keys=[k.session(session_id), k.upload(session_id)], args=[archive, ttl_ms]
        )
        return _text(reply)

    async def take_upload(self, session_id: str) -> bytes | None:
        """Return and delete the session's uploaded archive, if any."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.upload(session_id))
            pipe.delete(self.keys.upload(session_id))
            archive, _ = await pipe.execute()
        return archive  # type: ignore[no-any-return]

    async def put_archive(self, claim: Claim, archive: bytes) -> bool:
        """Keep the workspace's files for the client, fenced by the lease."""
        k = self.keys
        stored = await self._put_archive(
            keys=[k.lease(claim.session_id), k.archive(claim.session_id)],
            args=[claim.token, archive, OUTPUT_RETENTION_MS],
        )
        return bool(stored)

    async def archive(self, session_id: str) -> bytes | None:
        """Return the workspace archive of an ended session, if one was kept."""
        return await self.redis.get(self.keys.archive(session_id))  # type: ignore[no-any-return]

    async def audit(self, session_id: str, event: str, **fields: str) -> None:
        """Append one event to the session's audit trail."""
        key = self.keys.audit(session_id)
        entry: dict[Any, Any] = {"event": event, **fields}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, entry, maxlen=AUDIT_MAX_EVENTS, approximate=False)
            pipe.pexpire(key, RETENTION_MS)
            await pipe.execute()

    async def audit_trail(self, session_id: str) -> list[dict[str, str]]:
        """Every event of the session's audit trail, oldest first."""
        entries = await self.redis.xrange(self.keys.audit(session_id))
        return [
            {"id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
            for entry_id, fields in entries
        ]

    async def org_sessions(self, org: str, *, limit: int) -> list[str]:
        """The org's newest sessions first, at most ``limit``."""
        ids = await self.redis.zrevrange(self.keys.org_sessions(org), 0, limit - 1)
        return [_text(session_id) for session_id in ids]

    async def end_stale_queued(self, max_wait_ms: int) -> int:
        """End sessions queued longer than their quota slot lasts.

        Their slot has lapsed already; a session held for an upload that
        never came, or whose job was lost, would otherwise stay queued.
        """
        stale = await self.redis.zrangebyscore(
            self.keys.queued, "-inf", await self.now_ms() - max_wait_ms
        )
        ended = 0
        for raw in stale:
            session_id = _text(raw)
            record = await self.record(session_id)
            if record is None:
                await self.redis.zrem(self.keys.queued, session_id)
                continue
            detail = "never started: its queue slot lapsed"
            if record.get("workspace_upload") == "pending":
                detail = "never started: no workspace archive was uploaded"
            outcome = Outcome(cause=EndCause.START_FAILED, detail=detail)
            ended += await self.finish(
                session_id, org=record["org"], expect="queued", outcome=outcome
            )
        return ended

    async def close(self) -> None:
        """Close both clients."""
        await self.redis.aclose()
        if self.blocking is not self.redis:
            await self.blocking.aclose()


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A Redis reply of alternating names and values, as a dict."""
    items = [_text(item) for item in flat]
    return dict(zip(items[::2], items[1::2], strict=True))


def _flat(pairs: Mapping[str, str]) -> list[str]:
    return [item for pair in pairs.items() for item in pair]


# What the operators' view shows of each running session.
_RUNNING_FIELDS = ("org", "profile", "node", "state", "claimed_ms", "start")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
