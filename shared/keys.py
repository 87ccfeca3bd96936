"""Every Redis key layout, lifetime and Lua script of the fleet, in one place.

Keys are ``{prefix}:...`` so that several fleets (or test runs) can share a
Redis. Scripts make each state change atomic; their argument order is part
of the layout and is documented next to each one.
"""

from __future__ import annotations

from dataclasses import dataclass

# The arq function that runs a session; admission queues jobs of it.
SESSION_JOB = "run_session"
# Rate limits count admissions over a sliding minute.
RATE_WINDOW_MS = 60_000
# An ended session's record and streams stay this long for status reads
# and for a client that reconnects to collect the tail of the output.
RETENTION_MS = 24 * 3600 * 1000
# An ended session's output stays this long for a client to collect its
# tail; shorter than the record, since unread output can be megabytes.
OUTPUT_RETENTION_MS = 3600 * 1000
# A session's audit trail keeps its newest events up to this many; a
# session has a handful, so only a misbehaving client reaches it.
AUDIT_MAX_EVENTS = 1000


@dataclass(frozen=True)
class Keys:
    """Names of the Redis keys under one fleet prefix."""

    prefix: str

    def session(self, session_id: str) -> str:
        """Hash: the session's record (state, cause, timings, owner)."""
        return f"{self.prefix}:session:{session_id}"

    def session_env(self, session_id: str) -> str:
        """Hash: per-session environment, deleted by the claim that reads it."""
        return f"{self.prefix}:session:{session_id}:env"

    def upload(self, session_id: str) -> str:
        """String: the tar archive to unpack into the workspace before the
        agent starts; deleted by the worker that unpacks it."""
        return f"{self.prefix}:session:{session_id}:upload"

    def archive(self, session_id: str) -> str:
        """String: the workspace as a tar archive, written after the agent
        is gone; kept as long as the session's output."""
        return f"{self.prefix}:session:{session_id}:archive"

    def audit(self, session_id: str) -> str:
        """Stream: who did what to the session, and what it ran with."""
        return f"{self.prefix}:session:{session_id}:audit"

    def org_sessions(self, org: str) -> str:
        """Sorted set: the org's sessions by admission time, for listing."""
        return f"{self.prefix}:org:{org}:sessions"

    def stdin(self, session_id: str) -> str:
        """Stream: client-to-agent bytes (``d``), ``eof`` and ``cancel``."""
        return f"{self.prefix}:session:{session_id}:in"

    def stdout(self, session_id: str) -> str:
        """Stream: agent-to-client bytes, ``o`` (stdout) or ``e`` (stderr),
        each with ``n``, the output bytes so far; ``slow`` notices when the
        relay waits for the client; one ``end`` entry with the outcome.
        Entries a client acknowledged are trimmed."""
        return f"{self.prefix}:session:{session_id}:out"

    def egress(self, session_id: str) -> str:
        """Stream: one entry per connection the egress proxy allowed or
        refused for the session (host, port, verdict, reason, bytes each
        way), capped at the worker's ``egress.records_max``."""
        return f"{self.prefix}:session:{session_id}:egress"

    def lease(self, session_id: str) -> str:
        """String: ``{node}/{fence}`` of the worker that owns the session."""
        return f"{self.prefix}:session:{session_id}:lease"

    def org_slots(self, org: str) -> str:
        """Sorted set: the org's sessions scored by when their slot lapses."""
        return f"{self.prefix}:org:{org}:slots"

    def org_rate(self, org: str) -> str:
        """Sorted set: the org's admissions of the last minute, by time."""
        return f"{self.prefix}:org:{org}:rate"

    @property
    def queued(self) -> str:
        """Sorted set: admitted, not yet claimed sessions, by admission time."""
        return f"{self.prefix}:queued"

    @property
    def running(self) -> str:
        """Sorted set: claimed sessions scored by when their lease lapses,
        so that any worker can find the sessions of a dead one."""
        return f"{self.prefix}:running"

    @property
    def fence(self) -> str:
        """Counter: fencing tokens, strictly increasing across the fleet."""
        return f"{self.prefix}:fence"

    def node(self, node: str) -> str:
        """Hash: a worker's heartbeat, capacity, sessions and drain state."""
        return f"{self.prefix}:node:{node}"

    def node_drain(self, node: str) -> str:
        """String: present while operators want the node drained; JSON of
        when they asked (``requested_ms``) and how many sessions the node
        ran then (``sessions_at_start``), for the drain's progress."""
        return f"{self.prefix}:node:{node}:drain"

    def node_owner(self, node: str) -> str:
        """String: the instance id of the one worker process that runs the
        node, renewed with its heartbeat; it lapses soon after that dies."""
        return f"{self.prefix}:node:{node}:owner"

    @property
    def nodes(self) -> str:
        """Sorted set: every node by its last heartbeat."""
        return f"{self.prefix}:nodes"

    @property
    def arq_queue(self) -> str:
        """The arq queue that carries session jobs."""
        return f"{self.prefix}:queue"


