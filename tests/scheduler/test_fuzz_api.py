"""The HTTP API fuzzed from its own OpenAPI document, against a real scheduler.

Schemathesis generates requests for every operation the scheduler serves,
both ones that fit the document and ones that break it, and sends them with
every kind of credential. No answer may be a 5xx, every answer must be one
the document declares, and no request that is refused may leave a session
behind. The scheduler runs alone, so admitted sessions stay queued.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from scheduler.client import FleetClient
from shared.keys import Keys
from shared.localfleet import LocalFleet, local_fleet
from shared.store import SessionStore
from tests.sandboxes import PROFILES

# Every operation of the document; a route added without being fuzzed fails
# TestOpenApiDocument. Cancelling comes after the other session operations,
# which would otherwise find every seeded session ended.
OPERATIONS = [
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/{session_id}"),
    ("GET", "/v1/sessions/{session_id}/egress"),
    ("GET", "/v1/sessions/{session_id}/workspace"),
    ("PUT", "/v1/sessions/{session_id}/workspace"),
    ("GET", "/v1/sessions/{session_id}/audit"),
    ("DELETE", "/v1/sessions/{session_id}"),
    ("GET", "/v1/fleet"),
    ("POST", "/v1/nodes/{node}/drain"),
    ("DELETE", "/v1/nodes/{node}/drain"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
]
# The answer of each operation that shows fuzzing got past credentials and
# lookups: without a worker no workspace is ever archived, so the workspace
# operations go no further than the state check.
DEEPEST = {
    ("POST", "/v1/sessions"): 201,
    ("GET", "/v1/sessions/{session_id}/workspace"): 409,
    ("PUT", "/v1/sessions/{session_id}/workspace"): 409,
    ("POST", "/v1/nodes/{node}/drain"): 202,
}
# Only these take input that can break the document: a JSON body and a
# bounded query each. The others take free-form strings, of which no value lies
# outside the document, so schemathesis has no negative case to make.
NEGATABLE = [("POST", "/v1/sessions"), ("GET", "/v1/sessions"), ("GET", "/v1/fleet")]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Generated credentials are random strings; these are the ones that mean
# something to the scheduler, and "generated" keeps what schemathesis made.
CREDENTIALS = [
    "org",
    "other-org",
    "operator",
    "session-token",
    "wrong-key",
    "garbage-token",
    "none",
    "generated",
]
# Enough examples per operation and mode to reach each route's refusals,
# few enough that the whole file fuzzes in well under a minute.
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 150}
NODE = "fuzz-node"
MEMBER_NAMES = ["a.txt", "src/main.py", "../escape", "/etc/passwd", "dir/", "."]


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    """Tar archives, some with names the scheduler must refuse, or noise."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=draw(st.sampled_from(["w", "w:gz"]))) as tar:
        for name in draw(st.lists(st.sampled_from(MEMBER_NAMES), max_size=4)):
            content = draw(st.binary(max_size=64))
            member = tarfile.TarInfo(name)
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))

    return buffer.getvalue()


# Workspace uploads are tar archives; schemathesis has no strategy for them.
schemathesis.openapi.media_type("application/x-tar", archives())


@dataclass(frozen=True)
class Seeds:
    """Sessions and a node that exist before fuzzing, so that generated
    requests reach past the not-found answers."""

    queued: str
    awaiting_upload: str
    ended: str
    foreign: str
    token: str

    @property
    def session_ids(self) -> list[str]:
        return [self.queued, self.awaiting_upload, self.ended, self.foreign]


