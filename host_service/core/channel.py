"""The channel state machine: ONE transition table, nothing else decides a channel's state.

Theory of operation
-------------------
A channel is one hv_sock connection between two ends: the *connector* (the end that called
connect) and the *acceptor* (the end whose listener received the offer).  Its life, as on
Hyper-V (hvsock-facts section 2):

* ``CONNECT_REQUESTED`` -- the connector's request is at the host.  Either a listener is found
  (``OFFER``), or nobody answers and the connect eventually times out.
* ``OFFERED`` -- the host offered the channel to the acceptor's partition; it counts against the
  listener's backlog until the acceptor ``ACCEPT``\\s (opens it) or refuses it.
* ``OPEN`` -- established; data flows both ways.
* ``HALF_CLOSED_BY_CONNECTOR`` / ``HALF_CLOSED_BY_ACCEPTOR`` -- that end sent its FIN
  (``shutdown(SHUT_WR)``, a zero-length packet); the other direction still flows.
* ``CLOSING_BY_CONNECTOR`` / ``CLOSING_BY_ACCEPTOR`` -- that end closed (close implies FIN) while
  the peer has not sent its FIN; the host waits at most the close timeout (8 s, HVS_CLOSE_TIMEOUT)
  for the peer's FIN or close, then rescinds.
* ``CLOSED`` -- terminal, graceful: both FINs seen (or the connect ended: refused, timed out,
  abandoned).  The host still rescinds the channel towards both ends -- a Linux guest waits for
  that rescind before it frees the channel.
* ``RESCINDED`` -- terminal, abortive: the host tore the channel down (fault injection, VM stop,
  partition detach, close timeout, protocol error).

Rules of this file:

1. ``TRANSITIONS`` lists every *allowed* (state, input) pair and its next state.  Every other pair
   is a protocol error: the machine moves to ``RESCINDED`` (an error closes the channel) and
   :class:`ProtocolError` is raised.  In a terminal state the machine stays where it is.
2. The machine knows nothing about partitions, listeners, events or time; ``HostCore`` turns
   transitions into events and deadlines.  It only says what the new state is.
3. Idempotent inputs (a second FIN from the same end, a second close) are explicit
   self-transitions, because sockets make those idempotent and a client may race them.

Invariant checked by the property tests: once terminal, always terminal; ``TRANSITIONS`` never
leads out of a terminal state; every state is reachable from ``CONNECT_REQUESTED``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from host_service.core.errors import NotConnected, ProtocolError

__all__ = [
    "CLOSING_STATES",
    "CONNECTING_STATES",
    "ESTABLISHED_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "ChannelInput",
    "ChannelMachine",
    "ChannelState",
]


class ChannelState(StrEnum):
    CONNECT_REQUESTED = "connect_requested"
    OFFERED = "offered"
    OPEN = "open"
    HALF_CLOSED_BY_CONNECTOR = "half_closed_by_connector"
    HALF_CLOSED_BY_ACCEPTOR = "half_closed_by_acceptor"
    CLOSING_BY_CONNECTOR = "closing_by_connector"
    CLOSING_BY_ACCEPTOR = "closing_by_acceptor"
    CLOSED = "closed"
    RESCINDED = "rescinded"


class ChannelInput(StrEnum):
    #: The router found a listener with backlog room and offered the channel to it.
    OFFER = "offer"
    #: The acceptor opened the offered channel.
    ACCEPT = "accept"
    #: A refusal the connector hears (TL_CONNECT_RESULT to a Windows guest / the host).
    REFUSE = "refuse"
    #: A refusal nobody hears (a Linux guest ignores the result; a guest ignores a host offer):
    #: the connector keeps waiting until its connect timeout.
    DROP = "drop"
    CONNECT_TIMEOUT = "connect_timeout"
    FIN_CONNECTOR = "fin_connector"
    FIN_ACCEPTOR = "fin_acceptor"
    CLOSE_CONNECTOR = "close_connector"
    CLOSE_ACCEPTOR = "close_acceptor"
    CLOSE_TIMEOUT = "close_timeout"
    RESCIND = "rescind"


S = ChannelState
I = ChannelInput  # noqa: E741 - a one-letter alias keeps the table readable

_TABLE: dict[tuple[ChannelState, ChannelInput], ChannelState] = {
    # --- connecting ------------------------------------------------------------------------
    (S.CONNECT_REQUESTED, I.OFFER): S.OFFERED,
    (S.CONNECT_REQUESTED, I.REFUSE): S.CLOSED,
    (S.CONNECT_REQUESTED, I.DROP): S.CONNECT_REQUESTED,
    (S.CONNECT_REQUESTED, I.CONNECT_TIMEOUT): S.CLOSED,
    (S.CONNECT_REQUESTED, I.CLOSE_CONNECTOR): S.CLOSED,  # connector gave up
    (S.CONNECT_REQUESTED, I.RESCIND): S.RESCINDED,
    (S.OFFERED, I.ACCEPT): S.OPEN,
    (S.OFFERED, I.REFUSE): S.CLOSED,
    (S.OFFERED, I.DROP): S.CONNECT_REQUESTED,  # offer ignored; connector waits for its timeout
    (S.OFFERED, I.CONNECT_TIMEOUT): S.CLOSED,  # the host withdraws the unopened offer
    (S.OFFERED, I.CLOSE_CONNECTOR): S.CLOSED,
    (S.OFFERED, I.RESCIND): S.RESCINDED,
    # --- established -----------------------------------------------------------------------
    (S.OPEN, I.FIN_CONNECTOR): S.HALF_CLOSED_BY_CONNECTOR,
    (S.OPEN, I.FIN_ACCEPTOR): S.HALF_CLOSED_BY_ACCEPTOR,
    (S.OPEN, I.CLOSE_CONNECTOR): S.CLOSING_BY_CONNECTOR,
    (S.OPEN, I.CLOSE_ACCEPTOR): S.CLOSING_BY_ACCEPTOR,
    (S.OPEN, I.RESCIND): S.RESCINDED,
    # --- half closed (one FIN seen) ------------------------------------------------------------
    (S.HALF_CLOSED_BY_CONNECTOR, I.FIN_CONNECTOR): S.HALF_CLOSED_BY_CONNECTOR,  # FIN sent once
    (S.HALF_CLOSED_BY_CONNECTOR, I.FIN_ACCEPTOR): S.CLOSED,
    (S.HALF_CLOSED_BY_CONNECTOR, I.CLOSE_CONNECTOR): S.CLOSING_BY_CONNECTOR,
    (S.HALF_CLOSED_BY_CONNECTOR, I.CLOSE_ACCEPTOR): S.CLOSED,
    (S.HALF_CLOSED_BY_CONNECTOR, I.RESCIND): S.RESCINDED,
    (S.HALF_CLOSED_BY_ACCEPTOR, I.FIN_ACCEPTOR): S.HALF_CLOSED_BY_ACCEPTOR,
    (S.HALF_CLOSED_BY_ACCEPTOR, I.FIN_CONNECTOR): S.CLOSED,
    (S.HALF_CLOSED_BY_ACCEPTOR, I.CLOSE_ACCEPTOR): S.CLOSING_BY_ACCEPTOR,
    (S.HALF_CLOSED_BY_ACCEPTOR, I.CLOSE_CONNECTOR): S.CLOSED,
    (S.HALF_CLOSED_BY_ACCEPTOR, I.RESCIND): S.RESCINDED,
    # --- closing (one end closed, waiting for the other's FIN, at most close_timeout) -------------
    (S.CLOSING_BY_CONNECTOR, I.CLOSE_CONNECTOR): S.CLOSING_BY_CONNECTOR,  # idempotent close
    (S.CLOSING_BY_CONNECTOR, I.FIN_ACCEPTOR): S.CLOSED,
    (S.CLOSING_BY_CONNECTOR, I.CLOSE_ACCEPTOR): S.CLOSED,
    (S.CLOSING_BY_CONNECTOR, I.CLOSE_TIMEOUT): S.RESCINDED,
    (S.CLOSING_BY_CONNECTOR, I.RESCIND): S.RESCINDED,
    (S.CLOSING_BY_ACCEPTOR, I.CLOSE_ACCEPTOR): S.CLOSING_BY_ACCEPTOR,
    (S.CLOSING_BY_ACCEPTOR, I.FIN_CONNECTOR): S.CLOSED,
    (S.CLOSING_BY_ACCEPTOR, I.CLOSE_CONNECTOR): S.CLOSED,
    (S.CLOSING_BY_ACCEPTOR, I.CLOSE_TIMEOUT): S.RESCINDED,
    (S.CLOSING_BY_ACCEPTOR, I.RESCIND): S.RESCINDED,
    # CLOSED and RESCINDED are terminal: no entries.
}

#: The allowed transitions, read-only.  Every pair not listed is a protocol error.
TRANSITIONS: Mapping[tuple[ChannelState, ChannelInput], ChannelState] = MappingProxyType(_TABLE)

TERMINAL_STATES = frozenset({S.CLOSED, S.RESCINDED})
#: States with a pending connect (a connect deadline runs).
CONNECTING_STATES = frozenset({S.CONNECT_REQUESTED, S.OFFERED})
#: States in which the close timeout runs.
CLOSING_STATES = frozenset({S.CLOSING_BY_CONNECTOR, S.CLOSING_BY_ACCEPTOR})
#: States in which both ends hold an open socket for this channel.
ESTABLISHED_STATES = frozenset(
    {
        S.OPEN,
        S.HALF_CLOSED_BY_CONNECTOR,
        S.HALF_CLOSED_BY_ACCEPTOR,
        S.CLOSING_BY_CONNECTOR,
        S.CLOSING_BY_ACCEPTOR,
    }
)

_NOT_CONNECTED_INPUTS = frozenset({I.FIN_CONNECTOR, I.FIN_ACCEPTOR, I.CLOSE_ACCEPTOR})

del S, I


class ChannelMachine:
    """The state of one channel, advanced only through :data:`TRANSITIONS`."""

    __slots__ = ("state",)

    def __init__(self, state: ChannelState = ChannelState.CONNECT_REQUESTED) -> None:
        self.state = state

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def allows(self, event: ChannelInput) -> bool:
        return (self.state, event) in TRANSITIONS

    def process(self, event: ChannelInput) -> ChannelState:
        """Apply ``event`` and return the new state.

        Raises:
            ProtocolError: the pair is not in the table.  The channel is closed first: it moves
                to RESCINDED unless it already was terminal.
        """
        try:
            new_state = TRANSITIONS[(self.state, event)]
        except KeyError:
            old = self.state
            if not self.terminal:
                self.state = ChannelState.RESCINDED
            # FIN/close of the acceptor before the channel is open is "not connected" (ENOTCONN);
            # the class is still a ProtocolError, so handling is the same.
            error: type[ProtocolError] = ProtocolError
            if old in CONNECTING_STATES and event in _NOT_CONNECTED_INPUTS:
                error = NotConnected
            raise error(
                f"channel input {event.value!r} is not allowed in state {old.value!r}"
                + ("" if old in TERMINAL_STATES else "; the channel was rescinded")
            ) from None
        self.state = new_state
        return new_state