# Milliseconds from Redis' own clock, so that every replica and worker
# agrees on "now" whatever their clocks say.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A sorted set of slots lives as long as its longest slot, so a quota key
# can never outlive every holder.
_EXPIRE_AT_LAST = """
local function expire_at_last(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, tonumber(last[2]) + 1000) end
end
"""

# Admission is one script, so that a session is counted, recorded, given
# its environment, audited and queued for a worker all at once or not at
# all: no crash between two calls leaves a slot without its job.
# KEYS: org_slots, org_rate, queued, session, org_sessions, session_env,
#       audit, job, job_queue
# ARGV: session_id, max_sessions, per_minute, queue_max, slot_ttl_ms,
#       session_ttl_ms, then counts of the record, env and audit items,
#       the arq job ('' to hold the session back), its score and lifetime,
#       then the record's, the environment's and the audit event's
#       field/value pairs, in that order
# Returns {"ok", now_ms} or {reason, retry_after_ms}.
ADMIT = (
    _NOW
    + _EXPIRE_AT_LAST
    + """
local sid, slot_ttl = ARGV[1], tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return {'org_concurrency', 1000}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - {window})
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {'org_rate', tonumber(oldest[2]) + {window} - now}
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - slot_ttl)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then
  return {'queue_full', 1000}
end
redis.call('ZADD', KEYS[1], now + slot_ttl, sid)
expire_at_last(KEYS[1])
redis.call('ZADD', KEYS[2], now, sid)
redis.call('PEXPIRE', KEYS[2], {window})
redis.call('ZADD', KEYS[3], now, sid)
redis.call('PEXPIRE', KEYS[3], slot_ttl)
local n_record, n_env, n_audit = tonumber(ARGV[7]), tonumber(ARGV[8]),
                                 tonumber(ARGV[9])
local first = 13
redis.call('HSET', KEYS[4], 'state', 'queued', 'admitted_ms', now,
           unpack(ARGV, first, first + n_record - 1))
redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[6]))
first = first + n_record
if n_env > 0 then
  redis.call('HSET', KEYS[6], unpack(ARGV, first, first + n_env - 1))
  redis.call('PEXPIRE', KEYS[6], slot_ttl)
end
first = first + n_env
redis.call('XADD', KEYS[7], 'MAXLEN', {audit_max}, '*',
           unpack(ARGV, first, first + n_audit - 1))
redis.call('PEXPIRE', KEYS[7], {retention})
redis.call('ZADD', KEYS[5], now, sid)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - {retention})
redis.call('PEXPIRE', KEYS[5], {retention})
if ARGV[10] ~= '' then
  redis.call('SET', KEYS[8], ARGV[10], 'PX', tonumber(ARGV[12]))
  redis.call('ZADD', KEYS[9], tonumber(ARGV[11]), sid)
end
return {'ok', now}
""".replace("{window}", str(RATE_WINDOW_MS))
    .replace("{retention}", str(RETENTION_MS))
    .replace("{audit_max}", str(AUDIT_MAX_EVENTS))
)

