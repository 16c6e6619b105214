"""Partition, listener and channel records (mutable, private to the core) and token hashing.

These records are the core's state.  Invariants kept by ``HostCore``:

* ``_Partition.channel_ends`` == number of (channel, side) pairs whose end lives in the partition
  (a loopback channel counts twice); ``sockets`` = listeners + channel ends <= max_socket_number
  at the moment each socket was added.  Sockets, listen addresses and local service ids are
  per partition, shared by all its sessions (as a VM's processes share its address space).
* A channel's acceptor fields are set exactly while its state is OFFERED or later (non-terminal).
* ``_Listener.pending`` holds exactly the ids of OFFERED channels offered through it.
* Ownership: every listener's ``session_id`` and every live channel end's session
  (``_Channel.session(side)``) is a key of its partition's ``sessions``.  Ending a session
  removes its listeners and rescinds every channel it holds an end of, so no socket outlives
  the session that made it; a partition without sessions has no listeners and no channels.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from host_service.core.channel import ChannelMachine
from host_service.core.errors import InvalidArgument
from host_service.core.types import (
    ListenerInfo,
    PartitionInfo,
    PartitionState,
    Personality,
    RingGeometry,
    Session,
    Side,
)
from hvsock_common.addresses import Address

__all__ = ["hash_token", "token_matches"]


def hash_token(token: str) -> str:
    """sha256 hex of a token: what the core keeps and persistence stores."""
    if not isinstance(token, str) or not token:
        raise InvalidArgument("a token must be a non-empty string")
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, token_sha256: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    presented = hashlib.sha256(token.encode("utf-8")).hexdigest()
    return hmac.compare_digest(presented, token_sha256)


@dataclass(slots=True, eq=False)
class _Listener:
    listener_id: int
    vm_id: str
    #: The session that listens: offers go to it, and the listener ends with it.
    session_id: int
    scope: str
    service_id: str
    backlog: int
    send_pages: int | None
    recv_pages: int | None
    created_at: float
    pending: set[int] = field(default_factory=set)

    @property
    def local(self) -> Address:
        return Address(self.scope, self.service_id)

    def info(self) -> ListenerInfo:
        return ListenerInfo(
            listener_id=self.listener_id,
            vm_id=self.vm_id,
            session_id=self.session_id,
            local=self.local,
            backlog=self.backlog,
            pending=len(self.pending),
            send_pages=self.send_pages,
            recv_pages=self.recv_pages,
            created_at=self.created_at,
        )


@dataclass(slots=True, eq=False)
class _Partition:
    vm_id: str
    name: str
    personality: Personality
    state: PartitionState
    is_host: bool
    token_sha256: str
    created_at: float
    #: Created by an anonymous attach (``attach_new``), not by an operator: only such a VM may
    #: be taken over by name by a later anonymous attach (see ``HostCore.attach_new``).
    auto_created: bool = False
    #: Live sessions by id (attach order).  At most max_sessions_per_partition.
    sessions: dict[int, Session] = field(default_factory=dict)
    listeners: dict[int, _Listener] = field(default_factory=dict)
    by_service: dict[str, list[_Listener]] = field(default_factory=dict)
    channels: set[int] = field(default_factory=set)
    channel_ends: int = 0
    #: Local service ids held by this partition's connecting ends -> channel id.
    local_ids: dict[str, int] = field(default_factory=dict)
    #: Next vsock port tried for a Linux guest's auto-bound local address.
    next_port: int = 1024

    @property
    def sockets(self) -> int:
        return len(self.listeners) + self.channel_ends

    @property
    def hears_refusals(self) -> bool:
        """Whether a refused connect from this partition is reported (vs ignored, as Linux)."""
        return self.is_host or self.personality is Personality.WINDOWS

    def info(self) -> PartitionInfo:
        return PartitionInfo(
            vm_id=self.vm_id,
            name=self.name,
            personality=self.personality,
            state=self.state,
            is_host=self.is_host,
            attached=bool(self.sessions),
            sessions=len(self.sessions),
            created_at=self.created_at,
            sockets=self.sockets,
            token_sha256=self.token_sha256,
            auto_created=self.auto_created,
        )


@dataclass(slots=True, eq=False)
class _Channel:
    channel_id: int
    machine: ChannelMachine
    connector_vm: str
    #: The session that connected (holds the connector end).
    connector_session: int
    connector_local: Address
    #: The address the connector dialled (canonical), reported as its remote address.
    target: Address
    #: Ring pages the connector asked for (None = no request).
    req_send: int | None
    req_recv: int | None
    #: Ring geometry from the connector's point of view.
    ring: RingGeometry
    created_at: float
    state_since: float
    connect_deadline: float
    deadline: float | None
    deadline_kind: str | None
    acceptor_vm: str | None = None
    #: The session that owns the listener the channel was offered through (set with acceptor_vm).
    acceptor_session: int | None = None
    acceptor_local: Address | None = None
    acceptor_remote: Address | None = None
    listener_id: int | None = None
    data_path: dict[Side, str] = field(default_factory=dict)
    bytes_sent: dict[Side, int] = field(default_factory=dict)

    def vm(self, side: Side) -> str | None:
        return self.connector_vm if side is Side.CONNECTOR else self.acceptor_vm

    def session(self, side: Side) -> int | None:
        return self.connector_session if side is Side.CONNECTOR else self.acceptor_session
