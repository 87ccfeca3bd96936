"""The HTTP API against a real scheduler and Redis: admission, auth, input.

The scheduler here runs without a worker, so admitted sessions stay queued
and every quota slot they take stays counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from redis import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from scheduler import api as scheduler_api
from scheduler.client import ApiError, FleetClient
from shared.keys import Keys
from shared.localfleet import LocalFleet, local_fleet
from tests.sandboxes import PROFILES

LIMITED = {"max_sessions": 5, "sessions_per_minute": 100_000}


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[LocalFleet]:
    """A scheduler alone, with orgs whose limits the tests exhaust."""
    with local_fleet(
        {"sh": PROFILES["cat-exit"], "claude": PROFILES["claude"]},
        redis_url=redis_url,
        orgs={
            "acme": LIMITED,
            "beta": {"max_sessions": 1000, "sessions_per_minute": 7},
            "gamma": {"max_sessions": 1000, "sessions_per_minute": 100_000},
            "delta": {"max_sessions": 1000, "sessions_per_minute": 100_000},
        },
        scheduler={"queue_max_depth": 40},
        start_worker=False,
    ) as fleet:
        yield fleet


def redis_of(fleet: LocalFleet) -> tuple[Redis, Keys]:
    settings = fleet.settings
    return Redis.from_url(settings.redis_url), Keys(settings.key_prefix)


def session_keys(fleet: LocalFleet) -> list[bytes]:
    redis, keys = redis_of(fleet)
    with redis:
        return list(redis.scan_iter(f"{keys.prefix}:session:*"))


def post_body(api: LocalFleet, content: bytes | Iterator[bytes]) -> httpx.Response:
    """POST raw bytes as a JSON session request with delta's key."""
    return httpx.post(
        f"{api.url}/v1/sessions",
        content=content,
        headers={
            "Authorization": f"Bearer {api.api_keys['delta']}",
            "Content-Type": "application/json",
        },
    )


async def create_many(fleet: LocalFleet, org: str, count: int) -> Counter[str]:
    """Create ``count`` sessions at once; count admissions and refusal codes."""
    async with FleetClient(fleet.url, fleet.api_keys[org]) as client:

        async def one() -> str:
            try:
                await client.create_session("sh")
            except ApiError as exc:
                return exc.code
            return "admitted"

        return Counter(await asyncio.gather(*(one() for _ in range(count))))


async def cancel_queued(fleet: LocalFleet, org: str) -> None:
    """Cancel every queued session of ``org``, freeing its place in the queue."""
    redis, keys = redis_of(fleet)
    with redis:
        queued = [raw.decode() for raw in redis.zrange(keys.queued, 0, -1)]
        owned = [
            sid
            for sid in queued
            if redis.hget(keys.session(sid), "org") == org.encode()
        ]
    async with FleetClient(fleet.url, fleet.api_keys[org]) as client:
        for session_id in owned:
            await client.cancel(session_id)


