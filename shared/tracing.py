"""Traces through OpenTelemetry, one per session, exported over OTLP/HTTP.

The scheduler's ``admission`` span is a session's root. Its W3C trace
context travels in the session's record (``traceparent``) to the worker
that claims it, whose phase spans and Docker call spans join the same
trace. A span processor stamps every span with the session's attributes
(``session.id`` first), bound once per session.

With no OTLP endpoint configured no tracer provider is installed:
OpenTelemetry's API then hands out non-recording spans, no context reaches
the record, and the worker's helpers skip span creation altogether.
"""

from __future__ import annotations

import contextvars
import functools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)
from opentelemetry.util.types import AttributeValue

from shared.settings import FleetSettings

P = ParamSpec("P")
R = TypeVar("R")

# The record field that carries the admission span's context.
TRACEPARENT_FIELD = "traceparent"
# The phases of a session, in order, as span names; Docker calls are
# children named "docker.<call>".
PHASES = (
    "admission",
    "queue_wait",
    "claim",
    "sandbox_ready",
    "first_byte",
    "relay",
    "removal",
)
_SCOPE = "acp_fleet"
# A collector that does not answer must not hold up a worker's shutdown
# for the exporter's default ten seconds per batch.
_EXPORT_TIMEOUT_S = 5.0
_PROPAGATOR = TraceContextTextMapPropagator()
# The attributes of the session whose work the current task does. A dict,
# shared by the session's tasks, so that what is learnt late (warm or cold)
# reaches every span started after it.
_session: contextvars.ContextVar[dict[str, AttributeValue] | None] = (
    contextvars.ContextVar("fleet_session_attributes", default=None)
)
_provider: TracerProvider | None = None


class _SessionAttributes(SpanProcessor):
    """Copy the bound session's attributes onto every span as it starts."""

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        attributes = _session.get()
        if attributes:
            span.set_attributes(attributes)


def traces_endpoint(settings: FleetSettings) -> str | None:
    """The OTLP/HTTP URL spans go to; None when tracing is off.

    ``telemetry.otlp_endpoint`` wins; otherwise OpenTelemetry's standard
    variables turn tracing on: the traces URL as it is, or the base URL
    with the traces path appended, as every OpenTelemetry SDK does.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if settings.telemetry.otlp_endpoint:
        return _traces_path(settings.telemetry.otlp_endpoint)
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return _traces_path(os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return None


def _traces_path(base: str) -> str:
    return base.rstrip("/") + "/v1/traces"


def build_provider(settings: FleetSettings, service: str) -> TracerProvider | None:
    """A tracer provider exporting in batches, or None when tracing is off."""
    endpoint = traces_endpoint(settings)
    if endpoint is None:
        return None
    # Imported here: a process that does not trace never loads the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(_SessionAttributes())
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=_EXPORT_TIMEOUT_S)
    provider.add_span_processor(BatchSpanProcessor(exporter))

    return provider


def configure_tracing(settings: FleetSettings, service: str) -> bool:
    """Install the process' tracer provider once; True when tracing is on."""
    global _provider
    if _provider is not None:
        return True
    _provider = build_provider(settings, service)
    if _provider is None:
        return False
    trace.set_tracer_provider(_provider)
    return True


def shutdown_tracing() -> None:
    """Export the spans still buffered, then stop; call on process exit."""
    if _provider is not None:
        _provider.shutdown()


def _tracer() -> trace.Tracer:
    return trace.get_tracer(_SCOPE)


@contextmanager
def bound_session(**attributes: AttributeValue) -> Iterator[None]:
    """Stamp ``attributes`` on every span this task and its children start."""
    with _bound(dict(attributes)):
        yield


@contextmanager
def _bound(attributes: dict[str, AttributeValue]) -> Iterator[None]:
    token = _session.set(attributes)
    try:
        yield
    finally:
        _session.reset(token)


def annotate(**attributes: AttributeValue) -> None:
    """Add ``attributes`` to the current span, if it records."""
    trace.get_current_span().set_attributes(attributes)


