"""The host's gRPC API as the command-line programs reach it: the channel from the connection
options (``--host``, ``--tls-*``), the token metadata, and failures as :class:`CliError`."""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_status import rpc_status

from guest_client import find_token
from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common.conventions import TOKEN_METADATA


class CliError(Exception):
    """A failure to report as ``hvsock: <status>: <message>`` with exit code 1."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError("INVALID_ARGUMENT", f"{path}: {exc.strerror}") from None


def tls_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """The ``--tls-*`` options as channel credentials (None: plain text)."""
    if args.tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca),
        private_key=_read(args.tls_key) if args.tls_key else None,
        certificate_chain=_read(args.tls_cert) if args.tls_cert else None,
    )


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    credentials = tls_credentials(args)
    if credentials is None:
        return grpc.insecure_channel(args.host)
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.host, credentials, options=options)


class Client:
    """The two stubs, the token metadata and the call deadline."""

    def __init__(self, args: argparse.Namespace, channel: grpc.Channel) -> None:
        self.host = hvsock_pb2_grpc.HostServiceStub(channel)
        self.admin = hvsock_pb2_grpc.AdminServiceStub(channel)
        self.timeout: float = args.timeout
        self._explicit_token: str | None = args.token

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = find_token(self._explicit_token)
        return ((TOKEN_METADATA, token),) if token else ()

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, metadata=self.metadata, timeout=self.timeout)


def describe_rpc_error(exc: grpc.RpcError) -> CliError:
    code = exc.code()
    status = code.name if isinstance(code, grpc.StatusCode) else str(code)
    message = exc.details() or status
    try:
        rich = rpc_status.from_call(exc)
    except ValueError:
        rich = None
    if rich is not None:
        for detail in rich.details:
            if detail.Is(hvsock_pb2.ErrnoDetail.DESCRIPTOR):
                errno_detail = hvsock_pb2.ErrnoDetail()
                detail.Unpack(errno_detail)
                message = f"{message} ({errno_detail.name or errno_detail.errno})"
    return CliError(status, message)


def list_vms(channel: grpc.Channel, token: str, *, errno_code: int, doing: str) -> list[Any]:
    """The VM partitions (not the host's) from the admin API, with the host token ``token``; a
    failed call is ``OSError(errno_code, "<doing>: <details>")``, as a socket caller expects."""
    stub = hvsock_pb2_grpc.AdminServiceStub(channel)
    try:
        listed = stub.ListPartitions(
            hvsock_pb2.ListPartitionsRequest(), metadata=((TOKEN_METADATA, token),), timeout=10
        )
    except grpc.RpcError as exc:
        raise OSError(errno_code, f"{doing}: {exc.details()}") from None
    return [p for p in listed.partitions if not p.host]


def vm_named(partitions: Iterable[Any], name: str) -> str | None:
    """The VM id of the partition called ``name``, compared ignoring case as the host compares
    names (they are unique so); None when none is."""
    folded = name.casefold()
    for partition in partitions:
        if partition.name and partition.name.casefold() == folded:
            return str(partition.vm_id)
    return None
