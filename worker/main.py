"""The worker process: an arq worker that runs this node's sessions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import uvloop
from arq.connections import RedisSettings
from arq.worker import Worker, func
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from shared.errors import ConfigError, SandboxError
from shared.heap import freeze_startup_heap
from shared.keys import SESSION_JOB, Keys
from shared.logs import FailureStreak, configure_logging
from shared.models import EgressRecord
from shared.settings import FleetSettings
from shared.store import SessionStore, blocking_client, command_client
from shared.telemetry import configure_metrics, worker_metrics
from shared.tracing import configure_tracing, shutdown_tracing
from worker.docker import DockerRuntime, seccomp_profile
from worker.egress import start_egress, stop_egress
from worker.ownership import NodeOwnership
from worker.pool import WarmPool
from worker.reconcile import Reconciler
from worker.session import Images, SessionRun, SessionRunner
from worker.workspace import Workspace

log = structlog.get_logger("worker")

# arq's own timeout is only a backstop: each session's lifetime timer ends
# it first, so the job may run this much longer than the longest lifetime.
_JOB_TIMEOUT_MARGIN_S = 300
# Long enough for every cancelled session to stop its sandbox (SIGKILL) and
# record its end; what remains after it is healed by the next reconcile.
_CLEANUP_WAIT_S = 30.0
_NODE_TTL_LEASES = 10
# The node's owner key has a client of its own, taken before arq's exists;
# a renewal that waits longer than this is as good as missed.
_OWNER_TIMEOUT_S = 2.0
_APPARMOR_FLAG = "/sys/module/apparmor/parameters/enabled"


async def run_session(ctx: dict[str, Any], session_id: str) -> str:
    """The arq job: run one session to its end."""
    runner: SessionRunner = ctx["runner"]
    return await runner.run(session_id)


def build_worker(settings: FleetSettings, ownership: NodeOwnership) -> Worker:
    """Return the arq worker for a node ``ownership`` holds, ready to run."""
    keys = Keys(settings.key_prefix)
    longest_s = max(
        (p.limits.lifetime_s for p in settings.profiles.values()), default=3600
    )

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["ownership"] = ownership
        ctx["hold_task"] = asyncio.create_task(
            ownership.hold_forever(), name="node-owner"
        )
        await _start(ctx, settings, keys)
        ctx["node_task"] = asyncio.create_task(
            _beat_forever(ctx, settings, worker), name="node-heartbeat"
        )
        freeze_startup_heap()

    async def shutdown(ctx: dict[str, Any]) -> None:
        await _stop(ctx)

    worker = Worker(
        functions=[
            # One try only: a session must never start twice, and a job
            # that arq retries finds its session already claimed.
            func(run_session, name=SESSION_JOB, max_tries=1),
        ],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=keys.arq_queue,
        max_jobs=settings.worker.max_sessions,
        job_completion_wait=settings.worker.drain_grace_s,
        job_timeout=longest_s + _JOB_TIMEOUT_MARGIN_S,
        poll_delay=settings.worker.poll_delay_ms / 1000,
        keep_result=0,
        on_startup=startup,
        on_shutdown=shutdown,
        handle_signals=True,
    )
    return worker


async def _start(ctx: dict[str, Any], settings: FleetSettings, keys: Keys) -> None:
    runtime = DockerRuntime(settings.worker.docker_url)
    await runtime.open()
    # Blocking stdin reads get a client without a socket timeout of its own.
    blocking = blocking_client(settings.redis_url)
    store = SessionStore(ctx["redis"], keys=keys, blocking=blocking)
    images = await _resolve_images(runtime, settings)
    max_records = settings.worker.egress.records_max

    async def record(session_id: str, entry: EgressRecord) -> None:
        fields = entry.stream_fields()
        await store.add_egress_record(session_id, fields, max_entries=max_records)

    runner = SessionRunner(
        settings=settings,
        store=store,
        runtime=runtime,
        seccomp=seccomp_profile(),
        images=images,
        apparmor=host_has_apparmor(),
        egress=await start_egress(settings, runtime, record=record),
    )
    reconciler = Reconciler(
        store=store,
        runtime=runtime,
        fleet=settings.fleet,
        node=settings.worker.node,
        owns=runner.owns,
        workspaces=settings.worker.workspace_root,
        live_workspaces=runner.workspace_names,
    )
    await reconciler.run_once()
    _start_pools(runner, settings)
    _watch_gauges(runner, settings.worker.node)
    ctx.update(runtime=runtime, blocking=blocking, runner=runner)
    ctx["reconcile_task"] = asyncio.create_task(
        _reconcile_forever(reconciler, settings), name="reconcile"
    )
    structlog.contextvars.bind_contextvars(node=settings.worker.node)
    log.info(
        "worker.started",
        max_sessions=settings.worker.max_sessions,
        profiles=sorted(images.refs),
    )


def _watch_gauges(runner: SessionRunner, node: str) -> None:
    """Let the worker's gauges read the runner's pools, runs and workspaces.

    Scrapes run in prometheus_client's server thread while the event loop
    changes the runs and the pools: each reading first copies what it
    iterates, with ``list``, which takes the copy without a thread switch.
    """
    gauges = worker_metrics().gauges
    on_node = {"node": node}
    gauges.watch(
        "pool_size",
        lambda: [(len(p.ready), {"pool": n}) for n, p in runner.pools.items()],
    )
    gauges.watch(
        "backlog",
        lambda: [(sum(r.backlog_bytes for r in _runs(runner)), on_node)],
    )
    gauges.watch(
        "workspace_used",
        lambda: [(_disk_bytes(runner, Workspace.used_bytes), on_node)],
    )
    gauges.watch(
        "workspace_capacity",
        lambda: [(_disk_bytes(runner, Workspace.capacity_bytes), on_node)],
    )


def _disk_bytes(runner: SessionRunner, measure: Callable[[Workspace], int]) -> int:
    """Sum ``measure`` over the workspaces of runs and waiting pool members."""
    workspaces = [r.workspace for r in _runs(runner) if r.workspace]
    workspaces += [m.workspace for p in runner.pools.values() for m in list(p.ready)]
    total = 0
    for workspace in workspaces:
        # A workspace can be unmounted between the listing and the look.
        with contextlib.suppress(OSError):
            total += measure(workspace)
    return total


def _runs(runner: SessionRunner) -> list[SessionRun]:
    return list(runner.active.values())


def host_has_apparmor() -> bool:
    """True when the node's kernel enforces AppArmor profiles."""
    try:
        return Path(_APPARMOR_FLAG).read_text().strip() == "Y"
    except OSError:
        return False


