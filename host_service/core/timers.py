"""The channels' timer queue: connect and close deadlines, in due order.

A deadline is never cancelled in the queue: the channel's own ``deadline`` / ``deadline_kind``
say which timer is current, and an entry that no longer matches (the channel moved on, or is
gone) is skipped when it comes up.  That keeps starting a timer O(log n) and stopping one free.

Owns: the heap.  Knows nothing of channels but the predicate it is given, which says whether an
entry is still current.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

__all__ = ["TimerEntry", "Timers"]

#: (deadline, tie-breaker, channel id, kind): the tie-breaker keeps equal deadlines in the
#: order they were started.
TimerEntry = tuple[float, int, int, str]


class Timers:
    __slots__ = ("_current", "_heap", "_ties")

    def __init__(self, current: Callable[[TimerEntry], bool]) -> None:
        self._current = current
        self._heap: list[TimerEntry] = []
        self._ties = itertools.count()

    def start(self, deadline: float, channel_id: int, kind: str) -> None:
        heapq.heappush(self._heap, (deadline, next(self._ties), channel_id, kind))

    def next_deadline(self) -> float | None:
        """The earliest current deadline, or None if no timer runs."""
        while self._heap and not self._current(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> tuple[int, str] | None:
        """``(channel id, kind)`` of the earliest current timer due at ``now``, taken off the
        queue; None when none is due.  Timers started while firing are seen by the next call."""
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if self._current(entry):
                return entry[2], entry[3]
        return None
