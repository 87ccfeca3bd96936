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
class SchedulerMetrics:
    """What a scheduler replica counts."""

    admissions: metrics.Counter

    @classmethod
    def create(cls) -> SchedulerMetrics:
        meter = metrics.get_meter("acp_fleet.scheduler")
        return cls(
            admissions=meter.create_counter(
                "fleet.admissions",
                unit="{request}",
                description="Session creations by outcome: admitted or why not.",
            ),
        )


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
        meter = metrics.get_meter("acp_fleet.worker")
        return cls(
            starts=meter.create_counter(
                "fleet.session.starts",
                unit="{session}",
                description="Sessions started, warm or cold.",
            ),
            ends=meter.create_counter(
                "fleet.session.ends",
                unit="{session}",
                description="Sessions ended, by cause.",
            ),
            startup=meter.create_histogram(
                "fleet.session.startup.duration",
                unit="s",
                description="Start-up time by phase, warm or cold.",
            ),
            relayed_bytes=meter.create_counter(
                "fleet.relay.bytes",
                unit="By",
                description="Bytes relayed, by direction and stream.",
            ),
            running=meter.create_up_down_counter(
                "fleet.sessions.running",
                unit="{session}",
                description="Sessions running on this node.",
            ),
            pool_claims=meter.create_counter(
                "fleet.pool.claims",
                unit="{claim}",
                description="Claims on warm pools: hit or miss.",
            ),
            pool_refill_failures=meter.create_counter(
                "fleet.pool.refill_failures",
                unit="{failure}",
                description="Warm-pool members that failed to start or probe.",
            ),
        )


@functools.cache
def scheduler_metrics() -> SchedulerMetrics:
    """The scheduler's instruments, created once per process."""
    return SchedulerMetrics.create()


@functools.cache
def worker_metrics() -> WorkerMetrics:
    """The worker's instruments, created once per process."""
    return WorkerMetrics.create()
