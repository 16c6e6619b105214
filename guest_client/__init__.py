"""Hyper-V sockets for programs: the standard socket API over the emulated Hyper-V host.

    import guest_client as hv
    with hv.attach() as vm:                       # HVSOCK_HOST, HVSOCK_VM_ID, HVSOCK_TOKEN
        s = vm.socket(hv.AF_HYPERV, hv.SOCK_STREAM, hv.HV_PROTOCOL_RAW)
        s.connect((hv.HV_GUID_PARENT, service_id))

Addresses are ``(vm_id, service_id)`` string tuples (``(cid, port)`` for ``AF_VSOCK``);
errors are ``OSError`` subclasses with the errno a real hv_sock caller sees.
"""

from __future__ import annotations

# First of all: gRPC reads which I/O stack to run on when it is imported.
from . import _grpc  # noqa: F401  # isort: skip

import json
import os
import pathlib
import threading
from socket import SHUT_RD, SHUT_RDWR, SHUT_WR, SOCK_STREAM

import grpc

from hvsock.v1 import hvsock_pb2
from hvsock_common import addresses as _addresses
from hvsock_common.conventions import DEFAULT_TARGET

from ._channel import DATA_PATH_NAMES
from ._partition import PERSONALITIES, Partition
from ._socket import (
    AF_HYPERV,
    AF_VSOCK,
    HV_PROTOCOL_RAW,
    HVSOCKET_ADDRESS_FLAG_PASSTHRU,
    HVSOCKET_CONNECT_TIMEOUT,
    HVSOCKET_CONNECT_TIMEOUT_MAX,
    HVSOCKET_CONNECTED_SUSPEND,
    HVSOCKET_RELAY_WINDOW,
    HVSOCKET_RELAY_WINDOW_MAX,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_PORT_ANY,
    HvSocket,
)
from ._token import find_token

__all__ = [
    "AF_HYPERV",
    "AF_VSOCK",
    "DATA_PATH_NAMES",
    "HVSOCKET_ADDRESS_FLAG_PASSTHRU",
    "HVSOCKET_CONNECTED_SUSPEND",
    "HVSOCKET_CONNECT_TIMEOUT",
    "HVSOCKET_CONNECT_TIMEOUT_MAX",
    "HVSOCKET_RELAY_WINDOW",
    "HVSOCKET_RELAY_WINDOW_MAX",
    "HV_GUID_BROADCAST",
    "HV_GUID_CHILDREN",
    "HV_GUID_LOOPBACK",
    "HV_GUID_PARENT",
    "HV_GUID_SILOHOST",
    "HV_GUID_VSOCK_TEMPLATE",
    "HV_GUID_WILDCARD",
    "HV_GUID_ZERO",
    "HV_PROTOCOL_RAW",
    "PERSONALITIES",
    "SHUT_RD",
    "SHUT_RDWR",
    "SHUT_WR",
    "SOCK_STREAM",
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VMADDR_PORT_ANY",
    "HvSocket",
    "Partition",
    "attach",
    "attach_from_env",
    "attach_host",
    "find_token",
    "port_for_service_id",
    "service_id_for_port",
    "socket",
]

# CPython's socket module spells these in upper case; results are reported in lower case.
HV_GUID_ZERO = _addresses.ZERO.upper()
HV_GUID_WILDCARD = _addresses.WILDCARD.upper()
HV_GUID_BROADCAST = _addresses.BROADCAST.upper()
HV_GUID_CHILDREN = _addresses.CHILDREN.upper()
HV_GUID_LOOPBACK = _addresses.LOOPBACK.upper()
HV_GUID_PARENT = _addresses.PARENT.upper()
HV_GUID_SILOHOST = _addresses.SILOHOST.upper()
HV_GUID_VSOCK_TEMPLATE = _addresses.VSOCK_TEMPLATE.upper()

service_id_for_port = _addresses.service_id_for_port
port_for_service_id = _addresses.port_for_service_id


def _credentials() -> grpc.ChannelCredentials | None:
    """TLS to the host service when HVSOCK_TLS_CA is set (HVSOCK_TLS_CERT/KEY for mTLS)."""
    ca = os.environ.get("HVSOCK_TLS_CA")
    if not ca:
        return None
    cert, key = os.environ.get("HVSOCK_TLS_CERT"), os.environ.get("HVSOCK_TLS_KEY")
    return grpc.ssl_channel_credentials(
        pathlib.Path(ca).read_bytes(),
        pathlib.Path(key).read_bytes() if key else None,
        pathlib.Path(cert).read_bytes() if cert else None,
    )


