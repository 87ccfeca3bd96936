"""The floor under the relay's round trip: the fleet's hops with least code.

A bare WebSocket server stands in for the scheduler and a bare loop for
the worker, each a process of its own as in the fleet. A line goes from
the client's WebSocket to the server, through a Redis stream to the loop,
into ``cat`` in a sandbox over an attach socket, and back the same way.
Stdin and output pass with plain XADD and XREAD, and nothing else is done:
no session state, lease fencing, stdin bound, numbering, metrics or
acknowledgements. What the fleet adds above this floor is
the cost of those and of its own client and server; the floor is the
least that Python pays here for the hops.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import hiredis
import uvloop
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from shared.localfleet import free_port
from worker.docker import DockerRuntime
from worker.frames import FrameDecoder

# The processes start the way the fleet's do, from a fresh interpreter.
_SPAWN = multiprocessing.get_context("spawn")
_START_TIMEOUT_S = 60
# How long a child has to remove what it made once the benchmark is done.
_STOP_GRACE_S = 5
_POLL_S = 0.05


# Where Redis listens: a host and port, or a unix socket's path.
Address = tuple[str, int] | str


class Resp:
    """One Redis connection that sends a command and waits for its reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._replies = hiredis.Reader()

    @classmethod
    async def open(cls, address: Address) -> Resp:
        if isinstance(address, str):
            return cls(*await asyncio.open_unix_connection(address))
        return cls(*await asyncio.open_connection(*address))

    async def call(self, *args: bytes | str | int) -> Any:
        self._writer.write(_pack(args))
        while (reply := self._replies.gets()) is False:
            self._replies.feed(await self._reader.read(65536))
        return reply


