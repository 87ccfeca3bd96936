"""Metrics through OpenTelemetry, read by Prometheus.

Each process sets up one meter provider whose reader feeds the
``prometheus_client`` registry; the scheduler serves it at ``/metrics`` on
its API port and the worker on ``worker.metrics_port``. Names follow
OpenTelemetry's conventions (dotted, units in metadata); attributes are
low-cardinality: causes, outcomes, phases, profile names from settings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

_configured = False

# Start-up phases run from milliseconds (warm) to seconds (a cold burst).
_LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def configure_metrics(service: str) -> None:
    """Install the process' meter provider once, exporting to Prometheus."""
    global _configured
    if _configured:
        return
    from opentelemetry.sdk.metrics.view import (
        ExplicitBucketHistogramAggregation,
        View,
    )

    provider = MeterProvider(
        resource=Resource.create({"service.name": service}),
        metric_readers=[PrometheusMetricReader()],
        views=[
            View(
                instrument_type=metrics.Histogram,
                aggregation=ExplicitBucketHistogramAggregation(_LATENCY_BUCKETS_S),
            )
        ],
    )
    metrics.set_meter_provider(provider)
    _configured = True


@dataclass(frozen=True)
class Spec:
    """One instrument: its kind, OpenTelemetry name, unit and meaning."""

    kind: str
    name: str
    unit: str
    description: str

    def prometheus_names(self) -> set[str]:
        """The series names Prometheus' exporter gives this instrument."""
        base = self.name.replace(".", "_") + ("_seconds" if self.unit == "s" else "")
        if self.kind == "histogram":
            return {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
        return {base if self.kind == "up_down_counter" else f"{base}_total"}


SCHEDULER_SPECS = {
    "admissions": Spec(
        "counter",
        "fleet.admissions",
        "{request}",
        "Session creations by outcome: admitted or why not.",
    ),
}
WORKER_SPECS = {
    "starts": Spec(
        "counter",
        "fleet.session.starts",
        "{session}",
        "Sessions started, warm or cold.",
    ),
    "ends": Spec(
        "counter", "fleet.session.ends", "{session}", "Sessions ended, by cause."
    ),
    "startup": Spec(
        "histogram",
        "fleet.session.startup.duration",
        "s",
        "Start-up time by phase, warm or cold.",
    ),
    "relayed_bytes": Spec(
        "counter", "fleet.relay.bytes", "By", "Bytes relayed, by direction and stream."
    ),
    "running": Spec(
        "up_down_counter",
        "fleet.sessions.running",
        "{session}",
        "Sessions running on this node.",
    ),
    "pool_claims": Spec(
        "counter",
        "fleet.pool.claims",
        "{claim}",
        "Claims on warm pools: hit or miss.",
    ),
    "pool_refill_failures": Spec(
        "counter",
        "fleet.pool.refill_failures",
        "{failure}",
        "Warm-pool members that failed to start or probe.",
    ),
}


def _instruments(scope: str, specs: dict[str, Spec]) -> dict[str, Any]:
    meter = metrics.get_meter(scope)
    return {
        field: getattr(meter, f"create_{spec.kind}")(
            spec.name, unit=spec.unit, description=spec.description
        )
        for field, spec in specs.items()
    }


def exported_names() -> set[str]:
    """Every Prometheus series name the fleet exports."""
    specs = [*SCHEDULER_SPECS.values(), *WORKER_SPECS.values()]
    return {name for spec in specs for name in spec.prometheus_names()}


@dataclass(frozen=True)
class SchedulerMetrics:
    """What a scheduler replica counts."""

    admissions: metrics.Counter

    @classmethod
    def create(cls) -> SchedulerMetrics:
        return cls(**_instruments("acp_fleet.scheduler", SCHEDULER_SPECS))


@dataclass(frozen=True)
class WorkerMetrics:
    """What a worker counts and times."""

    starts: metrics.Counter
    ends: metrics.Counter
    startup: metrics.Histogram
    relayed_bytes: metrics.Counter
    running: metrics.UpDownCounter
    pool_claims: metrics.Counter
    pool_refill_failures: metrics.Counter

    @classmethod
    def create(cls) -> WorkerMetrics:
        return cls(**_instruments("acp_fleet.worker", WORKER_SPECS))


@functools.cache
def scheduler_metrics() -> SchedulerMetrics:
    """The scheduler's instruments, created once per process."""
    return SchedulerMetrics.create()


@functools.cache
def worker_metrics() -> WorkerMetrics:
    """The worker's instruments, created once per process."""
    return WorkerMetrics.create()