@contextmanager
def admission_span(
    session_id: str, **attributes: AttributeValue
) -> Iterator[dict[str, str]]:
    """Start a session's trace; yield the record fields that carry it on.

    The mapping is empty when tracing is off, so nothing is stored then.
    """
    if _provider is None:
        # No span, link or propagation on every admission of an untraced
        # fleet: the no-op tracer still cost a few percent of each request.
        yield {}
        return
    # Always a new trace, even inside a request's span: a session outlives
    # the request that created it. A link keeps the way back.
    ambient = trace.get_current_span().get_span_context()
    links = [trace.Link(ambient)] if ambient.is_valid else []
    with (
        bound_session(**{"session.id": session_id, **attributes}),
        _tracer().start_as_current_span("admission", Context(), links=links),
    ):
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        yield {
            name: value for name, value in carrier.items() if name == TRACEPARENT_FIELD
        }


@contextmanager
def span(name: str) -> Iterator[Span]:
    """A child of the current span; nothing at all outside a session's trace.

    Work that belongs to no session, such as refilling a warm pool, is not
    traced: its spans would each start a trace of their own.
    """
    current = trace.get_current_span()
    if _provider is None or not current.get_span_context().is_valid:
        yield trace.INVALID_SPAN
        return
    with _tracer().start_as_current_span(name) as child:
        yield child


def traced(
    name: str,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Run each call of the decorated coroutine function inside ``span(name)``."""

    def decorate(
        function: Callable[P, Awaitable[R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with span(name):
                return await function(*args, **kwargs)

        return wrapper

    return decorate


class SessionTrace:
    """A session's trace as the worker continues it.

    ``resume`` records the phases that ended before the worker knew the
    trace (the queue wait and the claim) from their timestamps;
    ``activate`` makes the session's later work part of the trace.
    """

    def __init__(self, parent: Context, attributes: dict[str, AttributeValue]):
        self.parent = parent
        self.attributes = attributes
        self.ready_ns = time.time_ns()

    @classmethod
    def resume(
        cls,
        record: Mapping[str, str],
        *,
        claim_started_ns: int,
        **attributes: AttributeValue,
    ) -> SessionTrace:
        """Continue the trace named in a claimed session's ``record``.

        Args:
            record: the session's record; its ``traceparent`` names the trace.
            claim_started_ns: wall-clock time the claim was sent.
            attributes: stamped on every span of the session from here on.
        """
        parent = Context()
        if _provider is not None and TRACEPARENT_FIELD in record:
            parent = _PROPAGATOR.extract({TRACEPARENT_FIELD: record[TRACEPARENT_FIELD]})
        session = cls(parent, dict(attributes))
        # Both ends of the wait are Redis' clock, as in the queue metric.
        if "admitted_ms" in record and "claimed_ms" in record:
            session.record(
                "queue_wait",
                int(record["admitted_ms"]) * 1_000_000,
                int(record["claimed_ms"]) * 1_000_000,
            )
        session.record("claim", claim_started_ns, time.time_ns())

        return session

    @property
    def recording(self) -> bool:
        """True when the session's spans are recorded and exported."""
        return trace.get_current_span(self.parent).get_span_context().is_valid

    @contextmanager
    def activate(self) -> Iterator[None]:
        """Make the session's trace current for this task and those it starts."""
        token = otel_context.attach(self.parent)
        try:
            with _bound(self.attributes):
                yield
        finally:
            otel_context.detach(token)

    def record(self, name: str, start_ns: int, end_ns: int | None = None) -> None:
        """Record a finished phase from its times, as a child of the root."""
        if not self.recording:
            return
        # Bound here too: the claim's phases are recorded before activate.
        with _bound(self.attributes):
            child = _tracer().start_span(name, self.parent, start_time=start_ns)
            child.end(end_time=end_ns or time.time_ns())

    def sandbox_ready(self, start: str) -> None:
        """Note that the agent runs; warm or cold is stamped from now on."""
        self.ready_ns = time.time_ns()
        # The bound dict is this one: later spans carry it; the current
        # one (sandbox_ready) learns it now.
        self.attributes["fleet.start"] = start
        annotate(**{"fleet.start": start})

    def first_byte(self) -> None:
        """Record the wait from a ready sandbox to the agent's first byte."""
        self.record("first_byte", self.ready_ns)