# The claimed session's job also leaves arq's queue: arq keeps a running
# job there and checks it again on every poll (four round trips, 200 times
# a second at a 5 ms poll delay, for each running session). The lease, not
# arq, decides what happens to the session if this worker dies.
# KEYS: session, lease, queued, org_slots, fence, session_env, running,
#       job_queue
# ARGV: session_id, node, lease_ms
# Returns {"ok", lease_token, env_flat, record_flat} or {"refused", state}.
CLAIM = (
    _NOW
    + _EXPIRE_AT_LAST
    + """
local sid, lease_ms = ARGV[1], tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return {'refused', state or 'missing'} end
local token = ARGV[2] .. '/' .. redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[2], token, 'PX', lease_ms)
redis.call('HSET', KEYS[1], 'state', 'starting', 'node', ARGV[2],
           'claimed_ms', now, 'lease', token)
redis.call('ZREM', KEYS[3], sid)
redis.call('ZADD', KEYS[4], now + lease_ms, sid)
expire_at_last(KEYS[4])
redis.call('ZADD', KEYS[7], now + lease_ms, sid)
redis.call('ZREM', KEYS[8], sid)
local env = redis.call('HGETALL', KEYS[6])
redis.call('DEL', KEYS[6])
return {'ok', token, env, redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: lease, org_slots, running, session
# ARGV: lease_token, lease_ms, session_id
# Returns 1 while the caller owns the session, 2 when it owns it and a
# client asked to cancel it, 0 once it does not own it.
RENEW = (
    _NOW
    + _EXPIRE_AT_LAST
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local lease_ms = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease_ms)
redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[3])
expire_at_last(KEYS[2])
redis.call('ZADD', KEYS[3], now + lease_ms, ARGV[3])
if redis.call('HEXISTS', KEYS[4], 'cancel_requested_ms') == 1 then return 2 end
return 1
"""
)

# KEYS: lease, stdout, session
# ARGV: lease_token, stream_ttl_ms, then field/value pairs, one entry each
# Each entry also gets ``n``, the session's output bytes up to its end, so
# that an acknowledged cursor tells how much the client has consumed.
# Returns {last_id, backlog_bytes}; errors with LEASE_LOST otherwise.
APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST')
end
local id
local total = tonumber(redis.call('HGET', KEYS[3], 'out_bytes') or '0')
for i = 3, #ARGV, 2 do
  -- Only agent output counts; notices such as "slow" are not its bytes.
  if ARGV[i] == 'o' or ARGV[i] == 'e' then
    total = redis.call('HINCRBY', KEYS[3], 'out_bytes', #ARGV[i + 1])
  end
  id = redis.call('XADD', KEYS[2], '*', ARGV[i], ARGV[i + 1], 'n', total)
end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
local acked = tonumber(redis.call('HGET', KEYS[3], 'acked_bytes') or '0')
return {id, total - acked}
"""

# KEYS: session, stdin
# ARGV: max_pending_bytes, stream_ttl_ms, writer, field, seq, value (those a
# relay loop sends alike for every message first)
# Appends client-to-agent data while the session has not ended and the
# worker has not fallen more than max_pending_bytes behind. A client that
# numbers its messages (writer non-empty, seq from 1) may send one again
# after a lost connection: a seq at or below the writer's last is already
# in the stream and is not appended twice.
# Returns the bytes now pending, -1 when the session has ended (or never
# existed), -2 when the pending bytes are at their bound, -3 for data after
# an eof: the worker stops reading the stream at eof, so the data would
# never reach the agent and its bytes would stay pending for good.
STDIN = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'ended' then return -1 end
local pending = tonumber(redis.call('HGET', KEYS[1], 'in_pending_bytes') or '0')
-- Before the eof check: data resent after a drop may precede an eof that
-- was written, and is then a repeat, not data after the end of stdin.
local seq_field = 'in_seq:' .. ARGV[3]
if ARGV[3] ~= '' then
  local last = tonumber(redis.call('HGET', KEYS[1], seq_field) or '0')
  if tonumber(ARGV[5]) <= last then return pending end
end
if ARGV[4] == 'd' and redis.call('HEXISTS', KEYS[1], 'stdin_eof') == 1 then
  return -3
end
if ARGV[4] == 'eof' then redis.call('HSET', KEYS[1], 'stdin_eof', '1') end
if ARGV[4] == 'd' and pending + #ARGV[6] > tonumber(ARGV[1]) and pending > 0 then
  return -2
end
redis.call('XADD', KEYS[2], '*', ARGV[4], ARGV[6])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], seq_field, ARGV[5]) end
if ARGV[4] == 'd' then
  return redis.call('HINCRBY', KEYS[1], 'in_pending_bytes', #ARGV[6])
end
return pending
"""

# KEYS: session, stdin
# ARGV: last consumed entry id, consumed bytes
# The worker wrote these entries to the agent: they leave the stream.
STDIN_CONSUMED = """
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'in_pending_bytes', -tonumber(ARGV[2]))
"""

# KEYS: session
# ARGV: field
# Stamps Redis' clock into a field of a session that still exists, so a
# late write never re-creates an expired record without its TTL.
TOUCH = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], now)
return now
"""
)

# KEYS: session, stdout
# ARGV: cursor the client has consumed up to
# Trims what the client has consumed and returns the backlog that remains,
# or -1 when the cursor names no entry of the stream.
ACK = """
local entry = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
if #entry == 0 then return -1 end
local fields, upto = entry[1][2], nil
for i = 1, #fields, 2 do
  if fields[i] == 'n' then upto = tonumber(fields[i + 1]) end