class Ledger:
    """The session records under one fleet's prefix, read straight from Redis."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.records = f"{prefix}:session:"
        self.prefix = prefix

    def session_ids(self) -> set[str]:
        """The id of every session record; streams and leases are not ones."""
        keys = (raw.decode() for raw in self.redis.scan_iter(f"{self.records}*"))
        ids = (key.removeprefix(self.records) for key in keys)
        return {session_id for session_id in ids if ":" not in session_id}

    def remove_all(self) -> None:
        """Delete every key of the fleet and the arq jobs of its sessions."""
        jobs = [f"arq:job:{session_id}" for session_id in self.session_ids()]
        stale = [*self.redis.scan_iter(f"{self.prefix}:*"), *jobs]
        for start in range(0, len(stale), 500):
            self.redis.delete(*stale[start : start + 500])


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[LocalFleet]:
    """A scheduler alone, with limits no fuzzing run reaches."""
    roomy = {"max_sessions": 100_000, "sessions_per_minute": 1_000_000}
    with local_fleet(
        {"sh": PROFILES["cat-exit"]},
        redis_url=redis_url,
        orgs={"acme": roomy, "other": roomy},
        scheduler={"queue_max_depth": 100_000},
        start_worker=False,
    ) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def ledger(api: LocalFleet) -> Iterator[Ledger]:
    """The fleet's sessions in Redis; every key of the fleet goes afterwards."""
    with Redis.from_url(api.redis_url) as redis:
        ledger = Ledger(redis, api.settings.key_prefix)
        try:
            yield ledger
        finally:
            ledger.remove_all()


@pytest.fixture(scope="module")
async def seeds(api: LocalFleet) -> Seeds:
    """A queued, an awaiting-upload, an ended and another org's session,
    and a node that has sent one heartbeat."""
    async with FleetClient(api.url, api.api_keys["acme"]) as client:
        queued = await client.create_session("sh")
        awaiting = await client.create_session("sh", upload=True)
        ended = await client.create_session("sh")
        await client.cancel(ended["id"])
    async with FleetClient(api.url, api.api_keys["other"]) as client:
        foreign = await client.create_session("sh")
    redis = AsyncRedis.from_url(api.redis_url)
    store = SessionStore(redis, keys=Keys(api.settings.key_prefix))
    await store.beat_node(NODE, {"capacity": "4", "sessions": "0"}, ttl_ms=3_600_000)
    await redis.aclose()
    return Seeds(
        queued=queued["id"],
        awaiting_upload=awaiting["id"],
        ended=ended["id"],
        foreign=foreign["id"],
        token=queued["token"],
    )


@pytest.fixture(scope="module")
def schema(api: LocalFleet) -> OpenApiSchema:
    """The document the running scheduler serves, requests aimed at it."""
    loaded = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    assert isinstance(loaded, OpenApiSchema)
    return loaded


def authorization(credential: str, fleet: LocalFleet, seeds: Seeds) -> str | None:
    """The Authorization header for one kind of credential, or None."""
    values = {
        "org": fleet.api_keys["acme"],
        "other-org": fleet.api_keys["other"],
        "operator": fleet.operator_key,
        "session-token": seeds.token,
        "wrong-key": "afk_not-a-key-of-this-fleet",
        "garbage-token": "a.b.c",
    }
    return f"Bearer {values[credential]}" if credential in values else None


def broken_parts(case: Any) -> frozenset[str]:
    """Where schemathesis made the case break the document: body, query..."""
    components = case.meta.components if case.meta else {}
    return frozenset(
        location.value
        for location, component in components.items()
        if component.mode.is_negative
    )


def aim(case: Any, data: st.DataObject, fleet: LocalFleet, seeds: Seeds) -> None:
    """Point a generated case at seeded sessions and real credentials."""
    # Half the requests carry the credential the operation wants, so that
    # enough of them get past authentication to admission and the store.
    operator_route = case.path.startswith(("/v1/fleet", "/v1/nodes"))
    wanted = st.just("operator" if operator_route else "org")
    credential = data.draw(wanted | st.sampled_from(CREDENTIALS), label="credential")
    if credential != "generated" and "header" not in broken_parts(case):
        headers = {
            name: value
            for name, value in (case.headers or {}).items()
            if name.lower() != "authorization"
        }
        value = authorization(credential, fleet, seeds)
        if value is not None:
            headers["Authorization"] = value
        case.headers = headers
    path = case.path_parameters or {}
    if "session_id" in path:
        choices = ["generated", *seeds.session_ids]
        chosen = data.draw(st.sampled_from(choices), label="session")
        if chosen != "generated":
            path["session_id"] = chosen
    if "node" in path and data.draw(st.booleans(), label="known node"):
        path["node"] = NODE
    body = case.body
    # A generated profile name is never one the fleet knows, and one bad
    # part refuses the whole body: a body that fits the document often
    # names the real profile and keeps only some of its other parts, so
    # that requests reach admission with each part in turn.
    fits = isinstance(body, dict) and "profile" in body and not broken_parts(case)
    if fits and data.draw(st.booleans(), label="known profile"):
        parts = sorted(set(body) - {"profile"})
        kept = data.draw(st.sets(st.sampled_from(parts)) if parts else st.just(set()))
        case.body = {"profile": "sh", **{part: body[part] for part in kept}}


