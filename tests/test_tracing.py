"""Traces: a real fleet exports one trace per session to an OTLP receiver."""

from __future__ import annotations

import gzip
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider

from shared import tracing
from shared.errors import ConfigError
from shared.localfleet import local_fleet
from shared.settings import FleetSettings, load_settings
from tests.sandboxes import Ran, busybox_profile, run_session
from tests.worker.test_pool import wait_pool

# Every span of a cold start's trace, by name; the warm one has no
# workspace or container of its own to make, but one claim on the pool.
COLD_SPANS = {
    *tracing.PHASES,
    "pool.claim",
    "workspace.format",
    "docker.create",
    "docker.attach",
    "docker.start",
    "docker.wait_exit",
    "docker.remove",
}
WARM_SPANS = {*tracing.PHASES, "pool.claim", "docker.remove"}
PROFILES = {
    "echo-cold": busybox_profile("cat; exit 4"),
    "echo-warm": {
        **busybox_profile("cat; exit 5"),
        "pool": {"size": 1, "max_age_s": 600},
    },
}


@dataclass(frozen=True)
class Span:
    """One exported span, as the receiver decoded it."""

    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    start_ns: int
    end_ns: int
    attributes: dict[str, str]


@dataclass
class Receiver:
    """What an OTLP/HTTP collector on loopback was sent."""

    url: str
    spans: list[Span] = field(default_factory=list)

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = _strings(resource.resource.attributes)["service.name"]
            for scope in resource.scope_spans:
                # extend, not +=: both processes' exports arrive at once.
                self.spans.extend(_span(service, raw) for raw in scope.spans)


def _strings(attributes: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in attributes}


def _span(service: str, raw: Any) -> Span:
    return Span(
        service=service,
        name=raw.name,
        trace_id=raw.trace_id,
        span_id=raw.span_id,
        parent_id=raw.parent_span_id,
        start_ns=raw.start_time_unix_nano,
        end_ns=raw.end_time_unix_nano,
        attributes=_strings(raw.attributes),
    )


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """An OTLP/HTTP trace receiver on a loopback port of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    received = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.receiver = received  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        self.server.receiver.add(body)  # type: ignore[attr-defined]
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test's output to the test's own reports."""


@dataclass(frozen=True)
class Traced:
    """A session a client ran, and the spans of its trace."""

    ran: Ran
    spans: list[Span]

    def named(self, name: str) -> list[Span]:
        return [span for span in self.spans if span.name == name]

    def one(self, name: str) -> Span:
        (found,) = self.named(name)
        return found


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sessions(
    receiver: Receiver, redis_url: str, docker_images: None
) -> AsyncIterator[dict[str, Traced]]:
    """One cold and one warm session of a traced fleet, ended and exported.

    The fleet is stopped before the spans are read: the processes flush what
    their batch processors hold on the way out.
    """
    with local_fleet(
        PROFILES,
        redis_url=redis_url,
        orgs={"acme": {"max_sessions": 4, "sessions_per_minute": 600}},
        worker={"kill_grace_s": 1.0},
        telemetry={"otlp_endpoint": receiver.url},
    ) as fleet:
        cold = await run_session(fleet, "echo-cold", stdin=b"cold\n")
        await wait_pool(fleet, "echo-warm", 1)
        warm = await run_session(fleet, "echo-warm", stdin=b"warm\n")
    traces = {}
    for ran, kind in ((cold, "cold"), (warm, "warm")):
        # Every trace the session has a span in, whole: a session split
        # over two traces, or a trace with foreign spans, shows in the tests.
        ids = {
            span.trace_id
            for span in receiver.spans
            if span.attributes.get("session.id") == ran.session_id
        }
        spans = [span for span in receiver.spans if span.trace_id in ids]
        traces[kind] = Traced(ran, spans)
    yield traces


