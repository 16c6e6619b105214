"""Channel notices: which end of a channel hears what, as the channel's machine moves.

These are the :class:`~host_service.core.events.PartitionEvent`\\s a channel sends to the
sessions holding its ends (the adapter's own events, ``ChannelStateChanged`` and
``ChannelRemoved``, are the channels collaborator's).  Rules:

* Notices go only to ends whose session is still attached: a session that ended is not told
  about its own sockets (``detach`` forgets the session first, so only the peers hear).
* ``ConnectionOffered`` goes to the session owning the listener; ``ConnectionEstablished`` to
  both ends, each with its own addresses and its own view of the rings.
* FIN bookkeeping: the first FIN an end sends (``shutdown``, or a close without an earlier FIN)
  reaches the peer as ``PeerFinReceived`` -- once, and not to a peer that has closed already.
* A channel that ends while connecting tells the connector how (``ConnectFailed``: timed out,
  refused, reset), unless the connector gave up itself, and withdraws the offer from an
  acceptor that did not refuse it itself (``ChannelRescinded``).  A channel that ends after it
  was opened is rescinded towards both ends -- even a gracefully closed one: a Linux guest waits
  for that rescind before it frees the channel.

Owns: nothing.  Reads channel records and whether sessions are live; changes neither.
"""

from __future__ import annotations

from host_service.core.channel import (
    CONNECTING_STATES,
    ESTABLISHED_STATES,
    ChannelInput,
    ChannelState,
)
from host_service.core.errors import ConnectionRefused, ConnectionReset, ConnectTimedOut, HvError
from host_service.core.eventlog import EventLog
from host_service.core.events import (
    ChannelRescinded,
    ConnectFailed,
    ConnectionEstablished,
    ConnectionOffered,
    Event,
    PeerFinReceived,
)
from host_service.core.partitions import Partitions
from host_service.core.records import _Channel
from host_service.core.types import SIDES, Side

__all__ = ["ChannelNotices"]

_HALF_CLOSED_BY = {
    Side.CONNECTOR: ChannelState.HALF_CLOSED_BY_CONNECTOR,
    Side.ACCEPTOR: ChannelState.HALF_CLOSED_BY_ACCEPTOR,
}
_CLOSING_BY = {
    Side.CONNECTOR: ChannelState.CLOSING_BY_CONNECTOR,
    Side.ACCEPTOR: ChannelState.CLOSING_BY_ACCEPTOR,
}
#: The end that sends a FIN with each input (a close implies a FIN).
_SENDER = {
    ChannelInput.FIN_CONNECTOR: Side.CONNECTOR,
    ChannelInput.CLOSE_CONNECTOR: Side.CONNECTOR,
    ChannelInput.FIN_ACCEPTOR: Side.ACCEPTOR,
    ChannelInput.CLOSE_ACCEPTOR: Side.ACCEPTOR,
}
#: Which error describes a pending connect ended by each input (any other: reset).
_CONNECT_FAILURE: dict[ChannelInput, type[HvError]] = {
    ChannelInput.CONNECT_TIMEOUT: ConnectTimedOut,
    ChannelInput.REFUSE: ConnectionRefused,
}


def _fin_sent(state: ChannelState, side: Side) -> bool:
    """Whether ``side`` has sent its FIN in a non-terminal ``state``."""
    return state in (_HALF_CLOSED_BY[side], _CLOSING_BY[side])


class ChannelNotices:
    """Emits the notices of channel transitions (see the module docstring)."""

    __slots__ = ("_events", "_partitions")

    def __init__(self, events: EventLog, partitions: Partitions) -> None:
        self._events = events
        self._partitions = partitions

    def offered(self, out: list[Event], channel: _Channel, now: float) -> None:
        """To the listener's session, just after the channel was offered through it."""
        self._events.emit(
            out,
            ConnectionOffered,
            now,
            partition=channel.acceptor_vm,
            session_id=channel.acceptor_session,
            channel_id=channel.channel_id,
            listener_id=channel.listener_id,
            local=channel.acceptor_local,
            remote=channel.acceptor_remote,
            ring=channel.ring_seen_by(Side.ACCEPTOR),
        )

    def established(self, out: list[Event], channel: _Channel, now: float) -> None:
        for side in SIDES:
            vm, owner = channel.vm(side), channel.session(side)
            if self._partitions.live(vm, owner):
                self._events.emit(
                    out,
                    ConnectionEstablished,
                    now,
                    partition=vm,
                    session_id=owner,
                    channel_id=channel.channel_id,
                    side=side,
                    local=channel.local(side),
                    remote=channel.remote(side),
                    ring=channel.ring_seen_by(side),
                )

    def peer_fin(
        self,
        out: list[Event],
        channel: _Channel,
        old: ChannelState,
        event: ChannelInput,
        now: float,
    ) -> None:
        """A FIN the peer has not seen yet, sent by ``event`` in ``old``."""
        sender = _SENDER.get(event)
        if sender is None or old not in ESTABLISHED_STATES or _fin_sent(old, sender):
            return
        receiver = sender.peer
        vm, owner = channel.vm(receiver), channel.session(receiver)
        if old is not _CLOSING_BY[receiver] and self._partitions.live(vm, owner):
            self._events.emit(
                out,
                PeerFinReceived,
                now,
                partition=vm,
                session_id=owner,
                channel_id=channel.channel_id,
                side=receiver,
            )

    def ended(
        self,
        out: list[Event],
        channel: _Channel,
        old: ChannelState,
        event: ChannelInput,
        now: float,
        reason: str,
    ) -> None:
        """The channel left ``old`` for a terminal state through ``event``; its ends are still
        attached to it."""
        live = self._partitions.live
        if old not in CONNECTING_STATES:
            for side in SIDES:
                if live(channel.vm(side), channel.session(side)):
                    self._rescinded(out, channel, side, now, reason)
            return
        if event is not ChannelInput.CLOSE_CONNECTOR and live(
            channel.connector_vm, channel.connector_session
        ):
            failure = _CONNECT_FAILURE.get(event, ConnectionReset)
            self._events.emit(
                out,
                ConnectFailed,
                now,
                partition=channel.connector_vm,
                session_id=channel.connector_session,
                channel_id=channel.channel_id,
                errno=failure.errno,
                status=failure.status,
                reason=reason,
            )
        if event is not ChannelInput.REFUSE and live(channel.acceptor_vm, channel.acceptor_session):
            self._rescinded(out, channel, Side.ACCEPTOR, now, reason)

    def _rescinded(
        self, out: list[Event], channel: _Channel, side: Side, now: float, reason: str
    ) -> None:
        self._events.emit(
            out,
            ChannelRescinded,
            now,
            partition=channel.vm(side),
            session_id=channel.session(side),
            channel_id=channel.channel_id,
            side=side,
            reason=reason,
        )
