"""The one exception root of ACP Fleet and the families beneath it.

::

    FleetError
    ├── ConfigError            settings or a profile are invalid
    ├── RequestRefused         a client request is refused (carries an HTTP status)
    │   ├── InvalidRequest     malformed or out-of-range input (422)
    │   ├── Unauthorized       no valid credential (401)
    │   ├── Forbidden          a valid credential that does not grant this (403)
    │   ├── NotFound           unknown session or profile, or not the caller's (404)
    │   ├── Conflict           the session is not in a state that allows it (409)
    │   ├── TooLarge           an upload is larger than allowed (413)
    │   └── AdmissionRefused   a quota, rate or queue bound says no (429)
    ├── LeaseLost              another owner fenced this worker out of a session
    ├── NodeBusy               another live worker runs this node
    ├── SandboxError           the Docker Engine failed a call for a sandbox
    ├── EgressRefused          the egress proxy will not carry a connection
    ├── DockerCallRefused      the Docker socket proxy will not carry a call
    └── RelayError             the stdio relay hit a protocol fault
        └── FrameError         a Docker stream frame header is malformed
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error ACP Fleet raises on purpose."""


class ConfigError(FleetError):
    """Settings or an agent profile are invalid; the message names each field."""


class RequestRefused(FleetError):
    """A client request is refused with a machine-readable code."""

    status = 400

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class InvalidRequest(RequestRefused):
    """The request is malformed or asks for more than its profile allows."""

    status = 422


class Unauthorized(RequestRefused):
    """The request carries no credential that grants what it asks."""

    status = 401


class Forbidden(RequestRefused):
    """The credential is valid but of a kind that does not grant the call."""

    status = 403


class NotFound(RequestRefused):
    """The session or profile does not exist for this caller."""

    status = 404


class Conflict(RequestRefused):
    """The session's state does not allow the request, now or ever."""

    status = 409


class TooLarge(RequestRefused):
    """An upload is larger than its bound."""

    status = 413


class AdmissionRefused(RequestRefused):
    """Admission control refused a new session for now."""

    status = 429

    def __init__(self, code: str, message: str, *, retry_after_s: int) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


class LeaseLost(FleetError):
    """This worker no longer owns the session and must stop touching it."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"lease lost for session {session_id}")
        self.session_id = session_id


class NodeBusy(FleetError):
    """Another worker process, alive, runs the node this one was told to."""

    def __init__(self, node: str, holder: str) -> None:
        super().__init__(
            f"node {node!r} is run by another live worker ({holder}): one "
            "worker per node; stop that one first, or give this one another "
            "worker.node"
        )
        self.node = node
        self.holder = holder


class SandboxError(FleetError):
    """The Docker Engine refused or failed a call made for a sandbox."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        container_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.container_id = container_id


class EgressRefused(FleetError):
    """The egress proxy refuses, or cannot carry, one connection."""

    def __init__(self, reason: str, message: str, *, status: int = 403) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


class DockerCallRefused(FleetError):
    """The Docker socket proxy refuses one Engine API call."""

    def __init__(self, call: str, reason: str, *, status: int = 403) -> None:
        super().__init__(f"{call} refused by the fleet's Docker proxy: {reason}")
        self.call = call
        self.reason = reason
        self.status = status


class RelayError(FleetError):
    """The stdio relay met data it cannot carry."""


class FrameError(RelayError):
    """A Docker multiplexed-stream header is malformed; the stream is unusable."""
