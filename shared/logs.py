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