end
if not upto then return -1 end
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked_bytes') or '0')
if upto > acked then
  redis.call('HSET', KEYS[1], 'acked_bytes', upto)
  redis.call('XTRIM', KEYS[2], 'MINID', ARGV[1])
  acked = upto
end
return tonumber(redis.call('HGET', KEYS[1], 'out_bytes') or '0') - acked
"""

# KEYS: session, upload
# ARGV: archive bytes, ttl_ms
# Takes the one archive a session created to wait for one; returns "ok",
# or why not: "not_queued", "not_expected" or "already_uploaded".
UPLOAD = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 'not_queued' end
local wanted = redis.call('HGET', KEYS[1], 'workspace_upload')
if wanted == 'received' then return 'already_uploaded' end
if wanted ~= 'pending' then return 'not_expected' end
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'workspace_upload', 'received')
return 'ok'
"""

# KEYS: lease, archive
# ARGV: lease_token, archive bytes, ttl_ms
# Returns 1 when stored, 0 when the caller no longer owns the session.
PUT_ARCHIVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""

# KEYS: lease, session
# ARGV: lease_token, then field/value pairs
# Returns 1 when written, 0 when the caller no longer owns the session.
UPDATE = (
    _NOW
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local fields = {}
for i = 2, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  -- A value of "now" stamps Redis' clock, keeping every timing comparable.
  if ARGV[i + 1] == 'now' then fields[#fields + 1] = now
  else fields[#fields + 1] = ARGV[i + 1] end
end
redis.call('HSET', KEYS[2], unpack(fields))
return 1
"""
)

# KEYS: lease, session, org_slots, running, queued, stdout, stdin, upload,
#       egress
# ARGV: expect, session_id, retention_ms, end_json, then field/value pairs
# ``expect`` is the owner's lease token, "queued" (cancel before a claim)
# or "lapsed" (the owner died: its lease is gone). Returns 1 when ended.
FINISH = (
    _NOW
    + """
local expect, sid = ARGV[1], ARGV[2]
local state = redis.call('HGET', KEYS[2], 'state')
if not state or state == 'ended' then return 0 end
if expect == 'queued' then
  if state ~= 'queued' then return 0 end
elseif expect == 'lapsed' then
  if state == 'queued' or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
elseif redis.call('GET', KEYS[1]) ~= expect then
  return 0
end
redis.call('HSET', KEYS[2], 'state', 'ended', 'ended_ms', now, unpack(ARGV, 5))
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], sid)
redis.call('ZREM', KEYS[4], sid)
redis.call('ZREM', KEYS[5], sid)
redis.call('XADD', KEYS[6], '*', 'end', ARGV[4])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[6], {output_retention})
-- The connection log is read alongside the record, so it lives as long.
redis.call('PEXPIRE', KEYS[9], tonumber(ARGV[3]))
-- No agent reads stdin any more: what is left of it goes now.
redis.call('DEL', KEYS[7], KEYS[8])
return 1
""".replace("{output_retention}", str(OUTPUT_RETENTION_MS))
)

# KEYS: node_owner. ARGV: instance, ttl_ms.
# Take the node for this worker process, or keep it, unless another
# process holds it. Returns the holder and the milliseconds its hold has
# left: a holder whose time left grows between two calls is alive.
OWN_NODE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return {holder, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return {ARGV[1], tonumber(ARGV[2])}
"""

# KEYS: node_owner, node, nodes. ARGV: instance, node name. Give the node
# up, if still held, and take it out of the listing: a worker that stops is
# not a node gone silent. A process that lost the hold touches neither.
RELEASE_NODE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""
