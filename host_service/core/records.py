"""Partition, listener and channel records: the core's mutable state, private to the core.

Each record is changed only by the collaborator that owns that part of it:

* ``_Partition`` -- its state machine, name, token, personality and ``sessions`` by the
  partitions collaborator (:mod:`~host_service.core.partitions`); ``listeners`` and
  ``by_service`` by the listeners (:mod:`~host_service.core.listeners`); ``channels``,
  ``channel_ends`` and ``local_ids`` by the channels (:mod:`~host_service.core.channels`);
  ``next_port`` by connect routing (:mod:`~host_service.core.connects`).
* ``_Listener`` -- by the listeners; its ``pending`` (the backlog) through
  ``Listeners.offered`` / ``Listeners.settled``, which the channels call as offers are made and
  end.
* ``_Channel`` -- by the channels.

Invariants:

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

from dataclasses import dataclass, field

from host_service.core.channel import ChannelMachine
from host_service.core.errors import NoBuffers
from host_service.core.lifecycle import PartitionMachine
from host_service.core.types import (
    ChannelInfo,
    EndpointInfo,
    ListenerInfo,
    PartitionInfo,
    PartitionState,
    Personality,
    RingGeometry,
    Session,
    Side,
)
from hvsock_common.addresses import Address


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
    #: RUNNING / PAUSED / OFF, moved only through the lifecycle table (and the host flag).
    machine: PartitionMachine
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
    def state(self) -> PartitionState:
        return self.machine.state

    @property
    def is_host(self) -> bool:
        return self.machine.host

    @property
    def sockets(self) -> int:
        return len(self.listeners) + self.channel_ends

    def check_socket_room(self, limit: int, what: str) -> None:
        """Refuse a new socket (listener or channel end) at ``max_socket_number``."""
        if self.sockets >= limit:
            raise NoBuffers(
                f"partition {self.vm_id} has {self.sockets} sockets "
                f"(listeners + channel ends), the max_socket_number limit; cannot {what}"
            )

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
    #: Each end's data path ("" until it opens): two fields, not a dict per channel (224
    #: bytes with one entry, for every open channel).
    connector_path: str = ""
    acceptor_path: str = ""

    def vm(self, side: Side) -> str | None:
        return self.connector_vm if side is Side.CONNECTOR else self.acceptor_vm

    def session(self, side: Side) -> int | None:
        return self.connector_session if side is Side.CONNECTOR else self.acceptor_session

    def local(self, side: Side) -> Address | None:
        return self.connector_local if side is Side.CONNECTOR else self.acceptor_local

    def remote(self, side: Side) -> Address | None:
        """The other end's address as ``side`` sees it (the connector: what it dialled)."""
        return self.target if side is Side.CONNECTOR else self.acceptor_remote

    def ring_seen_by(self, side: Side) -> RingGeometry:
        return self.ring if side is Side.CONNECTOR else self.ring.swapped

    def info(self) -> ChannelInfo:
        connector = EndpointInfo(
            vm_id=self.connector_vm,
            session_id=self.connector_session,
            local=self.connector_local,
            remote=self.target,
            data_path=self.connector_path,
        )
        acceptor = None
        if (
            self.acceptor_vm is not None
            and self.acceptor_session is not None
            and self.acceptor_local is not None
            and self.acceptor_remote is not None
        ):
            acceptor = EndpointInfo(
                vm_id=self.acceptor_vm,
                session_id=self.acceptor_session,
                local=self.acceptor_local,
                remote=self.acceptor_remote,
                data_path=self.acceptor_path,
            )
        return ChannelInfo(
            channel_id=self.channel_id,
            state=self.machine.state,
            connector=connector,
            acceptor=acceptor,
            ring=self.ring,
            created_at=self.created_at,
            state_since=self.state_since,
            deadline=self.deadline,
        )
