"""The partition and session state machine: ONE transition table decides what a partition may do.

Theory of operation
-------------------
A VM partition is in one of three :class:`~host_service.core.types.PartitionState`\\s:

* ``RUNNING`` -- its sessions act (listen, connect, accept, send ...), connects to it are
  answered by its listeners.
* ``PAUSED`` -- frozen, as a paused Hyper-V VM: its rings stop being serviced, its sessions may
  attach and detach but not act (``PartitionNotRunning``), connects to it go unanswered.
  Channels stay.
* ``OFF`` -- powered off: it has no sessions, no listeners and no channels; it cannot be
  attached until it is started.

Inputs come from two places.  The operator's lifecycle inputs (``PAUSE``, ``RESUME``, ``STOP``,
``START``, ``DELETE``) move a VM between states.  A session's inputs (``ATTACH`` -- open a
session, ``ACT`` -- any socket operation of a session, ``DETACH`` -- the session's stream ended)
never move it, but are refused in some states.

Rules of this file:

1. ``TRANSITIONS`` lists *every* (state, input) pair: each maps either to the next state or to a
   :class:`Refusal` -- the error the caller gets, with its message.  A refused input changes
   nothing.  Nothing else decides whether a partition may take an input.
2. The host (root) partition is no VM: it is created ``RUNNING`` and ``HOST_TRANSITIONS`` refuses
   every lifecycle input (``InvalidState``) while taking every session input, so it never leaves
   ``RUNNING``.
3. ``DELETE`` leads to ``OFF``; the partition is then forgotten (the record is gone, its
   ``PartitionChanged`` "deleted" carries no state).
4. The machine knows nothing about sessions, sockets, events or time; the partitions
   collaborator turns transitions into events and tears sockets down.  Two facts it does not
   decide, for that reason: how many sessions a partition may have (a count, not a state:
   ``TooManySessions``) and whether a stale session is still attached (``Unauthenticated``,
   checked before the table -- which is why ``ACT`` and ``DETACH`` in ``OFF``, where no session
   can exist, are unreachable through ``HostCore``).  Connect routing reads the state too: a
   connect to an ``OFF`` VM is ``HostUnreachable``, one to a ``PAUSED`` VM goes unanswered.

Invariants checked by the table tests: every pair of both tables is listed; session inputs never
change the state; ``DETACH`` is never refused; ``ACT`` is taken only in ``RUNNING``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from host_service.core.errors import HvError, InvalidState, PartitionNotRunning
from host_service.core.types import PartitionState

__all__ = [
    "CHANGE",
    "HOST_TRANSITIONS",
    "LIFECYCLE_INPUTS",
    "SESSION_INPUTS",
    "TRANSITIONS",
    "PartitionInput",
    "PartitionMachine",
    "Refusal",
]


class PartitionInput(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    START = "start"
    DELETE = "delete"
    #: Open a session (``attach``, also the take-over of an idle auto-created VM).
    ATTACH = "attach"
    #: Any operation of an attached session other than ending it.
    ACT = "act"
    #: End a session (its attach stream ended).
    DETACH = "detach"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused input: the error raised and its message, a template over ``{vm_id}`` and
    ``{state}``."""

    error: type[HvError]
    message: str

    def exception(self, *, vm_id: str, state: PartitionState) -> HvError:
        return self.error(self.message.format(vm_id=vm_id, state=state))


S = PartitionState
I = PartitionInput  # noqa: E741 - a one-letter alias keeps the table readable

LIFECYCLE_INPUTS = frozenset({I.PAUSE, I.RESUME, I.STOP, I.START, I.DELETE})
SESSION_INPUTS = frozenset({I.ATTACH, I.ACT, I.DETACH})

#: The word for each lifecycle input done: the ``PartitionChanged.change`` it reports, and what
#: the host partition "cannot be".
CHANGE: Mapping[PartitionInput, str] = MappingProxyType(
    {
        I.PAUSE: "paused",
        I.RESUME: "resumed",
        I.STOP: "stopped",
        I.START: "started",
        I.DELETE: "deleted",
    }
)

