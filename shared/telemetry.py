"""Metrics through OpenTelemetry, read by Prometheus.

Each process sets up one meter provider whose reader feeds the
``prometheus_client`` registry; the scheduler serves it at ``/metrics`` on
its API port and the worker on ``worker.metrics_port``. Names follow
OpenTelemetry's conventions (dotted, units in metadata); attributes are
low-cardinality: causes, outcomes, phases, profile, pool, org and node
names from settings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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
# Containers live from a failed start (well under a second) to the longest
# lifetime a profile allows (hours).
_LIFETIME_BUCKETS_S = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0)
# The exporter appends these to a name that does not end with them already.
_UNIT_SUFFIXES = {"s": "seconds", "By": "bytes"}
_GAUGE_KINDS = {"up_down_counter", "observable_gauge"}

# What an observable gauge reads at each scrape: (value, attributes) pairs.
Reading = Callable[[], Iterable[tuple[float, Mapping[str, str]]]]


def configure_metrics(service: str) -> None:
    """Install the process' meter provider once, exporting to Prometheus."""
    global _configured
    if _configured:
        return
    provider = MeterProvider(
        resource=Resource.create({"service.name": service}),
        metric_readers=[PrometheusMetricReader()],
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
    # A histogram's bucket bounds, given to the SDK as advice.
    buckets: tuple[float, ...] = _LATENCY_BUCKETS_S

    def prometheus_names(self) -> set[str]:
        """The series names Prometheus' exporter gives this instrument."""
        base = self.name.replace(".", "_")
        suffix = _UNIT_SUFFIXES.get(self.unit)
        if suffix and not base.endswith(f"_{suffix}"):
            base += f"_{suffix}"
        if self.kind == "histogram":
            return {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
        return {base if self.kind in _GAUGE_KINDS else f"{base}_total"}


# Used by both processes: a session's end is counted by whichever records
# it (a worker for the sessions it ran, a scheduler or any worker for those
# a sweep ends), and its start-up phases by the process that sees each.
SHARED_SPECS = {
    "ends": Spec(
        "counter", "fleet.session.ends", "{session}", "Sessions ended, by cause."
    ),
    # The scheduler times admission; workers the phases after it.
    "startup": Spec(
        "histogram",
        "fleet.session.startup.duration",
        "s",
        "Start-up time by phase; warm or cold from the claim on.",
    ),
}
SCHEDULER_SPECS = {
    "admissions": Spec(
        "counter",
        "fleet.admissions",
        "{request}",
        "Session creations by outcome: admitted or why not.",
    ),
    "heartbeat_age": Spec(
        "observable_gauge",
        "fleet.node.heartbeat.age",
        "s",
        "Time since each listed node last sent its heartbeat.",
    ),
}
WORKER_SPECS = {
    "starts": Spec(
        "counter",
        "fleet.session.starts",
        "{session}",
        "Sessions started, warm or cold.",
    ),
    "queue_wait": Spec(
        "histogram",
        "fleet.queue.wait.duration",
        "s",
        "Time from admission to a worker's claim, by profile, warm or cold.",
    ),
    # Counted on every relayed message, so summed in the process (Tally).
    "relayed_bytes": Spec(
        "observable_counter",
        "fleet.relay.bytes",
        "By",
        "Bytes relayed, by direction and stream.",
    ),
    "relayed_messages": Spec(
        "observable_counter",
        "fleet.relay.messages",
        "{message}",
        "Lines relayed (ACP messages on stdout and stdin), by direction and stream.",
    ),
    "backlog": Spec(
        "observable_gauge",
        "fleet.relay.backlog",
        "By",
        "Output bytes no client has acknowledged, over this node's sessions.",
    ),
    "slow_clients": Spec(
        "counter",
        "fleet.relay.slow_clients",
        "{event}",
        "Times the relay paused an agent because its client lagged.",
    ),
    "running": Spec(
        "up_down_counter",
        "fleet.sessions.running",
        "{session}",
        "Sessions running on this node, by org.",
    ),
    "container_lifetime": Spec(
        "histogram",
        "fleet.container.lifetime",
        "s",
        "Time from a session's container being created to its removal.",
        _LIFETIME_BUCKETS_S,
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
    "pool_size": Spec(
        "observable_gauge",
        "fleet.pool.size",
        "{member}",
        "Members ready in each warm pool.",
    ),
    "workspace_used": Spec(
        "observable_gauge",
        "fleet.workspace.disk.used",
        "By",
        "Bytes used in the workspaces of this node's sessions and pools.",
    ),
    "workspace_capacity": Spec(
        "observable_gauge",
        "fleet.workspace.disk.capacity",
        "By",
        "Size of the workspaces of this node's sessions and pools.",
    ),
    "docker_errors": Spec(
        "counter",
        "fleet.docker.errors",
        "{error}",
        "Docker Engine calls that failed, by kind (permission_denied, ...).",
    ),
}


@dataclass
class Gauges:
    """The readings behind a process' observable gauges, set once known.

    Gauges are created with the instruments, before what they read (pools,
    runs, a cache of Redis) exists; until ``watch`` they report nothing.
    """

    readings: dict[str, Reading] = field(default_factory=dict)

    def watch(self, name: str, reading: Reading) -> None:
        """Report ``reading`` for the gauge ``name`` at each scrape."""
        self.readings[name] = reading

    def callback(self, name: str) -> Callable[[Any], list[metrics.Observation]]:
        def observe(_: Any) -> list[metrics.Observation]:
            reading = self.readings.get(name)
            if reading is None:
                return []
            return [metrics.Observation(v, dict(a)) for v, a in reading()]

        return observe


Labels = tuple[tuple[str, str], ...]


def labels(**attributes: str) -> Labels:
    """Attributes in the hashable form ``Tally.add`` takes."""
    return tuple(sorted(attributes.items()))


class Tally:
    """A monotonic count kept in the process and read at each scrape.

    For what grows with every relayed message: adding to a dict costs a
    small fraction of a synchronous counter's ``add``, which builds and
    hashes a measurement each time. The scrape thread copies the totals
    in one step the event loop cannot interleave with.
    """

    def __init__(self) -> None:
        self._totals: dict[Labels, int] = {}

    def add(self, amount: int, attributes: Labels) -> None:
        """Count ``amount`` more under ``attributes`` (from ``labels``)."""
        self._totals[attributes] = self._totals.get(attributes, 0) + amount

    def observe(self, _: Any) -> list[metrics.Observation]:
        return [
            metrics.Observation(total, dict(attributes))
            for attributes, total in list(self._totals.items())
        ]


def _instruments(
    scope: str, specs: dict[str, Spec], gauges: Gauges | None = None
) -> dict[str, Any]:
    meter = metrics.get_meter(scope)
    made: dict[str, Any] = {}
    for name, spec in specs.items():
        options: dict[str, Any] = {"unit": spec.unit, "description": spec.description}
        tally = Tally() if spec.kind == "observable_counter" else None
        if tally is not None:
            options["callbacks"] = [tally.observe]
        elif spec.kind.startswith("observable_"):
            assert gauges is not None, spec.name
            options["callbacks"] = [gauges.callback(name)]
        if spec.kind == "histogram":
            options["explicit_bucket_boundaries_advisory"] = spec.buckets
        instrument = getattr(meter, f"create_{spec.kind}")(spec.name, **options)
        made[name] = tally or instrument
    return made


def exported_names() -> set[str]:
    """Every Prometheus series name the fleet exports."""
    specs = [*SHARED_SPECS.values(), *SCHEDULER_SPECS.values(), *WORKER_SPECS.values()]
    return {name for spec in specs for name in spec.prometheus_names()}


@dataclass(frozen=True)
class SharedMetrics:
    """What scheduler and worker both count."""

    ends: metrics.Counter
    startup: metrics.Histogram

    @classmethod
    def create(cls) -> SharedMetrics:
        return cls(**_instruments("acp_fleet", SHARED_SPECS))


@dataclass(frozen=True)
class SchedulerMetrics:
    """What a scheduler replica counts."""

    admissions: metrics.Counter
    heartbeat_age: metrics.ObservableGauge
    gauges: Gauges

    @classmethod
    def create(cls) -> SchedulerMetrics:
        gauges = Gauges()
        made = _instruments("acp_fleet.scheduler", SCHEDULER_SPECS, gauges)
        return cls(**made, gauges=gauges)


@dataclass(frozen=True)
class WorkerMetrics:
    """What a worker counts and times."""

    starts: metrics.Counter
    queue_wait: metrics.Histogram
    relayed_bytes: Tally
    relayed_messages: Tally
    backlog: metrics.ObservableGauge
    slow_clients: metrics.Counter
    running: metrics.UpDownCounter
    container_lifetime: metrics.Histogram
    pool_claims: metrics.Counter
    pool_refill_failures: metrics.Counter
    pool_size: metrics.ObservableGauge
    workspace_used: metrics.ObservableGauge
    workspace_capacity: metrics.ObservableGauge
    docker_errors: metrics.Counter
    gauges: Gauges

    @classmethod
    def create(cls) -> WorkerMetrics:
        gauges = Gauges()
        made = _instruments("acp_fleet.worker", WORKER_SPECS, gauges)
        return cls(**made, gauges=gauges)


@functools.cache
def shared_metrics() -> SharedMetrics:
    """The instruments both kinds of process use, created once per process."""
    return SharedMetrics.create()


@functools.cache
def scheduler_metrics() -> SchedulerMetrics:
    """The scheduler's instruments, created once per process."""
    return SchedulerMetrics.create()


@functools.cache
def worker_metrics() -> WorkerMetrics:
    """The worker's instruments, created once per process."""
    return WorkerMetrics.create()
