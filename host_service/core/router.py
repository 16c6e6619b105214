"""Routing rules: who may listen where, which listener a connect reaches, how peers are named.

Pure functions over GUID strings; the state they consult (partitions, listeners) is passed in.

Listener scopes (the VM-id half of a listener's bound address):

=========== ================================ =====================================
partition   scope                            hears connects from
=========== ================================ =====================================
host        WILDCARD                         every partition, the host included
host        CHILDREN                         every VM (not the host)
host        <VM id>                          that VM only
host        LOOPBACK                         the host itself (LOOPBACK connects)
VM          WILDCARD                         the host, itself, and other VMs if allowed
VM          PARENT                           the host only
VM          LOOPBACK                         itself only
=========== ================================ =====================================

PARENT on the host is refused ("not supported on a physical host"); BROADCAST and SILOHOST are
reserved; CHILDREN in a VM is refused (a VM has no children).

Precedence when several listeners of one partition could hear a connect (hvsock-facts 8.2 leaves
Windows' order UNCONFIRMED; this is the documented choice): the most specific scope first --
a VM id / PARENT / LOOPBACK, then CHILDREN, then WILDCARD.  With the duplicate-bind rule below two
listeners that both hear a source cannot coexist, so precedence only matters as a safety net.

Duplicate binds: two listeners of one partition on the same service id conflict (EADDRINUSE)
when their scopes overlap, i.e. some source would be heard by both.
"""

from __future__ import annotations

from host_service.core.errors import BadAddress, NetworkUnreachable
from hvsock_common.addresses import (
    BROADCAST,
    CHILDREN,
    LOOPBACK,
    PARENT,
    SILOHOST,
    WELL_KNOWN_VM_IDS,
    WILDCARD,
)

__all__ = [
    "Route",
    "connector_local_vm_id",
    "peer_vm_id_as_seen",
    "resolve_target",
    "scope_hears",
    "scope_rank",
    "scopes_overlap",
    "validate_listen_scope",
]


def validate_listen_scope(scope: str, *, is_host: bool) -> str:
    """Check that a partition may bind a listener to ``scope``; return it unchanged.

    Raises:
        BadAddress: the scope has no meaning for this kind of partition.
    """
    if scope in (BROADCAST, SILOHOST):
        raise BadAddress(f"{WELL_KNOWN_VM_IDS[scope]} is reserved and cannot be bound")
    if is_host:
        if scope == PARENT:
            raise BadAddress("the host cannot listen on PARENT: not supported on a physical host")
        return scope
    if scope in (WILDCARD, PARENT, LOOPBACK):
        return scope
    if scope == CHILDREN:
        raise BadAddress("a VM cannot listen on CHILDREN: it has no child partitions")
    raise BadAddress(f"a VM listens on WILDCARD, PARENT or LOOPBACK, not on the VM id {scope}")


def scope_hears(
    scope: str, *, listener_is_host: bool, listener_vm: str, source_vm: str, source_is_host: bool
) -> bool:
    """Whether a listener bound to ``scope`` in ``listener_vm`` hears a connect from
    ``source_vm``.  ``source_vm == listener_vm`` means a loopback connect."""
    if scope == WILDCARD:
        return True
    if listener_is_host:
        if scope == CHILDREN:
            return not source_is_host
        if scope == LOOPBACK:
            return source_is_host
        return scope == source_vm
    if scope == PARENT:
        return source_is_host
    if scope == LOOPBACK:
        return source_vm == listener_vm
    return False


def scope_rank(scope: str) -> int:
    """Lower is more specific (tried first)."""
    if scope == WILDCARD:
        return 2
    if scope == CHILDREN:
        return 1
    return 0


def scopes_overlap(a: str, b: str, *, is_host: bool) -> bool:
    """Whether two scopes of one partition hear at least one common source."""
    if a == b or WILDCARD in (a, b):
        return True
    # On the host CHILDREN covers every specific VM id; no other distinct pair overlaps.
    return is_host and CHILDREN in (a, b) and LOOPBACK not in (a, b)


class Route:
    """Where a connect target points, before looking at listeners."""

    HOST = "host"
    LOOPBACK = "loopback"
    GUEST = "guest"


def resolve_target(target_vm: str, *, caller_vm: str, caller_is_host: bool) -> tuple[str, str]:
    """Classify a connect target: ``(Route.HOST | Route.LOOPBACK | Route.GUEST, vm id)``.

    For Route.GUEST the VM id is the target VM (existence, state and guest-to-guest policy are
    checked by the caller).  Rules (hvsock-facts 1.3): a VM reaches the host through PARENT --
    or the all-zero id, which is what the legacy Linux AF_HYPERV patch required for the host --
    and itself through LOOPBACK (or its own id); the host reaches a VM by its id and itself by
    LOOPBACK.

    Raises:
        BadAddress: WILDCARD as a target from the host.
        NetworkUnreachable: a reserved id or PARENT from the host.
    """
    if caller_is_host and target_vm == PARENT:
        # Checked first: the host's own partition id is PARENT, yet PARENT is no target for it.
        raise NetworkUnreachable("the host has no parent partition (PARENT unreachable)")
    if target_vm in (LOOPBACK, caller_vm):
        return Route.LOOPBACK, caller_vm
    if target_vm in (CHILDREN, BROADCAST, SILOHOST):
        raise NetworkUnreachable(f"{WELL_KNOWN_VM_IDS[target_vm]} is not a connect target")
    if caller_is_host:
        if target_vm == WILDCARD:
            raise BadAddress("the wildcard VM id is not a connect target; use a VM id")
        return Route.GUEST, target_vm
    if target_vm in (PARENT, WILDCARD):
        return Route.HOST, target_vm
    return Route.GUEST, target_vm


def peer_vm_id_as_seen(*, viewer_vm: str, other_vm: str, other_is_host: bool) -> str:
    """How a partition names the other end's partition in a remote address."""
    if other_vm == viewer_vm:
        return LOOPBACK
    if other_is_host:
        return PARENT
    return other_vm


def connector_local_vm_id(*, caller_vm: str, caller_is_host: bool) -> str:
    """The VM-id half of a connecting socket's local address.

    Windows reports CHILDREN for a host socket that connected (go-winio's loopback test); a VM's
    socket reports its own VM id.
    """
    return CHILDREN if caller_is_host else caller_vm
