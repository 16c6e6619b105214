"""The hand-written SessionData decoders (hvsock_common.relaywire) against protobuf's own parse,
as each side deploys them: the host's request decoder (host_service.relayframes) and the guest
library's response decoder (guest_client._relay). For any message protobuf builds, and for any
bytes at all (garbage, or a valid message cut, spliced or grown with unknown fields), each
fails exactly when protobuf fails and otherwise reads every field protobuf reads."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from guest_client._relay import _decode_frames
from host_service.relayframes import decode_session_data
from hvsock.v1 import hvsock_pb2
from hvsock_common.relaywire import Frame, kept

pytestmark = pytest.mark.property

U64 = st.integers(0, 2**64 - 1)
EDGES = st.sampled_from([0, 1, 127, 128, 255, 16383, 16384, 2**32 - 1, 2**63, 2**64 - 1])

frames_strategy = st.lists(
    st.builds(
        hvsock_pb2.RelayFrame,
        channel_id=st.one_of(EDGES, U64),
        end=st.one_of(st.integers(0, 1), st.integers(0, 2**32 - 1)),
        data=st.one_of(st.just(b""), st.binary(max_size=300)),
        fin=st.booleans(),
        credit=st.one_of(EDGES, U64),
        close=st.booleans(),
        close_done=st.booleans(),
        reset=st.one_of(
            st.none(),
            st.builds(hvsock_pb2.Error, code=st.integers(-(2**31), 2**31 - 1), message=st.text()),
        ),
    ),
    max_size=6,
)
requests_strategy = st.builds(
    hvsock_pb2.SessionDataRequest,
    session=st.text(max_size=30),
    early_frames=st.booleans(),
    frames=frames_strategy,
)
# Fields a newer client might send (unknown here), in every wire type, and protobuf's own
# encodings of known fields that the decoder must take as protobuf does (a repeated scalar,
# whose last value wins).
unknown_fields = st.sampled_from(
    [
        b"\x48\x05",  # field 9, varint
        b"\x51" + bytes(8),  # field 10, fixed64
        b"\x5a\x03abc",  # field 11, length-delimited
        b"\x65" + bytes(4),  # field 12, fixed32
        b"\x6b\x70\x01\x6c",  # field 13, a group holding a varint
        b"\x08\x07",  # field 1 as a varint (wrong wire type for session/frames' key)
        b"\x18\x00",  # early_frames = false, again
        b"\x80\x80\x80\x80\x10",  # a key beyond 29-bit field numbers
        b"\x0c",  # a stray end-group
    ]
)


def _parsed(message: type, raw: bytes) -> object:
    try:
        return message.FromString(raw)
    except DecodeError:
        return None


def _decoded(decode: object, raw: bytes) -> object:
    try:
        return decode(raw)  # type: ignore[operator]
    except DecodeError:
        return None


def _same_frames(frames: list[Frame], expected: object) -> None:
    assert len(frames) == len(expected)  # type: ignore[arg-type]
    for frame, want in zip(frames, expected, strict=True):  # type: ignore[call-overload]
        assert (frame.channel_id, frame.end, frame.credit) == (
            want.channel_id,
            want.end,
            want.credit,
        )
        assert (frame.fin, frame.close, frame.close_done) == (want.fin, want.close, want.close_done)
        assert bytes(frame.data) == want.data
        assert (frame.reset is not None) == want.HasField("reset")
        if frame.reset is not None:
            assert hvsock_pb2.Error.FromString(frame.reset) == want.reset


def _same_as_protobuf(raw: bytes) -> None:
    """``raw`` read as a request by the host, and as a response by the guest library (the two
    messages share RelayFrame and differ in their own fields), each as protobuf reads it."""
    expected, got = _parsed(hvsock_pb2.SessionDataRequest, raw), _decoded(decode_session_data, raw)
    assert (expected is None) == (got is None), (raw, expected, got)
    if expected is not None:
        assert got.session == expected.session  # type: ignore[attr-defined]
        assert got.early_frames == expected.early_frames  # type: ignore[attr-defined]
        _same_frames(got.frames, expected.frames)  # type: ignore[attr-defined]
    expected, got = _parsed(hvsock_pb2.SessionDataResponse, raw), _decoded(_decode_frames, raw)
    assert (expected is None) == (got is None), (raw, expected, got)
    if expected is not None:
        _same_frames(got, expected.frames)  # type: ignore[arg-type, attr-defined]


@given(requests_strategy)
def test_any_request_reads_as_protobuf_reads_it(request: hvsock_pb2.SessionDataRequest) -> None:
    _same_as_protobuf(request.SerializeToString())


@given(frames_strategy)
def test_any_response_reads_as_protobuf_reads_it(frames: list[hvsock_pb2.RelayFrame]) -> None:
    _same_as_protobuf(hvsock_pb2.SessionDataResponse(frames=frames).SerializeToString())


@given(requests_strategy, st.lists(st.tuples(st.integers(0, 10_000), unknown_fields), max_size=4))
def test_unknown_and_repeated_fields_read_as_protobuf_reads_them(
    request: hvsock_pb2.SessionDataRequest, inserts: list[tuple[int, bytes]]
) -> None:
    """Fields spliced in between the request's own fields (or inside a frame, where the
    position lands there): what protobuf skips or takes, the decoder does too."""
    raw = request.SerializeToString()
    for position, field in inserts:
        position %= len(raw) + 1
        raw = raw[:position] + field + raw[position:]
    _same_as_protobuf(raw)


@given(requests_strategy, st.integers(0, 10_000), st.binary(max_size=8))
def test_cut_and_spliced_requests_fail_as_protobuf_fails(
    request: hvsock_pb2.SessionDataRequest, position: int, junk: bytes
) -> None:
    raw = request.SerializeToString()
    position %= len(raw) + 1
    _same_as_protobuf(raw[:position])
    _same_as_protobuf(raw[:position] + junk + raw[position + len(junk) :])


@given(st.binary(max_size=64))
def test_arbitrary_bytes_fail_as_protobuf_fails(raw: bytes) -> None:
    _same_as_protobuf(raw)


# ---- unit cases: what the decoder gives beyond protobuf's fields ---------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"\x12\x04\x08\x01\x12\x05",  # data longer than its frame
        b"\x12\x80",  # a frame's length cut short
        b"\x0a\x02\xff\xfe",  # session not UTF-8
        b"\x12\x04\x3a\x02\x12\x01",  # reset whose Error is cut short
        b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
        b"\x6b\x74\x01",  # a group never ended
        b"\x6b\x7c",  # a group ended by another field's end-group
    ],
)
def test_malformed_requests_raise_decode_error(raw: bytes) -> None:
    assert _parsed(hvsock_pb2.SessionDataRequest, raw) is None
    with pytest.raises(DecodeError):
        decode_session_data(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x80\x80\x80\x10\x00",  # a key beyond 29-bit field numbers: malformed
        b"\xf8\xff\xff\xff\x0f\x00",  # the largest field number: an unknown varint
        b"\x12\x0b\x40" + b"\xff" * 9 + b"\x01",  # end as a 64-bit varint: cut to 32 bits
        b"\x12\x0b\x08" + b"\xff" * 9 + b"\x7f",  # channel_id beyond 64 bits: cut to 64
        b"\x12\x02\x18\x02\x12\x02\x28\x00",  # fin as 2 (true); close as 0 (false)
        b"\x12\x04\x12\x01a\x12\x00" + b"\x12\x06\x12\x01a\x12\x01b",  # last data wins
        # A reset given twice: protobuf merges the two Errors (code from one, message the other).
        b"\x12\x09\x3a\x02\x08\x05\x3a\x03\x12\x01a",
        b"\x0a\x09\x3a\x02\x08\x05\x3a\x03\x12\x01a",
    ],
)
def test_edge_encodings_read_as_protobuf_reads_them(raw: bytes) -> None:
    _same_as_protobuf(raw)


def test_deeply_nested_groups_raise_decode_error_not_recursion_error() -> None:
    raw = b"\x6b" * 5000 + b"\x6c" * 5000
    assert _parsed(hvsock_pb2.SessionDataRequest, raw) is None
    with pytest.raises(DecodeError):
        decode_session_data(raw)
    with pytest.raises(DecodeError):
        _decode_frames(raw)


def test_frame_data_is_a_view_of_the_received_message() -> None:
    request = hvsock_pb2.SessionDataRequest(
        frames=[hvsock_pb2.RelayFrame(channel_id=3, end=1, data=b"x" * 1000)]
    )
    raw = request.SerializeToString()
    (frame,) = decode_session_data(raw).frames
    assert isinstance(frame.data, memoryview)
    assert frame.data.obj is raw
    assert frame.data == b"x" * 1000


def test_kept_holds_a_view_only_while_it_is_a_fifth_of_its_message() -> None:
    raw = bytes(1000)
    view = memoryview(raw)
    assert kept(view[:200]) is not None and isinstance(kept(view[:200]), memoryview)
    small = kept(view[:199])
    assert type(small) is bytes and small == bytes(199)  # a copy: it pins nothing
    assert kept(view[100:200][10:20]) == bytes(10)
    assert type(kept(view[100:200][10:20])) is bytes  # a view of a view pins the message too
    assert kept(b"abc") == b"abc"


def test_kept_holds_every_frame_of_a_full_request_as_a_view() -> None:
    # Three 256 KiB frames and the rest of a 1 MB request (the guest's budget): the smallest
    # is above a fifth of the message, so bulk data is held without a copy.
    view = memoryview(bytes(1_000_000))
    for start, end in ((0, 262144), (262144, 524288), (524288, 786432), (786432, 1_000_000)):
        assert type(kept(view[start:end])) is memoryview
