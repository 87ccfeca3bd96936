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

# What JavaScript's String.prototype.trim removes, as agents on Node.js trim
# each line before they parse it: a byte-order mark and Unicode spaces too.
_JS_TRIMMED = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)


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
        text = _as_the_agent_reads(line)
        if not text.startswith(("{", "[")):
            # No JSON parser takes a line that starts otherwise for a value
            # that could be a request.
            return line
        try:
            message = json.loads(text)
        except ValueError:
            raise RelayError(
                "a stdin line looks like JSON but is not; the session ends"
            ) from None
        except RecursionError:
            # The agent's parser may read what ours cannot; passing the line
            # unguarded could hand it capabilities it must not get.
            raise RelayError(
                "a stdin line is nested too deeply to check; the session ends"
            ) from None
        # Every object is parsed: a method name may be spelled with JSON
        # escapes, so no byte pattern can tell which lines to guard.
        batch = message if isinstance(message, list) else [message]
        if not any([self._rewrite(item) for item in batch]):
            return line
        ending = line[len(line.rstrip(b"\r\n")) :]

        return json.dumps(message, separators=(",", ":")).encode() + ending

    def _rewrite(self, message: object) -> bool:
        """Guard one request in place; True when it was one to guard."""
        if not isinstance(message, dict) or not isinstance(message.get("params"), dict):
            return False
        method = message.get("method")
        if method == "initialize":
            self._withdraw_capabilities(message["params"])
        elif method in ("session/new", "session/load"):
            message["params"]["cwd"] = self.workdir
        else:
            return False
        return True

    def _withdraw_capabilities(self, params: dict[str, Any]) -> None:
        capabilities = params.get("clientCapabilities")
        if not isinstance(capabilities, dict):
            return
        capabilities["terminal"] = False
        if not self.allow_fs:
            capabilities["fs"] = {"readTextFile": False, "writeTextFile": False}


def _as_the_agent_reads(line: bytes) -> str:
    """The text an agent parses from ``line``, or a refusal.

    Agents decode leniently (Node's TextDecoder turns a bad byte into
    U+FFFD) and trim more than JSON's whitespace, so a line that only they
    could read would pass the guard unchecked: invalid UTF-8 is refused and
    the guard trims what they trim.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RelayError("a stdin line is not valid UTF-8; the session ends") from None
    return text.strip(_JS_TRIMMED)
