"""The hand-written SessionData encoder (hvsock_common.relaywire) against protobuf itself: for
any frames, protobuf parses what the encoder wrote into exactly the message protobuf would have
built from the same fields, whichever message (request or response) carries them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvsock.v1 import hvsock_pb2
from hvsock_common.relaywire import (
    REQUEST_FRAMES,
    RESPONSE_FRAMES,
    FrameWriter,
    encode_varint,
)

pytestmark = pytest.mark.property

U64 = st.integers(0, 2**64 - 1)
# Values near the varint's byte boundaries, where an encoder goes wrong if it does.
EDGES = st.sampled_from([0, 1, 127, 128, 255, 16383, 16384, 2**32 - 1, 2**63, 2**64 - 1])

frames_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "channel_id": st.one_of(EDGES, U64),
            "end": st.one_of(st.integers(0, 1), st.integers(0, 2**32 - 1)),
            "data": st.one_of(st.just(b""), st.binary(max_size=300)),
            "fin": st.booleans(),
            "credit": st.one_of(EDGES, U64),
            "close": st.booleans(),
            "close_done": st.booleans(),
            # Frames protobuf encodes (a reset's Error), passed through add_encoded.
            "reset": st.one_of(st.none(), st.tuples(st.integers(0, 16), st.text(max_size=20))),
        }
    ),
    max_size=8,
)


def _write(writer: FrameWriter, frame: dict[str, object]) -> hvsock_pb2.RelayFrame:
    """Add ``frame`` to ``writer``; returns the RelayFrame protobuf builds from it."""
    fields = {k: v for k, v in frame.items() if k != "reset"}
    built = hvsock_pb2.RelayFrame(**fields)  # type: ignore[arg-type]
    if frame["reset"] is not None or frame["close_done"]:
        # The host's own frames, built as protobuf: they go in encoded.
        if frame["reset"] is not None:
            code, message = frame["reset"]  # type: ignore[misc]
            built.reset.code, built.reset.message = code, message
        writer.add_encoded(built.SerializeToString())
    else:
        data = fields.pop("data")
        del fields["close_done"]
        # Any buffer will do, unchanged until message().
        writer.add(data=memoryview(bytearray(data)), **fields)  # type: ignore[arg-type]
    return built


@given(frames=frames_strategy, session=st.text(max_size=40))
def test_a_request_parses_as_protobuf_builds_it(
    frames: list[dict[str, object]], session: str
) -> None:
    # Encoded protobuf messages concatenate into their merge: a session field then frames.
    prefix = hvsock_pb2.SessionDataRequest(session=session).SerializeToString()
    writer = FrameWriter(REQUEST_FRAMES)
    expected = hvsock_pb2.SessionDataRequest(session=session)
    for frame in frames:
        expected.frames.append(_write(writer, frame))
    assert hvsock_pb2.SessionDataRequest.FromString(prefix + writer.message()) == expected
    assert writer.count == len(frames)


@given(frames=frames_strategy)
def test_a_response_parses_as_protobuf_builds_it(frames: list[dict[str, object]]) -> None:
    writer = FrameWriter(RESPONSE_FRAMES)
    expected = hvsock_pb2.SessionDataResponse()
    for frame in frames:
        expected.frames.append(_write(writer, frame))
    assert hvsock_pb2.SessionDataResponse.FromString(writer.message()) == expected
    assert writer.data_bytes == sum(
        len(f["data"])
        for f in frames
        if f["reset"] is None and not f["close_done"]  # type: ignore[arg-type]
    )


@given(value=st.integers(1, 2**64 - 1))
def test_varints_are_protobufs(value: int) -> None:
    # A uint64 field (credit: field 4, key byte 0x20) is its key and then the varint.
    assert b"\x20" + encode_varint(value) == hvsock_pb2.RelayFrame(credit=value).SerializeToString()


@pytest.mark.parametrize("value", [-1, 2**64])
def test_values_out_of_range_are_refused(value: int) -> None:
    with pytest.raises(ValueError, match="varint"):
        encode_varint(value)