def _pack(args: tuple[bytes | str | int, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        value = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(parts)


async def _follow(
    address: Address, key: str, deliver: Callable[[bytes], Awaitable[None]]
) -> None:
    """Hand each entry's one value to ``deliver``, in order, forever."""
    redis, cursor = await Resp.open(address), b"0-0"
    while True:
        reply = await redis.call(
            "XREAD", "COUNT", 512, "BLOCK", 0, "STREAMS", key, cursor
        )
        for entry_id, fields in reply[0][1]:
            cursor = entry_id
            await deliver(fields[1])


def _child(main: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    """A child process's body: ``main(*args)`` on uvloop."""
    # Ctrl-C reaches the whole process group; the benchmark alone handles
    # it, and its children end when it closes their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        uvloop.run(main(*args))
    except Exception:
        # A benchmark stopped while this starts takes with it the pipe this
        # would say it is ready on and the Redis it would reach; what this
        # made is removed regardless, and there is nobody to tell. (The
        # benchmark may be gone before this interpreter has even started.)
        benchmark = multiprocessing.parent_process()
        if benchmark is not None and os.getppid() == benchmark.pid:
            raise


async def _work(
    address: Address,
    keys: tuple[str, str],
    docker_url: str,
    sandbox: tuple[str, dict[str, Any]],
    parent: Connection,
) -> None:
    runtime = DockerRuntime(docker_url)
    await runtime.open()
    name, config = sandbox
    try:
        container_id = await runtime.create(config, name=name)
        stdio = await runtime.attach(container_id)
        await runtime.start(container_id)
        output = await Resp.open(address)
        parent.send("ready")

        async def pump_out() -> None:
            decoder = FrameDecoder()
            while chunk := await stdio.read():
                for _, data in decoder.feed(chunk):
                    await output.call("XADD", keys[1], "*", "o", data)

        relay = asyncio.gather(_follow(address, keys[0], stdio.write), pump_out())
        await _until_gone(parent, relay)
    finally:
        await runtime.remove(name)
        await runtime.close()


async def _serve(
    address: Address, keys: tuple[str, str], port: int, parent: Connection
) -> None:
    async def relay(ws: ServerConnection) -> None:
        stdin = await Resp.open(address)
        outbound = asyncio.create_task(_follow(address, keys[1], ws.send))
        try:
            async for message in ws:
                await stdin.call("XADD", keys[0], "*", "d", message)
        except ConnectionClosed:
            pass  # the benchmark was stopped midway
        finally:
            outbound.cancel()
            await asyncio.gather(outbound, return_exceptions=True)

    async with serve(relay, "127.0.0.1", port, compression=None):
        parent.send("ready")
        await _until_gone(parent, asyncio.Future())


async def _until_gone(parent: Connection, work: Awaitable[Any]) -> None:
    """Run ``work`` until the benchmark closes its end of the pipe, or dies.

    The benchmark sends nothing after the start, so the pipe turns
    readable only at its end.
    """
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(parent.fileno(), gone.set)
    running = asyncio.ensure_future(work)
    try:
        await asyncio.wait(
            {running, asyncio.ensure_future(gone.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        loop.remove_reader(parent.fileno())
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


@contextlib.asynccontextmanager
async def floor_path(
    redis_url: str, docker_url: str, config: dict[str, Any], line: bytes
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Start the floor; yield a call that sends ``line`` through it and
    waits until it is back.

    Args:
        config: the Engine API body of a container that runs ``cat``.
    """
    url = urlsplit(redis_url)
    address: Address = url.path
    if url.scheme != "unix":
        address = (url.hostname or "127.0.0.1", url.port or 6379)
    nonce = secrets.token_hex(4)
    keys = (f"floor:{nonce}:in", f"floor:{nonce}:out")
    # Named here, so that it is removed even if the worker dies midway.
    sandbox = (f"bench-floor-{nonce}", config)
    port = free_port()
    to_worker, worker_end = _SPAWN.Pipe()
    to_gateway, gateway_end = _SPAWN.Pipe()
    processes = [
        _SPAWN.Process(
            target=_child,
            args=(_work, address, keys, docker_url, sandbox, worker_end),
            daemon=True,
        ),
        _SPAWN.Process(
            target=_child,
            args=(_serve, address, keys, port, gateway_end),
            daemon=True,
        ),
    ]
    try:
        for process in processes:
            process.start()
        # Held by the children alone now: a child's exit closes its pipe.
        worker_end.close()
        gateway_end.close()
        await _ready([to_worker, to_gateway])
        # The fleet's client's options, less its offer of per-message
        # deflate, which the fleet's gateway declines too by default.
        async with websockets.connect(
            f"ws://127.0.0.1:{port}", max_size=None, max_queue=None, compression=None
        ) as ws:

            async def round_trip() -> None:
                await ws.send(line)
                got = 0
                while got < len(line):
                    got += len(await ws.recv())

            yield round_trip
    finally:
        to_worker.close()
        to_gateway.close()
        await _stop(processes)
        await _remove(docker_url, sandbox[0])
        await _delete(address, keys)


async def _ready(children: list[Connection]) -> None:
    """Wait until every child has said it is ready.

    Raises:
        RuntimeError: a child stopped first, or took over a minute.
    """
    deadline = time.monotonic() + _START_TIMEOUT_S
    waiting = list(children)
    while waiting:
        for child in [child for child in waiting if child.poll()]:
            try:
                child.recv()
            except EOFError:
                message = "a process of the floor stopped; see its output"
                raise RuntimeError(message) from None
            waiting.remove(child)
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"the floor was not ready in {_START_TIMEOUT_S} s")
        await asyncio.sleep(_POLL_S)


async def _stop(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Give the children a moment to end themselves, then kill them."""
    started = [process for process in processes if process.pid is not None]
    for _ in range(int(_STOP_GRACE_S / _POLL_S)):
        if not any(process.is_alive() for process in started):
            break
        await asyncio.sleep(_POLL_S)
    for process in started:
        process.kill()
        process.join()


async def _remove(docker_url: str, container: str) -> None:
    runtime = DockerRuntime(docker_url)
    await runtime.open()
    try:
        await runtime.remove(container)
    finally:
        await runtime.close()


async def _delete(address: Address, keys: tuple[str, str]) -> None:
    with contextlib.suppress(OSError):
        redis = await Resp.open(address)
        await redis.call("DEL", *keys)
