"""The command client's bound on a connection's set-up, for every kind of
Redis URL, against a real Redis that hangs."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from shared.localfleet import redis_process
from shared.store import (
    BoundedConnection,
    BoundedUnixConnection,
    command_client,
)

CONNECT_TIMEOUT_S = 0.3
# Far longer than the connect timeout: a set-up read with it would show.
COMMAND_TIMEOUT_S = 3.0


class TestSetUpBound:
    @pytest.mark.parametrize("transport", ["tcp", "unix"])
    async def test_a_hung_redis_fails_a_new_connection_by_its_connect_timeout(
        self, tmp_path: Path, transport: str
    ) -> None:
        """A URL that asks for a database makes the set-up send SELECT; with
        Redis stopped, the new connection fails within the connect timeout,
        not after the command timeout, over TCP and over a unix socket."""
        socket = tmp_path / "redis.sock" if transport == "unix" else None
        with redis_process(unix_socket=socket) as (url, redis):
            with_db = f"{url}?db=1" if transport == "unix" else f"{url[:-2]}/1"
            client = command_client(
                with_db,
                timeout_s=COMMAND_TIMEOUT_S,
                connect_timeout_s=CONNECT_TIMEOUT_S,
                pool_wait_s=1.0,
            )
            kind = client.connection_pool.connection_class
            redis.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            try:
                with pytest.raises(RedisError):
                    await client.ping()
                took_s = time.monotonic() - started
            finally:
                redis.send_signal(signal.SIGCONT)
                await client.aclose()

        assert (
            kind is {"tcp": BoundedConnection, "unix": BoundedUnixConnection}[transport]
        )
        assert took_s < COMMAND_TIMEOUT_S / 2
