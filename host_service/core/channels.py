"""Channels: the live channel records and what each transition of their machine does to them.

:mod:`~host_service.core.channel` says which state a channel moves to; this module is the one
place that feeds it (:meth:`Channels.feed`) and carries the transition out:

* a ``ChannelStateChanged`` for every input (a protocol error rescinds the channel first, and
  the teardown events ride on the raised error);
* the deadline the new state runs: the connect deadline through CONNECT_REQUESTED and OFFERED,
  the close timeout (``close_timeout``) from entering a CLOSING state, none otherwise -- timers
  that fire feed CONNECT_TIMEOUT / CLOSE_TIMEOUT like any other input;
* the ends' bookkeeping: an end counts as a socket of its partition from the moment it exists
  (the connecting end from ``open``, the accepting end from ``offer``) until the channel is
  forgotten or the offer ends; an offer holds a backlog slot of its listener until accepted;
* in a terminal state, the channel is forgotten (rings can be reclaimed: ``ChannelRemoved``).

What the ends hear along the way (offers, FINs, failures, rescinds) is
:mod:`~host_service.core.notices`'s.

Owns: the channel table and ids, the timers, each partition's ``channels`` / ``channel_ends`` /
``local_ids``, and a channel's acceptor end (set by :meth:`Channels.offer`, cleared by
``_detach_acceptor``) with its backlog slot.  May read, but not change: partition states and
sessions, listeners other than their backlog slot.  Where a connect goes, and whether a refusal is
heard, is connect routing's (:mod:`~host_service.core.connects`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from host_service.core.channel import (
    CLOSING_STATES,
    CONNECTING_STATES,
    ESTABLISHED_STATES,
    TERMINAL_STATES,
    ChannelInput,
    ChannelMachine,
    ChannelState,
)
from host_service.core.config import HostConfig
from host_service.core.errors import (
    InvalidArgument,
    InvalidState,
    NotFound,
    PermissionDenied,
    ProtocolError,
)
from host_service.core.eventlog import EventLog
from host_service.core.events import (
    ChannelRemoved,
    ChannelStateChanged,
    Event,
)
from host_service.core.listeners import Listeners
from host_service.core.notices import ChannelNotices
from host_service.core.partitions import Partitions
from host_service.core.records import _Channel, _Listener, _Partition
from host_service.core.timers import TimerEntry, Timers
from host_service.core.types import SIDES, ChannelInfo, RingGeometry, Session, Side
from hvsock_common.addresses import Address

__all__ = ["Channels"]

#: What one end's shutdown, close and reset feed the channel's machine, by the end that asks,
#: and the reason recorded ("{end}": connector or acceptor).
_END_ACTIONS: dict[str, tuple[dict[Side, ChannelInput], str]] = {
    "shutdown": (
        {Side.CONNECTOR: ChannelInput.FIN_CONNECTOR, Side.ACCEPTOR: ChannelInput.FIN_ACCEPTOR},
        "shutdown by the {end}",
    ),
    "close": (
        {Side.CONNECTOR: ChannelInput.CLOSE_CONNECTOR, Side.ACCEPTOR: ChannelInput.CLOSE_ACCEPTOR},
        "closed by the {end}",
    ),
    "reset": ({side: ChannelInput.RESCIND for side in Side}, "reset by the {end}"),
}
#: The input each timer kind fires, and the reason it gives.
_TIMEOUTS = {
    "connect": (ChannelInput.CONNECT_TIMEOUT, "connect timed out"),
    "close": (ChannelInput.CLOSE_TIMEOUT, "close timeout: the peer did not close in time"),
}


class Channels:
    """Every live channel (see the module docstring)."""

    __slots__ = (
        "_channel_id_factory",
        "_channels",
        "_config",
        "_events",
        "_listeners",
        "_notices",
        "_partitions",
        "_timers",
    )

    def __init__(
        self,
        config: HostConfig,
        events: EventLog,
        partitions: Partitions,
        listeners: Listeners,
        channel_id_factory: Callable[[], int],
    ) -> None:
        self._config = config
        self._events = events
        self._partitions = partitions
        self._listeners = listeners
        self._channel_id_factory = channel_id_factory
        self._notices = ChannelNotices(events, partitions)
        self._channels: dict[int, _Channel] = {}
        self._timers = Timers(self._timer_current)

    # --- lookups ------------------------------------------------------------------------------

    def get(self, channel_id: int) -> _Channel:
        channel = self._channels.get(channel_id)
        if channel is None:
            raise NotFound(f"no channel {channel_id}")
        return channel

    def end(
        self, partition: _Partition, session: Session, channel_id: int, side: Side | None
    ) -> tuple[_Channel, Side]:
        """The channel and which of its ends the caller speaks for.

        Channels the session holds no end of are reported as not found (a session cannot
        learn about, let alone act on, another partition's channels -- nor the ends another
        session of its own partition holds).
        """
        channel = self._channels.get(channel_id)
        sides = (
            []
            if channel is None
            else [
                s
                for s in SIDES
                if channel.vm(s) == partition.vm_id and channel.session(s) == session.session_id
            ]
        )
        if channel is None or not sides:
            raise NotFound(
                f"no channel {channel_id} in session {session.session_id} of {partition.vm_id}"
            )
        if side is None:
            if len(sides) > 1:
                raise InvalidArgument(
                    f"channel {channel_id} is a loopback channel: say which side (connector "
                    "or acceptor) the request is for"
                )
            return channel, sides[0]
        side = Side(side)
        if side not in sides:
            raise PermissionDenied(
                f"session {session.session_id} of partition {partition.vm_id} is not the {side} "
                f"of channel {channel_id}"
            )
        return channel, side

    def established(self, partition: _Partition) -> tuple[int, ...]:
        """Ids of ``partition``'s channels in which both ends hold an open socket."""
        return tuple(
            sorted(
                cid
                for cid in partition.channels
                if self._channels[cid].machine.state in ESTABLISHED_STATES
            )
        )

    def info(self, channel_id: int) -> ChannelInfo:
        return self.get(channel_id).info()

    def infos(self, partition: _Partition | None) -> list[ChannelInfo]:
        """Every live channel (or those with an end in ``partition``), by channel id."""
        ids: Iterable[int] = self._channels if partition is None else partition.channels
        return [self._channels[cid].info() for cid in sorted(ids)]

    # --- a channel's life ---------------------------------------------------------------------

    def open(
        self,
        connector: _Partition,
        session: Session,
        local: Address,
        target: Address,
        *,
        req_send: int | None,
        req_recv: int | None,
        ring: RingGeometry,
        deadline: float,
        now: float,
    ) -> tuple[_Channel, list[Event]]:
        """Create the channel of a connect (CONNECT_REQUESTED): the connecting end counts as a
        socket of ``connector`` and holds ``local`` from now on; the connect deadline runs."""
        cid = self._channel_id_factory()
        if cid in self._channels:
            raise InvalidState(f"channel id factory returned channel id {cid}, which is in use")
        channel = _Channel(
            channel_id=cid,
            machine=ChannelMachine(),
            connector_vm=connector.vm_id,
            connector_session=session.session_id,
            connector_local=local,
            target=target,
            req_send=req_send,
            req_recv=req_recv,
            ring=ring,
            created_at=now,
            state_since=now,
            connect_deadline=deadline,
            deadline=deadline,
            deadline_kind="connect",
        )
        self._channels[cid] = channel
        connector.channels.add(cid)
        connector.channel_ends += 1
        connector.local_ids[local.service_id] = cid
        self._timers.start(deadline, cid, "connect")
        out: list[Event] = []
        self._events.emit(
            out,
            ChannelStateChanged,
            now,
            channel_id=cid,
            old=None,
            new=channel.machine.state,
            input=None,
            reason=f"connect from {connector.vm_id} to {target}",
        )
        return channel, out

    def offer(
        self,
        channel: _Channel,
        acceptor: _Partition,
        listener: _Listener,
        *,
        remote: Address,
        ring: RingGeometry,
        now: float,
    ) -> list[Event]:
        """Offer the channel through ``listener``: the accepting end exists (it counts as a
        socket of ``acceptor`` and takes a backlog slot) from now until it is accepted or the
        offer ends."""
        channel.acceptor_vm = acceptor.vm_id
        channel.acceptor_session = listener.session_id
        channel.listener_id = listener.listener_id
        channel.acceptor_local = listener.local
        channel.acceptor_remote = remote
        channel.ring = ring
        self._listeners.offered(listener, channel.channel_id)
        acceptor.channels.add(channel.channel_id)
        acceptor.channel_ends += 1
        out = self.feed(
            channel, ChannelInput.OFFER, now, f"offered to listener {listener.listener_id}"
        )
        self._notices.offered(out, channel, now)
        return out

    def accept(
        self, partition: _Partition, session: Session, channel_id: int, now: float
    ) -> list[Event]:
        channel, _ = self.end(partition, session, channel_id, Side.ACCEPTOR)
        out = self.feed(channel, ChannelInput.ACCEPT, now, "accepted")
        self._listeners.settled(channel.listener_id, channel.channel_id)
        self._notices.established(out, channel, now)
        return out

    def end_action(
        self,
        action: str,
        partition: _Partition,
        session: Session,
        channel_id: int,
        now: float,
        side: Side | None,
    ) -> list[Event]:
        """``action`` (shutdown, close or reset, see _END_ACTIONS) by the end ``session``
        holds."""
        channel, end = self.end(partition, session, channel_id, side)
        inputs, reason = _END_ACTIONS[action]
        return self.feed(channel, inputs[end], now, reason.format(end=end))

    def rescind(self, channel_id: int, now: float, reason: str) -> list[Event]:
        return self.feed(self.get(channel_id), ChannelInput.RESCIND, now, reason)

    def rescind_all(self, now: float, reason: str) -> list[Event]:
        out: list[Event] = []
        for cid in sorted(self._channels):
            channel = self._channels.get(cid)
            if channel is not None:
                out.extend(self.feed(channel, ChannelInput.RESCIND, now, reason))
        return out

    def rescind_held(
        self, partition: _Partition, session_id: int | None, now: float, *, reason: str
    ) -> list[Event]:
        """Rescind every channel with an end held by ``session_id`` in ``partition`` (by any
        session for None)."""
        out: list[Event] = []
        for cid in sorted(partition.channels):
            channel = self._channels.get(cid)
            if channel is None or channel.machine.terminal:
                continue
            if session_id is None or any(
                channel.vm(side) == partition.vm_id and channel.session(side) == session_id
                for side in SIDES
            ):
                out.extend(self.feed(channel, ChannelInput.RESCIND, now, reason))
        return out

    # --- the one place that advances a channel ------------------------------------------------

    def feed(self, channel: _Channel, event: ChannelInput, now: float, reason: str) -> list[Event]:
        """Feed ``event`` to the channel's machine and turn the transition into events.

        A protocol error closes the channel (the machine moved to RESCINDED): the teardown
        events are attached to the re-raised :class:`ProtocolError`.
        """
        old = channel.machine.state
        try:
            new = channel.machine.process(event)
        except ProtocolError as error:
            if old in TERMINAL_STATES:  # pragma: no cover - removed channels are never fed
                raise
            events = self._after(
                channel, old, ChannelState.RESCINDED, event, now, f"protocol error: {error.message}"
            )
            raise error.with_events(events) from None
        return self._after(channel, old, new, event, now, reason)

    def _after(
        self,
        channel: _Channel,
        old: ChannelState,
        new: ChannelState,
        event: ChannelInput,
        now: float,
        reason: str,
    ) -> list[Event]:
        out: list[Event] = []
        if new is not old:
            channel.state_since = now
        self._events.emit(
            out,
            ChannelStateChanged,
            now,
            channel_id=channel.channel_id,
            old=old,
            new=new,
            input=event,
            reason=reason,
        )
        # Deadlines: the connect deadline runs through CONNECT_REQUESTED and OFFERED; the close
        # timeout starts when a CLOSING state is entered; nothing else has a timer.
        if new in CLOSING_STATES and old not in CLOSING_STATES:
            channel.deadline = now + self._config.close_timeout
            channel.deadline_kind = "close"
            self._timers.start(channel.deadline, channel.channel_id, "close")
        elif new not in CONNECTING_STATES and new not in CLOSING_STATES:
            channel.deadline = None
            channel.deadline_kind = None

        if old is ChannelState.OFFERED and new is ChannelState.CONNECT_REQUESTED:
            self._detach_acceptor(channel)
            return out

        self._notices.peer_fin(out, channel, old, event, now)
        if new in TERMINAL_STATES:
            out.extend(self._finish(channel, old, new, event, now, reason))
        return out

    def _finish(
        self,
        channel: _Channel,
        old: ChannelState,
        new: ChannelState,
        event: ChannelInput,
        now: float,
        reason: str,
    ) -> list[Event]:
        """Tell both ends the channel is over, then forget it (rings can be reclaimed)."""
        out: list[Event] = []
        cid = channel.channel_id
        self._notices.ended(out, channel, old, event, now, reason)
        acceptor_vm, acceptor_session = channel.acceptor_vm, channel.acceptor_session
        self._detach_acceptor(channel)
        connector = self._partitions.find(channel.connector_vm)
        if connector is not None:
            connector.channels.discard(cid)
            connector.channel_ends -= 1
            if connector.local_ids.get(channel.connector_local.service_id) == cid:
                del connector.local_ids[channel.connector_local.service_id]
        channel.deadline = None
        channel.deadline_kind = None
        del self._channels[cid]
        self._events.emit(
            out,
            ChannelRemoved,
            now,
            channel_id=cid,
            final_state=new,
            reason=reason,
            connector=channel.connector_vm,
            acceptor=acceptor_vm,
            connector_session=channel.connector_session,
            acceptor_session=acceptor_session,
        )
        return out

    def _detach_acceptor(self, channel: _Channel) -> None:
        """Undo :meth:`offer`: the acceptor end no longer exists."""
        if channel.acceptor_vm is None:
            return
        self._listeners.settled(channel.listener_id, channel.channel_id)
        acceptor = self._partitions.find(channel.acceptor_vm)
        if acceptor is not None:
            acceptor.channel_ends -= 1
            if acceptor.vm_id != channel.connector_vm:
                acceptor.channels.discard(channel.channel_id)
        channel.acceptor_vm = None
        channel.acceptor_session = None
        channel.acceptor_local = None
        channel.acceptor_remote = None
        channel.listener_id = None

    # --- timers -------------------------------------------------------------------------------

    def _timer_current(self, entry: TimerEntry) -> bool:
        deadline, _, cid, kind = entry
        channel = self._channels.get(cid)
        return (
            channel is not None and channel.deadline == deadline and channel.deadline_kind == kind
        )

    def next_deadline(self) -> float | None:
        return self._timers.next_deadline()

    def on_timer(self, now: float) -> list[Event]:
        out: list[Event] = []
        while (due := self._timers.pop_due(now)) is not None:
            cid, kind = due
            event, reason = _TIMEOUTS[kind]
            out.extend(self.feed(self._channels[cid], event, now, reason))
        return out

    # --- adapter reports ----------------------------------------------------------------------

    def set_data_path(self, channel_id: int, side: Side, path: str) -> bool:
        channel = self._channels.get(channel_id)
        if channel is None:
            return False
        if Side(side) is Side.CONNECTOR:
            channel.connector_path = path
        else:
            channel.acceptor_path = path
        return True
