"""The one event constructor: every event the core produces is made, stamped and logged here.

An event's ``at`` is the ``now`` of the call that caused it and its ``seq`` the next number of
one counter, so ``seq`` is strictly increasing in the order events were caused -- which is what
lets a diagnostics stream resume "after seq N".  That holds only if nothing else builds events,
so the collaborators of :class:`~host_service.core.host.HostCore` never call an event class
themselves: they name the class and its own fields, and :meth:`EventLog.emit` fills in ``at``
and ``seq``, appends the event to the caller's result list and to the bounded lifecycle log.

Owns: the sequence counter and the log.  Touches nothing else.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, TypeVar

from host_service.core.events import Event

__all__ = ["EventLog"]

E = TypeVar("E", bound=Event)


class EventLog:
    """Stamps, logs and hands out the core's events."""

    __slots__ = ("_log", "_seqs")

    def __init__(self, size: int) -> None:
        self._seqs = itertools.count(1)
        #: The last ``size`` events (``event_log_size``): older ones are dropped, never resent.
        self._log: deque[Event] = deque(maxlen=size)

    def emit(self, out: list[Event], kind: type[E], now: float, **fields: Any) -> E:
        """Make a ``kind`` event from ``fields`` at ``now``; log it and append it to ``out``.

        ``fields`` are the event's own fields (everything but ``at`` and ``seq``); the event's
        dataclass checks them, so a missing or unknown field fails at once, in every test that
        reaches the emitting line.
        """
        event = kind(at=now, seq=next(self._seqs), **fields)
        self._log.append(event)
        out.append(event)
        return event

    def since(self, seq: int) -> list[Event]:
        """Logged events with ``event.seq > seq``, oldest first."""
        return [event for event in self._log if event.seq > seq]