class TestSessionTrace:
    def test_the_sessions_ran_to_their_ends(self, sessions: dict[str, Traced]) -> None:
        """Both sessions echo their input and end with the agent's own exit."""
        cold, warm = sessions["cold"].ran, sessions["warm"].ran

        assert (cold.stdout, cold.view["cause"], cold.view["exit_code"]) == (
            b"cold\n",
            "agent_exit",
            4,
        )
        assert (warm.stdout, warm.view["exit_code"]) == (b"warm\n", 5)

    def test_each_session_is_one_trace_of_its_own(
        self, sessions: dict[str, Traced]
    ) -> None:
        """All of a session's spans share one trace id, not shared with the
        other session."""
        cold = {span.trace_id for span in sessions["cold"].spans}
        warm = {span.trace_id for span in sessions["warm"].spans}

        assert len(cold) == len(warm) == 1
        assert cold != warm

    def test_every_span_exported_belongs_to_one_of_the_sessions(
        self, sessions: dict[str, Traced], receiver: Receiver
    ) -> None:
        """Pool refills and start-up calls make no traces of their own."""
        ours = len(sessions["cold"].spans) + len(sessions["warm"].spans)

        assert len(receiver.spans) == ours

    def test_a_cold_trace_has_every_phase_and_docker_call(
        self, sessions: dict[str, Traced]
    ) -> None:
        """Admission to removal: each phase once, each Docker call of a cold
        start, all in the one trace."""
        traced = sessions["cold"]

        assert {span.name for span in traced.spans} >= COLD_SPANS
        assert traced.one("pool.claim").attributes["fleet.pool.outcome"] == "none"
        for phase in tracing.PHASES:
            assert len(traced.named(phase)) == 1, phase

    def test_a_warm_trace_claims_from_the_pool_instead_of_creating(
        self, sessions: dict[str, Traced]
    ) -> None:
        """The warm session's trace has every phase, a pool hit, and no
        container created for it."""
        traced = sessions["warm"]
        names = {span.name for span in traced.spans}

        assert names >= WARM_SPANS
        assert not names & {"docker.create", "docker.start", "workspace.format"}
        assert traced.one("pool.claim").attributes["fleet.pool.outcome"] == "hit"
        assert traced.one("relay").attributes["fleet.start"] == "warm"

    def test_every_span_carries_the_session_and_its_place(
        self, sessions: dict[str, Traced]
    ) -> None:
        """session.id and the profile on every span; the node on the worker's."""
        for kind, traced in sessions.items():
            for span in traced.spans:
                assert span.attributes["session.id"] == traced.ran.session_id
                assert span.attributes["fleet.profile"] == f"echo-{kind}"
                if span.service == "acp-fleet-worker":
                    assert span.attributes["fleet.node"] == traced.ran.view["node"]

    def test_admission_is_the_root_and_phases_are_its_children(
        self, sessions: dict[str, Traced]
    ) -> None:
        """The scheduler's admission span roots the trace; the worker's
        phases hang from it across the process boundary."""
        traced = sessions["cold"]
        root = traced.one("admission")

        assert root.service == "acp-fleet-scheduler"
        assert root.parent_id == b""
        for phase in tracing.PHASES[1:]:
            span = traced.one(phase)
            assert span.service == "acp-fleet-worker"
            assert span.parent_id == root.span_id, phase

    def test_docker_calls_are_children_of_the_phase_that_made_them(
        self, sessions: dict[str, Traced]
    ) -> None:
        """create, attach, start and the workspace's format (a task of its
        own) under sandbox_ready; wait under relay; remove under removal."""
        traced = sessions["cold"]
        parent_of = {
            span.name: name
            for span in traced.spans
            for name, phase in ((p, traced.one(p)) for p in tracing.PHASES)
            if span.parent_id == phase.span_id
        }

        assert parent_of["docker.create"] == "sandbox_ready"
        assert parent_of["docker.attach"] == "sandbox_ready"
        assert parent_of["docker.start"] == "sandbox_ready"
        assert parent_of["workspace.format"] == "sandbox_ready"
        assert parent_of["docker.wait_exit"] == "relay"
        assert parent_of["docker.remove"] == "removal"

    def test_phases_follow_one_another_in_time(
        self, sessions: dict[str, Traced]
    ) -> None:
        """Each phase starts no earlier than the one before it starts, and
        removal records the end cause."""
        traced = sessions["cold"]
        starts = [traced.one(phase).start_ns for phase in tracing.PHASES]
        removal = traced.one("removal")

        # Redis stamps the queue wait in whole milliseconds.
        for earlier, later in itertools.pairwise(starts):
            assert later >= earlier - 1_000_000
        assert removal.attributes["fleet.cause"] == "agent_exit"
        assert traced.one("sandbox_ready").attributes["fleet.start"] == "cold"


