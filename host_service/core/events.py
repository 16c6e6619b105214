"""Events the core returns: frozen facts, named in the past tense (aioquic style).

Every event carries ``at`` (the ``now`` of the call that produced it) and ``seq`` (a strictly
increasing number, so a diagnostics stream can resume "after seq N").

Two families:

* :class:`PartitionEvent` -- addressed to one session of one partition (``partition`` = its VM
  id, ``session_id`` = the session).  The adapter sends it on that session's attach stream.  The
  core addresses only live sessions: a channel notice goes to the session that holds that end,
  an offer to the session that owns the listener; ``SessionEnded`` is emitted just as the
  session ends.
* everything else -- for the adapter itself (reclaim rings, stall rings, metrics) and for the
  lifecycle log.

All events go to the lifecycle log (``HostCore.events_since``).
"""

from __future__ import annotations

from dataclasses import dataclass

from host_service.core.channel import ChannelInput, ChannelState
from host_service.core.types import PartitionState, RingGeometry, Side
from hvsock_common.addresses import Address

__all__ = [
    "ChannelRemoved",
    "ChannelRescinded",
    "ChannelStateChanged",
    "ConnectFailed",
    "ConnectRefused",
    "ConnectionEstablished",
    "ConnectionOffered",
    "Event",
    "ListenerChanged",
    "PartitionChanged",
    "PartitionEvent",
    "PartitionResumed",
    "PartitionStalled",
    "PeerFinReceived",
    "ServiceChanged",
    "SessionChanged",
    "SessionEnded",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    at: float
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionEvent(Event):
    #: VM id of the partition this event is for.
    partition: str
    #: The session (attach stream) of that partition this event is for.
    session_id: int


# --- to a partition -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionOffered(PartitionEvent):
    """A connect reached one of the partition's listeners; accept or refuse ``channel_id``."""

    channel_id: int
    listener_id: int
    #: The listener's bound address.
    local: Address
    #: The connector's address as this partition sees it.
    remote: Address
    #: Rings from the acceptor's point of view.
    ring: RingGeometry


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionEstablished(PartitionEvent):
    """The channel is open; sent to both ends (for loopback, to both sessions involved -- twice
    to one session if it holds both ends)."""

    channel_id: int
    side: Side
    local: Address
    remote: Address
    ring: RingGeometry


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectFailed(PartitionEvent):
    """A pending connect failed (to the connector). ``errno``/``status`` as in the error classes:
    ETIMEDOUT (ConnectTimedOut), ECONNREFUSED (ConnectionRefused) or ECONNRESET (ConnectionReset).
    """

    channel_id: int
    errno: int
    status: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerFinReceived(PartitionEvent):
    """The peer sent its FIN: after the data already queued, reads return EOF."""

    channel_id: int
    side: Side


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelRescinded(PartitionEvent):
    """The host rescinded the channel: read what is left, then EOF; sends fail with EPIPE.
    Also sent after a graceful close (the host always rescinds) and to an acceptor whose
    unopened offer was withdrawn.  After it the partition must not use ``channel_id`` again."""

    channel_id: int
    side: Side
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnded(PartitionEvent):
    """The host ended the session (VM stopped or deleted; every session of the partition gets
    one): close its stream."""

    reason: str


# --- to the adapter / lifecycle log -----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelStateChanged(Event):
    """Lifecycle log entry for every channel transition (``old`` is None at creation)."""

    channel_id: int
    old: ChannelState | None
    new: ChannelState
    input: ChannelInput | None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelRemoved(Event):
    """The channel is gone from the core: reclaim its rings and shared-memory segments."""

    channel_id: int
    final_state: ChannelState
    reason: str
    #: VM ids of the connector and (if any) the acceptor.
    connector: str
    acceptor: str | None
    #: Sessions that held the connector and (if any) the acceptor end.
    connector_session: int
    acceptor_session: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRefused(Event):
    """A connect refused synchronously (no channel was created); for metrics and the log."""

    connector: str
    target: Address
    errno: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionChanged(Event):
    """created / deleted / paused / resumed / stopped / started / attached / detached /
    taken_over (an anonymous attach took an idle auto-created VM over by name: new token).

    "attached" marks the partition's first live session, "detached" the end of its last one;
    :class:`SessionChanged` reports every session in between.
    """

    vm_id: str
    change: str
    state: PartitionState | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionChanged(Event):
    """A session of ``vm_id`` "opened" (attach) or "closed" (detach, stop, delete)."""

    vm_id: str
    session_id: int
    change: str
    #: Live sessions of the partition after the change.
    sessions: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionStalled(Event):
    """The VM was paused: stall (stop servicing) the rings of these channels."""

    vm_id: str
    channel_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionResumed(Event):
    """The VM runs again: service the rings of these channels again."""

    vm_id: str
    channel_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerChanged(Event):
    """``change`` is "listening" or "closed"."""

    listener_id: int
    vm_id: str
    local: Address
    change: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceChanged(Event):
    """``change`` is "registered", "updated" or "unregistered"."""

    service_id: str
    element_name: str
    change: str
