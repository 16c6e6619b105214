"""``HostCore``: the emulated Hyper-V host as a sans-I/O object.

The adapter drives it like aioquic's ``QuicConnection``:

* every call takes ``now`` (seconds on a monotonic clock the adapter owns) and returns the list
  of :mod:`~host_service.core.events` it caused; a call that raises attaches its side-effect
  events to the exception (``err.events``) -- dispatch them too;
* ``next_deadline()`` says when the earliest timer (connect timeout, close timeout) is due and
  ``on_timer(now)`` fires every due timer.  The core never reads a clock, never sleeps, never does
  I/O; identifiers and tokens come from injected factories, so tests are deterministic.

Sessions.  Each ``attach`` with the right token opens a new session (one attach stream, one
process of the partition), up to ``max_sessions_per_partition`` at once (then
:class:`TooManySessions`).  Listeners and channel ends belong to the session that created or
was offered them: offers go to the session owning the listener, channel notices to the session
holding that end, and only that session can act on them (to another session of the same
partition they do not exist: NotFound).  ``detach`` (the attach stream ended) rescinds the
channels that session holds an end of and drops its listeners; the partition's other sessions
are untouched.  Stopping or deleting a VM ends all its sessions.  Addresses and
``max_socket_number`` stay per partition: two sessions of one VM binding overlapping addresses
conflict (EADDRINUSE), and LOOPBACK connects between them work as between two processes.
``PartitionChanged`` "attached"/"detached" mark the first session and the end of the last;
``SessionChanged`` reports each one.

``HostCore`` is a facade: it checks which session speaks for which partition and hands each
call to the collaborator with that job, composing them where a call crosses jobs (ending a
session releases its channels and listeners).  Each collaborator's module states its rules:

* :mod:`~host_service.core.partitions` -- partitions and sessions, moved through the table of
  :mod:`~host_service.core.lifecycle`;
* :mod:`~host_service.core.listeners` -- listeners, their backlogs, the socket limit;
* :mod:`~host_service.core.connects` -- connect routing: targets, refusal or timeout;
* :mod:`~host_service.core.channels` -- channels, moved through the table of
  :mod:`~host_service.core.channel`: their ends' bookkeeping, deadlines
  (:mod:`~host_service.core.timers`) and rescinds; what their ends hear (offers, FINs,
  failures, rescinds) is decided in :mod:`~host_service.core.notices`;
* :mod:`~host_service.core.rings` -- ring geometry;
* :mod:`~host_service.core.eventlog` -- the one event constructor and the lifecycle log;
* :mod:`~host_service.core.records` -- the records they share, and who may change what.

Dependencies run one way -- event log, partitions, listeners, channels, connect routing, each
knowing only those before it -- so a call that needs two that do not know each other is
composed here: closing a listener (connect routing refuses its pending offers, then the
listeners forget it), ending a session or a VM (the partitions forget the sessions, then the
channels and listeners they held are released).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from host_service.core.channels import Channels
from host_service.core.config import HostConfig
from host_service.core.connects import ConnectRouter
from host_service.core.eventlog import EventLog
from host_service.core.events import (
    Event,
    PartitionResumed,
    PartitionStalled,
    ServiceChanged,
)
from host_service.core.lifecycle import PartitionInput
from host_service.core.listeners import Listeners
from host_service.core.partitions import (
    HOST_NAME,
    HOST_VM_ID,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    Partitions,
)
from host_service.core.records import _Listener, _Partition
from host_service.core.registry import ServiceRegistry
from host_service.core.types import (
    ChannelInfo,
    ListenerInfo,
    PartitionInfo,
    PartitionState,
    Personality,
    ServiceRegistration,
    Session,
    Side,
)

__all__ = ["HOST_NAME", "HOST_VM_ID", "MAX_NAME_LENGTH", "NAME_PATTERN", "HostCore"]

_ACT = PartitionInput.ACT


class HostCore:
    """The emulated host: partitions, service registry, listeners, routing, channels, timers.

    Args:
        config: limits and policies.
        host_token: the host partition's secret (``--host-token``).
        token_factory: returns a fresh unguessable token for each created VM.
        guid_factory: returns a fresh random GUID (VM ids, ephemeral endpoint ids).
        channel_id_factory: returns a new channel id; default 1, 2, 3 ...
        now: creation time of the host partition.
    """

    def __init__(
        self,
        *,
        config: HostConfig | None = None,
        host_token: str,
        token_factory: Callable[[], str],
        guid_factory: Callable[[], str],
        channel_id_factory: Callable[[], int] | None = None,
        now: float = 0.0,
    ) -> None:
        self.config = config if config is not None else HostConfig()
        if channel_id_factory is None:
            channel_id_factory = itertools.count(1).__next__
        self._events = EventLog(self.config.event_log_size)
        self._registry = ServiceRegistry()
        self._partitions = Partitions(
            self.config,
            self._events,
            host_token=host_token,
            token_factory=token_factory,
            guid_factory=guid_factory,
            now=now,
        )
        self._listeners = Listeners(self.config, self._events, self._registry)
        self._channels = Channels(
            self.config, self._events, self._partitions, self._listeners, channel_id_factory
        )
        self._router = ConnectRouter(
            self.config,
            self._events,
            self._partitions,
            self._listeners,
            self._channels,
            guid_factory,
        )

    def events_since(self, seq: int = 0) -> list[Event]:
        """Logged events with ``event.seq > seq`` (the log keeps ``event_log_size`` events)."""
        return self._events.since(seq)

    # ------------------------------------------------------------------------------------------
    # partitions (admin)
    # ------------------------------------------------------------------------------------------

    @property
    def host_vm_id(self) -> str:
        return HOST_VM_ID

    def create_partition(
        self,
        name: str,
        now: float,
        *,
        vm_id: str | None = None,
        personality: Personality | str = Personality.LINUX,
    ) -> tuple[PartitionInfo, str, list[Event]]:
        """Create a running VM.  Returns its info, its token (shown only here) and events.

        Raises:
            InvalidArgument: bad name (see NAME_PATTERN, MAX_NAME_LENGTH) or personality.
            BadAddress: malformed or well-known id.
            AlreadyExists: ``vm_id`` is taken, or another partition has that name.
            TooManyPartitions: the host keeps ``max_partitions`` VMs already.
        """
        return self._partitions.create(name, personality, now, vm_id=vm_id)

    def restore_partition(
        self,
        *,
        vm_id: str,
        name: str,
        personality: Personality | str,
        token_sha256: str,
        state: PartitionState | str,
        created_at: float,
        auto_created: bool = False,
    ) -> PartitionInfo:
        """Re-create a persisted VM (adapter start-up).  No events: nothing happened.

        What was persisted is restored even where today's rules would refuse it, so that a
        state file written before them still loads: a name of the old rules (any non-blank
        text up to 256 characters), a name another partition has, more VMs than
        ``max_partitions`` (then nothing more can be created until some are deleted).
        """
        return self._partitions.restore(
            vm_id=vm_id,
            name=name,
            personality=personality,
            token_sha256=token_sha256,
            state=state,
            created_at=created_at,
            auto_created=auto_created,
        )

    def get_partition(self, vm_id: str) -> PartitionInfo:
        return self._partitions.get(vm_id).info()

    def list_partitions(self) -> list[PartitionInfo]:
        """The host first, then VMs by creation time and id."""
        return self._partitions.infos()

    def pause_partition(self, vm_id: str, now: float) -> list[Event]:
        """Pause a running VM: its rings stop being serviced (``PartitionStalled``), it cannot
        act, and connects to it go unanswered.  Channels stay."""
        partition = self._partitions.get(vm_id)
        out: list[Event] = []
        self._partitions.advance(out, partition, PartitionInput.PAUSE, now)
        self._events.emit(
            out,
            PartitionStalled,
            now,
            vm_id=partition.vm_id,
            channel_ids=self._channels.established(partition),
        )
        return out

    def resume_partition(self, vm_id: str, now: float) -> list[Event]:
        partition = self._partitions.get(vm_id)
        out: list[Event] = []
        self._partitions.advance(out, partition, PartitionInput.RESUME, now)
        self._events.emit(
            out,
            PartitionResumed,
            now,
            vm_id=partition.vm_id,
            channel_ids=self._channels.established(partition),
        )
        return out

    def stop_partition(self, vm_id: str, now: float) -> list[Event]:
        """Power a VM off: end all its sessions, rescind its channels, drop its listeners."""
        partition = self._partitions.prepare(vm_id, PartitionInput.STOP)
        out = self._tear_down(partition, now, reason="VM stopped")
        self._partitions.advance(out, partition, PartitionInput.STOP, now)
        return out

    def start_partition(self, vm_id: str, now: float) -> list[Event]:
        out: list[Event] = []
        self._partitions.advance(out, self._partitions.get(vm_id), PartitionInput.START, now)
        return out

    def delete_partition(self, vm_id: str, now: float) -> list[Event]:
        """Remove a VM for good (as stop, then forget it and its token)."""
        partition = self._partitions.prepare(vm_id, PartitionInput.DELETE)
        out = self._tear_down(partition, now, reason="VM deleted")
        self._partitions.forget(out, partition, now)
        return out

    def _tear_down(self, partition: _Partition, now: float, *, reason: str) -> list[Event]:
        """End every session (telling each why), then rescind and unlisten everything."""
        out = self._partitions.end_sessions(partition, now, reason=reason)
        out.extend(self._release(partition, None, now, reason=reason))
        return out

    def _release(
        self, partition: _Partition, session_id: int | None, now: float, *, reason: str
    ) -> list[Event]:
        """Rescind every channel with an end held by ``session_id`` in ``partition`` (by any
        session for None) and close that session's listeners.

        Called once the session is gone, so only the peers -- possibly other sessions of the
        same partition, over loopback -- hear about it.
        """
        out = self._channels.rescind_held(partition, session_id, now, reason=reason)
        for listener in self._listeners.held(partition, session_id):
            out.extend(self._close_listener(partition, listener, now, reason=reason))
        return out

    def _close_listener(
        self, partition: _Partition, listener: _Listener, now: float, *, reason: str
    ) -> list[Event]:
        """Refuse the channels still offered through ``listener``, then remove it."""
        out = self._router.refuse_pending(listener, now, reason=f"listener closed ({reason})")
        out.extend(self._listeners.remove(partition, listener, now, reason=reason))
        return out

    # ------------------------------------------------------------------------------------------
    # sessions
    # ------------------------------------------------------------------------------------------

    def attach(self, vm_id: str, token: str | None, now: float) -> tuple[Session, list[Event]]:
        """Authenticate a partition and open a new session of it (another process of that VM,
        or of the host); the partition's other sessions are unaffected.

        Raises:
            NotFound: no such partition.  Unauthenticated: missing or wrong token.
            PartitionNotRunning: the VM is off.
            TooManySessions: the partition has max_sessions_per_partition sessions already.
        """
        return self._partitions.attach(vm_id, token, now)

    def attach_new(
        self, now: float, *, name: str | None = None, personality: Personality | str = "linux"
    ) -> tuple[Session, str, list[Event]]:
        """Attach without a VM id: create a VM and attach it (``auto_create_on_attach`` only).

        Returns the session, the VM's token and events.  The VM is named ``name`` (the same
        rules and limits as ``create_partition``), or ``vm-`` and the start of its id.

        A name that is taken is refused (AlreadyExists) unless the VM of that name was itself
        created by an anonymous attach, has no live session and is not off: then this attach
        takes that VM over -- same VM id, a new token (returned, as for a new VM), the
        personality asked for.  That is a VM container recreated without its identity file
        (``docker compose up --force-recreate``): it comes back as the same VM instead of
        being locked out of its own name.  Nothing is taken from anyone: such a VM had no
        process attached, and anyone may create VMs anonymously on this host anyway; a VM an
        operator created is never taken over.

        Raises:
            PermissionDenied: the host does not create VMs on attach.
            InvalidArgument: bad name or personality.
            AlreadyExists: the name belongs to a partition that cannot be taken over.
            PartitionNotRunning: the VM of that name is off.
            TooManyPartitions: the host keeps ``max_partitions`` VMs already.
        """
        return self._partitions.attach_new(now, name=name, personality=personality)

    def detach(self, session: Session, now: float, *, reason: str = "detached") -> list[Event]:
        """The session's attach stream ended: rescind the channels it holds an end of and drop
        its listeners.  Other sessions of the partition keep theirs."""
        partition = self._partitions.of_session(session, PartitionInput.DETACH)
        out: list[Event] = []
        self._partitions.end_session(out, partition, session.session_id, now, reason=reason)
        out.extend(self._release(partition, session.session_id, now, reason=f"partition {reason}"))
        return out

    # ------------------------------------------------------------------------------------------
    # service registry
    # ------------------------------------------------------------------------------------------

    def register_service(
        self, service_id: str, element_name: str, now: float
    ) -> tuple[ServiceRegistration, list[Event]]:
        registration, new = self._registry.register(service_id, element_name, now)
        out: list[Event] = []
        self._service_changed(out, registration, "registered" if new else "updated", now)
        return registration, out

    def unregister_service(self, service_id: str, now: float) -> list[Event]:
        """Live listeners stay, but in strict mode they stop hearing guests."""
        out: list[Event] = []
        self._service_changed(out, self._registry.unregister(service_id), "unregistered", now)
        return out

    def _service_changed(
        self, out: list[Event], registration: ServiceRegistration, change: str, now: float
    ) -> None:
        self._events.emit(
            out,
            ServiceChanged,
            now,
            service_id=registration.service_id,
            element_name=registration.element_name,
            change=change,
        )

    def get_service(self, service_id: str) -> ServiceRegistration:
        return self._registry.get(service_id)

    def list_services(self) -> list[ServiceRegistration]:
        return self._registry.list()

    # ------------------------------------------------------------------------------------------
    # listeners
    # ------------------------------------------------------------------------------------------

    def listen(
        self,
        session: Session,
        vm_id: str,
        service_id: str,
        now: float,
        *,
        backlog: int | None = None,
        send_pages: int | None = None,
        recv_pages: int | None = None,
    ) -> tuple[ListenerInfo, list[Event]]:
        """Bind and listen on ``(vm_id, service_id)`` in the session's partition.

        ``backlog`` bounds the channels offered but not yet accepted (None = default_backlog;
        clamped to max_backlog; 0 admits one, like listen(0) on Linux TCP).  ``send_pages`` /
        ``recv_pages`` request larger rings for accepted channels, from the acceptor's view.

        Raises:
            BadAddress: malformed ids or a scope the partition cannot bind.
            InvalidArgument: negative backlog, bad page counts.
            ServiceNotRegistered: strict mode, host partition, service not registered.
            AddressInUse: an overlapping listener or a connecting end holds the address.
            NoBuffers: max_socket_number reached.
        """
        return self._listeners.listen(
            self._partitions.of_session(session, _ACT),
            session,
            vm_id,
            service_id,
            now,
            backlog=backlog,
            send_pages=send_pages,
            recv_pages=recv_pages,
        )

    def unlisten(self, session: Session, listener_id: int, now: float) -> list[Event]:
        """Close a listener of this session.  Channels offered through it and not yet accepted
        are refused (heard or ignored by the connector as for a connect nobody takes)."""
        partition = self._partitions.of_session(session, _ACT)
        listener = self._listeners.owned(partition, session, listener_id)
        return self._close_listener(partition, listener, now, reason="unlisten")

    def list_listeners(self, vm_id: str | None = None) -> list[ListenerInfo]:
        return self._listeners.infos(None if vm_id is None else self._partitions.get(vm_id))

    # ------------------------------------------------------------------------------------------
    # connect / accept / refuse
    # ------------------------------------------------------------------------------------------

    def connect(
        self,
        session: Session,
        vm_id: str,
        service_id: str,
        now: float,
        *,
        timeout_ms: int | None = None,
        local_service_id: str | None = None,
        send_pages: int | None = None,
        recv_pages: int | None = None,
    ) -> tuple[int, list[Event]]:
        """Start a connect to ``(vm_id, service_id)``; returns the channel id and events.

        The outcome arrives as events: ``ConnectionOffered`` to the listener's partition now
        (if one hears it), then ``ConnectionEstablished`` to both ends on ``accept``, or
        ``ConnectFailed`` to the caller (timeout, refusal of the offer, teardown).

        Raises:
            BadAddress / NetworkUnreachable: bad or unreachable target.
            GuestToGuestRefused: VM -> other VM without ``allow_guest_to_guest``.
            HostUnreachable: no such VM, or it is off.
            ConnectionRefused: nobody listens and the caller hears refusals (host / windows).
            AddressInUse / AddressNotAvailable: local service id problems.
            NoBuffers: max_socket_number reached.  InvalidArgument: timeout or ring pages.
        """
        return self._router.connect(
            self._partitions.of_session(session, _ACT),
            session,
            vm_id,
            service_id,
            now,
            timeout_ms=timeout_ms,
            local_service_id=local_service_id,
            send_pages=send_pages,
            recv_pages=recv_pages,
        )

    def accept(self, session: Session, channel_id: int, now: float) -> list[Event]:
        """Open an offered channel (acceptor only): ``ConnectionEstablished`` to both ends."""
        partition = self._partitions.of_session(session, _ACT)
        return self._channels.accept(partition, session, channel_id, now)

    def refuse(self, session: Session, channel_id: int, now: float) -> list[Event]:
        """Decline an offered channel (acceptor only)."""
        partition = self._partitions.of_session(session, _ACT)
        channel, _ = self._channels.end(partition, session, channel_id, Side.ACCEPTOR)
        return self._router.refuse_offer(channel, now, reason="refused by the acceptor")

    # ------------------------------------------------------------------------------------------
    # shutdown / close / rescind
    # ------------------------------------------------------------------------------------------

    def shutdown(
        self, session: Session, channel_id: int, now: float, *, side: Side | None = None
    ) -> list[Event]:
        """``shutdown(SHUT_WR)`` (or SHUT_RDWR): send the FIN.  SHUT_RD is local to the socket
        (no wire signal exists) and never reaches the host."""
        partition = self._partitions.of_session(session, _ACT)
        return self._channels.end_action("shutdown", partition, session, channel_id, now, side)

    def close(
        self, session: Session, channel_id: int, now: float, *, side: Side | None = None
    ) -> list[Event]:
        """Close one end: implies its FIN; the host rescinds once the peer's FIN arrives or
        after the close timeout.  Closing a connecting end abandons the connect."""
        partition = self._partitions.of_session(session, _ACT)
        return self._channels.end_action("close", partition, session, channel_id, now, side)

    def reset(
        self, session: Session, channel_id: int, now: float, *, side: Side | None = None
    ) -> list[Event]:
        """An end that cannot use its channel (e.g. it cannot map the rings it was handed)
        tears it down: a rescind, as for an end that crashed, but only by one of its ends."""
        partition = self._partitions.of_session(session, _ACT)
        return self._channels.end_action("reset", partition, session, channel_id, now, side)

    def rescind(
        self, channel_id: int, now: float, *, reason: str = "fault injected"
    ) -> list[Event]:
        """Tear a channel down from the host (admin / fault injection)."""
        return self._channels.rescind(channel_id, now, reason)

    def rescind_all(self, now: float, *, reason: str = "host shutting down") -> list[Event]:
        """Rescind every channel (graceful service shutdown)."""
        return self._channels.rescind_all(now, reason)

    # ------------------------------------------------------------------------------------------
    # timers
    # ------------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``on_timer`` must next be called, or None if no timer runs."""
        return self._channels.next_deadline()

    def on_timer(self, now: float) -> list[Event]:
        """Fire every timer due at ``now``: connect timeouts and close timeouts."""
        return self._channels.on_timer(now)

    # ------------------------------------------------------------------------------------------
    # diagnostics and adapter reports
    # ------------------------------------------------------------------------------------------

    def set_data_path(self, channel_id: int, side: Side, path: str) -> bool:
        """Record how ``side`` moves data ("shm", "relay" ...).  False if the channel is gone."""
        return self._channels.set_data_path(channel_id, side, path)

    def get_channel(self, channel_id: int) -> ChannelInfo:
        return self._channels.info(channel_id)

    def list_channels(self, vm_id: str | None = None) -> list[ChannelInfo]:
        """Every live channel (or those with an end in ``vm_id``), by channel id."""
        return self._channels.infos(None if vm_id is None else self._partitions.get(vm_id))
