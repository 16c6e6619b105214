"""Small value types shared by the core's modules and its public API (all immutable)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from host_service.core.channel import ChannelState
from hvsock_common.addresses import Address

__all__ = [
    "PAGE_SIZE",
    "SIDES",
    "ChannelInfo",
    "EndpointInfo",
    "ListenerInfo",
    "PartitionInfo",
    "PartitionState",
    "Personality",
    "RingGeometry",
    "ServiceRegistration",
    "Session",
    "Side",
]

#: VMBus ring pages are 4 KiB (HV_HYP_PAGE_SIZE), whatever the machine's page size.
PAGE_SIZE = 4096


class Side(StrEnum):
    """Which end of a channel."""

    CONNECTOR = "connector"
    ACCEPTOR = "acceptor"

    @property
    def peer(self) -> Side:
        return Side.ACCEPTOR if self is Side.CONNECTOR else Side.CONNECTOR


#: Side's members in order, for loops on the hot path (iterating the enum class is several
#: times slower than a tuple).
SIDES = (Side.CONNECTOR, Side.ACCEPTOR)


class Personality(StrEnum):
    """How a partition's sockets behave where Linux and Windows differ.

    ``linux``: a connect nobody answers ends in ETIMEDOUT after the connect timeout (Linux
    ignores TL_CONNECT_RESULT).  ``windows``: such a connect is refused at once (ECONNREFUSED).
    The host partition is always ``windows``.
    """

    LINUX = "linux"
    WINDOWS = "windows"


class PartitionState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class RingGeometry:
    """Ring sizes in 4 KiB pages (control page included), from one end's point of view."""

    send_pages: int
    recv_pages: int

    @property
    def swapped(self) -> RingGeometry:
        """The same rings seen from the other end."""
        return RingGeometry(self.recv_pages, self.send_pages)

    @property
    def send_bytes(self) -> int:
        """Data-area bytes of the send ring (pages minus the control page)."""
        return (self.send_pages - 1) * PAGE_SIZE

    @property
    def recv_bytes(self) -> int:
        return (self.recv_pages - 1) * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Session:
    """One attachment of a partition: one attach stream, i.e. one process of that VM (or of the
    host).  A partition may hold several sessions at once, as a VM runs many processes that
    each open their own sockets.  Every partition-side call takes a session; a stale one is
    refused.  The listeners and channel ends a session creates (or accepts) are its own: only
    it can act on them, only it is told about them, and they go when it ends.
    """

    session_id: int
    vm_id: str
    is_host: bool
    personality: Personality


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    vm_id: str
    name: str
    personality: Personality
    state: PartitionState
    is_host: bool
    #: At least one session is live (``sessions > 0``).
    attached: bool
    #: Live sessions (attach streams) of the partition.
    sessions: int
    created_at: float
    #: Live sockets (listeners + channel ends) counted against max_socket_number.
    sockets: int
    #: sha256 hex of the token; what persistence stores (the token itself is shown once).
    token_sha256: str
    #: Created by an anonymous attach (auto_create_on_attach), not by an operator.
    auto_created: bool = False


@dataclass(frozen=True, slots=True)
class ServiceRegistration:
    service_id: str
    element_name: str
    registered_at: float


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    listener_id: int
    vm_id: str
    #: The session that listens (offers go to it; the listener goes when it ends).
    session_id: int
    local: Address
    backlog: int
    pending: int
    send_pages: int | None
    recv_pages: int | None
    created_at: float


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One end of a channel as its program sees it."""

    vm_id: str
    #: The session of ``vm_id`` that holds this end (notices about it go to that session).
    session_id: int
    local: Address
    remote: Address
    #: Opaque label the adapter sets ("shm", "relay", ...); "" until set.
    data_path: str


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    channel_id: int
    state: ChannelState
    connector: EndpointInfo
    #: None while no listener was found (CONNECT_REQUESTED without an offer).
    acceptor: EndpointInfo | None
    #: Ring geometry from the connector's point of view.
    ring: RingGeometry
    created_at: float
    state_since: float
    #: When the pending connect or close timer fires, if one runs.
    deadline: float | None