@dataclass(frozen=True)
class Answer:
    """What one generated request got, and where it broke the document."""

    status: int
    broken: frozenset[str]


def fuzz(
    schema: OpenApiSchema,
    fleet: LocalFleet,
    seeds: Seeds,
    ledger: Ledger,
    *,
    method: str,
    path: str,
    mode: GenerationMode,
) -> list[Answer]:
    """Send generated requests to one operation, each checked against the
    document and for stray sessions; return what they got."""
    operation = schema[path][method]
    answers: list[Answer] = []
    http = requests.Session()

    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        derandomize=True,
        database=None,
        # Each example is an HTTP request and a Redis scan, slow by
        # hypothesis' measure; negative generation discards the cases that
        # happen to fit the document.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def one(case: Any, data: st.DataObject) -> None:
        aim(case, data, fleet, seeds)
        before = ledger.session_ids()

        response = case.call(base_url=fleet.url, session=http, timeout=30)
        created = ledger.session_ids() - before

        answers.append(Answer(response.status_code, broken_parts(case)))
        case.validate_response(response, checks=CHECKS)
        if response.status_code == 201:
            assert created == {response.json()["id"]}, created
        else:
            assert not created, (response.status_code, response.text, created)

    try:
        one()
    except FailureGroup as failures:
        pytest.fail(str(failures))
    finally:
        http.close()

    return answers


class TestOpenApiDocument:
    def test_every_operation_is_fuzzed(self, schema: OpenApiSchema) -> None:
        """The document's operations are exactly the ones this file fuzzes."""
        served = {
            (method.upper(), path)
            for path, item in schema.raw_schema["paths"].items()
            for method in item
        }

        assert served == set(OPERATIONS)

    def test_refusals_are_documented_with_the_error_body(
        self, schema: OpenApiSchema
    ) -> None:
        """Each guarded operation declares 401, 422 and 503 as error bodies."""
        paths = schema.raw_schema["paths"]
        for method, path in OPERATIONS:
            if path in ("/healthz", "/readyz"):
                continue
            responses = paths[path][method.lower()]["responses"]
            for status in ("401", "422", "503"):
                body = responses[status]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}, (
                    method,
                    path,
                    status,
                )


class TestFuzzing:
    @pytest.mark.parametrize(("method", "path"), OPERATIONS)
    def test_valid_requests_get_declared_answers(
        self,
        api: LocalFleet,
        seeds: Seeds,
        ledger: Ledger,
        schema: OpenApiSchema,
        method: str,
        path: str,
    ) -> None:
        """Requests that fit the document get declared answers below 500, and
        only a 201 leaves a new session behind."""
        mode = GenerationMode.POSITIVE

        answers = fuzz(schema, api, seeds, ledger, method=method, path=path, mode=mode)

        statuses = {answer.status for answer in answers}
        assert max(statuses) < 500
        assert DEEPEST.get((method, path), 200) in statuses, statuses

    @pytest.mark.parametrize(("method", "path"), NEGATABLE)
    def test_invalid_requests_are_refused_and_create_nothing(
        self,
        api: LocalFleet,
        seeds: Seeds,
        ledger: Ledger,
        schema: OpenApiSchema,
        method: str,
        path: str,
    ) -> None:
        """Requests that break the document get declared answers below 500
        and leave no session behind; a broken body is always refused."""
        mode = GenerationMode.NEGATIVE

        answers = fuzz(schema, api, seeds, ledger, method=method, path=path, mode=mode)

        assert any(answer.broken for answer in answers)
        assert all(answer.status < 500 for answer in answers)
        body_broken = [answer.status for answer in answers if "body" in answer.broken]
        assert all(400 <= status < 500 for status in body_broken), body_broken
