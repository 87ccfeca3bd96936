"""Specification of the guard on client-to-agent ACP messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.errors import RelayError
from shared.localfleet import LocalFleet
from tests.sandboxes import run_session
from worker.acp import AcpGuard

WORKDIR = "/workspace"
CAPABILITIES = {"fs": {"readTextFile": True, "writeTextFile": True}, "terminal": True}


def request(method: str, params: dict[str, Any], ending: bytes = b"\n") -> bytes:
    message = {"jsonrpc": "2.0", "id": 0, "method": method, "params": params}
    return json.dumps(message).encode() + ending


def initialize(ending: bytes = b"\n") -> bytes:
    params = {"protocolVersion": 1, "clientCapabilities": CAPABILITIES}
    return request("initialize", params, ending)


def session_new(method: str = "session/new") -> bytes:
    params = {"cwd": "/home/alice/project", "mcpServers": [], "sessionId": "s1"}
    return request(method, params)


class TestAcpGuard:
    """AcpGuard withdraws client capabilities and pins cwd to the workspace."""

    def test_initialize_withdraws_capabilities(self) -> None:
        """terminal and both fs capabilities become false by default."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)

        guarded = guard.feed(initialize())

        assert guarded.endswith(b"}\n")
        assert json.loads(guarded) == {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": 1,
                "clientCapabilities": {
                    "fs": {"readTextFile": False, "writeTextFile": False},
                    "terminal": False,
                },
            },
        }

    def test_initialize_keeps_fs_when_allowed(self) -> None:
        """With allow_fs the fs capabilities stay; terminal still goes."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=True)

        guarded = json.loads(guard.feed(initialize()))

        assert guarded["params"]["clientCapabilities"] == {
            "fs": {"readTextFile": True, "writeTextFile": True},
            "terminal": False,
        }

    @pytest.mark.parametrize("method", ["session/new", "session/load"])
    def test_cwd_is_the_workdir(self, method: str) -> None:
        """session/new and session/load get the sandbox workdir as cwd."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)

        guarded = json.loads(guard.feed(session_new(method)))

        assert guarded["method"] == method
        assert guarded["params"] == {
            "cwd": WORKDIR,
            "mcpServers": [],
            "sessionId": "s1",
        }

    @pytest.mark.parametrize(
        "line",
        [
            b"hello\n",
            b'{"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": 1}}\n',
            b'{"jsonrpc":"2.0","id":3,"method":"session/prompt","params":'
            b'{"sessionId":"s1","prompt":[{"type":"text","text":"run '
            b'\\"initialize\\" with cwd \\"session/new\\""}]}}\n',
            b'{"jsonrpc":"2.0","id":1,"result":{"method":"initialize"}}\n',
            b'{"method":"initialize","params":"not an object"}\n',
            b'["initialize"]\n',
            "\u00a0plain text\n".encode(),
            b"\n",
        ],
        ids=[
            "not-json",
            "response",
            "other-method",
            "result-names-method",
            "params-not-object",
            "array",
            "unicode-space-then-text",
            "empty-line",
        ],
    )
    def test_other_lines_pass_unchanged(self, line: bytes) -> None:
        """Anything but a guarded request passes byte for byte."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)

        assert guard.feed(line) == line

    def test_partial_line_is_held(self) -> None:
        """A line is held until its newline arrives, then guarded whole."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)
        line = initialize()

        first = guard.feed(line[:20])
        second = guard.feed(line[20:-1])
        third = guard.feed(line[-1:] + b"hel")

        assert (first, second) == (b"", b"")
        assert json.loads(third)["params"]["clientCapabilities"]["terminal"] is False
        assert guard.flush() == b"hel"

    def test_lines_keep_their_order(self) -> None:
        """Several lines in one chunk come out in order, each guarded."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)

        guarded = guard.feed(b"one\n" + session_new() + b"two\n")

        lines = guarded.splitlines(keepends=True)
        assert [lines[0], lines[2]] == [b"one\n", b"two\n"]
        assert json.loads(lines[1])["params"]["cwd"] == WORKDIR

    def test_flush_guards_the_tail(self) -> None:
        """At EOF the unterminated last line is guarded and has no newline."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)
        guard.feed(session_new()[:-1])

        tail = guard.flush()

        assert not tail.endswith(b"\n")
        assert json.loads(tail)["params"]["cwd"] == WORKDIR
        assert guard.flush() == b""

    def test_crlf_ending_is_kept(self) -> None:
        """A guarded line keeps its CRLF ending."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)

        guarded = guard.feed(initialize(ending=b"\r\n"))

        assert guarded.endswith(b"}\r\n")
        assert json.loads(guarded)["params"]["clientCapabilities"]["terminal"] is False

    @pytest.mark.parametrize(
        "line",
        [
            initialize().replace(b'"params"', b'\r"params"'),
            initialize().replace(b'"initialize"', b'"\\u0069nitialize"'),
        ],
        ids=["cr-whitespace", "escaped-method"],
    )
    def test_equivalent_json_is_guarded(self, line: bytes) -> None:
        """An initialize spelled with other valid JSON still loses terminal."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)
        assert json.loads(line)["params"]["clientCapabilities"]["terminal"] is True

        guarded = json.loads(guard.feed(line))

        assert guarded["params"]["clientCapabilities"] == {
            "fs": {"readTextFile": False, "writeTextFile": False},
            "terminal": False,
        }

    def test_escaped_slash_session_new_is_guarded(self) -> None:
        """A session/new spelled 'session\\/new' still gets the workdir as cwd."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)
        line = session_new().replace(b"session/new", b"session\\/new")

        guarded = json.loads(guard.feed(line))

        assert guarded["params"]["cwd"] == WORKDIR

    @pytest.mark.parametrize(
        "prefix",
        ["\ufeff", "\u00a0", "\u2028", "\u3000 \t"],
        ids=["byte-order-mark", "no-break-space", "line-separator", "mixed"],
    )
    def test_a_request_behind_what_agents_trim_is_guarded(self, prefix: str) -> None:
        """Agents on Node trim a BOM and Unicode spaces; so does the guard."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)

        guarded = guard.feed(prefix.encode() + initialize())

        assert json.loads(guarded)["params"]["clientCapabilities"]["terminal"] is False

    def test_each_request_of_a_batch_is_guarded(self) -> None:
        """A JSON-RPC batch cannot carry an initialize past the guard."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)
        batch = b"[" + initialize()[:-1] + b"," + session_new()[:-1] + b"]\n"

        first, second = json.loads(guard.feed(batch))

        assert first["params"]["clientCapabilities"]["terminal"] is False
        assert second["params"]["cwd"] == WORKDIR


class TestGuardRefusals:
    @pytest.mark.parametrize(
        "line",
        [
            session_new()[:-2] + b',"x":"\xff"}\n',
            b"\xef\xbb" + initialize(),
        ],
        ids=["invalid-byte-in-string", "cut-byte-order-mark"],
    )
    def test_a_line_that_is_not_utf8_is_refused(self, line: bytes) -> None:
        """An agent would read a bad byte as U+FFFD; the guard cannot check it."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)

        with pytest.raises(RelayError, match="not valid UTF-8"):
            guard.feed(line)

    def test_a_line_that_looks_like_json_but_is_not_is_refused(self) -> None:
        """A broken object is refused: another parser might still read it."""
        guard = AcpGuard(workdir=WORKDIR, allow_fs=False)

        with pytest.raises(RelayError, match="looks like JSON"):
            guard.feed(b'{"method": "initialize", broken\n')

    def test_a_line_too_deep_to_parse_is_refused_not_passed(self) -> None:
        """A line nested beyond the parser's depth raises instead of slipping by."""
        guard = AcpGuard(workdir="/workspace", allow_fs=False)
        line = b'{"method":"initialize","params":' + b"[" * 100_000 + b"]" * 100_000

        with pytest.raises(RelayError):
            guard.feed(line + b"}\n")

    def test_an_endless_line_is_refused_at_the_cap(self) -> None:
        """Stdin without a newline past the cap raises instead of piling up."""
        guard = AcpGuard(workdir="/workspace", allow_fs=False, max_line_bytes=4096)
        guard.feed(b"x" * 4000)

        with pytest.raises(RelayError):
            guard.feed(b"x" * 100)


class TestGuardInTheFleet:
    async def test_the_agent_receives_the_guarded_initialize(
        self, fleet: LocalFleet
    ) -> None:
        """A BOM before initialize still reaches the agent without terminal."""
        ran = await run_session(
            fleet, "acp-echo", stdin="\ufeff".encode() + initialize()
        )

        received = json.loads(ran.stdout)
        assert received["params"]["clientCapabilities"]["terminal"] is False
        assert ran.end["cause"] == "agent_exit"

    async def test_a_line_the_guard_cannot_read_ends_the_session(
        self, fleet: LocalFleet
    ) -> None:
        """Invalid UTF-8 never reaches the agent; the session ends saying why."""
        line = session_new()[:-2] + b',"x":"\xff"}\n'

        ran = await run_session(fleet, "acp-echo", stdin=line)

        assert ran.stdout == b""
        assert ran.view["cause"] == "relay_failed"
        assert "not valid UTF-8" in ran.view["detail"]
