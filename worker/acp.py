"""The guard on what a client tells an ACP agent in a sandbox.

A client that advertises ``fs`` or ``terminal`` in ``initialize`` invites the
agent to read, write and run things on the client's own machine, which is
exactly what the sandbox exists to prevent. The guard withdraws those
capabilities (``fs`` stays when the profile allows it) and points the
``cwd`` of ``session/new`` and ``session/load`` at the sandbox workspace,
since the client's path means nothing inside the container. Every other
byte passes through unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import RelayError


class AcpGuard:
    """Rewrite the client's requests line by line on their way to the agent."""

    def __init__(
        self, *, workdir: str, allow_fs: bool, max_line_bytes: int = 16 * 1024**2
    ) -> None:
        self.workdir = workdir
        self.allow_fs = allow_fs
        self.max_line_bytes = max_line_bytes
        self._pending = bytearray()

    def feed(self, data: bytes) -> bytes:
        """Return the complete lines of ``data``, guarded; keep the rest."""
        cut = data.rfind(b"\n")
        if cut < 0:
            self._pending += data
            if len(self._pending) > self.max_line_bytes:
                raise RelayError(
                    f"a stdin line exceeds {self.max_line_bytes} bytes; "
                    "the session ends"
                )
            return b""
        lines = bytes(self._pending) + data[: cut + 1]
        self._pending = bytearray(data[cut + 1 :])

        # The agent frames messages by "\n" alone; a bare "\r" is JSON
        # whitespace inside a line and must not split it here.
        return b"".join(self._guard(line + b"\n") for line in lines.split(b"\n")[:-1])

    def flush(self) -> bytes:
        """Return what is left at EOF, guarded as a last line."""
        rest = bytes(self._pending)
        self._pending.clear()
        return self._guard(rest) if rest else b""

    def _guard(self, line: bytes) -> bytes:
        # Every object is parsed: a method name may be spelled with JSON
        # escapes, so no byte pattern can tell which lines to guard.
        if not line.lstrip().startswith(b"{"):
            return line
        try:
            message = json.loads(line)
        except ValueError:
            return line
        except RecursionError:
            # The agent's parser may read what ours cannot; passing the line
            # unguarded could hand it capabilities it must not get.
            raise RelayError(
                "a stdin line is nested too deeply to check; the session ends"
            ) from None
        if not isinstance(message, dict) or not isinstance(message.get("params"), dict):
            return line
        method = message.get("method")
        if method == "initialize":
            self._withdraw_capabilities(message["params"])
        elif method in ("session/new", "session/load"):
            message["params"]["cwd"] = self.workdir
        else:
            return line
        ending = line[len(line.rstrip(b"\r\n")) :]

        return json.dumps(message, separators=(",", ":")).encode() + ending

    def _withdraw_capabilities(self, params: dict[str, Any]) -> None:
        capabilities = params.get("clientCapabilities")
        if not isinstance(capabilities, dict):
            return
        capabilities["terminal"] = False
        if not self.allow_fs:
            capabilities["fs"] = {"readTextFile": False, "writeTextFile": False}