def _start_pools(runner: SessionRunner, settings: FleetSettings) -> None:
    """Create each profile's warm pool and start filling it."""
    for name, profile in settings.profiles.items():
        if profile.pool.size == 0:
            continue
        egress = runner.egress if profile.network.mode == "egress" else None
        pool = WarmPool(
            name=name,
            profile=profile,
            image=runner.images.refs.get(name, profile.image),
            runtime=runner.runtime,
            fleet=settings.fleet,
            node=settings.worker.node,
            seccomp=runner.seccomp,
            workspaces=settings.worker.workspace_root,
            apparmor=profile.apparmor_profile if runner.apparmor else None,
            network=egress.network if egress else None,
        )
        runner.pools[name] = pool
        runner.pool_tasks.append(
            asyncio.create_task(pool.fill_forever(), name=f"pool-{name}")
        )


async def _resolve_images(runtime: DockerRuntime, settings: FleetSettings) -> Images:
    """Pin each profile's image to what it names now, for the worker's life."""
    images = Images()
    for name, profile in settings.profiles.items():
        try:
            digest = await runtime.image_digest(profile.image)
        except SandboxError as exc:
            raise SandboxError(
                f"profile {name!r}: image {profile.image!r} is not on this "
                f"node ({exc}); build or load it first",
                status=exc.status,
            ) from exc
        images.digests[name] = digest
        # A local image with no repository digest is pinned by its id.
        images.refs[name] = digest if digest.startswith("sha256:") else profile.image
    return images


async def _reconcile_forever(reconciler: Reconciler, settings: FleetSettings) -> None:
    # Lapsed leases are looked for twice per lease period, so a dead
    # worker's sessions end within one and a half lease periods at most;
    # orphaned containers cost only memory and are swept less often.
    tick_s = settings.worker.lease_ms / 2000
    sweep_every = max(1, round(settings.worker.reconcile_interval_s / tick_s))
    ticks = 0
    streak = FailureStreak(log, "reconcile.redis_failed")
    while True:
        await asyncio.sleep(tick_s)
        ticks += 1
        try:
            await reconciler.end_lapsed_sessions()
            if ticks % sweep_every == 0:
                await reconciler.remove_orphans()
        except RedisError as exc:
            streak.failed(exc)
        except Exception:
            log.exception("reconcile.failed")
        else:
            streak.succeeded()


