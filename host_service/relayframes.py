"""SessionData requests decoded by hand: the relay's data path without protobuf's copies.

Decoding a ``SessionDataRequest`` with protobuf copies every frame's data twice more: into the
parsed message, then into a ``bytes`` when ``.data`` is read. Profiled in the host service at
256 KiB sends, those two copies were 7% of its CPU (memory copies of frames that no longer sit
in the cache are far slower than a copy timed alone). :func:`decode_request` reads the same
wire format into :class:`Request` and :class:`Frame` values whose ``data`` is a view of the
received message: no data byte is copied until it goes into a ring or onto the peer's stream.
It follows protobuf's rules exactly (unknown fields and fields of the wrong wire type skipped,
the last of a repeated scalar winning, integers cut to their width, strings checked as UTF-8)
and raises protobuf's ``DecodeError`` wherever protobuf would; the property tests hold it to
protobuf's own parse for any message and for arbitrary bytes.

(The guest library encodes those requests by hand as well: ``hvsock_common.relaywire``.)
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from hvsock.v1 import hvsock_pb2

__all__ = ["SESSION_DATA", "Frame", "Request", "decode_request", "kept"]

_SERVICE = hvsock_pb2.DESCRIPTOR.services_by_name["HostService"]
#: The method whose requests are decoded here.
SESSION_DATA = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['SessionData'].name}"

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
#: Nesting of groups (a wire type no field of ours uses, skipped as unknown) protobuf allows.
_MAX_GROUP_DEPTH = 100
# Wire types.
_VARINT, _FIXED64, _LENGTH, _GROUP_START, _GROUP_END, _FIXED32 = 0, 1, 2, 3, 4, 5


class Frame:
    """A RelayFrame as :func:`decode_request` reads it: the fields, at protobuf's defaults when
    absent; ``data`` is a view of the received message (``b""`` when empty) and ``reset`` says
    whether the frame has one (its content is validated, not kept: no client sends one the
    host reads)."""

    # The defaults are class attributes: a frame stores only the fields it has.
    channel_id = 0
    data: bytes | memoryview = b""
    fin = False
    credit = 0
    close = False
    close_done = False
    reset = False
    end = 0


class Request:
    """A SessionDataRequest as :func:`decode_request` reads it."""

    __slots__ = ("early_frames", "frames", "session")

    def __init__(self) -> None:
        self.session = ""
        self.early_frames = False
        self.frames: list[Frame] = []


def _varint(buf: bytes, pos: int, limit: int) -> tuple[int, int]:
    """The varint at ``pos`` (within ``limit``): its value, cut to 64 bits as protobuf does,
    and the position after it."""
    if pos < limit:
        byte = buf[pos]
        if byte < 0x80:
            return byte, pos + 1
    value = shift = 0
    while pos < limit:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _U64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("a varint longer than 10 bytes")
    raise DecodeError("truncated message (in a varint)")


def _skip(buf: bytes, pos: int, limit: int, key: int) -> int:
    """Skip the value of an unknown field (``key`` read already); the position after it."""
    wire_type = key & 7
    if wire_type == _VARINT:
        return _varint(buf, pos, limit)[1]
    if wire_type == _LENGTH:
        size, pos = _varint(buf, pos, limit)
        end = pos + size
    elif wire_type == _FIXED64:
        end = pos + 8
    elif wire_type == _FIXED32:
        end = pos + 4
    elif wire_type == _GROUP_START:
        # Until the matching end-group key, nested groups counted (not recursed into).
        open_groups = [key >> 3]
        while open_groups:
            inner, pos = _varint(buf, pos, limit)
            if inner >> 3 == 0:
                raise DecodeError("field number 0")
            if inner & 7 == _GROUP_END:
                if inner >> 3 != open_groups.pop():
                    raise DecodeError("an end-group tag that does not match its group")
            elif inner & 7 == _GROUP_START:
                open_groups.append(inner >> 3)
                if len(open_groups) > _MAX_GROUP_DEPTH:
                    raise DecodeError("groups nested too deep")
            else:
                pos = _skip(buf, pos, limit, inner)
        return pos
    else:  # an end-group tag outside a group, or wire type 6 or 7
        raise DecodeError(f"invalid wire type {wire_type}")
    if end > limit:
        raise DecodeError("truncated message")
    return end


def _key(buf: bytes, pos: int, limit: int) -> tuple[int, int]:
    key, pos = _varint(buf, pos, limit)
    if key >> 3 == 0 or key > _U32:
        raise DecodeError("field number 0, or beyond 29 bits")
    return key, pos


def _frame(buf: bytes, view: memoryview, pos: int, limit: int) -> Frame:
    frame = Frame()
    while pos < limit:
        key = buf[pos]  # every key of RelayFrame's own fields is one byte
        if key < 0x80 and key >= 8:
            pos += 1
        else:
            key, pos = _key(buf, pos, limit)
        if key == 0x12:  # data (2, length-delimited)
            size, pos = _varint(buf, pos, limit)
            if pos + size > limit:
                raise DecodeError("truncated message (in data)")
            frame.data = view[pos : pos + size] if size else b""
            pos += size
        elif key == 0x08:  # channel_id (1, varint)
            frame.channel_id, pos = _varint(buf, pos, limit)
        elif key == 0x40:  # end (8, varint: a uint32)
            value, pos = _varint(buf, pos, limit)
            frame.end = value & _U32
        elif key == 0x20:  # credit (4, varint)
            frame.credit, pos = _varint(buf, pos, limit)
        elif key == 0x18:  # fin (3)
            value, pos = _varint(buf, pos, limit)
            frame.fin = value != 0
        elif key == 0x28:  # close (5)
            value, pos = _varint(buf, pos, limit)
            frame.close = value != 0
        elif key == 0x30:  # close_done (6)
            value, pos = _varint(buf, pos, limit)
            frame.close_done = value != 0
        elif key == 0x3A:  # reset (7, an Error message): protobuf checks it
            size, pos = _varint(buf, pos, limit)
            if pos + size > limit:
                raise DecodeError("truncated message (in reset)")
            hvsock_pb2.Error.FromString(buf[pos : pos + size])
            frame.reset = True
            pos += size
        else:
            pos = _skip(buf, pos, limit, key)
    return frame


def kept(data: bytes | memoryview) -> bytes | memoryview:
    """What to hold of a decoded frame's ``data`` beyond handling it: the view itself when it
    is at least half of the message it keeps alive, else a copy of it. A frame held for long
    (its end stalled, its ring full) then never keeps alive more than twice its own bytes,
    which the relay windows bound: a client cannot make a few held bytes pin whole messages."""
    if type(data) is memoryview and len(data) * 2 < memoryview(data.obj).nbytes:
        return bytes(data)
    return data


def decode_request(raw: bytes) -> Request:
    """A serialized SessionDataRequest as :class:`Request` (frames' data viewed, not copied);
    ``DecodeError`` where protobuf's parse would raise one."""
    request = Request()
    view = memoryview(raw)
    pos, limit = 0, len(raw)
    try:
        while pos < limit:
            key, pos = _key(raw, pos, limit)
            if key == 0x12:  # frames (2, length-delimited RelayFrame)
                size, pos = _varint(raw, pos, limit)
                end = pos + size
                if end > limit:
                    raise DecodeError("truncated message (in a frame)")
                request.frames.append(_frame(raw, view, pos, end))
                pos = end
            elif key == 0x0A:  # session (1, a string)
                size, pos = _varint(raw, pos, limit)
                if pos + size > limit:
                    raise DecodeError("truncated message (in session)")
                request.session = str(raw[pos : pos + size], "utf-8")
                pos += size
            elif key == 0x18:  # early_frames (3)
                value, pos = _varint(raw, pos, limit)
                request.early_frames = value != 0
            else:
                pos = _skip(raw, pos, limit, key)
    except UnicodeDecodeError as exc:
        raise DecodeError(f"session is not UTF-8: {exc}") from None
    return request