class TestAdmission:
    async def test_concurrency_limit_holds_under_200_concurrent_creations(
        self, api: LocalFleet
    ) -> None:
        """Exactly the org's limit of 5 is admitted out of 200 at once."""
        outcomes = await create_many(api, "acme", 200)

        assert outcomes == Counter({"admitted": 5, "org_concurrency": 195})
        redis, keys = redis_of(api)
        with redis:
            assert redis.zcard(keys.org_slots("acme")) == 5

    async def test_rate_limit_holds_under_concurrency(self, api: LocalFleet) -> None:
        """An org allowed 7 a minute gets 7 of 50 concurrent creations."""
        outcomes = await create_many(api, "beta", 50)

        assert outcomes == Counter({"admitted": 7, "org_rate": 43})

    async def test_queue_depth_bounds_admission(self, api: LocalFleet) -> None:
        """With the queue's bound reached, creations are refused as queue_full."""
        redis, keys = redis_of(api)
        with redis:
            depth = redis.zcard(keys.queued)
        room = 40 - depth

        outcomes = await create_many(api, "gamma", room + 10)
        await cancel_queued(api, "gamma")

        assert outcomes == Counter({"admitted": room, "queue_full": 10})
        with redis:
            assert redis.zcard(keys.queued) == depth

    def test_refusal_carries_retry_after_and_a_reason(self, api: LocalFleet) -> None:
        """A 429 says why in a machine-readable code and when to retry."""
        response = httpx.post(
            f"{api.url}/v1/sessions",
            json={"profile": "sh"},
            headers={"Authorization": f"Bearer {api.api_keys['acme']}"},
        )

        assert response.status_code == 429
        assert response.json()["error"]["code"] in ("org_concurrency", "queue_full")
        assert int(response.headers["Retry-After"]) >= 1

    def test_quota_keys_always_carry_a_ttl(self, api: LocalFleet) -> None:
        """C12: no quota key lacks a TTL."""
        redis, keys = redis_of(api)
        with redis:
            quota_keys = [keys.queued] + [
                key
                for org in ("acme", "beta", "gamma")
                for key in (keys.org_slots(org), keys.org_rate(org))
            ]
            ttls = {key: redis.pttl(key) for key in quota_keys}
        existing = {key: ttl for key, ttl in ttls.items() if ttl != -2}

        assert len(existing) >= 4, ttls
        assert all(ttl > 0 for ttl in existing.values()), ttls


