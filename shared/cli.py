"""``acp-fleet``: one command for every role of the fleet."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

from shared.errors import ConfigError
from shared.wire import MAX_STDIN_MESSAGE_BYTES

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
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Refused by the command's own parser, so that the usage shown is
        # the command's rather than the bare list of commands.
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        status: int = args.run(args)
    except ConfigError as exc:
        print(f"acp-fleet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read stdout left (``| head``): end quietly, with the
        # status rich's console gives the same case, and keep Python's
        # flush at exit from failing on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acp-fleet",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_service_commands(commands)
    _add_connect_command(commands)
    _add_operator_commands(commands)
    _add_demo_command(commands)
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)

    return parser


def _add_service_commands(commands: Any) -> None:
    """The scheduler and the worker, the fleet's two services."""
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

    proxy = commands.add_parser(
        "docker-proxy",
        help="hold the Docker socket; let the worker make only its own calls",
        description="Listen on a unix socket for the worker's Engine API calls "
        "and forward to the Docker Engine only the calls the worker makes, on "
        "containers and networks carrying the fleet's label; refuse the rest "
        "with 403. Point worker.docker_url at unix://LISTEN_PATH. SIGTERM "
        "stops it.",
    )
    _config_option(proxy)
    proxy.add_argument(
        "--listen", metavar="PATH", help="unix socket to listen on (default: settings)"
    )
    proxy.set_defaults(run=_run_docker_proxy)


def _add_connect_command(commands: Any) -> None:
    """The editor's agent command."""
    connect = commands.add_parser(
        "connect",
        help="speak ACP on stdin/stdout to an agent in the fleet",
        description="Create a session (or attach to one) and relay this "
        "process' stdin and stdout to the agent, for an editor that launches "
        "it as its agent command. The credential is read from "
        "ACP_FLEET_API_KEY (an organisation key) or --token.",
    )
    _url_option(connect)
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
    connect.add_argument(
        "--reconnect-s",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to keep reconnecting after the connection drops before "
        "giving up (default: %(default)g; 0: give up at once)",
    )
    connect.set_defaults(run=_run_connect)


def _add_operator_commands(commands: Any) -> None:
    """Operators' view of nodes and the queue."""
    nodes = commands.add_parser(
        "nodes",
        help="list worker nodes, their pools, and the queue",
        description="Show every node's heartbeat age, capacity, sessions, "
        "drain state and warm pools, and the queue's depth and oldest wait. "
        "Needs an operator key in ACP_FLEET_OPERATOR_KEY.",
    )
    _url_option(nodes)
    nodes.add_argument("--json", action="store_true", help="print the raw JSON")
    nodes.set_defaults(run=_run_nodes)

    _add_top_command(commands)

    drain = commands.add_parser(
        "drain",
        help="stop a node from claiming sessions (or let it resume)",
        description="Ask a node's worker to stop claiming new sessions; "
        "running ones finish. The worker follows at its next heartbeat "
        "(worker.heartbeat_ms), so a session may still be claimed until "
        "then. --undo lets it claim again. Needs an operator key in "
        "ACP_FLEET_OPERATOR_KEY.",
    )
    _url_option(drain)
    drain.add_argument("node", help="the node's name, as 'nodes' lists it")
    drain.add_argument("--undo", action="store_true", help="let the node resume")
    drain.set_defaults(run=_run_drain)


def _add_top_command(commands: Any) -> None:
    """Operators' live view."""
    top = commands.add_parser(
        "top",
        help="watch nodes, pools, sessions and the queue, refreshing in place",
        description="A live view of the fleet, redrawn in place every "
        "--interval-s: each node's heartbeat age, sessions (starting and "
        "running) against capacity and drain state; a progress bar while a "
        "node drains (sessions left of those it ran when the drain was "
        "asked for) and for each warm pool (ready of target, with member "
        "ages); the running sessions, oldest first, with org, profile, node "
        "and age; the queue's depth and oldest wait. Press q or Ctrl-C to "
        "quit. Into a pipe or a file, each frame is printed after the last. "
        "--once prints one frame and exits (for scripts). "
        "Needs an operator key in ACP_FLEET_OPERATOR_KEY.",
    )
    _url_option(top)
    top.add_argument(
        "--interval-s",
        type=_refresh_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default: %(default)s)",
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument(
        "--sessions",
        type=_positive_count,
        default=20,
        metavar="N",
        help="list at most N running sessions (default: %(default)s)",
    )
    top.set_defaults(run=_run_top)


def _refresh_seconds(text: str) -> float:
    # Finer than a tenth of a second would only load the scheduler.
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value < math.inf:
        raise argparse.ArgumentTypeError(
            f"expected at least 0.1 seconds, such as 0.5 or 2, not {text!r}"
        )
    return value


def _positive_count(text: str) -> int:
    # Zero or fewer would ask the API for no sessions and then show
    # "no sessions running" while sessions run.
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive whole number, such as 20, not {text!r}"
        )
    return value


