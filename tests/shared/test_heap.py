"""Start-up objects are exempt from later collections."""

from __future__ import annotations

import gc

from shared.heap import freeze_startup_heap


def collected(target: object) -> bool:
    """Whether a full collection would scan ``target``."""
    return any(candidate is target for candidate in gc.get_objects())


class TestStartupHeap:
    """The heap a process has once it has started."""

    def test_start_up_objects_leave_the_collected_heap_and_later_ones_do_not(
        self,
    ) -> None:
        """Objects from before the freeze are no longer collected; objects made
        after it are."""
        start_up_state = [{"route": "/v1/sessions"}]
        assert collected(start_up_state)
        try:
            freeze_startup_heap()
            later_request = [{"body": "{}"}]

            assert gc.get_freeze_count() > 0
            assert not collected(start_up_state)
            assert collected(later_request)
        finally:
            gc.unfreeze()
