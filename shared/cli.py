"""``acp-fleet``: one command for every role of the fleet."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from shared.errors import ConfigError

_DESCRIPTION = """\
Run ACP coding agents in hardened Docker sandboxes.

Backends create sessions through the scheduler's HTTP API; a worker on
each node runs them; editors reach them through 'connect'. Settings come
from a TOML file (--config or ACP_FLEET_CONFIG), each field overridable
by an ACP_FLEET_... environment variable (nested fields use '__').
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``acp-fleet`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args)
    except ConfigError as exc:
        print(f"acp-fleet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acp-fleet",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scheduler = commands.add_parser(
        "scheduler",
        help="serve the HTTP API and the stdio gateway",
        description="Serve the HTTP API (sessions, stdio WebSocket, health) "
        "with admission control. Replicas are stateless: run as many as "
        "needed behind a load balancer.",
    )
    _config_option(scheduler)
    scheduler.add_argument("--host", help="listen address (default: settings)")
    scheduler.add_argument("--port", type=int, help="listen port (default: settings)")
    scheduler.set_defaults(run=_run_scheduler)

    worker = commands.add_parser(
        "worker",
        help="run this node's sessions in Docker sandboxes",
        description="Take sessions from the queue and run each in a hardened "
        "container on this node's Docker Engine, relaying its stdio through "
        "Redis. Run exactly one per node; SIGTERM stops it.",
    )
    _config_option(worker)
    worker.set_defaults(run=_run_worker)

    connect = commands.add_parser(
        "connect",
        help="speak ACP on stdin/stdout to an agent in the fleet",
        description="Create a session (or attach to one) and relay this "
        "process' stdin and stdout to the agent, for an editor that launches "
        "it as its agent command. The credential is read from "
        "ACP_FLEET_API_KEY (an organisation key) or --token.",
    )
    connect.add_argument(
        "--url",
        default=os.environ.get("ACP_FLEET_URL", "http://127.0.0.1:8080"),
        help="the scheduler's base URL (default: $ACP_FLEET_URL or %(default)s)",
    )
    which = connect.add_mutually_exclusive_group(required=True)
    which.add_argument("--profile", help="create a new session of this agent profile")
    which.add_argument("--session", help="attach to this existing session id")
    connect.add_argument("--token", help="session token (for --session)")
    connect.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this variable of the environment to the agent (repeatable; "
        "the profile must allow it)",
    )
    connect.set_defaults(run=_run_connect)

    demo = commands.add_parser(
        "demo",
        help="run a real ACP session through the whole fleet, then clean up",
        description="Start Redis (unless ACP_FLEET_REDIS_URL names one), a "
        "scheduler and a worker; build the agent image if missing; then drive "
        "initialize, session/new and session/prompt through 'connect' with the "
        "real agent, print what happened and each phase's timing, and clean up.",
    )
    demo.add_argument(
        "--prompt", default="Say hello.", help="text of the session/prompt request"
    )
    demo.set_defaults(run=_run_demo)

    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("ACP_FLEET_CONFIG"),
        help="settings file (TOML; default: $ACP_FLEET_CONFIG)",
    )


def _run_scheduler(args: argparse.Namespace) -> int:
    import uvicorn

    from scheduler.api import create_app
    from shared.logs import configure_logging
    from shared.settings import load_settings

    settings = load_settings(args.config)
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.scheduler.host,
        port=args.port if args.port is not None else settings.scheduler.port,
        log_level="warning",
        # Longer than clients' usual idle reuse, so that a kept-alive
        # connection is rarely closed under a request.
        timeout_keep_alive=75,
        ws_max_size=64 * 1024 * 1024,
    )
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from shared.settings import load_settings
    from worker.main import run_worker

    run_worker(load_settings(args.config))
    return 0


def _run_connect(args: argparse.Namespace) -> int:
    import httpx
    from websockets.exceptions import WebSocketException

    from scheduler.client import ApiError
    from scheduler.connect import Target, connect

    credential = args.token or os.environ.get("ACP_FLEET_API_KEY")
    if not credential:
        print(
            "acp-fleet connect: no credential; set ACP_FLEET_API_KEY to an "
            "organisation key, or give --token with --session.",
            file=sys.stderr,
        )
        return 2
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        print(
            f"acp-fleet connect: --env names unset variables: {', '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    target = Target(
        base_url=args.url,
        credential=credential,
        profile=args.profile,
        session_id=args.session,
        env={name: os.environ[name] for name in args.env},
    )
    try:
        return asyncio.run(connect(target))
    except ApiError as exc:
        print(f"acp-fleet connect: {exc}", file=sys.stderr)
        return 2
    except (OSError, httpx.HTTPError, WebSocketException) as exc:
        print(f"acp-fleet connect: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2


def _run_demo(args: argparse.Namespace) -> int:
    from shared.demo import run_demo

    return run_demo(prompt=args.prompt)


if __name__ == "__main__":
    raise SystemExit(main())