_NOT_RUNNING = Refusal(InvalidState, "VM {vm_id} is {state}, not running")
_NOT_PAUSED = Refusal(InvalidState, "VM {vm_id} is {state}, not paused")
_NOT_OFF = Refusal(InvalidState, "VM {vm_id} is {state}, not off")
_ALREADY_OFF = Refusal(InvalidState, "VM {vm_id} is already off")
_START_FIRST = Refusal(PartitionNotRunning, "VM {vm_id} is off; start it first")
_CANNOT_ACT = Refusal(PartitionNotRunning, "partition {vm_id} is {state}")

_TABLE: dict[tuple[PartitionState, PartitionInput], PartitionState | Refusal] = {
    # --- running ---------------------------------------------------------------------------
    (S.RUNNING, I.PAUSE): S.PAUSED,
    (S.RUNNING, I.RESUME): _NOT_PAUSED,
    (S.RUNNING, I.STOP): S.OFF,
    (S.RUNNING, I.START): _NOT_OFF,
    (S.RUNNING, I.DELETE): S.OFF,
    (S.RUNNING, I.ATTACH): S.RUNNING,
    (S.RUNNING, I.ACT): S.RUNNING,
    (S.RUNNING, I.DETACH): S.RUNNING,
    # --- paused: sessions come and go, but cannot act ----------------------------------------
    (S.PAUSED, I.PAUSE): _NOT_RUNNING,
    (S.PAUSED, I.RESUME): S.RUNNING,
    (S.PAUSED, I.STOP): S.OFF,
    (S.PAUSED, I.START): _NOT_OFF,
    (S.PAUSED, I.DELETE): S.OFF,
    (S.PAUSED, I.ATTACH): S.PAUSED,
    (S.PAUSED, I.ACT): _CANNOT_ACT,
    (S.PAUSED, I.DETACH): S.PAUSED,
    # --- off: no sessions; only START (or DELETE) gets it going ------------------------------
    (S.OFF, I.PAUSE): _NOT_RUNNING,
    (S.OFF, I.RESUME): _NOT_PAUSED,
    (S.OFF, I.STOP): _ALREADY_OFF,
    (S.OFF, I.START): S.RUNNING,
    (S.OFF, I.DELETE): S.OFF,
    (S.OFF, I.ATTACH): _START_FIRST,
    (S.OFF, I.ACT): _CANNOT_ACT,  # unreachable: no session outlives a stop
    (S.OFF, I.DETACH): S.OFF,  # unreachable, as ACT
}

#: A VM's transitions, read-only: every (state, input) pair, to a state or a refusal.
TRANSITIONS: Mapping[tuple[PartitionState, PartitionInput], PartitionState | Refusal] = (
    MappingProxyType(_TABLE)
)

#: The host partition's transitions, read-only: it is always RUNNING, takes every session input
#: and no lifecycle input (the host is not a VM an operator can pause, stop or delete).
HOST_TRANSITIONS: Mapping[PartitionInput, PartitionState | Refusal] = MappingProxyType(
    {
        event: (
            Refusal(InvalidState, f"the host partition cannot be {CHANGE[event]}")
            if event in LIFECYCLE_INPUTS
            else S.RUNNING
        )
        for event in I
    }
)

del S, I


class PartitionMachine:
    """The state of one partition, advanced only through :data:`TRANSITIONS` (a VM) or
    :data:`HOST_TRANSITIONS` (the host)."""

    __slots__ = ("host", "state")

    def __init__(self, state: PartitionState, *, host: bool = False) -> None:
        if host and state is not PartitionState.RUNNING:
            raise ValueError("the host partition is always running")
        self.host = host
        self.state = state

    def next_state(self, event: PartitionInput, *, vm_id: str) -> PartitionState:
        """The state ``event`` would lead to; nothing changes.

        Raises:
            HvError: the table's refusal for the pair (InvalidState, PartitionNotRunning).
        """
        outcome = HOST_TRANSITIONS[event] if self.host else TRANSITIONS[(self.state, event)]
        if isinstance(outcome, Refusal):
            raise outcome.exception(vm_id=vm_id, state=self.state)
        return outcome

    def process(self, event: PartitionInput, *, vm_id: str) -> PartitionState:
        """Apply ``event`` and return the new state (raises as :meth:`next_state`)."""
        self.state = self.next_state(event, vm_id=vm_id)
        return self.state
