"""SessionData requests, decoded by hand (``hvsock_common.relaywire.decode_request``: each
frame's data a view of the received message) with any reset's Error checked by protobuf, so a
request fails exactly where protobuf's parse of it would."""

from __future__ import annotations

from hvsock.v1 import hvsock_pb2
from hvsock_common.relaywire import Request, decode_request

__all__ = ["SESSION_DATA", "decode_session_data"]

_SERVICE = hvsock_pb2.DESCRIPTOR.services_by_name["HostService"]
#: The method whose requests are decoded here.
SESSION_DATA = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['SessionData'].name}"


def decode_session_data(raw: bytes) -> Request:
    """``raw`` as a SessionDataRequest; ``DecodeError`` where protobuf's parse raises one."""
    request = decode_request(raw)
    for frame in request.frames:
        if frame.reset is not None:
            hvsock_pb2.Error.FromString(frame.reset)  # no client may send one: only checked
    return request
