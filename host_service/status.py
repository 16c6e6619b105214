"""The one mapping from core errors to gRPC: status code, message and the errno detail."""

from __future__ import annotations

import errno as errno_module
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from hvsock.v1 import hvsock_pb2

from .core import errors

#: Core status names (``HvError.status``) to gRPC codes. Covers ``errors.STATUS_NAMES``; a test
#: checks that, so a new core status cannot slip through unmapped.
STATUS_CODES: dict[str, grpc.StatusCode] = {
    "INTERNAL": grpc.StatusCode.INTERNAL,
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "DATA_LOSS": grpc.StatusCode.DATA_LOSS,
}


def errno_detail(number: int) -> hvsock_pb2.ErrnoDetail:
    return hvsock_pb2.ErrnoDetail(errno=number, name=errno_module.errorcode.get(number, ""))


def error_message(err: errors.HvError) -> hvsock_pb2.Error:
    """An in-stream answer (attach stream) carrying the same facts as a unary status."""
    return in_stream_error(err.status, err.message, err.errno)


def in_stream_error(status: str, message: str, number: int) -> hvsock_pb2.Error:
    """The same, from a core status name (events carry these, not exceptions)."""
    code = STATUS_CODES[status]
    return hvsock_pb2.Error(code=code.value[0], message=message, errno=errno_detail(number))


def rich_status(code: grpc.StatusCode, message: str, number: int | None) -> grpc.Status:
    """A grpc.Status whose trailer holds google.rpc.Status with an ErrnoDetail when given."""
    details = []
    if number is not None:
        packed = any_pb2.Any()
        packed.Pack(errno_detail(number))
        details.append(packed)
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=details)
    )


async def abort(context: grpc.aio.ServicerContext, err: errors.HvError) -> NoReturn:
    await context.abort_with_status(rich_status(STATUS_CODES[err.status], err.message, err.errno))
    raise AssertionError("abort_with_status returned")  # it always raises
