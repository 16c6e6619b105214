"""``HostCore``: the emulated Hyper-V host as a sans-I/O object.

The adapter drives it like aioquic's ``QuicConnection``:

* every call takes ``now`` (seconds on a monotonic clock the adapter owns) and returns the list
  of :mod:`~host_service.core.events` it caused; a call that raises attaches its side-effect
  events to the exception (``err.events``) -- dispatch them too;
* ``next_deadline()`` says when the earliest timer (connect timeout, close timeout) is due and
  ``on_timer(now)`` fires every due timer.  The core never reads a clock, never sleeps, never does
  I/O; identifiers and tokens come from injected factories, so tests are deterministic.

Partitions.  The host (root) partition always exists, is always running, has the ``windows``
personality and is identified by :data:`HOST_VM_ID` (= PARENT, the address VMs use to reach it).
VMs are created with a name, an optional VM id and a personality; each gets a secret token shown
once (only its sha256 is kept).  A partition acts only through a :class:`Session` obtained with
``attach``.

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

Sockets and ``max_socket_number``.  A partition's socket count is its listeners plus its channel
ends: a connecting end counts from ``connect`` on, an accepting end from the moment the channel
is offered to it (the child socket exists before ``accept``, as on Linux), both until the channel
is removed.  A loopback channel therefore counts twice.  Going over the limit raises
:class:`NoBuffers` (ENOBUFS, RESOURCE_EXHAUSTED) for the caller; an acceptor at its limit makes an
incoming connect behave like a full backlog.

Connect outcomes (hvsock-facts 2.2-2.5).  If a listener hears the connect and has backlog room,
the channel is offered to it at once.  Otherwise nobody answers, and what the connector sees
depends on who would have answered: the host (and, for loopback, the connector's own partition)
sends a refusal that only the host and Windows-personality partitions hear -- they get
:class:`ConnectionRefused` synchronously -- while a Linux partition ignores it and its connect
times out (:class:`ConnectTimedOut` via ``ConnectFailed``).  A VM never answers a connect it
cannot take, so a host->VM (or VM->VM) connect to a missing listener or a full backlog always
times out.  A refusal of an *offered* channel (``refuse``, ``unlisten``) follows the same rule.

Ring geometry.  Defaults come from ``send_ring_page``/``recv_ring_page`` seen from the VM end of
the channel (the seed's module parameters are the guest's rings); for host loopback and
VM->VM channels from the connector.  Each direction is the largest of the default, the
connector's request and the listener's request, clamped to ``max_ring_pages`` (Linux clamps
SO_SNDBUF/SO_RCVBUF the same way).  Geometry is fixed when the channel is offered.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections import deque
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
    AddressInUse,
    AddressNotAvailable,
    AlreadyExists,
    BadAddress,
    ConnectionRefused,
    ConnectionReset,
    ConnectTimedOut,
    GuestToGuestRefused,
    HostUnreachable,
    HvError,
    InvalidArgument,
    InvalidState,
    NoBuffers,
    NotFound,
    PartitionNotRunning,
    PermissionDenied,
    ProtocolError,
    ServiceNotRegistered,
    TooManyPartitions,
    TooManySessions,
    Unauthenticated,
)
from host_service.core.events import (
    ChannelRemoved,
    ChannelRescinded,
    ChannelStateChanged,
    ConnectFailed,
    ConnectionEstablished,
    ConnectionOffered,
    ConnectRefused,
    Event,
    ListenerChanged,
    PartitionChanged,
    PartitionResumed,
    PartitionStalled,
    PeerFinReceived,
    ServiceChanged,
    SessionChanged,
    SessionEnded,
)
from host_service.core.partitions import (
    _Channel,
    _Listener,
    _Partition,
    hash_token,
    token_matches,
)
from host_service.core.registry import ServiceRegistry
from host_service.core.router import (
    Route,
    connector_local_vm_id,
    peer_vm_id_as_seen,
    resolve_target,
    scope_hears,
    scope_rank,
    scopes_overlap,
    validate_listen_scope,
)
from host_service.core.types import (
    ChannelInfo,
    EndpointInfo,
    ListenerInfo,
    PartitionInfo,
    PartitionState,
    Personality,
    RingGeometry,
    ServiceRegistration,
    Session,
    Side,
)
from hvsock_common.addresses import (
    PARENT,
    WELL_KNOWN_VM_IDS,
    Address,
    parse_guid,
    service_id_for_port,
)

__all__ = ["HOST_NAME", "HOST_VM_ID", "MAX_NAME_LENGTH", "NAME_PATTERN", "HostCore"]

#: The host partition's VM id: PARENT, the address by which every VM reaches it.
HOST_VM_ID = PARENT
HOST_NAME = "host"
#: Longest partition name.  Names are labels people type (``hvsock bridge ... hv:NAME:80``,
#: ``hvsock vms list``), not payloads: a short bound keeps a hostile attach from parking
#: kilobytes per VM in memory and in the state file.
MAX_NAME_LENGTH = 64
#: A partition name: a letter or digit, then letters, digits, '.', '_' or '-' -- a hostname-like
#: token (a container hostname fits), safe in logs, tables and ``hv:NAME:SERVICE`` endpoints.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Names persisted by versions before NAME_PATTERN were checked only for this length; such
#: partitions are restored as they are, so that an existing state file still loads.
_LEGACY_MAX_NAME_LENGTH = 256
#: Attempts to find a free ephemeral local address (vsock's MAX_PORT_RETRIES).
_LOCAL_ID_RETRIES = 24
_MAX_VSOCK_PORT = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_PORT_ANY

_FIN = {Side.CONNECTOR: ChannelInput.FIN_CONNECTOR, Side.ACCEPTOR: ChannelInput.FIN_ACCEPTOR}
_CLOSE = {Side.CONNECTOR: ChannelInput.CLOSE_CONNECTOR, Side.ACCEPTOR: ChannelInput.CLOSE_ACCEPTOR}
_HALF_CLOSED_BY = {
    Side.CONNECTOR: ChannelState.HALF_CLOSED_BY_CONNECTOR,
    Side.ACCEPTOR: ChannelState.HALF_CLOSED_BY_ACCEPTOR,
}
_CLOSING_BY = {
    Side.CONNECTOR: ChannelState.CLOSING_BY_CONNECTOR,
    Side.ACCEPTOR: ChannelState.CLOSING_BY_ACCEPTOR,
}
_SIDE_OF_INPUT = {
    ChannelInput.FIN_CONNECTOR: Side.CONNECTOR,
    ChannelInput.CLOSE_CONNECTOR: Side.CONNECTOR,
    ChannelInput.FIN_ACCEPTOR: Side.ACCEPTOR,
    ChannelInput.CLOSE_ACCEPTOR: Side.ACCEPTOR,
}
#: Which error describes a pending connect ended by each input (for ConnectFailed).
_CONNECT_FAILURE: dict[ChannelInput, type[HvError]] = {
    ChannelInput.CONNECT_TIMEOUT: ConnectTimedOut,
    ChannelInput.REFUSE: ConnectionRefused,
}


def _fin_sent(state: ChannelState, side: Side) -> bool:
    """Whether ``side`` has sent its FIN in a non-terminal ``state``."""
    return state in (_HALF_CLOSED_BY[side], _CLOSING_BY[side])


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
        self._token_factory = token_factory
        self._guid_factory = guid_factory
        counter = itertools.count(1)
        self._channel_id_factory = (
            channel_id_factory if channel_id_factory is not None else counter.__next__
        )
        self._listener_ids = itertools.count(1)
        self._session_ids = itertools.count(1)
        self._seqs = itertools.count(1)
        self._timer_seq = itertools.count()
        self._partitions: dict[str, _Partition] = {}
        self._listeners: dict[int, _Listener] = {}
        self._channels: dict[int, _Channel] = {}
        self._registry = ServiceRegistry()
        # (deadline, tie-breaker, channel id, kind); stale entries are skipped lazily.
        self._timers: list[tuple[float, int, int, str]] = []
        self._log: deque[Event] = deque(maxlen=self.config.event_log_size)
        self._partitions[HOST_VM_ID] = _Partition(
            vm_id=HOST_VM_ID,
            name=HOST_NAME,
            personality=Personality.WINDOWS,
            state=PartitionState.RUNNING,
            is_host=True,
            token_sha256=hash_token(host_token),
            created_at=now,
        )

    # ------------------------------------------------------------------------------------------
    # events
    # ------------------------------------------------------------------------------------------

    def _seq(self) -> int:
        return next(self._seqs)

    def _emit(self, out: list[Event], event: Event) -> None:
        self._log.append(event)
        out.append(event)

    def events_since(self, seq: int = 0) -> list[Event]:
        """Logged events with ``event.seq > seq`` (the log keeps ``event_log_size`` events)."""
        return [event for event in self._log if event.seq > seq]

    def _live(self, vm_id: str | None, session_id: int | None) -> bool:
        """Whether events addressed to ``session_id`` of ``vm_id`` have a session to go to."""
        if vm_id is None or session_id is None:
            return False
        partition = self._partitions.get(vm_id)
        return partition is not None and session_id in partition.sessions

    # ------------------------------------------------------------------------------------------
    # partitions (admin)
    # ------------------------------------------------------------------------------------------

    @property
    def host_vm_id(self) -> str:
        return HOST_VM_ID

    def _partition(self, vm_id: str) -> _Partition:
        canonical = parse_guid(vm_id, what="VM id")
        partition = self._partitions.get(canonical)
        if partition is None:
            raise NotFound(f"no partition with VM id {canonical}")
        return partition

    def _vm(self, vm_id: str, action: str) -> _Partition:
        partition = self._partition(vm_id)
        if partition.is_host:
            raise InvalidState(f"the host partition cannot be {action}")
        return partition

    @staticmethod
    def _check_name(name: object) -> str:
        if not isinstance(name, str) or not name:
            raise InvalidArgument("a partition name must be a non-empty string")
        # Length first: the message below quotes the name, and only a short one.
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidArgument(
                f"a partition name is at most {MAX_NAME_LENGTH} characters, got {len(name)}"
            )
        if NAME_PATTERN.fullmatch(name) is None:
            raise InvalidArgument(
                f"bad partition name {name!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return name

    @staticmethod
    def _check_legacy_name(name: object) -> str:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgument("a partition name must be a non-empty string")
        if len(name) > _LEGACY_MAX_NAME_LENGTH:
            raise InvalidArgument(
                f"a persisted partition name is at most {_LEGACY_MAX_NAME_LENGTH} characters"
            )
        return name

    def _named(self, name: str) -> _Partition | None:
        """The partition called ``name``, ignoring case ("Web" and "web" would be one VM to a
        person reading ``hvsock vms list``); the host partition's name counts too."""
        folded = name.casefold()
        for partition in self._partitions.values():
            if partition.name.casefold() == folded:
                return partition
        return None

    def _check_name_free(self, name: str) -> None:
        owner = self._named(name)
        if owner is not None:
            raise AlreadyExists(
                f"a partition named {owner.name!r} already exists ({owner.vm_id}); "
                "names are unique on a host"
            )

    def _check_room(self) -> None:
        vms = len(self._partitions) - 1  # the host partition is not counted
        if vms >= self.config.max_partitions:
            raise TooManyPartitions(
                f"the host keeps {vms} VMs, the max_partitions limit; "
                "delete one before creating another"
            )

    @staticmethod
    def _check_personality(personality: object) -> Personality:
        try:
            return Personality(str(personality))
        except ValueError:
            raise InvalidArgument(
                f"personality must be 'linux' or 'windows', got {personality!r}"
            ) from None

    def _check_new_vm_id(self, vm_id: str) -> str:
        canonical = parse_guid(vm_id, what="VM id")
        if canonical in WELL_KNOWN_VM_IDS:
            raise BadAddress(
                f"{WELL_KNOWN_VM_IDS[canonical]} ({canonical}) is a well-known id, not a VM id"
            )
        if canonical in self._partitions:
            raise AlreadyExists(f"a partition with VM id {canonical} already exists")
        return canonical

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
        return self._create(
            self._check_name(name),
            self._check_personality(personality),
            now,
            vm_id=vm_id,
            auto_created=False,
        )

    def _create(
        self,
        name: str,
        personality: Personality,
        now: float,
        *,
        vm_id: str | None,
        auto_created: bool,
    ) -> tuple[PartitionInfo, str, list[Event]]:
        # Bad input first, then a clash, then the count: the most specific answer wins.
        canonical = self._check_new_vm_id(vm_id) if vm_id is not None else None
        self._check_name_free(name)
        self._check_room()
        if canonical is None:
            canonical = self._fresh_vm_id()
        token = self._token_factory()
        partition = _Partition(
            vm_id=canonical,
            name=name,
            personality=personality,
            state=PartitionState.RUNNING,
            is_host=False,
            token_sha256=hash_token(token),
            created_at=now,
            auto_created=auto_created,
        )
        self._partitions[canonical] = partition
        out: list[Event] = []
        self._emit_partition(out, partition, "created", now)
        return partition.info(), token, out

    def _fresh_vm_id(self) -> str:
        for _ in range(_LOCAL_ID_RETRIES):
            candidate = parse_guid(self._guid_factory(), what="generated VM id")
            if candidate not in WELL_KNOWN_VM_IDS and candidate not in self._partitions:
                return candidate
        raise AddressNotAvailable("could not generate an unused VM id")

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
        canonical = self._check_new_vm_id(vm_id)
        if (
            not isinstance(token_sha256, str)
            or len(token_sha256) != 64
            or any(c not in "0123456789abcdefABCDEF" for c in token_sha256)
        ):
            raise InvalidArgument("token_sha256 must be a sha256 hex digest (64 hex digits)")
        try:
            checked_state = PartitionState(state)
        except ValueError:
            raise InvalidArgument(f"unknown partition state {state!r}") from None
        partition = _Partition(
            vm_id=canonical,
            name=self._check_legacy_name(name),
            personality=self._check_personality(personality),
            state=checked_state,
            is_host=False,
            token_sha256=token_sha256.lower(),
            created_at=created_at,
            auto_created=bool(auto_created),
        )
        self._partitions[canonical] = partition
        return partition.info()

    def get_partition(self, vm_id: str) -> PartitionInfo:
        return self._partition(vm_id).info()

    def list_partitions(self) -> list[PartitionInfo]:
        """The host first, then VMs by creation time and id."""
        vms = sorted(
            (p for p in self._partitions.values() if not p.is_host),
            key=lambda p: (p.created_at, p.vm_id),
        )
        return [self._partitions[HOST_VM_ID].info(), *(p.info() for p in vms)]

    def _emit_partition(
        self, out: list[Event], partition: _Partition, change: str, now: float
    ) -> None:
        self._emit(
            out,
            PartitionChanged(
                at=now,
                seq=self._seq(),
                vm_id=partition.vm_id,
                change=change,
                state=partition.state,
            ),
        )

    def pause_partition(self, vm_id: str, now: float) -> list[Event]:
        """Pause a running VM: its rings stop being serviced (``PartitionStalled``), it cannot
        act, and connects to it go unanswered.  Channels stay."""
        partition = self._vm(vm_id, "paused")
        if partition.state is not PartitionState.RUNNING:
            raise InvalidState(f"VM {partition.vm_id} is {partition.state}, not running")
        partition.state = PartitionState.PAUSED
        out: list[Event] = []
        self._emit_partition(out, partition, "paused", now)
        self._emit(
            out,
            PartitionStalled(
                at=now,
                seq=self._seq(),
                vm_id=partition.vm_id,
                channel_ids=self._established_channels(partition),
            ),
        )
        return out

    def resume_partition(self, vm_id: str, now: float) -> list[Event]:
        partition = self._vm(vm_id, "resumed")
        if partition.state is not PartitionState.PAUSED:
            raise InvalidState(f"VM {partition.vm_id} is {partition.state}, not paused")
        partition.state = PartitionState.RUNNING
        out: list[Event] = []
        self._emit_partition(out, partition, "resumed", now)
        self._emit(
            out,
            PartitionResumed(
                at=now,
                seq=self._seq(),
                vm_id=partition.vm_id,
                channel_ids=self._established_channels(partition),
            ),
        )
        return out

    def _established_channels(self, partition: _Partition) -> tuple[int, ...]:
        return tuple(
            sorted(
                cid
                for cid in partition.channels
                if self._channels[cid].machine.state in ESTABLISHED_STATES
            )
        )

    def stop_partition(self, vm_id: str, now: float) -> list[Event]:
        """Power a VM off: end all its sessions, rescind its channels, drop its listeners."""
        partition = self._vm(vm_id, "stopped")
        if partition.state is PartitionState.OFF:
            raise InvalidState(f"VM {partition.vm_id} is already off")
        out = self._tear_down(partition, now, reason="VM stopped")
        partition.state = PartitionState.OFF
        self._emit_partition(out, partition, "stopped", now)
        return out

    def start_partition(self, vm_id: str, now: float) -> list[Event]:
        partition = self._vm(vm_id, "started")
        if partition.state is not PartitionState.OFF:
            raise InvalidState(f"VM {partition.vm_id} is {partition.state}, not off")
        partition.state = PartitionState.RUNNING
        out: list[Event] = []
        self._emit_partition(out, partition, "started", now)
        return out

    def delete_partition(self, vm_id: str, now: float) -> list[Event]:
        """Remove a VM for good (as stop, then forget it and its token)."""
        partition = self._vm(vm_id, "deleted")
        out = self._tear_down(partition, now, reason="VM deleted")
        del self._partitions[partition.vm_id]
        partition.state = PartitionState.OFF
        self._emit(
            out,
            PartitionChanged(
                at=now, seq=self._seq(), vm_id=partition.vm_id, change="deleted", state=None
            ),
        )
        return out

    def _tear_down(self, partition: _Partition, now: float, *, reason: str) -> list[Event]:
        """End every session (telling each why), then rescind and unlisten everything."""
        out: list[Event] = []
        for session_id in list(partition.sessions):
            self._emit(
                out,
                SessionEnded(
                    at=now,
                    seq=self._seq(),
                    partition=partition.vm_id,
                    session_id=session_id,
                    reason=reason,
                ),
            )
            self._end_session(out, partition, session_id, now, reason=reason)
        out.extend(self._release(partition, None, now, reason=reason))
        return out

    def _end_session(
        self, out: list[Event], partition: _Partition, session_id: int, now: float, *, reason: str
    ) -> None:
        """Forget one session (before its sockets are released, so that only the peers hear
        about them); the last one to go detaches the partition."""
        del partition.sessions[session_id]
        self._emit(
            out,
            SessionChanged(
                at=now,
                seq=self._seq(),
                vm_id=partition.vm_id,
                session_id=session_id,
                change="closed",
                sessions=len(partition.sessions),
                reason=reason,
            ),
        )
        if not partition.sessions:
            self._emit_partition(out, partition, "detached", now)

    def _release(
        self, partition: _Partition, session_id: int | None, now: float, *, reason: str
    ) -> list[Event]:
        """Rescind every channel with an end held by ``session_id`` in ``partition`` (by any
        session for None) and close that session's listeners.

        Called once the session is gone, so only the peers -- possibly other sessions of the
        same partition, over loopback -- hear about it.
        """
        out: list[Event] = []
        for cid in sorted(partition.channels):
            channel = self._channels.get(cid)
            if channel is None or channel.machine.terminal:
                continue
            if session_id is None or any(
                channel.vm(side) == partition.vm_id and channel.session(side) == session_id
                for side in Side
            ):
                out.extend(self._apply(channel, ChannelInput.RESCIND, now, reason))
        for listener in list(partition.listeners.values()):
            if session_id is None or listener.session_id == session_id:
                out.extend(self._remove_listener(partition, listener, now, reason=reason))
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
        partition = self._partition(vm_id)
        if not token:
            raise Unauthenticated(f"a token is required to attach as {partition.vm_id}")
        if not isinstance(token, str) or not token_matches(token, partition.token_sha256):
            raise Unauthenticated(f"wrong token for partition {partition.vm_id}")
        if partition.state is PartitionState.OFF:
            raise PartitionNotRunning(f"VM {partition.vm_id} is off; start it first")
        limit = self.config.max_sessions_per_partition
        if len(partition.sessions) >= limit:
            raise TooManySessions(
                f"partition {partition.vm_id} has {len(partition.sessions)} sessions, the "
                f"max_sessions_per_partition limit; end one before attaching again"
            )
        session = Session(
            session_id=next(self._session_ids),
            vm_id=partition.vm_id,
            is_host=partition.is_host,
            personality=partition.personality,
        )
        partition.sessions[session.session_id] = session
        out: list[Event] = []
        if len(partition.sessions) == 1:
            self._emit_partition(out, partition, "attached", now)
        self._emit(
            out,
            SessionChanged(
                at=now,
                seq=self._seq(),
                vm_id=partition.vm_id,
                session_id=session.session_id,
                change="opened",
                sessions=len(partition.sessions),
                reason="attach",
            ),
        )
        return session, out

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
        if not self.config.auto_create_on_attach:
            raise PermissionDenied(
                "attaching without a VM id needs auto_create_on_attach; create the VM first"
            )
        checked_personality = self._check_personality(personality)
        if name is None:
            vm_id = self._fresh_vm_id()
            checked_name = f"vm-{vm_id[:8]}"
            for _ in range(_LOCAL_ID_RETRIES):
                if self._named(checked_name) is None:
                    break
                # Someone chose a name of this shape: another id gives another default name.
                vm_id = self._fresh_vm_id()
                checked_name = f"vm-{vm_id[:8]}"
        else:
            vm_id = None
            checked_name = self._check_name(name)
            owner = self._named(checked_name)
            if owner is not None:
                return self._take_over(owner, checked_personality, now)
        info, token, out = self._create(
            checked_name, checked_personality, now, vm_id=vm_id, auto_created=True
        )
        session, more = self.attach(info.vm_id, token, now)
        return session, token, out + more

    def _take_over(
        self, partition: _Partition, personality: Personality, now: float
    ) -> tuple[Session, str, list[Event]]:
        """``attach_new`` of a name an idle auto-created VM has: re-issue its token."""
        if partition.is_host or not partition.auto_created:
            raise AlreadyExists(
                f"a partition named {partition.name!r} already exists ({partition.vm_id}) and "
                "was not created on attach; attach it with its VM id and token, or choose "
                "another name"
            )
        if partition.sessions:
            raise AlreadyExists(
                f"VM {partition.name!r} ({partition.vm_id}) exists and is attached "
                f"({len(partition.sessions)} sessions); attach it with its VM id and token "
                "(HVSOCK_VM_IDENTITY), or choose another name"
            )
        if partition.state is PartitionState.OFF:
            # Checked before the token changes: a refused attach must leave the VM as it was.
            raise PartitionNotRunning(f"VM {partition.vm_id} is off; start it first")
        token = self._token_factory()
        partition.token_sha256 = hash_token(token)
        # No session, so no listener or channel depends on the personality it had.
        partition.personality = personality
        out: list[Event] = []
        self._emit_partition(out, partition, "taken_over", now)
        session, more = self.attach(partition.vm_id, token, now)
        return session, token, out + more

    def detach(self, session: Session, now: float, *, reason: str = "detached") -> list[Event]:
        """The session's attach stream ended: rescind the channels it holds an end of and drop
        its listeners.  Other sessions of the partition keep theirs."""
        partition = self._session_partition(session, require_running=False)
        out: list[Event] = []
        self._end_session(out, partition, session.session_id, now, reason=reason)
        out.extend(self._release(partition, session.session_id, now, reason=f"partition {reason}"))
        return out

    def _session_partition(self, session: Session, *, require_running: bool = True) -> _Partition:
        partition = self._partitions.get(session.vm_id)
        if partition is None or partition.sessions.get(session.session_id) != session:
            raise Unauthenticated(f"session {session.session_id} is no longer attached")
        if require_running and partition.state is not PartitionState.RUNNING:
            raise PartitionNotRunning(f"partition {partition.vm_id} is {partition.state}")
        return partition

    # ------------------------------------------------------------------------------------------
    # service registry
    # ------------------------------------------------------------------------------------------

    def register_service(
        self, service_id: str, element_name: str, now: float
    ) -> tuple[ServiceRegistration, list[Event]]:
        registration, new = self._registry.register(service_id, element_name, now)
        out: list[Event] = []
        self._emit(
            out,
            ServiceChanged(
                at=now,
                seq=self._seq(),
                service_id=registration.service_id,
                element_name=registration.element_name,
                change="registered" if new else "updated",
            ),
        )
        return registration, out

    def unregister_service(self, service_id: str, now: float) -> list[Event]:
        """Live listeners stay, but in strict mode they stop hearing guests."""
        registration = self._registry.unregister(service_id)
        out: list[Event] = []
        self._emit(
            out,
            ServiceChanged(
                at=now,
                seq=self._seq(),
                service_id=registration.service_id,
                element_name=registration.element_name,
                change="unregistered",
            ),
        )
        return out

    def get_service(self, service_id: str) -> ServiceRegistration:
        return self._registry.get(service_id)

    def list_services(self) -> list[ServiceRegistration]:
        return self._registry.list()

    # ------------------------------------------------------------------------------------------
    # listeners
    # ------------------------------------------------------------------------------------------

    def _check_socket_room(self, partition: _Partition, what: str) -> None:
        limit = self.config.max_socket_number
        if partition.sockets >= limit:
            raise NoBuffers(
                f"partition {partition.vm_id} has {partition.sockets} sockets "
                f"(listeners + channel ends), the max_socket_number limit; cannot {what}"
            )

    def _ring_request(self, pages: int | None, what: str) -> int | None:
        if pages is None:
            return None
        if isinstance(pages, bool) or not isinstance(pages, int) or pages < 1:
            raise InvalidArgument(f"{what} must be a positive number of pages, got {pages!r}")
        return min(pages, self.config.max_ring_pages)

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
        partition = self._session_partition(session)
        scope = validate_listen_scope(
            parse_guid(vm_id, what="listen VM id"), is_host=partition.is_host
        )
        sid = parse_guid(service_id, what="service id")
        if backlog is None:
            backlog = self.config.default_backlog
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 0:
            raise InvalidArgument(f"backlog must be a non-negative integer, got {backlog!r}")
        effective_backlog = max(1, min(backlog, self.config.max_backlog))
        req_send = self._ring_request(send_pages, "send_pages")
        req_recv = self._ring_request(recv_pages, "recv_pages")
        if (
            partition.is_host
            and self.config.strict_registry
            and not self._registry.is_registered(sid)
        ):
            raise ServiceNotRegistered(
                f"service {sid} is not registered: in strict registry mode the host can listen "
                "only on registered services (register it with an element name first)"
            )
        for other in partition.by_service.get(sid, ()):
            if scopes_overlap(other.scope, scope, is_host=partition.is_host):
                raise AddressInUse(
                    f"({scope}, {sid}) overlaps listener {other.listener_id} on "
                    f"({other.scope}, {sid}) in partition {partition.vm_id}"
                )
        if sid in partition.local_ids:
            raise AddressInUse(
                f"service id {sid} is the local address of channel {partition.local_ids[sid]}"
            )
        self._check_socket_room(partition, "listen")
        listener = _Listener(
            listener_id=next(self._listener_ids),
            vm_id=partition.vm_id,
            session_id=session.session_id,
            scope=scope,
            service_id=sid,
            backlog=effective_backlog,
            send_pages=req_send,
            recv_pages=req_recv,
            created_at=now,
        )
        partition.listeners[listener.listener_id] = listener
        partition.by_service.setdefault(sid, []).append(listener)
        self._listeners[listener.listener_id] = listener
        out: list[Event] = []
        self._emit(
            out,
            ListenerChanged(
                at=now,
                seq=self._seq(),
                listener_id=listener.listener_id,
                vm_id=partition.vm_id,
                local=listener.local,
                change="listening",
                reason="listen",
            ),
        )
        return listener.info(), out

    def unlisten(self, session: Session, listener_id: int, now: float) -> list[Event]:
        """Close a listener of this session.  Channels offered through it and not yet accepted
        are refused (heard or ignored by the connector as for a connect nobody takes)."""
        partition = self._session_partition(session)
        listener = partition.listeners.get(listener_id)
        if listener is None or listener.session_id != session.session_id:
            raise NotFound(
                f"no listener {listener_id} in session {session.session_id} of partition "
                f"{partition.vm_id}"
            )
        return self._remove_listener(partition, listener, now, reason="unlisten")

    def _remove_listener(
        self, partition: _Partition, listener: _Listener, now: float, *, reason: str
    ) -> list[Event]:
        out: list[Event] = []
        for cid in sorted(listener.pending):
            channel = self._channels[cid]
            out.extend(self._refuse_offer(channel, now, reason=f"listener closed ({reason})"))
        del partition.listeners[listener.listener_id]
        siblings = partition.by_service[listener.service_id]
        siblings.remove(listener)
        if not siblings:
            del partition.by_service[listener.service_id]
        del self._listeners[listener.listener_id]
        self._emit(
            out,
            ListenerChanged(
                at=now,
                seq=self._seq(),
                listener_id=listener.listener_id,
                vm_id=partition.vm_id,
                local=listener.local,
                change="closed",
                reason=reason,
            ),
        )
        return out

    def list_listeners(self, vm_id: str | None = None) -> list[ListenerInfo]:
        if vm_id is None:
            listeners: Iterable[_Listener] = self._listeners.values()
        else:
            listeners = self._partition(vm_id).listeners.values()
        return [listener.info() for listener in sorted(listeners, key=lambda x: x.listener_id)]

    # ------------------------------------------------------------------------------------------
    # connect / accept / refuse
    # ------------------------------------------------------------------------------------------

    def _connect_timeout(self, timeout_ms: int | None) -> float:
        """HVSOCKET_CONNECT_TIMEOUT semantics: ms, 0 or None = the default, max 300000."""
        if timeout_ms is None or timeout_ms == 0:
            return self.config.connect_timeout
        limit = self.config.max_connect_timeout_ms
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

    def _find_listener(
        self, dest: _Partition, source: _Partition, service_id: str
    ) -> _Listener | None:
        """The listener that takes a connect now, or None if nobody would answer.

        For a loopback connect the caller's own (not yet counted) connecting end must fit
        beside the accepting end, hence ``reserve``.
        """
        reserve = 1 if dest is source else 0
        if dest.state is not PartitionState.RUNNING:
            return None  # a paused VM services nothing
        best: _Listener | None = None
        for listener in dest.by_service.get(service_id, ()):
            if scope_hears(
                listener.scope,
                listener_is_host=dest.is_host,
                listener_vm=dest.vm_id,
                source_vm=source.vm_id,
                source_is_host=source.is_host,
            ) and (best is None or scope_rank(listener.scope) < scope_rank(best.scope)):
                best = listener
        if best is None:
            return None
        if (
            dest.is_host
            and not source.is_host
            and self.config.strict_registry
            and not self._registry.is_registered(service_id)
        ):
            return None  # unregistered since listen: the registry gate refuses guests
        if len(best.pending) >= best.backlog:
            return None
        if dest.sockets + reserve >= self.config.max_socket_number:
            return None
        return best

    def _geometry(
        self,
        connector: _Partition,
        acceptor: _Partition,
        req_send: int | None,
        req_recv: int | None,
        listener: _Listener | None,
    ) -> RingGeometry:
        """Connector-view ring geometry (see the module docstring)."""
        send_default = self.config.send_ring_page
        recv_default = self.config.recv_ring_page
        if connector.is_host and not acceptor.is_host:
            # The VM is the acceptor: the defaults are its view, so swap for the connector.
            send_default, recv_default = recv_default, send_default
        send = max(send_default, req_send or 0, (listener.recv_pages if listener else None) or 0)
        recv = max(recv_default, req_recv or 0, (listener.send_pages if listener else None) or 0)
        limit = self.config.max_ring_pages
        return RingGeometry(min(send, limit), min(recv, limit))

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
        partition = self._session_partition(session)
        target = Address.parse(vm_id, service_id)
        timeout = self._connect_timeout(timeout_ms)
        req_send = self._ring_request(send_pages, "send_pages")
        req_recv = self._ring_request(recv_pages, "recv_pages")
        route, dest_vm = resolve_target(
            target.vm_id, caller_vm=partition.vm_id, caller_is_host=partition.is_host
        )
        if route == Route.HOST:
            dest = self._partitions[HOST_VM_ID]
        elif route == Route.LOOPBACK:
            dest = partition
        else:
            if not partition.is_host and not self.config.allow_guest_to_guest:
                raise GuestToGuestRefused(
                    f"VM {partition.vm_id} cannot connect to VM {dest_vm}: Hyper-V has no "
                    "guest-to-guest path (start the host with --allow-guest-to-guest)"
                )
            found = self._partitions.get(dest_vm)
            if found is None or found.is_host:
                raise HostUnreachable(f"no VM with id {dest_vm}")
            if found.state is PartitionState.OFF:
                raise HostUnreachable(f"VM {dest_vm} is off")
            dest = found
        self._check_socket_room(partition, "connect")
        listener = self._find_listener(dest, partition, target.service_id)
        if listener is None and partition.hears_refusals and (dest.is_host or dest is partition):
            reason = f"nothing listens on {target} (or its backlog is full)"
            out: list[Event] = []
            self._emit(
                out,
                ConnectRefused(
                    at=now,
                    seq=self._seq(),
                    connector=partition.vm_id,
                    target=target,
                    errno=ConnectionRefused.errno,
                    reason=reason,
                ),
            )
            raise ConnectionRefused(f"connection refused: {reason}", events=out)
        local_sid = self._allocate_local_id(partition, local_service_id)
        cid = self._channel_id_factory()
        if cid in self._channels:
            raise InvalidState(f"channel id factory returned channel id {cid}, which is in use")
        deadline = now + timeout
        channel = _Channel(
            channel_id=cid,
            machine=ChannelMachine(),
            connector_vm=partition.vm_id,
            connector_session=session.session_id,
            connector_local=Address(
                connector_local_vm_id(caller_vm=partition.vm_id, caller_is_host=partition.is_host),
                local_sid,
            ),
            target=target,
            req_send=req_send,
            req_recv=req_recv,
            ring=self._geometry(partition, dest, req_send, req_recv, None),
            created_at=now,
            state_since=now,
            connect_deadline=deadline,
            deadline=deadline,
            deadline_kind="connect",
        )
        self._channels[cid] = channel
        partition.channels.add(cid)
        partition.channel_ends += 1
        partition.local_ids[local_sid] = cid
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), cid, "connect"))
        out = []
        self._emit(
            out,
            ChannelStateChanged(
                at=now,
                seq=self._seq(),
                channel_id=cid,
                old=None,
                new=channel.machine.state,
                input=None,
                reason=f"connect from {partition.vm_id} to {target}",
            ),
        )
        if listener is not None:
            out.extend(self._offer(channel, partition, dest, listener, now))
        return cid, out

    def _offer(
        self,
        channel: _Channel,
        connector: _Partition,
        acceptor: _Partition,
        listener: _Listener,
        now: float,
    ) -> list[Event]:
        channel.acceptor_vm = acceptor.vm_id
        channel.acceptor_session = listener.session_id
        channel.listener_id = listener.listener_id
        channel.acceptor_local = listener.local
        channel.acceptor_remote = Address(
            peer_vm_id_as_seen(
                viewer_vm=acceptor.vm_id, other_vm=connector.vm_id, other_is_host=connector.is_host
            ),
            channel.connector_local.service_id,
        )
        channel.ring = self._geometry(
            connector, acceptor, channel.req_send, channel.req_recv, listener
        )
        listener.pending.add(channel.channel_id)
        acceptor.channels.add(channel.channel_id)
        acceptor.channel_ends += 1
        out = self._apply(
            channel, ChannelInput.OFFER, now, f"offered to listener {listener.listener_id}"
        )
        self._emit(
            out,
            ConnectionOffered(
                at=now,
                seq=self._seq(),
                partition=acceptor.vm_id,
                session_id=listener.session_id,
                channel_id=channel.channel_id,
                listener_id=listener.listener_id,
                local=channel.acceptor_local,
                remote=channel.acceptor_remote,
                ring=channel.ring.swapped,
            ),
        )
        return out

    def _channel_end(
        self, partition: _Partition, session: Session, channel_id: int, side: Side | None
    ) -> tuple[_Channel, Side]:
        """The channel and which of its ends the caller speaks for.

        Channels the session holds no end of are reported as not found (a session cannot
        learn about, let alone act on, another partition's channels -- nor the ends another
        session of its own partition holds).
        """
        channel = self._channels.get(channel_id)
        missing = f"no channel {channel_id} in session {session.session_id} of {partition.vm_id}"
        if channel is None:
            raise NotFound(missing)
        sides = [
            s
            for s in Side
            if channel.vm(s) == partition.vm_id and channel.session(s) == session.session_id
        ]
        if not sides:
            raise NotFound(missing)
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

    def accept(self, session: Session, channel_id: int, now: float) -> list[Event]:
        """Open an offered channel (acceptor only): ``ConnectionEstablished`` to both ends."""
        partition = self._session_partition(session)
        channel, _ = self._channel_end(partition, session, channel_id, Side.ACCEPTOR)
        listener = self._listeners.get(channel.listener_id) if channel.listener_id else None
        out = self._apply(channel, ChannelInput.ACCEPT, now, "accepted")
        if listener is not None:
            listener.pending.discard(channel.channel_id)
        assert channel.acceptor_vm is not None and channel.acceptor_session is not None
        assert channel.acceptor_local is not None and channel.acceptor_remote is not None
        for side, vm, owner, local, remote, ring in (
            (
                Side.CONNECTOR,
                channel.connector_vm,
                channel.connector_session,
                channel.connector_local,
                channel.target,
                channel.ring,
            ),
            (
                Side.ACCEPTOR,
                channel.acceptor_vm,
                channel.acceptor_session,
                channel.acceptor_local,
                channel.acceptor_remote,
                channel.ring.swapped,
            ),
        ):
            if self._live(vm, owner):
                self._emit(
                    out,
                    ConnectionEstablished(
                        at=now,
                        seq=self._seq(),
                        partition=vm,
                        session_id=owner,
                        channel_id=channel.channel_id,
                        side=side,
                        local=local,
                        remote=remote,
                        ring=ring,
                    ),
                )
        return out

    def refuse(self, session: Session, channel_id: int, now: float) -> list[Event]:
        """Decline an offered channel (acceptor only)."""
        partition = self._session_partition(session)
        channel, _ = self._channel_end(partition, session, channel_id, Side.ACCEPTOR)
        return self._refuse_offer(channel, now, reason="refused by the acceptor")

    def _refuse_offer(self, channel: _Channel, now: float, *, reason: str) -> list[Event]:
        """A refusal from the acceptor's side: heard (REFUSE) only if the acceptor is the host
        (or the connector's own partition) and the connector hears refusals; otherwise the
        offer is dropped and the connector waits for its timeout."""
        connector = self._partitions.get(channel.connector_vm)
        acceptor = self._partitions.get(channel.acceptor_vm or "")
        heard = (
            connector is not None
            and acceptor is not None
            and connector.hears_refusals
            and (acceptor.is_host or acceptor is connector)
        )
        event = ChannelInput.REFUSE if heard else ChannelInput.DROP
        return self._apply(channel, event, now, reason)

    # ------------------------------------------------------------------------------------------
    # shutdown / close / rescind
    # ------------------------------------------------------------------------------------------

    def shutdown(
        self, session: Session, channel_id: int, now: float, *, side: Side | None = None
    ) -> list[Event]:
        """``shutdown(SHUT_WR)`` (or SHUT_RDWR): send the FIN.  SHUT_RD is local to the socket
        (no wire signal exists) and never reaches the host."""
        partition = self._session_partition(session)
        channel, end = self._channel_end(partition, session, channel_id, side)
        return self._apply(channel, _FIN[end], now, f"shutdown by the {end}")

    def close(
        self, session: Session, channel_id: int, now: float, *, side: Side | None = None
    ) -> list[Event]:
        """Close one end: implies its FIN; the host rescinds once the peer's FIN arrives or
        after the close timeout.  Closing a connecting end abandons the connect."""
        partition = self._session_partition(session)
        channel, end = self._channel_end(partition, session, channel_id, side)
        return self._apply(channel, _CLOSE[end], now, f"closed by the {end}")

    def reset(
        self, session: Session, channel_id: int, now: float, *, side: Side | None = None
    ) -> list[Event]:
        """An end that cannot use its channel (e.g. it cannot map the rings it was handed)
        tears it down: a rescind, as for an end that crashed, but only by one of its ends."""
        partition = self._session_partition(session)
        channel, end = self._channel_end(partition, session, channel_id, side)
        return self._apply(channel, ChannelInput.RESCIND, now, f"reset by the {end}")

    def rescind(
        self, channel_id: int, now: float, *, reason: str = "fault injected"
    ) -> list[Event]:
        """Tear a channel down from the host (admin / fault injection)."""
        channel = self._channels.get(channel_id)
        if channel is None:
            raise NotFound(f"no channel {channel_id}")
        return self._apply(channel, ChannelInput.RESCIND, now, reason)

    def rescind_all(self, now: float, *, reason: str = "host shutting down") -> list[Event]:
        """Rescind every channel (graceful service shutdown)."""
        out: list[Event] = []
        for cid in sorted(self._channels):
            channel = self._channels.get(cid)
            if channel is not None:
                out.extend(self._apply(channel, ChannelInput.RESCIND, now, reason))
        return out

    # ------------------------------------------------------------------------------------------
    # the one place that advances a channel
    # ------------------------------------------------------------------------------------------

    def _apply(
        self, channel: _Channel, event: ChannelInput, now: float, reason: str
    ) -> list[Event]:
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
        self._emit(
            out,
            ChannelStateChanged(
                at=now,
                seq=self._seq(),
                channel_id=channel.channel_id,
                old=old,
                new=new,
                input=event,
                reason=reason,
            ),
        )
        # Deadlines: the connect deadline runs through CONNECT_REQUESTED and OFFERED; the close
        # timeout starts when a CLOSING state is entered; nothing else has a timer.
        if new in CLOSING_STATES and old not in CLOSING_STATES:
            channel.deadline = now + self.config.close_timeout
            channel.deadline_kind = "close"
            heapq.heappush(
                self._timers,
                (channel.deadline, next(self._timer_seq), channel.channel_id, "close"),
            )
        elif new not in CONNECTING_STATES and new not in CLOSING_STATES:
            channel.deadline = None
            channel.deadline_kind = None

        if old is ChannelState.OFFERED and new is ChannelState.CONNECT_REQUESTED:
            self._detach_acceptor(channel)
            return out

        # A FIN the peer has not seen yet (shutdown, or a close without an earlier FIN).
        sender = _SIDE_OF_INPUT.get(event)
        if sender is not None and old in ESTABLISHED_STATES and not _fin_sent(old, sender):
            receiver = sender.peer
            receiver_vm, receiver_session = channel.vm(receiver), channel.session(receiver)
            if old is not _CLOSING_BY[receiver] and self._live(receiver_vm, receiver_session):
                assert receiver_vm is not None and receiver_session is not None
                self._emit(
                    out,
                    PeerFinReceived(
                        at=now,
                        seq=self._seq(),
                        partition=receiver_vm,
                        session_id=receiver_session,
                        channel_id=channel.channel_id,
                        side=receiver,
                    ),
                )

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
        if old in CONNECTING_STATES:
            # The connector learns how its connect ended, unless it gave up itself.
            if event is not ChannelInput.CLOSE_CONNECTOR and self._live(
                channel.connector_vm, channel.connector_session
            ):
                failure = _CONNECT_FAILURE.get(event, ConnectionReset)
                self._emit(
                    out,
                    ConnectFailed(
                        at=now,
                        seq=self._seq(),
                        partition=channel.connector_vm,
                        session_id=channel.connector_session,
                        channel_id=cid,
                        errno=failure.errno,
                        status=failure.status,
                        reason=reason,
                    ),
                )
            # An offered acceptor sees its offer withdrawn, unless it refused it itself.
            if (
                channel.acceptor_vm is not None
                and channel.acceptor_session is not None
                and event is not ChannelInput.REFUSE
                and self._live(channel.acceptor_vm, channel.acceptor_session)
            ):
                self._emit(
                    out,
                    ChannelRescinded(
                        at=now,
                        seq=self._seq(),
                        partition=channel.acceptor_vm,
                        session_id=channel.acceptor_session,
                        channel_id=cid,
                        side=Side.ACCEPTOR,
                        reason=reason,
                    ),
                )
        else:
            # The host always rescinds an opened channel towards both ends; a Linux guest
            # waits for that rescind before it frees the channel.
            for side in Side:
                vm, owner = channel.vm(side), channel.session(side)
                if self._live(vm, owner):
                    assert vm is not None and owner is not None
                    self._emit(
                        out,
                        ChannelRescinded(
                            at=now,
                            seq=self._seq(),
                            partition=vm,
                            session_id=owner,
                            channel_id=cid,
                            side=side,
                            reason=reason,
                        ),
                    )
        acceptor_vm, acceptor_session = channel.acceptor_vm, channel.acceptor_session
        self._detach_acceptor(channel)
        connector = self._partitions.get(channel.connector_vm)
        if connector is not None:
            connector.channels.discard(cid)
            connector.channel_ends -= 1
            if connector.local_ids.get(channel.connector_local.service_id) == cid:
                del connector.local_ids[channel.connector_local.service_id]
        channel.deadline = None
        channel.deadline_kind = None
        del self._channels[cid]
        self._emit(
            out,
            ChannelRemoved(
                at=now,
                seq=self._seq(),
                channel_id=cid,
                final_state=new,
                reason=reason,
                connector=channel.connector_vm,
                acceptor=acceptor_vm,
                connector_session=channel.connector_session,
                acceptor_session=acceptor_session,
            ),
        )
        return out

    def _detach_acceptor(self, channel: _Channel) -> None:
        """Undo ``_offer``: the acceptor end no longer exists."""
        if channel.acceptor_vm is None:
            return
        if channel.listener_id is not None:
            listener = self._listeners.get(channel.listener_id)
            if listener is not None:
                listener.pending.discard(channel.channel_id)
        acceptor = self._partitions.get(channel.acceptor_vm)
        if acceptor is not None:
            acceptor.channel_ends -= 1
            if acceptor.vm_id != channel.connector_vm:
                acceptor.channels.discard(channel.channel_id)
        channel.acceptor_vm = None
        channel.acceptor_session = None
        channel.acceptor_local = None
        channel.acceptor_remote = None
        channel.listener_id = None

    # ------------------------------------------------------------------------------------------
    # timers
    # ------------------------------------------------------------------------------------------

    def _timer_valid(self, entry: tuple[float, int, int, str]) -> bool:
        deadline, _, cid, kind = entry
        channel = self._channels.get(cid)
        return (
            channel is not None and channel.deadline == deadline and channel.deadline_kind == kind
        )

    def next_deadline(self) -> float | None:
        """When ``on_timer`` must next be called, or None if no timer runs."""
        while self._timers and not self._timer_valid(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> list[Event]:
        """Fire every timer due at ``now``: connect timeouts and close timeouts."""
        out: list[Event] = []
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if not self._timer_valid(entry):
                continue
            channel = self._channels[entry[2]]
            if entry[3] == "connect":
                out.extend(
                    self._apply(channel, ChannelInput.CONNECT_TIMEOUT, now, "connect timed out")
                )
            else:
                out.extend(
                    self._apply(
                        channel,
                        ChannelInput.CLOSE_TIMEOUT,
                        now,
                        "close timeout: the peer did not close in time",
                    )
                )
        return out

    # ------------------------------------------------------------------------------------------
    # diagnostics and adapter reports
    # ------------------------------------------------------------------------------------------

    def set_data_path(self, channel_id: int, side: Side, path: str) -> bool:
        """Record how ``side`` moves data ("shm", "relay" ...).  False if the channel is gone."""
        channel = self._channels.get(channel_id)
        if channel is None:
            return False
        channel.data_path[Side(side)] = path
        return True

    def report_traffic(self, channel_id: int, side: Side, nbytes: int) -> bool:
        """Add ``nbytes`` sent by ``side``.  False if the channel is gone (late reports are
        harmless)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidArgument(f"nbytes must be a non-negative integer, got {nbytes!r}")
        channel = self._channels.get(channel_id)
        if channel is None:
            return False
        end = Side(side)
        channel.bytes_sent[end] = channel.bytes_sent.get(end, 0) + nbytes
        return True

    def _channel_info(self, channel: _Channel) -> ChannelInfo:
        connector = EndpointInfo(
            vm_id=channel.connector_vm,
            session_id=channel.connector_session,
            local=channel.connector_local,
            remote=channel.target,
            data_path=channel.data_path.get(Side.CONNECTOR, ""),
            bytes_sent=channel.bytes_sent.get(Side.CONNECTOR, 0),
        )
        acceptor = None
        if (
            channel.acceptor_vm is not None
            and channel.acceptor_session is not None
            and channel.acceptor_local is not None
            and channel.acceptor_remote is not None
        ):
            acceptor = EndpointInfo(
                vm_id=channel.acceptor_vm,
                session_id=channel.acceptor_session,
                local=channel.acceptor_local,
                remote=channel.acceptor_remote,
                data_path=channel.data_path.get(Side.ACCEPTOR, ""),
                bytes_sent=channel.bytes_sent.get(Side.ACCEPTOR, 0),
            )
        return ChannelInfo(
            channel_id=channel.channel_id,
            state=channel.machine.state,
            connector=connector,
            acceptor=acceptor,
            ring=channel.ring,
            created_at=channel.created_at,
            state_since=channel.state_since,
            deadline=channel.deadline,
        )

    def get_channel(self, channel_id: int) -> ChannelInfo:
        channel = self._channels.get(channel_id)
        if channel is None:
            raise NotFound(f"no channel {channel_id}")
        return self._channel_info(channel)

    def list_channels(self, vm_id: str | None = None) -> list[ChannelInfo]:
        """Every live channel (or those with an end in ``vm_id``), by channel id."""
        if vm_id is None:
            ids: Iterable[int] = self._channels
        else:
            ids = self._partition(vm_id).channels
        return [self._channel_info(self._channels[cid]) for cid in sorted(ids)]