class TestAuthentication:
    def test_session_creation_documents_its_credential_like_every_route(
        self, api: LocalFleet
    ) -> None:
        """POST /v1/sessions reads Authorization itself; its OpenAPI entry is
        the one FastAPI writes for the routes that declare the header."""
        paths = httpx.get(f"{api.url}/openapi.json").json()["paths"]

        declared = paths["/v1/sessions"]["get"]["parameters"]
        written = paths["/v1/sessions"]["post"]["parameters"]

        header = [p for p in declared if p["name"] == "authorization"]
        assert header
        assert written == header

    def test_a_wrong_key_is_refused(self, api: LocalFleet) -> None:
        """An unknown key gets 401 invalid_credentials and creates nothing."""
        before = session_keys(api)

        response = httpx.post(
            f"{api.url}/v1/sessions",
            json={"profile": "sh"},
            headers={"Authorization": "Bearer not-a-key"},
        )

        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_credentials"
        assert session_keys(api) == before

    def test_a_missing_key_is_refused(self, api: LocalFleet) -> None:
        """A request without credentials gets 401."""
        response = httpx.get(f"{api.url}/v1/sessions/{'0' * 32}")

        assert response.status_code == 401

    def test_an_operator_key_does_not_act_for_an_org(self, api: LocalFleet) -> None:
        """An operator key listing sessions is 403 org_key_required, saying why."""
        response = httpx.get(
            f"{api.url}/v1/sessions",
            headers={"Authorization": f"Bearer {api.operator_key}"},
        )

        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == "org_key_required"
        assert error["message"].startswith(
            "Operator keys do not act for an organisation"
        )

    @pytest.mark.parametrize(
        ("method", "path"), [("GET", "/v1/fleet"), ("POST", "/v1/nodes/n1/drain")]
    )
    def test_an_org_key_on_an_operator_call_is_forbidden(
        self, api: LocalFleet, method: str, path: str
    ) -> None:
        """A valid org key on an operator endpoint is 403, not 401."""
        response = httpx.request(
            method,
            f"{api.url}{path}",
            headers={"Authorization": f"Bearer {api.api_keys['delta']}"},
        )

        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "operator_required"
        assert "www-authenticate" not in response.headers

    def test_an_unknown_key_on_an_operator_call_is_unauthorized(
        self, api: LocalFleet
    ) -> None:
        """An unknown key on an operator endpoint stays 401 with a challenge."""
        response = httpx.get(
            f"{api.url}/v1/fleet", headers={"Authorization": "Bearer not-a-key"}
        )

        assert response.status_code == 401
        assert response.json()["error"]["code"] == "operator_required"
        assert response.headers["www-authenticate"] == "Bearer"

    async def test_an_operator_key_on_stdio_closes_forbidden(
        self, api: LocalFleet
    ) -> None:
        """The stdio WebSocket refuses an operator key with an error and 4403."""
        url = api.url.replace("http", "ws") + f"/v1/sessions/{'0' * 32}/stdio"
        headers = {"Authorization": f"Bearer {api.operator_key}"}

        async with connect(url, additional_headers=headers) as ws:
            refusal = json.loads(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)

        assert refusal["code"] == "org_key_required"
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4403

    async def test_stdin_after_eof_is_answered_stdin_closed(
        self, api: LocalFleet
    ) -> None:
        """Bytes sent after {"type": "eof"} get an error frame, not silence."""
        async with FleetClient(api.url, api.api_keys["delta"]) as owner:
            created = await owner.create_session("sh")
        url = api.url.replace("http", "ws") + f"/v1/sessions/{created['id']}/stdio"
        headers = {"Authorization": f"Bearer {created['token']}"}

        async with connect(url, additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "eof"}))
            await ws.send(b"too late\n")
            refusal = json.loads(await asyncio.wait_for(ws.recv(), 10))
        await cancel_queued(api, "delta")

        assert refusal["type"] == "error"
        assert refusal["code"] == "stdin_closed"
        assert "eof" in refusal["message"]

    async def test_another_orgs_key_gets_nothing(self, api: LocalFleet) -> None:
        """Another org can neither read, cancel nor attach to a session."""
        async with FleetClient(api.url, api.api_keys["delta"]) as owner:
            created = await owner.create_session("sh")
        session_id = created["id"]
        intruder = FleetClient(api.url, api.api_keys["gamma"])

        async with intruder:
            with pytest.raises(ApiError) as read:
                await intruder.session(session_id)
            with pytest.raises(ApiError) as cancel:
                await intruder.cancel(session_id)
            async with intruder.stdio(session_id) as stdio:
                with pytest.raises(ApiError) as attach:
                    await anext(stdio.events())

        assert (read.value.status, read.value.code) == (404, "session_not_found")
        assert (cancel.value.status, cancel.value.code) == (404, "session_not_found")
        assert attach.value.code == "session_not_found"
        async with FleetClient(api.url, api.api_keys["delta"]) as owner:
            assert (await owner.session(session_id))["state"] == "queued"

    async def test_a_session_token_opens_only_its_own_session(
        self, api: LocalFleet
    ) -> None:
        """Session A's token reads A and is refused for session B."""
        async with FleetClient(api.url, api.api_keys["delta"]) as backend:
            first = await backend.create_session("sh")
            second = await backend.create_session("sh")

        async with FleetClient(api.url, first["token"]) as holder:
            own = await holder.session(first["id"])
            with pytest.raises(ApiError) as foreign:
                await holder.session(second["id"])

        assert own["id"] == first["id"]
        assert (foreign.value.status, foreign.value.code) == (404, "session_not_found")

    async def test_an_expired_token_is_refused(self, api: LocalFleet) -> None:
        """A token past its expiry gets 401 token_expired."""
        async with FleetClient(api.url, api.api_keys["delta"]) as backend:
            created = await backend.create_session("sh")
        secret = api.settings.token_secret.get_secret_value()
        expired = jwt.encode(
            {
                "sub": created["id"],
                "org": "delta",
                "aud": "acp-fleet/session",
                "exp": int(time.time()) - 5,
            },
            secret,
            algorithm="HS256",
        )

        async with FleetClient(api.url, expired) as holder:
            with pytest.raises(ApiError) as refused:
                await holder.session(created["id"])

        assert (refused.value.status, refused.value.code) == (401, "token_expired")

    async def test_a_token_signed_elsewhere_is_refused(self, api: LocalFleet) -> None:
        """A token signed with another secret gets 401 invalid_token."""
        forged = jwt.encode(
            {
                "sub": "0" * 32,
                "org": "delta",
                "aud": "acp-fleet/session",
                "exp": int(time.time()) + 600,
            },
            "another-secret-that-is-long-enough-to-sign",
            algorithm="HS256",
        )

        async with FleetClient(api.url, forged) as holder:
            with pytest.raises(ApiError) as refused:
                await holder.session("0" * 32)

        assert (refused.value.status, refused.value.code) == (401, "invalid_token")