def _add_demo_command(commands: Any) -> None:
    """The end-to-end demonstration."""
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


def _url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        type=_scheduler_url,
        default=os.environ.get("ACP_FLEET_URL", "http://127.0.0.1:8080"),
        help="the scheduler's base URL (default: $ACP_FLEET_URL or %(default)s)",
    )


def _scheduler_url(text: str) -> str:
    """An argparse type: an http(s) URL with a host and a valid port, and
    nothing the commands' own paths would be appended after (a query or a
    fragment) or sent in place of the key (a user and password)."""
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises for a port that is not one
    except ValueError as exc:
        reason = str(exc)
    else:
        if parts.scheme not in ("http", "https"):
            reason = "the scheme is not http or https"
        elif not parts.hostname:
            reason = "it names no host"
        elif parts.netloc.endswith(":"):
            reason = "the port is empty"
        elif "@" in parts.netloc:
            reason = "it holds a user or password; the key is sent instead"
        elif parts.query or parts.fragment or text.endswith(("?", "#")):
            reason = "it has a query or a fragment"
        else:
            return text
    raise argparse.ArgumentTypeError(
        f"expected the scheduler's URL, such as http://127.0.0.1:8080, "
        f"not {text!r}: {reason}"
    )


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
    listen = {"host": args.host, "port": args.port}
    overrides = {name: value for name, value in listen.items() if value is not None}
    scheduler = settings.scheduler.model_copy(update=overrides)
    settings = settings.model_copy(update={"scheduler": scheduler})
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=scheduler.host,
        port=scheduler.port,
        log_level="warning",
        # Longer than clients' usual idle reuse, so that a kept-alive
        # connection is rarely closed under a request.
        timeout_keep_alive=75,
        # Stdin arrives in messages of at most this; the client splits more.
        ws_max_size=MAX_STDIN_MESSAGE_BYTES,
        ws_per_message_deflate=scheduler.ws_compression,
    )
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from shared.errors import NodeBusy, SandboxError
    from shared.settings import load_settings
    from worker.main import run_worker

    settings = load_settings(args.config)
    try:
        run_worker(settings)
    except NodeBusy as exc:
        _complain(f"worker cannot start: {exc}")
        return 2
    except (RedisError, SandboxError, OSError) as exc:
        _complain(f"worker cannot run: {exc}")
        return 1
    return 0


def _run_docker_proxy(args: argparse.Namespace) -> int:
    from shared.logs import configure_logging
    from shared.settings import load_settings
    from worker.socketproxy import serve

    settings = load_settings(args.config)
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    try:
        asyncio.run(_until_signalled(serve(settings, listen_path=args.listen)))
    except OSError as exc:
        _complain(f"docker-proxy cannot listen: {exc}")
        return 1
    return 0


async def _until_signalled(main: Any) -> None:
    """Run ``main`` until SIGTERM or SIGINT, then cancel it cleanly."""
    import signal

    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        # The signal's cancellation is the normal way out.
        return


