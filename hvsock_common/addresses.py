"""Hyper-V socket addresses: GUID text, well-known VM ids and the vsock port template.

An hv_sock endpoint is ``(vm_id, service_id)``, both GUIDs.  Both sides represent a GUID as its
*canonical text*: 36 lower-case characters without braces (what CPython's AF_HYPERV support
reports).  Input may use upper case and/or surrounding braces (CPython's ``HV_GUID_*`` constants
are upper case); anything else is rejected with :class:`BadAddress`.  Invariant: every GUID
stored anywhere in the host core went through :func:`parse_guid`, so string equality is GUID
equality.

The well-known values are from hvsock-facts section 1.2 (Microsoft docs, go-winio, CPython).
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import uuid
from dataclasses import dataclass

from hvsock_common.errors import BadAddress, NetworkUnreachable

__all__ = [
    "BROADCAST",
    "CHILDREN",
    "LOOPBACK",
    "PARENT",
    "SILOHOST",
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VSOCK_TEMPLATE",
    "WELL_KNOWN_VM_IDS",
    "WILDCARD",
    "ZERO",
    "Address",
    "cid_for_vm_id",
    "guid_from_bytes_le",
    "guid_to_bytes_le",
    "is_vsock_service_id",
    "parse_guid",
    "port_for_service_id",
    "service_id_for_port",
    "vm_id_for_cid",
    "vm_id_for_host_cid",
]

ZERO = "00000000-0000-0000-0000-000000000000"
#: Same value as ZERO: a listener bound here hears every partition.
WILDCARD = ZERO
#: Reserved (no documented semantics); never a valid bind or connect target here.
BROADCAST = "ffffffff-ffff-ffff-ffff-ffffffffffff"
#: Host listener scope: every child partition (VM), not the host itself.
CHILDREN = "90db8b89-0d35-4f79-8ce9-49ea0ac8b7cd"
#: Connect target meaning "the caller's own partition".
LOOPBACK = "e0e16197-dd56-4a10-9195-5ee7a155a838"
#: Connect target meaning "my parent": the host partition, seen from a VM.
PARENT = "a42e7cda-d03f-480c-9cc2-a4de20abb878"
#: Silo host of a container; there are no silos in the emulator, so it is reserved here.
SILOHOST = "36bd0c5c-7276-4223-88ba-7d03b654c568"
#: Service id template for vsock ports: Data1 carries the port.
VSOCK_TEMPLATE = "00000000-facb-11e6-bd58-64006a7986d3"

#: Names of the well-known VM ids (ZERO and WILDCARD share a value; the map keeps "WILDCARD").
WELL_KNOWN_VM_IDS: dict[str, str] = {
    WILDCARD: "WILDCARD",
    BROADCAST: "BROADCAST",
    CHILDREN: "CHILDREN",
    LOOPBACK: "LOOPBACK",
    PARENT: "PARENT",
    SILOHOST: "SILOHOST",
}

#: vsock CIDs a Linux-style guest uses (include/uapi/linux/vm_sockets.h).
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2

_VSOCK_SUFFIX = VSOCK_TEMPLATE[8:]  # "-facb-11e6-bd58-64006a7986d3"
_GUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAX_PORT = 0xFFFFFFFF


def parse_guid(text: object, *, what: str = "GUID") -> str:
    """Return the canonical form of a GUID given as text.

    Accepts ``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` in any case, optionally wrapped in one pair
    of braces.  Rejects everything else (no hyphen-less, URN or partial forms), because a
    lenient parser would let two spellings of one address slip past the duplicate-bind checks.

    Raises:
        BadAddress: ``text`` is not a string or not a GUID; the message names ``what``.
    """
    if not isinstance(text, str):
        raise BadAddress(f"{what} must be a string, got {type(text).__name__}")
    candidate = text.strip()
    if candidate.startswith("{") and candidate.endswith("}"):
        candidate = candidate[1:-1]
    candidate = candidate.lower()
    if _GUID_RE.fullmatch(candidate) is None:
        raise BadAddress(f"{what} {text!r} is not a valid GUID (expected xxxxxxxx-xxxx-...)")
    # Interned: every parse makes a new string (85 bytes), and the host keeps the parsed
    # address of each open channel; thousands of connections to one service then share one
    # copy of its VM id and service id. (Interned strings are freed with their last user.)
    return sys.intern(candidate)


def service_id_for_port(port: int) -> str:
    """The vsock template service id for a port: ``%08x-facb-11e6-bd58-64006a7986d3``.

    Raises:
        BadAddress: ``port`` is not an integer in ``[0, 0xFFFFFFFF]``.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
        raise BadAddress(f"vsock port {port!r} is outside 0..0xFFFFFFFF")
    return f"{port:08x}{_VSOCK_SUFFIX}"


def is_vsock_service_id(service_id: str) -> bool:
    """Whether a (canonical or raw) service id is built from the vsock template."""
    return parse_guid(service_id, what="service id").endswith(_VSOCK_SUFFIX)


def port_for_service_id(service_id: str) -> int | None:
    """The vsock port carried by a template service id, or None for any other service id."""
    canonical = parse_guid(service_id, what="service id")
    if not canonical.endswith(_VSOCK_SUFFIX):
        return None
    return int(canonical[:8], 16)


def vm_id_for_cid(cid: int) -> str:
    """Map a Linux guest's vsock CID to the VM id it means here.

    hv_sock only reaches CID 2 (the host, i.e. PARENT); binding uses VMADDR_CID_ANY (WILDCARD).
    Any other CID is ENETUNREACH, as ``hvs_stream_allow`` makes it on Linux.
    """
    if cid == VMADDR_CID_HOST:
        return PARENT
    if cid == VMADDR_CID_ANY:
        return WILDCARD
    raise NetworkUnreachable(f"vsock CID {cid} is unreachable over hv_sock (only CID 2, the host)")


#: CIDs given to VMs: [3, 2**31 - 1). 0 (hypervisor), 1 (local), 2 (host) and
#: VMADDR_CID_ANY are never a VM's; staying below 2**31 keeps tools that print a CID as a
#: signed int honest.
_CID_FIRST = 3
_CID_SPAN = 0x7FFFFFFF - _CID_FIRST


@functools.lru_cache(maxsize=4096)  # a pure function, asked for on every accepted connect
def cid_for_vm_id(vm_id: str) -> int:
    """The vsock CID a host-side vsock program uses for a VM (``hvsock vms list`` shows it).

    Hyper-V has no CIDs: a VM is its GUID. A host program written for vsock needs a number,
    so the emulator derives one from the VM id: the first 4 bytes of SHA-256 of the
    canonical GUID text, read little-endian, folded into ``[3, 2**31 - 1)``. Deterministic
    (the same VM has the same CID on every host and after restarts), computed without asking
    the host; two VMs may in principle share one (about 1 in 2**31 per pair), which the
    inverse reports as ambiguous.
    """
    digest = hashlib.sha256(parse_guid(vm_id, what="VM id").encode("ascii")).digest()
    return _CID_FIRST + int.from_bytes(digest[:4], "little") % _CID_SPAN


def vm_id_for_host_cid(cid: int, vm_ids: list[str]) -> str:
    """What a host-side vsock connect to ``cid`` means, among the VMs ``vm_ids``.

    CID 2 (the host itself) and 1 (local) are LOOPBACK; a VM's CID (``cid_for_vm_id``) is that
    VM; anything else is ENETUNREACH, as a CID no VM has.
    """
    if cid in (1, VMADDR_CID_HOST):
        return LOOPBACK
    found = [vm_id for vm_id in vm_ids if cid_for_vm_id(vm_id) == cid]
    if len(found) != 1:
        what = "no VM has" if not found else f"{len(found)} VMs share"
        raise NetworkUnreachable(f"vsock CID {cid} is unreachable: {what} it")
    return parse_guid(found[0], what="VM id")


def guid_to_bytes_le(guid: str) -> bytes:
    """The 16-byte Microsoft mixed-endian wire form (Data1/2/3 little-endian)."""
    return uuid.UUID(parse_guid(guid)).bytes_le


def guid_from_bytes_le(data: bytes) -> str:
    """Inverse of :func:`guid_to_bytes_le`."""
    if len(data) != 16:
        raise BadAddress(f"a wire GUID is 16 bytes, got {len(data)}")
    return str(uuid.UUID(bytes_le=bytes(data)))


@dataclass(frozen=True, slots=True)
class Address:
    """A socket address ``(vm_id, service_id)`` in canonical form, as a program would see it."""

    vm_id: str
    service_id: str

    @classmethod
    def parse(cls, vm_id: object, service_id: object) -> Address:
        return cls(parse_guid(vm_id, what="VM id"), parse_guid(service_id, what="service id"))

    def __str__(self) -> str:
        return f"({self.vm_id}, {self.service_id})"