BAD_BODIES = [
    (b"{not json", "invalid_request"),
    (b'{"profile": "\xff"}', "invalid_request"),
    (b'{"profile": 5}', "invalid_request"),
    (b'{"profile": "sh", "surprise": 1}', "invalid_request"),
    (b'{"profile": "nope"}', "unknown_profile"),
    (b'{"profile": "sh", "env": {"SECRET": "x"}}', "env_not_allowed"),
    (b'{"profile": "sh", "limits": {"memory": "10x"}}', "invalid_limit"),
    (b'{"profile": "sh", "limits": {"memory": "5m"}}', "invalid_limit"),
    (b'{"profile": "sh", "limits": {"memory": "1g"}}', "limit_exceeds_profile"),
    (b'{"profile": "sh", "limits": {"pids": 0}}', "invalid_limit"),
    (b'{"profile": "sh", "limits": {"pids": "unlimited"}}', "limit_exceeds_profile"),
    (b'{"profile": "sh", "limits": {"cpus": -1}}', "invalid_limit"),
    (b'{"profile": "sh", "limits": {"cpus": 3}}', "limit_exceeds_profile"),
    (b'{"profile": "sh", "limits": {"cpus": "1e999999999"}}', "invalid_limit"),
    (b'{"profile": "sh", "limits": {"lifetime_s": 0}}', "invalid_request"),
    (b'{"profile": "sh", "limits": {"idle_timeout_s": true}}', "invalid_request"),
    (b'{"profile": "sh", "env": {"X": "a\\u0000b"}}', "invalid_request"),
]


class TestBadInput:
    @pytest.mark.parametrize(("body", "code"), BAD_BODIES)
    def test_bad_bodies_get_a_4xx_with_a_reason_and_create_nothing(
        self, api: LocalFleet, body: bytes, code: str
    ) -> None:
        """Each malformed or out-of-range body is a 422 naming what is wrong."""
        before = session_keys(api)

        response = post_body(api, body)

        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert error["message"]
        assert session_keys(api) == before

    @pytest.mark.parametrize(
        ("limits", "message"),
        [
            (
                {"pids": "unlimited"},
                "limits.pids: unlimited is wider than the profile's 64 processes",
            ),
            ({"cpus": 3}, "limits.cpus: 3 CPUs is wider than the profile's 1 CPUs"),
            (
                {"memory": "1g"},
                "limits.memory: 1024 MiB is wider than the profile's 64 MiB",
            ),
        ],
    )
    def test_a_limit_wider_than_the_profile_says_so_in_its_words(
        self, api: LocalFleet, limits: dict[str, object], message: str
    ) -> None:
        """A limit over the profile's is named as asked, never as Docker's -1."""
        response = httpx.post(
            f"{api.url}/v1/sessions",
            json={"profile": "sh", "limits": limits},
            headers={"Authorization": f"Bearer {api.api_keys['delta']}"},
        )

        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "limit_exceeds_profile"
        assert error["message"].startswith(message)

    @pytest.mark.parametrize("name", ["memory", "cpus", "pids"])
    def test_a_boolean_limit_is_refused_naming_it(
        self, api: LocalFleet, name: str
    ) -> None:
        """true for a limit is a 422 naming the limit, never a limit of 1."""
        before = session_keys(api)

        response = httpx.post(
            f"{api.url}/v1/sessions",
            json={"profile": "sh", "limits": {name: True}},
            headers={"Authorization": f"Bearer {api.api_keys['delta']}"},
        )

        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == f"limits.{name}"
        assert error["message"].startswith(f"limits.{name}: a boolean is not a")
        assert session_keys(api) == before

    def test_an_unknown_session_id_is_not_found(self, api: LocalFleet) -> None:
        """A malformed session id is a 404, not a 500."""
        response = httpx.get(
            f"{api.url}/v1/sessions/../../etc",
            headers={"Authorization": f"Bearer {api.api_keys['delta']}"},
        )

        assert response.status_code == 404

    def test_health_and_readiness_answer(self, api: LocalFleet) -> None:
        """/healthz and /readyz answer 200 while Redis is reachable."""
        assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{api.url}/readyz").json() == {"status": "ready"}