def _run_connect(args: argparse.Namespace) -> int:
    import httpx
    from websockets.exceptions import WebSocketException

    from scheduler.client import ApiError
    from scheduler.connect import ConnectionLost, Target, connect

    credential = args.token or os.environ.get("ACP_FLEET_API_KEY")
    if not credential:
        print(
            "acp-fleet connect: no credential; set ACP_FLEET_API_KEY to an "
            "organisation key, or give --token with --session.",
            file=sys.stderr,
        )
        return 2
    unusable = _unusable_key(
        "--token" if args.token else "ACP_FLEET_API_KEY", credential
    )
    if unusable:
        print(f"acp-fleet connect: {unusable}", file=sys.stderr)
        return 2
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        print(
            f"acp-fleet connect: --env names unset variables: {', '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    if args.reconnect_s < 0:
        print(
            "acp-fleet connect: --reconnect-s must be 0 or more seconds.",
            file=sys.stderr,
        )
        return 2
    target = Target(
        base_url=args.url,
        credential=credential,
        profile=args.profile,
        session_id=args.session,
        env={name: os.environ[name] for name in args.env},
        reconnect_s=args.reconnect_s,
    )
    try:
        return asyncio.run(connect(target))
    except ApiError as exc:
        print(f"acp-fleet connect: {exc}", file=sys.stderr)
        return 2
    except ConnectionLost as exc:
        print(f"acp-fleet connect: lost {args.url}: {exc}", file=sys.stderr)
        return 2
    except (OSError, httpx.HTTPError, WebSocketException) as exc:
        print(f"acp-fleet connect: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2


def _operator_call(args: argparse.Namespace, method: str, path: str) -> Any:
    """Call an operator endpoint; its JSON, or None once refused and said."""
    import httpx

    key = _operator_key()
    if key is None:
        return None
    try:
        response = httpx.request(
            method,
            args.url.rstrip("/") + path,
            headers={"Authorization": f"Bearer {key}"},
            # As top's: a scheduler that does not answer is reported.
            timeout=5,
        )
    except httpx.HTTPError as exc:
        _complain(f"cannot reach {args.url}: {str(exc) or type(exc).__name__}")
        return None
    from pydantic import ValidationError

    from shared.models import FleetView

    try:
        body = response.json()
        if response.status_code >= 400:
            error = body["error"]
            _complain(f"{error['code']}: {error['message']}")
            return None
        # Every operator call answers the fleet's view; another service's
        # JSON must not read as a drain done.
        FleetView.model_validate(body)
    except (ValueError, KeyError, TypeError, ValidationError):
        _complain(f"{args.url} does not answer as an ACP Fleet scheduler")
        return None

    return body


def _operator_key() -> str | None:
    """ACP_FLEET_OPERATOR_KEY, or None once said why it cannot be used."""
    key = os.environ.get("ACP_FLEET_OPERATOR_KEY")
    if not key:
        _complain("set ACP_FLEET_OPERATOR_KEY to an operator key")
        return None
    unusable = _unusable_key("ACP_FLEET_OPERATOR_KEY", key)
    if unusable:
        _complain(unusable)
        return None
    return key


def _unusable_key(source: str, key: str) -> str | None:
    """Why ``key`` from ``source`` cannot be sent in a header, or None.

    Without this a key pasted with its newline is refused by the HTTP
    library as a header value and reported as a failure to connect.
    """
    if key.isascii() and key.isprintable() and " " not in key:
        return None
    return (
        f"{source} holds a character no key has"
        " (keys are printable ASCII, without spaces or line breaks)"
    )


def _complain(text: str) -> None:
    print(f"acp-fleet: {text}", file=sys.stderr)


def _table(view: Any) -> str:
    """Render ``GET /v1/fleet`` for a terminal."""
    width = max([22, *(len(node["node"]) for node in view["nodes"])]) + 2
    lines = [
        f"{'node':<{width}}{'beat':>8}{'sessions':>10}{'drain':>11}"
        "  pools (ready/target)"
    ]
    for node in view["nodes"]:
        pools = ", ".join(
            f"{name} {pool['ready']}/{pool['target']}"
            + (" backing off" if pool["backing_off"] else "")
            for name, pool in node["pools"].items()
        )
        lines.append(
            f"{node['node']:<{width}}{node['heartbeat_age_ms'] / 1000:>7.1f}s"
            f"{node['sessions']:>5}/{node['capacity']:<4}"
            f"{_drain_state(node):>11}  {pools or '-'}"
        )
    queue = view["queue"]
    wait_ms = queue["oldest_wait_ms"]
    waited = "-" if wait_ms is None else f"{wait_ms / 1000:.1f}s"
    lines.append(f"queue: {queue['depth']} waiting, oldest {waited}")
    return "\n".join(lines)


def _drain_state(node: Any) -> str:
    """yes once the worker drains; requested until it follows; else no."""
    if node["draining"]:
        return "yes"
    return "requested" if node.get("drain_requested") else "no"


def _run_nodes(args: argparse.Namespace) -> int:
    import json

    view = _operator_call(args, "GET", "/v1/fleet")
    if view is None:
        return 2
    print(json.dumps(view, indent=2) if args.json else _table(view))
    return 0


def _run_top(args: argparse.Namespace) -> int:
    import httpx

    from scheduler.client import ApiError
    from scheduler.top import top

    key = _operator_key()
    if key is None:
        return 2
    try:
        asyncio.run(
            top(
                args.url,
                key,
                once=args.once,
                interval_s=args.interval_s,
                sessions_limit=min(args.sessions, 1000),
            )
        )
    except ApiError as exc:
        _complain(f"top: {exc}")
        return 2
    except httpx.HTTPError as exc:
        _complain(f"top: cannot reach {args.url}: {str(exc) or type(exc).__name__}")
        return 2
    except ValueError:
        # Something answered, but not with the fleet's JSON.
        _complain(f"top: {args.url} does not answer as an ACP Fleet scheduler")
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is how a live view is left; nothing failed.
        return 0
    return 0


def _run_drain(args: argparse.Namespace) -> int:
    if not args.node:
        _complain("drain: the node's name is empty")
        return 2
    method = "DELETE" if args.undo else "POST"
    # Quoted whole, so that a name with / or ? names no other path.
    node = urllib.parse.quote(args.node, safe="")
    if _operator_call(args, method, f"/v1/nodes/{node}/drain") is None:
        return 2
    # The worker learns of the request from its next heartbeat's answer,
    # so a table now would still show the node claiming.
    if args.undo:
        print(f"drain withdrawn; {args.node} claims again at its next heartbeat")
    else:
        print(f"drain requested; {args.node} stops claiming at its next heartbeat")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from shared.demo import run_demo

    return run_demo(prompt=args.prompt)


if __name__ == "__main__":
    raise SystemExit(main())