def _settings(**telemetry: str) -> FleetSettings:
    return FleetSettings(
        config_version=1, token_secret="s" * 32, telemetry=telemetry or {}
    )


class TestConfiguration:
    @pytest.fixture(autouse=True)
    def _no_standard_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_SDK_DISABLED",
        ):
            monkeypatch.delenv(name, raising=False)

    def test_no_endpoint_installs_no_provider(self) -> None:
        """Without an endpoint the process keeps OpenTelemetry's no-op API."""
        enabled = tracing.configure_tracing(_settings(), "test")

        assert enabled is False
        assert not isinstance(trace.get_tracer_provider(), TracerProvider)
        assert tracing.build_provider(_settings(), "test") is None

    def test_no_endpoint_stores_no_context_and_makes_no_span(self) -> None:
        """Admission yields no record field and the helpers make nothing."""
        with tracing.admission_span("s1") as fields, tracing.span("docker.x") as inner:
            assert fields == {}
            assert not inner.is_recording()

    def test_an_endpoint_builds_a_batching_exporter_to_its_traces_path(
        self,
    ) -> None:
        """The configured base URL gets OTLP's /v1/traces path."""
        settings = _settings(otlp_endpoint="http://collector:4318/")

        provider = tracing.build_provider(settings, "test")

        assert tracing.traces_endpoint(settings) == "http://collector:4318/v1/traces"
        assert isinstance(provider, TracerProvider)
        provider.shutdown()

    def test_the_standard_variable_turns_tracing_on(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT gets the traces path, the traces
        variable is taken whole; OTEL_SDK_DISABLED turns both off."""
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318")

        assert tracing.traces_endpoint(_settings()) == "http://otel:4318/v1/traces"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/traces")
        assert tracing.traces_endpoint(_settings()) == "http://t:1/traces"
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        assert tracing.traces_endpoint(_settings()) is None

    def test_the_endpoint_comes_from_the_environment_like_every_field(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ACP_FLEET_TELEMETRY__OTLP_ENDPOINT sets the field."""
        monkeypatch.setenv("ACP_FLEET_CONFIG_VERSION", "1")
        monkeypatch.setenv("ACP_FLEET_TOKEN_SECRET", "t" * 32)
        monkeypatch.setenv("ACP_FLEET_TELEMETRY__OTLP_ENDPOINT", "https://c:4318")

        assert load_settings().telemetry.otlp_endpoint == "https://c:4318"

    def test_an_endpoint_that_is_no_url_is_refused_by_name(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bad endpoint stops start-up with an error naming the field."""
        monkeypatch.setenv("ACP_FLEET_CONFIG_VERSION", "1")
        monkeypatch.setenv("ACP_FLEET_TOKEN_SECRET", "t" * 32)
        monkeypatch.setenv("ACP_FLEET_TELEMETRY__OTLP_ENDPOINT", "collector:4318")

        with pytest.raises(ConfigError, match=r"telemetry\.otlp_endpoint: .*http://"):
            load_settings()