class TestLimitsOfInput:
    def test_a_huge_body_is_refused_before_parsing(self, api: LocalFleet) -> None:
        """A body over 1 MiB gets 413 body_too_large, with or without a key."""
        body = b'{"profile": "sh", "env": {"FOO": "' + b"a" * (2 * 1024 * 1024) + b'"}}'

        response = httpx.post(
            f"{api.url}/v1/sessions",
            content=body,
            headers={"Content-Type": "application/json"},
        )

        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"

    def test_a_huge_chunked_body_is_refused_as_too_large(self, api: LocalFleet) -> None:
        """A body over 1 MiB with no Content-Length gets 413 body_too_large."""
        before = session_keys(api)

        def chunks() -> Iterator[bytes]:
            yield b'{"profile": "sh", "env": {"FOO": "'
            for _ in range(32):
                yield b"a" * 65536
            yield b'"}}'

        response = post_body(api, chunks())

        assert response.status_code == 413, response.text
        assert response.json()["error"] == {
            "code": "body_too_large",
            "message": "Request bodies are limited to 1048576 bytes.",
        }
        assert session_keys(api) == before

    @pytest.mark.parametrize("depth", [1_000, 100_000])
    def test_deeply_nested_json_is_refused_as_too_deep(
        self, api: LocalFleet, depth: int
    ) -> None:
        """JSON nested past the parser's depth is a 422 body_too_deep."""
        body = b'{"profile": "sh", "env": ' + b"[" * depth + b"]" * depth + b"}"

        response = post_body(api, body)

        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "body_too_deep"
        assert error["message"].startswith("body: the JSON is nested too deeply")

    def test_a_body_that_is_not_utf8_says_so(self, api: LocalFleet) -> None:
        """Bytes that are not UTF-8 are a 422 saying where decoding failed."""
        response = post_body(api, b'{"profile": "\xff"}')

        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["message"].startswith("body: is not UTF-8 text (byte 13")

    def test_a_wrong_method_speaks_the_error_format(self, api: LocalFleet) -> None:
        """A 405 carries a machine-readable code like every other error."""
        response = httpx.put(f"{api.url}/v1/sessions")

        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"

    def test_an_env_value_over_32_kib_is_refused(self, api: LocalFleet) -> None:
        """A per-session variable longer than 32 KiB is a 422 naming env."""
        response = httpx.post(
            f"{api.url}/v1/sessions",
            json={"profile": "sh", "env": {"ANTHROPIC_API_KEY": "k" * 40_000}},
            headers={"Authorization": f"Bearer {api.api_keys['delta']}"},
        )

        assert response.status_code == 422
        assert response.json()["error"]["field"].startswith("env")


class TestCancel:
    async def test_a_session_claimed_during_its_cancel_is_cancelled_running(
        self, api: LocalFleet, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A cancel that reads the session queued, then loses it to a worker's
        claim before it can end it, still sends the worker the cancel."""
        # A replica of the scheduler in this process, so that the claim can
        # land between the cancel's read and its finish.
        monkeypatch.setattr(scheduler_api, "freeze_startup_heap", lambda: None)
        app = scheduler_api.create_app(api.settings)
        auth = {"Authorization": f"Bearer {api.api_keys['delta']}"}
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://fleet") as http,
        ):
            store = app.state.fleet.store
            finish = store.finish

            async def claimed_first(session_id: str, **kwargs: Any) -> bool:
                await store.claim(session_id, node="elsewhere", lease_ms=60_000)
                return bool(await finish(session_id, **kwargs))

            monkeypatch.setattr(store, "finish", claimed_first)
            created = await http.post(
                "/v1/sessions", json={"profile": "sh"}, headers=auth
            )
            session_id = created.json()["id"]

            cancelled = await http.delete(f"/v1/sessions/{session_id}", headers=auth)
            stdin = await store.redis.xrange(store.keys.stdin(session_id))

        assert cancelled.status_code == 202
        assert cancelled.json()["state"] == "starting"
        assert [fields for _, fields in stdin] == [{b"cancel": b""}]
