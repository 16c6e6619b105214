"""Connect routing: where a connect goes, and what the connector sees when nobody takes it.

Target resolution (:func:`~host_service.core.router.resolve_target`) names the destination
partition: the host, the caller itself (loopback) or another VM -- which must exist and not be
off (``HostUnreachable``), and which a VM may reach only with ``allow_guest_to_guest``.

Connect outcomes (hvsock-facts 2.2-2.5).  If a listener hears the connect and has backlog room
(:meth:`~host_service.core.listeners.Listeners.taker`), the channel is offered to it at once.
Otherwise nobody answers, and what the connector sees depends on who would have answered: the
host (and, for loopback, the connector's own partition) sends a refusal that only the host and
Windows-personality partitions hear -- they get :class:`ConnectionRefused` synchronously -- while
a Linux partition ignores it and its connect times out (:class:`ConnectTimedOut` via
``ConnectFailed``).  A VM never answers a connect it cannot take, so a host->VM (or VM->VM)
connect to a missing listener or a full backlog always times out.  A refusal of an *offered*
channel (``refuse``, a listener closing) follows the same rule: :meth:`ConnectRouter.refuse_offer`
makes it a REFUSE the connector hears or a DROP it does not.

Owns: these decisions, the connect timeout rule, and the choice of a connecting end's local
address (each partition's ``next_port``).  May read, but not change: channel records and partition
counts (:class:`~host_service.core.channels.Channels` creates and offers channels), listeners.
"""

from __future__ import annotations

from collections.abc import Callable

from host_service.core.channel import ChannelInput
from host_service.core.channels import Channels
from host_service.core.config import HostConfig
from host_service.core.errors import (
    AddressInUse,
    AddressNotAvailable,
    ConnectionRefused,
    GuestToGuestRefused,
    HostUnreachable,
    InvalidArgument,
)
from host_service.core.eventlog import EventLog
from host_service.core.events import ConnectRefused, Event
from host_service.core.listeners import Listeners
from host_service.core.partitions import Partitions
from host_service.core.records import _Channel, _Listener, _Partition
from host_service.core.rings import geometry, ring_request
from host_service.core.router import (
    Route,
    connector_local_vm_id,
    peer_vm_id_as_seen,
    resolve_target,
)
from host_service.core.types import PartitionState, Personality, Session
from hvsock_common.addresses import Address, parse_guid, service_id_for_port

__all__ = ["ConnectRouter"]

#: Attempts to find a free ephemeral local address (vsock's MAX_PORT_RETRIES).
_LOCAL_ID_RETRIES = 24
_MAX_VSOCK_PORT = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_PORT_ANY