def _target(target: str | None) -> str:
    return target or os.environ.get("HVSOCK_HOST") or DEFAULT_TARGET


def attach(
    target: str | None = None,
    *,
    vm_id: str | None = None,
    token: str | None = None,
    name: str | None = None,
    personality: str | None = None,
    identity: str | os.PathLike[str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Partition:
    """Attach a VM partition (``vm_id``/``token`` default to HVSOCK_VM_ID/HVSOCK_TOKEN; with
    no VM id the host creates a VM when its policy allows, named ``name`` (HVSOCK_VM_NAME) with
    ``personality`` (HVSOCK_PERSONALITY, ``linux`` or ``windows``; default ``linux``)).

    ``identity`` (default HVSOCK_VM_IDENTITY) is a JSON file with a VM's id and token: used when
    no VM id is given, and written (mode 0600) when the host creates the VM on attach, so that
    every program in one VM container attaches as the same VM.
    """
    vm_id = vm_id if vm_id is not None else os.environ.get("HVSOCK_VM_ID", "")
    token = token if token is not None else os.environ.get("HVSOCK_TOKEN", "")
    personality = personality or os.environ.get("HVSOCK_PERSONALITY") or "linux"
    if personality not in PERSONALITIES:
        raise ValueError(f"personality must be linux or windows, not {personality!r}")
    identity_file = identity or os.environ.get("HVSOCK_VM_IDENTITY")
    if not vm_id and identity_file:
        vm_id, token = _read_identity(pathlib.Path(identity_file))
    hello = hvsock_pb2.Hello(
        vm_id=vm_id,
        token=token,
        name=name or os.environ.get("HVSOCK_VM_NAME", ""),
        personality=PERSONALITIES[personality],
        client="guest_client",
    )
    partition = Partition(_target(target), hello, credentials=credentials or _credentials())
    if not vm_id and identity_file:
        _write_identity(pathlib.Path(identity_file), partition.vm_id, partition.token)
    return partition


def _read_identity(path: pathlib.Path) -> tuple[str, str]:
    """(vm_id, token) saved in ``path``; empty strings when there is no such file yet."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return "", ""
    except (OSError, ValueError) as exc:
        raise ValueError(f"VM identity file {path}: {exc}") from None
    if not isinstance(saved, dict) or not all(
        isinstance(saved.get(key), str) and saved[key] for key in ("vm_id", "token")
    ):
        raise ValueError(f"VM identity file {path}: needs string fields vm_id and token")
    return saved["vm_id"], saved["token"]


def _write_identity(path: pathlib.Path, vm_id: str, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump({"vm_id": vm_id, "token": token}, file)
    os.replace(temporary, path)  # whole or not at all, for a program starting at the same time


def attach_host(
    target: str | None = None,
    *,
    token: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Partition:
    """Attach the host (root) partition (``token`` defaults to HVSOCK_HOST_TOKEN, then to the
    file a local ``hvsock-host`` wrote its generated token to)."""
    if token is None:
        token = find_token(None) or ""
    hello = hvsock_pb2.Hello(host=True, token=token, client="guest_client")
    return Partition(_target(target), hello, credentials=credentials or _credentials())


_default: Partition | None = None
_default_lock = threading.Lock()


def attach_from_env() -> Partition:
    """Attach as the environment says: the host partition when HVSOCK_HOST_TOKEN is set and
    neither HVSOCK_VM_ID nor HVSOCK_VM_IDENTITY is; a VM otherwise (see ``attach``)."""
    is_vm = os.environ.get("HVSOCK_VM_ID") or os.environ.get("HVSOCK_VM_IDENTITY")
    if os.environ.get("HVSOCK_HOST_TOKEN") and not is_vm:
        return attach_host()
    return attach()


def socket(
    family: int = AF_HYPERV, type: int = SOCK_STREAM, proto: int = HV_PROTOCOL_RAW
) -> HvSocket:
    """A socket on the process's default partition (``attach_from_env()`` on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = attach_from_env()
        partition = _default
    result: HvSocket = partition.socket(family, type, proto)
    return result
