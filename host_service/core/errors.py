"""The one exception hierarchy of the host core.

Every error the core raises is an :class:`HvError`; the root and the address errors live in
:mod:`hvsock_common.errors` (the guest library uses them too).  Each class carries two class-level
facts:

* ``errno`` -- the POSIX errno a socket program would see for this failure (the adapter puts it in
  the rich status detail so clients in any language can raise the right ``OSError``);
* ``status`` -- the *name* of the gRPC status code (``"NOT_FOUND"``, ...).  The core never imports
  grpc; the adapter maps these names to ``grpc.StatusCode`` in exactly one table.

Some failures have side effects (a protocol error closes the channel, a refused connect is
logged).  Those side-effect events are attached to the exception as ``events`` so that nothing is
lost: an adapter that catches an :class:`HvError` must dispatch ``err.events`` exactly as it would
dispatch the list a successful call returns.

Tree::

    HvError
    +-- InvalidArgument (also ValueError)  EINVAL        INVALID_ARGUMENT
    |   +-- BadAddress                     EINVAL        INVALID_ARGUMENT
    +-- NetworkUnreachable                 ENETUNREACH   INVALID_ARGUMENT
    +-- GuestToGuestRefused                ENETUNREACH   PERMISSION_DENIED
    +-- HostUnreachable                    EHOSTUNREACH  NOT_FOUND
    +-- NotFound                           ENOENT        NOT_FOUND
    +-- AlreadyExists                      EEXIST        ALREADY_EXISTS
    +-- AddressInUse                       EADDRINUSE    ALREADY_EXISTS
    +-- AddressNotAvailable                EADDRNOTAVAIL RESOURCE_EXHAUSTED
    +-- NoBuffers                          ENOBUFS       RESOURCE_EXHAUSTED
    |   +-- TooManySessions                ENOBUFS       RESOURCE_EXHAUSTED
    |   +-- TooManyPartitions              ENOBUFS       RESOURCE_EXHAUSTED
    +-- Unauthenticated                    EACCES        UNAUTHENTICATED
    +-- PermissionDenied                   EACCES        PERMISSION_DENIED
    |   +-- ServiceNotRegistered           EACCES        PERMISSION_DENIED
    +-- InvalidState                       EINVAL        FAILED_PRECONDITION
    +-- PartitionNotRunning                ENETDOWN      FAILED_PRECONDITION
    +-- ProtocolError                      EPROTO        FAILED_PRECONDITION
    |   +-- NotConnected                   ENOTCONN      FAILED_PRECONDITION
    +-- ConnectionRefused                  ECONNREFUSED  UNAVAILABLE
    +-- ConnectTimedOut                    ETIMEDOUT     DEADLINE_EXCEEDED
    +-- ConnectionReset                    ECONNRESET    UNAVAILABLE
    +-- RingCorrupt                        EPROTO        DATA_LOSS

``ConnectionRefused``, ``ConnectTimedOut`` and ``ConnectionReset`` also describe asynchronous
connect failures: the ``ConnectFailed`` event carries their ``errno``/``status`` and message.
"""

from __future__ import annotations

import errno as _errno

# The root of the tree and the errors an address can raise are shared with the guest library
# (which parses addresses without importing the host); they are re-exported here because they are
# as much the core's vocabulary as the rest of this tree.
from hvsock_common.errors import (
    STATUS_NAMES,
    BadAddress,
    HvError,
    InvalidArgument,
    NetworkUnreachable,
)

__all__ = [
    "STATUS_NAMES",
    "AddressInUse",
    "AddressNotAvailable",
    "AlreadyExists",
    "BadAddress",
    "ConnectTimedOut",
    "ConnectionRefused",
    "ConnectionReset",
    "GuestToGuestRefused",
    "HostUnreachable",
    "HvError",
    "InvalidArgument",
    "InvalidState",
    "NetworkUnreachable",
    "NoBuffers",
    "NotConnected",
    "NotFound",
    "PartitionNotRunning",
    "PermissionDenied",
    "ProtocolError",
    "RingCorrupt",
    "ServiceNotRegistered",
    "TooManyPartitions",
    "TooManySessions",
    "Unauthenticated",
]


