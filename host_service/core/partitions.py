"""Partitions and their sessions: who exists, under which name and token, in which state, and
which sessions act for it.

The host (root) partition always exists, is always running, has the ``windows`` personality and
is identified by :data:`HOST_VM_ID` (= PARENT, the address VMs use to reach it).  VMs are created
with a name, an optional VM id and a personality; each gets a secret token shown once (only its
sha256 is kept).  A partition acts only through a :class:`~host_service.core.types.Session`
obtained with ``attach``, up to ``max_sessions_per_partition`` at once.

Every state change and every session input goes through the partition's
:class:`~host_service.core.lifecycle.PartitionMachine` (the table in
:mod:`~host_service.core.lifecycle`); this module turns its transitions into
``PartitionChanged`` / ``SessionChanged`` / ``SessionEnded`` events.

Owns: the partition records' identity, state machine, token, personality and ``sessions``; the
session ids.  May not touch: listeners, channels, the socket counts -- ending a session here
only forgets it; rescinding what it held is the caller's (``HostCore``'s) next step.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from collections.abc import Callable

from host_service.core.config import HostConfig
from host_service.core.errors import (
    AddressNotAvailable,
    AlreadyExists,
    BadAddress,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TooManyPartitions,
    TooManySessions,
    Unauthenticated,
)
from host_service.core.eventlog import EventLog
from host_service.core.events import Event, PartitionChanged, SessionChanged, SessionEnded
from host_service.core.lifecycle import CHANGE, PartitionInput, PartitionMachine
from host_service.core.records import _Partition
from host_service.core.types import PartitionInfo, PartitionState, Personality, Session
from hvsock_common.addresses import PARENT, WELL_KNOWN_VM_IDS, parse_guid

__all__ = [
    "HOST_NAME",
    "HOST_VM_ID",
    "MAX_NAME_LENGTH",
    "NAME_PATTERN",
    "Partitions",
    "hash_token",
    "token_matches",
]

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
#: Attempts to find an unused VM id (or default name) before giving up.
_ID_RETRIES = 24


def hash_token(token: str) -> str:
    """sha256 hex of a token: what the core keeps and persistence stores."""
    if not isinstance(token, str) or not token:
        raise InvalidArgument("a token must be a non-empty string")
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, token_sha256: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    presented = hashlib.sha256(token.encode("utf-8")).hexdigest()
    return hmac.compare_digest(presented, token_sha256)


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


def _check_legacy_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument("a partition name must be a non-empty string")
    if len(name) > _LEGACY_MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"a persisted partition name is at most {_LEGACY_MAX_NAME_LENGTH} characters"
        )
    return name


def _check_personality(personality: object) -> Personality:
    try:
        return Personality(str(personality))
    except ValueError:
        raise InvalidArgument(
            f"personality must be 'linux' or 'windows', got {personality!r}"
        ) from None


class Partitions:
    """The partition table and the sessions of each partition (see the module docstring)."""

    __slots__ = (
        "_config",
        "_events",
        "_guid_factory",
        "_partitions",
        "_session_ids",
        "_token_factory",
        "host",
    )

    def __init__(
        self,
        config: HostConfig,
        events: EventLog,
        *,
        host_token: str,
        token_factory: Callable[[], str],
        guid_factory: Callable[[], str],
        now: float,
    ) -> None:
        self._config = config
        self._events = events
        self._token_factory = token_factory
        self._guid_factory = guid_factory
        self._session_ids = itertools.count(1)
        self._partitions: dict[str, _Partition] = {}
        #: The host (root) partition: always there, always running.
        self.host = _Partition(
            vm_id=HOST_VM_ID,
            name=HOST_NAME,
            personality=Personality.WINDOWS,
            machine=PartitionMachine(PartitionState.RUNNING, host=True),
            token_sha256=hash_token(host_token),
            created_at=now,
        )
        self._partitions[HOST_VM_ID] = self.host

    # --- lookups ------------------------------------------------------------------------------

    def find(self, vm_id: str) -> _Partition | None:
        """The partition with the canonical id ``vm_id``, if it still exists."""
        return self._partitions.get(vm_id)

    def get(self, vm_id: str) -> _Partition:
        canonical = parse_guid(vm_id, what="VM id")
        partition = self._partitions.get(canonical)
        if partition is None:
            raise NotFound(f"no partition with VM id {canonical}")
        return partition

    def live(self, vm_id: str | None, session_id: int | None) -> bool:
        """Whether events addressed to ``session_id`` of ``vm_id`` have a session to go to."""
        if vm_id is None or session_id is None:
            return False
        partition = self._partitions.get(vm_id)
        return partition is not None and session_id in partition.sessions

    def of_session(self, session: Session, event: PartitionInput) -> _Partition:
        """The partition ``session`` acts for, if it is still attached and the table takes
        ``event`` (ACT or DETACH) in the partition's state."""
        partition = self._partitions.get(session.vm_id)
        if partition is None or partition.sessions.get(session.session_id) != session:
            raise Unauthenticated(f"session {session.session_id} is no longer attached")
        partition.machine.process(event, vm_id=partition.vm_id)
        return partition

    def infos(self) -> list[PartitionInfo]:
        """The host first, then VMs by creation time and id."""
        vms = sorted(
            (p for p in self._partitions.values() if not p.is_host),
            key=lambda p: (p.created_at, p.vm_id),
        )
        return [self.host.info(), *(p.info() for p in vms)]

    # --- creation -----------------------------------------------------------------------------

    def create(
        self, name: str, personality: Personality | str, now: float, *, vm_id: str | None
    ) -> tuple[PartitionInfo, str, list[Event]]:
        return self._create(
            _check_name(name), _check_personality(personality), now, vm_id=vm_id, auto=False
        )

    def _create(
        self, name: str, personality: Personality, now: float, *, vm_id: str | None, auto: bool
    ) -> tuple[PartitionInfo, str, list[Event]]:
        # Bad input first, then a clash, then the count: the most specific answer wins.
        canonical = self._check_new_vm_id(vm_id) if vm_id is not None else None
        owner = self._named(name)
        if owner is not None:
            raise AlreadyExists(
                f"a partition named {owner.name!r} already exists ({owner.vm_id}); "
                "names are unique on a host"
            )
        vms = len(self._partitions) - 1  # the host partition is not counted
        if vms >= self._config.max_partitions:
            raise TooManyPartitions(
                f"the host keeps {vms} VMs, the max_partitions limit; "
                "delete one before creating another"
            )
        if canonical is None:
            canonical = self._fresh_vm_id()
        token = self._token_factory()
        partition = _Partition(
            vm_id=canonical,
            name=name,
            personality=personality,
            machine=PartitionMachine(PartitionState.RUNNING),
            token_sha256=hash_token(token),
            created_at=now,
            auto_created=auto,
        )
        self._partitions[canonical] = partition
        out: list[Event] = []
        self._changed(out, partition, "created", now)
        return partition.info(), token, out

    def restore(
        self,
        *,
        vm_id: str,
        name: str,
        personality: Personality | str,
        token_sha256: str,
        state: PartitionState | str,
        created_at: float,
        auto_created: bool,
    ) -> PartitionInfo:
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
            name=_check_legacy_name(name),
            personality=_check_personality(personality),
            # A persisted state is where the machine starts, not a transition.
            machine=PartitionMachine(checked_state),
            token_sha256=token_sha256.lower(),
            created_at=created_at,
            auto_created=bool(auto_created),
        )
        self._partitions[canonical] = partition
        return partition.info()

    def _check_new_vm_id(self, vm_id: str) -> str:
        canonical = parse_guid(vm_id, what="VM id")
        if canonical in WELL_KNOWN_VM_IDS:
            raise BadAddress(
                f"{WELL_KNOWN_VM_IDS[canonical]} ({canonical}) is a well-known id, not a VM id"
            )
        if canonical in self._partitions:
            raise AlreadyExists(f"a partition with VM id {canonical} already exists")
        return canonical

    def _fresh_vm_id(self) -> str:
        for _ in range(_ID_RETRIES):
            candidate = parse_guid(self._guid_factory(), what="generated VM id")
            if candidate not in WELL_KNOWN_VM_IDS and candidate not in self._partitions:
                return candidate
        raise AddressNotAvailable("could not generate an unused VM id")

    def _named(self, name: str) -> _Partition | None:
        """The partition called ``name``, ignoring case ("Web" and "web" would be one VM to a
        person reading ``hvsock vms list``); the host partition's name counts too."""
        folded = name.casefold()
        for partition in self._partitions.values():
            if partition.name.casefold() == folded:
                return partition
        return None

    # --- lifecycle ----------------------------------------------------------------------------

    def prepare(self, vm_id: str, event: PartitionInput) -> _Partition:
        """The partition ``vm_id`` if the table takes ``event`` in its state; nothing changes
        yet (STOP and DELETE refuse before anything is torn down)."""
        partition = self.get(vm_id)
        partition.machine.next_state(event, vm_id=partition.vm_id)
        return partition

    def advance(
        self, out: list[Event], partition: _Partition, event: PartitionInput, now: float
    ) -> None:
        """Apply a lifecycle input (PAUSE, RESUME, STOP, START) and report it."""
        partition.machine.process(event, vm_id=partition.vm_id)
        self._changed(out, partition, CHANGE[event], now)

    def forget(self, out: list[Event], partition: _Partition, now: float) -> None:
        """DELETE, once the partition holds nothing: drop the record and its token."""
        partition.machine.process(PartitionInput.DELETE, vm_id=partition.vm_id)
        del self._partitions[partition.vm_id]
        self._events.emit(
            out,
            PartitionChanged,
            now,
            vm_id=partition.vm_id,
            change=CHANGE[PartitionInput.DELETE],
            state=None,
        )

    def _changed(self, out: list[Event], partition: _Partition, change: str, now: float) -> None:
        self._events.emit(
            out, PartitionChanged, now, vm_id=partition.vm_id, change=change, state=partition.state
        )

    # --- sessions -----------------------------------------------------------------------------

    def attach(self, vm_id: str, token: str | None, now: float) -> tuple[Session, list[Event]]:
        partition = self.get(vm_id)
        if not token:
            raise Unauthenticated(f"a token is required to attach as {partition.vm_id}")
        if not isinstance(token, str) or not token_matches(token, partition.token_sha256):
            raise Unauthenticated(f"wrong token for partition {partition.vm_id}")
        partition.machine.process(PartitionInput.ATTACH, vm_id=partition.vm_id)
        limit = self._config.max_sessions_per_partition
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
            self._changed(out, partition, "attached", now)
        self._events.emit(
            out,
            SessionChanged,
            now,
            vm_id=partition.vm_id,
            session_id=session.session_id,
            change="opened",
            sessions=len(partition.sessions),
            reason="attach",
        )
        return session, out

    def attach_new(
        self, now: float, *, name: str | None, personality: Personality | str
    ) -> tuple[Session, str, list[Event]]:
        if not self._config.auto_create_on_attach:
            raise PermissionDenied(
                "attaching without a VM id needs auto_create_on_attach; create the VM first"
            )
        checked_personality = _check_personality(personality)
        if name is None:
            vm_id = self._fresh_vm_id()
            checked_name = f"vm-{vm_id[:8]}"
            for _ in range(_ID_RETRIES):
                if self._named(checked_name) is None:
                    break
                # Someone chose a name of this shape: another id gives another default name.
                vm_id = self._fresh_vm_id()
                checked_name = f"vm-{vm_id[:8]}"
        else:
            vm_id = None
            checked_name = _check_name(name)
            owner = self._named(checked_name)
            if owner is not None:
                return self._take_over(owner, checked_personality, now)
        info, token, out = self._create(
            checked_name, checked_personality, now, vm_id=vm_id, auto=True
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
        # Checked before the token changes: a refused attach must leave the VM as it was.
        partition.machine.next_state(PartitionInput.ATTACH, vm_id=partition.vm_id)
        token = self._token_factory()
        partition.token_sha256 = hash_token(token)
        # No session, so no listener or channel depends on the personality it had.
        partition.personality = personality
        out: list[Event] = []
        self._changed(out, partition, "taken_over", now)
        session, more = self.attach(partition.vm_id, token, now)
        return session, token, out + more

    def end_session(
        self, out: list[Event], partition: _Partition, session_id: int, now: float, *, reason: str
    ) -> None:
        """Forget one session (before its sockets are released, so that only the peers hear
        about them); the last one to go detaches the partition."""
        del partition.sessions[session_id]
        self._events.emit(
            out,
            SessionChanged,
            now,
            vm_id=partition.vm_id,
            session_id=session_id,
            change="closed",
            sessions=len(partition.sessions),
            reason=reason,
        )
        if not partition.sessions:
            self._changed(out, partition, "detached", now)

    def end_sessions(self, partition: _Partition, now: float, *, reason: str) -> list[Event]:
        """End every session of ``partition``, telling each why (``SessionEnded``)."""
        out: list[Event] = []
        for session_id in list(partition.sessions):
            self._events.emit(
                out,
                SessionEnded,
                now,
                partition=partition.vm_id,
                session_id=session_id,
                reason=reason,
            )
            self.end_session(out, partition, session_id, now, reason=reason)
        return out
