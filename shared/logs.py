"""structlog set-up: JSON off a terminal, the console renderer on one.

Context (``session_id``, ``org``, ``node``, ``container_id``,
``image_digest``) is bound once through contextvars and reaches every line
logged while it is bound. A redaction step drops stdio payloads and masks
anything that looks like a credential, whatever the call site passed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

# Fields whose values never reach a log line, in any event.
_PAYLOAD_FIELDS = frozenset({"data", "payload", "stdin", "stdout", "stderr", "line"})
_SECRET_MARKERS = ("secret", "token", "password", "api_key", "apikey", "env")
REDACTED = "[redacted]"


def redact(
    _logger: object, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask credentials and drop stdio payloads from an event dict."""
    for name in list(event):
        lowered = name.lower()
        if lowered in _PAYLOAD_FIELDS or any(m in lowered for m in _SECRET_MARKERS):
            event[name] = REDACTED
    return event


def configure_logging(
    *,
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
) -> None:
    """Configure structlog and the standard library's root logger once."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr)


class FailureStreak:
    """One warning per run of failures of a repeated task, not one a try.

    A timer that retries every second against a Redis that is gone would
    otherwise write a traceback a second. The first failure of a streak is
    a warning with the error's type and message, the repeats are debug
    lines counting it, and the first success after it says how many tries
    failed.
    """

    def __init__(
        self, logger: structlog.typing.FilteringBoundLogger, event: str
    ) -> None:
        self.logger = logger
        self.event = event
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        """Count one failure; log it if it starts a streak."""
        self.failures += 1
        fields = {"error_type": type(exc).__name__, "error": str(exc)}
        if self.failures == 1:
            self.logger.warning(self.event, **fields)
        else:
            self.logger.debug(self.event, failures=self.failures, **fields)

    def succeeded(self) -> None:
        """End the streak, if any, with one line that says it is over."""
        if self.failures:
            self.logger.info(self.event, recovered=True, failures=self.failures)
        self.failures = 0
