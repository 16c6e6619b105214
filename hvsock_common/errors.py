"""The root of the hv_sock error vocabulary, and the errors an address can raise.

Every error the host core raises is an :class:`HvError`; the rest of the tree is in
``host_service/core/errors.py``. Each class carries two class-level facts:

* ``errno`` -- the POSIX errno a socket program would see for this failure (the host puts it in
  the rich status detail so clients in any language can raise the right ``OSError``);
* ``status`` -- the *name* of the gRPC status code (``"NOT_FOUND"``, ...). Nothing here imports
  grpc (the host's pure core builds on this module); the host maps these names to
  ``grpc.StatusCode`` in exactly one table.

The classes here are the ones :mod:`hvsock_common.addresses` raises, so the guest library can
parse and check addresses (and catch :class:`HvError`) without importing the host service.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "STATUS_NAMES",
    "BadAddress",
    "HvError",
    "InvalidArgument",
    "NetworkUnreachable",
]

#: Every status name an error class may use; a test checks each class against this set, and the
#: host's mapping table must cover all of them.
STATUS_NAMES: frozenset[str] = frozenset(
    {
        "INTERNAL",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "DEADLINE_EXCEEDED",
        "UNAVAILABLE",
        "DATA_LOSS",
    }
)


class HvError(Exception):
    """Base of every hv_sock error. Not raised directly (it has no specific meaning).

    ``events`` are the side effects the host core produced before raising (its
    ``host_service.core.events.Event`` values); they are typed ``object`` here because this
    package must not import the host, and stay empty for errors raised outside the core.
    """

    errno: ClassVar[int] = _errno.EIO
    status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, events: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.message = message
        #: Side-effect events produced before the error was raised; dispatch them.
        self.events: tuple[object, ...] = tuple(events)

    def with_events(self, events: Sequence[object]) -> HvError:
        """Return ``self`` with ``events`` appended (used where the core raises after acting)."""
        self.events = (*self.events, *events)
        return self

    def __str__(self) -> str:
        return self.message


class InvalidArgument(HvError, ValueError):
    """A request field is out of range or malformed (backlog, ring pages, timeout, name ...)."""

    errno = _errno.EINVAL
    status = "INVALID_ARGUMENT"


class BadAddress(InvalidArgument):
    """A GUID is malformed, or a well-known VM id is used where it has no meaning."""


class NetworkUnreachable(HvError):
    """The target VM id cannot be reached from the caller (e.g. PARENT from the host)."""

    errno = _errno.ENETUNREACH
    status = "INVALID_ARGUMENT"