class ConnectRouter:
    """Routes connects and refusals (see the module docstring)."""

    __slots__ = ("_channels", "_config", "_events", "_guid_factory", "_listeners", "_partitions")

    def __init__(
        self,
        config: HostConfig,
        events: EventLog,
        partitions: Partitions,
        listeners: Listeners,
        channels: Channels,
        guid_factory: Callable[[], str],
    ) -> None:
        self._config = config
        self._guid_factory = guid_factory
        self._events = events
        self._partitions = partitions
        self._listeners = listeners
        self._channels = channels

    def connect(
        self,
        partition: _Partition,
        session: Session,
        vm_id: str,
        service_id: str,
        now: float,
        *,
        timeout_ms: int | None,
        local_service_id: str | None,
        send_pages: int | None,
        recv_pages: int | None,
    ) -> tuple[int, list[Event]]:
        target = Address.parse(vm_id, service_id)
        timeout = self._connect_timeout(timeout_ms)
        req_send = ring_request(self._config, send_pages, "send_pages")
        req_recv = ring_request(self._config, recv_pages, "recv_pages")
        dest = self._destination(partition, target)
        partition.check_socket_room(self._config.max_socket_number, "connect")
        listener = self._listeners.taker(dest, partition, target.service_id)
        if listener is None and partition.hears_refusals and (dest.is_host or dest is partition):
            reason = f"nothing listens on {target} (or its backlog is full)"
            out: list[Event] = []
            self._events.emit(
                out,
                ConnectRefused,
                now,
                connector=partition.vm_id,
                target=target,
                errno=ConnectionRefused.errno,
                reason=reason,
            )
            raise ConnectionRefused(f"connection refused: {reason}", events=out)
        local = Address(
            connector_local_vm_id(caller_vm=partition.vm_id, caller_is_host=partition.is_host),
            self._allocate_local_id(partition, local_service_id),
        )
        channel, out = self._channels.open(
            partition,
            session,
            local,
            target,
            req_send=req_send,
            req_recv=req_recv,
            ring=geometry(self._config, partition, dest, req_send, req_recv, None),
            deadline=now + timeout,
            now=now,
        )
        if listener is not None:
            out.extend(self._offer(channel, partition, dest, listener, now))
        return channel.channel_id, out

    def _destination(self, partition: _Partition, target: Address) -> _Partition:
        """The partition a connect from ``partition`` to ``target`` is for."""
        route, dest_vm = resolve_target(
            target.vm_id, caller_vm=partition.vm_id, caller_is_host=partition.is_host
        )
        if route == Route.HOST:
            return self._partitions.host
        if route == Route.LOOPBACK:
            return partition
        if not partition.is_host and not self._config.allow_guest_to_guest:
            raise GuestToGuestRefused(
                f"VM {partition.vm_id} cannot connect to VM {dest_vm}: Hyper-V has no "
                "guest-to-guest path (start the host with --allow-guest-to-guest)"
            )
        found = self._partitions.find(dest_vm)
        if found is None or found.is_host:
            raise HostUnreachable(f"no VM with id {dest_vm}")
        if found.state is PartitionState.OFF:
            raise HostUnreachable(f"VM {dest_vm} is off")
        return found

    def _offer(
        self,
        channel: _Channel,
        connector: _Partition,
        acceptor: _Partition,
        listener: _Listener,
        now: float,
    ) -> list[Event]:
        remote = Address(
            peer_vm_id_as_seen(
                viewer_vm=acceptor.vm_id, other_vm=connector.vm_id, other_is_host=connector.is_host
            ),
            channel.connector_local.service_id,
        )
        ring = geometry(
            self._config, connector, acceptor, channel.req_send, channel.req_recv, listener
        )
        return self._channels.offer(channel, acceptor, listener, remote=remote, ring=ring, now=now)

    def _connect_timeout(self, timeout_ms: int | None) -> float:
        """HVSOCKET_CONNECT_TIMEOUT semantics: ms, 0 or None = the default, max 300000."""
        if timeout_ms is None or timeout_ms == 0:
            return self._config.connect_timeout
        limit = self._config.max_connect_timeout_ms
        if (
            isinstance(timeout_ms, bool)
            or not isinstance(timeout_ms, int)
            or not 0 < timeout_ms <= limit
        ):
            raise InvalidArgument(
                f"connect timeout must be 1..{limit} ms (HVSOCKET_CONNECT_TIMEOUT_MAX), "
                f"got {timeout_ms!r}"
            )
        return timeout_ms / 1000

    def _allocate_local_id(self, partition: _Partition, requested: str | None) -> str:
        if requested is not None:
            sid = parse_guid(requested, what="local service id")
            if sid in partition.local_ids or sid in partition.by_service:
                raise AddressInUse(f"local service id {sid} is in use in {partition.vm_id}")
            return sid
        for _ in range(_LOCAL_ID_RETRIES):
            if not partition.is_host and partition.personality is Personality.LINUX:
                # vsock auto-bind: a port above 1023 in the vsock template (counting up here,
                # deterministic, instead of Linux's random pick).
                port = partition.next_port
                partition.next_port = port + 1 if port < _MAX_VSOCK_PORT else 1024
                candidate = service_id_for_port(port)
            else:
                candidate = parse_guid(self._guid_factory(), what="generated endpoint id")
            if candidate not in partition.local_ids and candidate not in partition.by_service:
                return candidate
        raise AddressNotAvailable(
            f"no free local service id in partition {partition.vm_id} after "
            f"{_LOCAL_ID_RETRIES} tries"
        )

    # --- refusals of offered channels ---------------------------------------------------------

    def refuse_offer(self, channel: _Channel, now: float, *, reason: str) -> list[Event]:
        """A refusal from the acceptor's side: heard (REFUSE) only if the acceptor is the host
        (or the connector's own partition) and the connector hears refusals; otherwise the
        offer is dropped and the connector waits for its timeout."""
        connector = self._partitions.find(channel.connector_vm)
        acceptor = self._partitions.find(channel.acceptor_vm or "")
        heard = (
            connector is not None
            and acceptor is not None
            and connector.hears_refusals
            and (acceptor.is_host or acceptor is connector)
        )
        event = ChannelInput.REFUSE if heard else ChannelInput.DROP
        return self._channels.feed(channel, event, now, reason)

    def refuse_pending(self, listener: _Listener, now: float, *, reason: str) -> list[Event]:
        """Refuse every channel still offered through a listener that is closing."""
        out: list[Event] = []
        for cid in sorted(listener.pending):
            out.extend(self.refuse_offer(self._channels.get(cid), now, reason=reason))
        return out