class GuestToGuestRefused(HvError):
    """A guest tried to reach another guest; Hyper-V has no such path (opt-in extension only)."""

    errno = _errno.ENETUNREACH
    status = "PERMISSION_DENIED"


class HostUnreachable(HvError):
    """The target VM does not exist or is powered off."""

    errno = _errno.EHOSTUNREACH
    status = "NOT_FOUND"


class NotFound(HvError):
    """No partition, channel, listener or service with that id (or not visible to the caller)."""

    errno = _errno.ENOENT
    status = "NOT_FOUND"


class AlreadyExists(HvError):
    """A partition with that VM id, or that name, already exists."""

    errno = _errno.EEXIST
    status = "ALREADY_EXISTS"


class AddressInUse(HvError):
    """Another listener (or connection endpoint) of the partition holds an overlapping address."""

    errno = _errno.EADDRINUSE
    status = "ALREADY_EXISTS"


class AddressNotAvailable(HvError):
    """No free ephemeral local service id could be found (like vsock's 24 auto-bind retries)."""

    errno = _errno.EADDRNOTAVAIL
    status = "RESOURCE_EXHAUSTED"


class NoBuffers(HvError):
    """The partition reached ``max_socket_number`` sockets (listeners + channel ends)."""

    errno = _errno.ENOBUFS
    status = "RESOURCE_EXHAUSTED"


class TooManySessions(NoBuffers):
    """The partition already has ``max_sessions_per_partition`` live sessions (attach streams,
    one per process of the VM); another attach must wait until one ends.  ENOBUFS, like every
    per-partition resource limit (and what a client infers from RESOURCE_EXHAUSTED alone)."""


class TooManyPartitions(NoBuffers):
    """The host already keeps ``max_partitions`` VMs; delete one before creating another.
    ENOBUFS, like every other count limit of the host (and what a client infers from
    RESOURCE_EXHAUSTED alone)."""


class Unauthenticated(HvError):
    """Missing or wrong partition token, or a session that is no longer attached."""

    errno = _errno.EACCES
    status = "UNAUTHENTICATED"


class PermissionDenied(HvError):
    """The caller is authenticated but not allowed to do this."""

    errno = _errno.EACCES
    status = "PERMISSION_DENIED"


class ServiceNotRegistered(PermissionDenied):
    """Strict registry mode: a host listener's service id is not in the service registry
    (the emulated ``GuestCommunicationServices`` key)."""


class InvalidState(HvError):
    """The object is not in a state that allows the request (pause a paused VM, ...)."""

    errno = _errno.EINVAL
    status = "FAILED_PRECONDITION"


class PartitionNotRunning(HvError):
    """The partition is paused or off, so it cannot act or be reached (Windows: WSAENETDOWN)."""

    errno = _errno.ENETDOWN
    status = "FAILED_PRECONDITION"


class ProtocolError(HvError):
    """A channel input that the transition table does not allow in the current state.

    Raising it always closes (rescinds) the channel first; the rescind events are in ``events``.
    """

    errno = _errno.EPROTO
    status = "FAILED_PRECONDITION"


class NotConnected(ProtocolError):
    """A FIN or close from an end whose channel is not established yet (the channel table's
    answer to shutdown before the connect completed); like every protocol error it closes the
    channel."""

    errno = _errno.ENOTCONN


class ConnectionRefused(HvError):
    """Connect refused at once: a Windows-personality (or host) caller and nobody listening."""

    errno = _errno.ECONNREFUSED
    status = "UNAVAILABLE"


class ConnectTimedOut(HvError):
    """Connect not answered before the connect timeout (Linux semantics of a refused connect)."""

    errno = _errno.ETIMEDOUT
    status = "DEADLINE_EXCEEDED"


class ConnectionReset(HvError):
    """A pending connect was torn down (rescind, VM stopped, listener's partition gone)."""

    errno = _errno.ECONNRESET
    status = "UNAVAILABLE"


class RingCorrupt(HvError):
    """A ring's contents are impossible (someone mapping the memory wrote them): the channel is
    rescinded, and a relayed end reading that ring is told this after the data before it."""

    errno = _errno.EPROTO
    status = "DATA_LOSS"