async def _beat_forever(
    ctx: dict[str, Any], settings: FleetSettings, worker: Worker
) -> None:
    """Publish this node's state; follow operators' drain requests."""
    runner: SessionRunner = ctx["runner"]
    node = settings.worker.node
    started_ms = await runner.store.now_ms()
    # A node record outlives a few missed heartbeats, so operators see a
    # dead node's age before it drops out of the listing.
    ttl_ms = settings.worker.lease_ms * _NODE_TTL_LEASES
    drained_by_operator = False
    streak = FailureStreak(log, "node.heartbeat_failed")
    while True:
        fields = {
            "capacity": str(settings.worker.max_sessions),
            "sessions": str(len(runner.active)),
            "started_ms": str(started_ms),
            "instance": ctx["ownership"].instance,
            "draining": str(int(not worker.allow_pick_jobs)),
            "pools": json.dumps(
                {name: pool.snapshot() for name, pool in runner.pools.items()}
            ),
        }
        try:
            drain = await runner.store.beat_node(node, fields, ttl_ms)
        except RedisError as exc:
            streak.failed(exc)
            drain = drained_by_operator
        else:
            streak.succeeded()
        # Only a drain this task started is undone here: arq clears the same
        # flag when a signal stops the worker, and that must stand.
        if drain and not drained_by_operator:
            log.info("worker.draining")
            worker.allow_pick_jobs, drained_by_operator = False, True
        elif not drain and drained_by_operator:
            log.info("worker.resumed")
            worker.allow_pick_jobs, drained_by_operator = True, False
        await asyncio.sleep(settings.worker.heartbeat_ms / 1000)


async def _stop(ctx: dict[str, Any]) -> None:
    ctx["stopped"] = True
    if "runner" in ctx:
        # Sessions cancelled by the drain are still recording their end and
        # removing their containers; Docker and Redis must outlive that.
        await ctx["runner"].wait_idle(timeout_s=_CLEANUP_WAIT_S)
    if "runner" in ctx:
        await ctx["runner"].close_pools()
        if ctx["runner"].egress is not None:
            await stop_egress(ctx["runner"].egress, ctx["runtime"])
    for name in ("reconcile_task", "node_task", "hold_task"):
        task = ctx.get(name)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if "runtime" in ctx:
        await ctx["runtime"].close()
        await ctx["blocking"].aclose()
    if "ownership" in ctx:
        await ctx["ownership"].release()
    log.info("worker.stopped")


def run_worker(settings: FleetSettings) -> None:
    """Run the worker until SIGINT or SIGTERM."""
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    configure_metrics("acp-fleet-worker")
    configure_tracing(settings, "acp-fleet-worker")
    # arq binds its signal handlers to the loop current at construction.
    # uvloop: the relay's every message is a few socket reads and writes,
    # and uvloop's are a fraction of the standard loop's cost.
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    # Before anything else, arq included: a second worker of a live node
    # must touch neither its containers, nor its keys, nor its metrics port.
    ownership = loop.run_until_complete(_take_node(settings))
    try:
        _serve_metrics(settings)
    except BaseException:
        loop.run_until_complete(ownership.release())
        raise
    worker = build_worker(settings, ownership)
    try:
        worker.run()
    finally:
        # arq's close reaches its shutdown hook only after a Redis call of
        # its own; with Redis gone that call raises first, and the node's
        # spares, pools and proxy would outlive the worker.
        if "stopped" not in worker.ctx:
            loop.run_until_complete(_stop(worker.ctx))
        # After arq's shutdown: the last sessions' removal spans are ended.
        shutdown_tracing()


def _serve_metrics(settings: FleetSettings) -> None:
    """Serve the Prometheus endpoint on the configured port, if one is.

    Raises:
        ConfigError: the port cannot be listened on, named with the setting.
    """
    host, port = settings.worker.metrics_host, settings.worker.metrics_port
    if not port:
        return
    try:
        start_http_server(port, host)
    except OSError as exc:
        raise ConfigError(
            f"worker.metrics_port: cannot listen on {host}:{port}:"
            f" {exc.strerror or exc}"
        ) from exc


async def _take_node(settings: FleetSettings) -> NodeOwnership:
    """Hold this worker's node, or raise ``NodeBusy`` if a live one does."""
    redis = command_client(
        settings.redis_url,
        timeout_s=_OWNER_TIMEOUT_S,
        connect_timeout_s=_OWNER_TIMEOUT_S,
        pool_wait_s=_OWNER_TIMEOUT_S,
    )
    ownership = NodeOwnership(
        SessionStore(redis, keys=Keys(settings.key_prefix)),
        node=settings.worker.node,
        heartbeat_ms=settings.worker.heartbeat_ms,
    )
    try:
        await ownership.acquire()
    except BaseException:
        await redis.aclose()
        raise
    return ownership
