"""The garbage collector, told what a long-running process keeps.

A fleet process builds its whole long-lived state at start-up: routes,
models, settings, the OpenTelemetry SDK, clients. Python's full
collection scans every tracked object, and here that is close to a hundred
thousand of them: about 50 ms on this machine's cores, long enough to
show in the admission p99 and in a relayed message's latency whenever one
runs. Frozen after start-up, those objects are never scanned again;
collections then walk only what requests and sessions allocate.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left, then exempt the rest from collections."""
    gc.collect()
    gc.freeze()
