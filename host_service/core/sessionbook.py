"""What one attach session is waiting for: pending connects and accepts, auto-accept credit.

Theory of operation
-------------------
An attach stream's requests are answered asynchronously: a ``Connect`` is answered when the
channel opens or the connect fails, an ``Accept`` when the opening completes, and a listener
with ``auto_accept`` has connections opened on its behalf with no request at all. The adapter
keeps, per session, one :class:`SessionBook` saying which answer each channel is owed and how
the end is to be opened (forced onto the relay, with which relay window). It is pure state: no
clock, no I/O; the adapter turns core events into calls here and sends what they return.

Rules:

1. A channel is owed at most one answer: :meth:`SessionBook.expect` refuses a second
   expectation for a channel (InvalidState), and :meth:`SessionBook.opened` /
   :meth:`SessionBook.failed` take the expectation away (None when nothing was owed: the
   opening arrives unsolicited).
2. Auto-accept credit is per listener, at most :data:`MAX_ACCEPT_CREDIT`; taking one (an
   offer accepted on the listener's behalf) and giving it back (the accept failed) keep the
   count within ``[0, MAX_ACCEPT_CREDIT]``. Credit for a listener the session does not
   auto-accept on is NotFound.
3. Channels this session closed (and holds only one end of) get no more notices: ``closed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from host_service.core.errors import InvalidState, NotFound

__all__ = ["MAX_ACCEPT_CREDIT", "OpenPlan", "SessionBook"]

#: Most auto-accept credit a listener may hold (the kernel's somaxconn-like bound).
MAX_ACCEPT_CREDIT = 65535


@dataclass(frozen=True, slots=True)
class OpenPlan:
    """How to answer and open one end: the request to answer (0: unsolicited), whether the end
    must use the relay, its relay window (None: the host's default), and for an opening made
    on a listener's behalf, that listener."""

    request_id: int = 0
    force_relay: bool = False
    relay_window: int | None = None
    listener_id: int = 0


@dataclass(slots=True)
class _AutoAccept:
    credit: int
    relay_window: int | None


@dataclass(slots=True)
class SessionBook:
    #: channel id -> the Connect owed an answer.
    connects: dict[int, OpenPlan] = field(default_factory=dict)
    #: channel id -> the Accept (or auto-accept) owed an opening.
    accepts: dict[int, OpenPlan] = field(default_factory=dict)
    #: listener id -> auto-accept credit and relay window.
    listeners: dict[int, _AutoAccept] = field(default_factory=dict)
    #: Channels this session closed and needs no more notices on.
    closed: set[int] = field(default_factory=set)

    # -- connects and accepts --------------------------------------------------------------

    def expect(self, channel_id: int, plan: OpenPlan, *, connecting: bool) -> None:
        book = self.connects if connecting else self.accepts
        if channel_id in book:
            raise InvalidState(f"channel {channel_id} already has a pending request")
        book[channel_id] = plan

    def opened(self, channel_id: int, *, connector: bool) -> OpenPlan | None:
        """The end opened: the plan it was expected with (None: unsolicited)."""
        return (self.connects if connector else self.accepts).pop(channel_id, None)

    def failed(self, channel_id: int) -> OpenPlan | None:
        """The connect (or accept) ended without opening: the plan owed an error, if any."""
        self.accepts.pop(channel_id, None)
        return self.connects.pop(channel_id, None)

    def forget(self, channel_id: int) -> None:
        """The channel is gone: nothing is owed for it any more."""
        self.connects.pop(channel_id, None)
        self.accepts.pop(channel_id, None)
        self.closed.discard(channel_id)

    # -- auto-accept -------------------------------------------------------------------------

    def listen(self, listener_id: int, auto_accept: int, relay_window: int | None) -> None:
        if auto_accept:
            self.listeners[listener_id] = _AutoAccept(
                min(auto_accept, MAX_ACCEPT_CREDIT), relay_window
            )

    def unlisten(self, listener_id: int) -> None:
        self.listeners.pop(listener_id, None)

    def add_credit(self, listener_id: int, count: int) -> None:
        listener = self.listeners.get(listener_id)
        if listener is None:
            raise NotFound(f"no auto-accepting listener {listener_id} in this session")
        listener.credit = min(listener.credit + count, MAX_ACCEPT_CREDIT)

    def credit(self, listener_id: int) -> int:
        listener = self.listeners.get(listener_id)
        return 0 if listener is None else listener.credit

    def take_credit(self, listener_id: int, channel_id: int) -> OpenPlan | None:
        """Accept ``channel_id`` on the listener's behalf if it has credit: the plan to open it
        with (recorded as owed), or None (offer it instead)."""
        listener = self.listeners.get(listener_id)
        if listener is None or listener.credit <= 0 or channel_id in self.accepts:
            return None
        listener.credit -= 1
        plan = OpenPlan(relay_window=listener.relay_window, listener_id=listener_id)
        self.accepts[channel_id] = plan
        return plan

    def return_credit(self, channel_id: int) -> None:
        """The accept made on a listener's behalf failed: its credit was not used."""
        plan = self.accepts.pop(channel_id, None)
        if plan is None or not plan.listener_id:
            return
        listener = self.listeners.get(plan.listener_id)
        if listener is not None:
            listener.credit = min(listener.credit + 1, MAX_ACCEPT_CREDIT)
