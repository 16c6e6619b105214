"""The one mapping from gRPC failures to the ``OSError`` a hv_sock caller sees."""

from __future__ import annotations

import errno

import grpc
from grpc_status import rpc_status

from hvsock.v1 import hvsock_pb2

#: When a status carries no ErrnoDetail (e.g. the transport itself failed), the errno a socket
#: caller would see for that status code.
STATUS_ERRNO: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: errno.EINVAL,
    grpc.StatusCode.NOT_FOUND: errno.ENOENT,
    grpc.StatusCode.ALREADY_EXISTS: errno.EEXIST,
    grpc.StatusCode.PERMISSION_DENIED: errno.EACCES,
    grpc.StatusCode.UNAUTHENTICATED: errno.EACCES,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errno.ENOBUFS,
    grpc.StatusCode.FAILED_PRECONDITION: errno.EINVAL,
    grpc.StatusCode.DEADLINE_EXCEEDED: errno.ETIMEDOUT,
    # The host service went away: what a socket sees when its peer vanishes.
    grpc.StatusCode.UNAVAILABLE: errno.ECONNRESET,
    grpc.StatusCode.CANCELLED: errno.ECONNRESET,
    grpc.StatusCode.ABORTED: errno.ECONNRESET,
    grpc.StatusCode.UNIMPLEMENTED: errno.EOPNOTSUPP,
    grpc.StatusCode.OUT_OF_RANGE: errno.EINVAL,
    grpc.StatusCode.INTERNAL: errno.EIO,
    grpc.StatusCode.UNKNOWN: errno.EIO,
    grpc.StatusCode.DATA_LOSS: errno.EIO,
}

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def os_error(number: int, message: str) -> OSError:
    """``OSError(errno, text)`` picks the subclass (ConnectionRefusedError, TimeoutError...)."""
    return OSError(number, message)


def from_error(error: hvsock_pb2.Error) -> OSError:
    """An in-stream Error from the attach stream."""
    if error.HasField("errno"):
        return os_error(error.errno.errno, error.message)
    code = _CODES_BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN)
    return os_error(STATUS_ERRNO[code], error.message)


def from_rpc_error(exc: grpc.RpcError) -> OSError:
    """A failed call: the ErrnoDetail in its rich status if any, else the status code's errno."""
    status = rpc_status.from_call(exc)
    if status is not None:
        for detail in status.details:
            if detail.Is(hvsock_pb2.ErrnoDetail.DESCRIPTOR):
                parsed = hvsock_pb2.ErrnoDetail()
                detail.Unpack(parsed)
                return os_error(parsed.errno, status.message)
    code = exc.code()
    return os_error(STATUS_ERRNO.get(code, errno.EIO), exc.details() or code.name)
