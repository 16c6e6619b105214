"""The guest library's early frames (guest_client._relay.Link) against a model: whatever the
interleaving of the host's frames on the SessionData stream and the ends' openings on the attach
stream (the two are not ordered), every end reads exactly its bytes in order and then EOF, a
NOT_FOUND reset for an end nobody holds changes nothing, and the link holds no frame afterwards.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_client._relay import Link, _decode_frames
from hvsock.v1 import hvsock_pb2

pytestmark = pytest.mark.property

_NOT_FOUND = 5


class _NoStream:
    """A gRPC channel whose stream is never opened: the test routes frames itself."""

    def stream_stream(self, *_args: Any, **_kwargs: Any) -> Any:
        def open_stream(_requests: Any) -> Any:
            raise AssertionError("the stream is not opened in this test")

        return open_stream


def _channel(channel_id: int) -> hvsock_pb2.Channel:
    return hvsock_pb2.Channel(
        channel_id=channel_id,
        data_path=hvsock_pb2.DATA_PATH_GRPC_RELAY,
        geometry=hvsock_pb2.RingGeometry(send_ring_pages=2, recv_ring_pages=2, max_payload=4096),
        relay_send_limit=4000,
        relay_receive_window=1 << 20,
        relay_receive_credited=True,
    )


# Per end (channel id = position + 1, end 0 or 1): its data chunks. Each end's frames are the
# chunks, then a FIN; the schedule says, step by step, which end's next frame arrives (or that
# the end is opened, or that a stray NOT_FOUND reset arrives).
ends_strategy = st.lists(
    st.tuples(st.integers(0, 1), st.lists(st.binary(min_size=1, max_size=64), max_size=4)),
    min_size=1,
    max_size=5,
)


@given(ends=ends_strategy, data=st.data())
def test_every_end_reads_its_bytes_whatever_the_interleaving(
    ends: list[tuple[int, list[bytes]]], data: st.DataObject
) -> None:
    link = Link(_NoStream(), "session")  # type: ignore[arg-type]
    link._started = True  # the stream's thread is this test
    keys = [(i + 1, end) for i, (end, _) in enumerate(ends)]
    frames = {
        key: [hvsock_pb2.RelayFrame(channel_id=key[0], end=key[1], data=c) for c in chunks]
        + [hvsock_pb2.RelayFrame(channel_id=key[0], end=key[1], fin=True)]
        for key, (_, chunks) in zip(keys, ends, strict=True)
    }
    # One token per frame to deliver, one per opening and a few stray resets, shuffled; a
    # key's frames keep their order (they are popped from the front).
    tokens = [("frame", k) for k in keys for _ in frames[k]] + [("open", k) for k in keys]
    tokens += [("stray", (100 + n, n % 2)) for n in range(data.draw(st.integers(0, 3)))]
    order = data.draw(st.permutations(tokens))
    pipes: dict[tuple[int, int], Any] = {}
    for kind, key in order:
        if kind == "open":
            pipes[key] = link.open_end(_channel(key[0]), key[1])
            assert not pipes[key].pending()  # credited: no first credit to send
        else:
            if kind == "frame":
                frame = frames[key].pop(0)
            else:
                frame = hvsock_pb2.RelayFrame(
                    channel_id=key[0], end=key[1], reset=hvsock_pb2.Error(code=_NOT_FOUND)
                )
            # As the stream thread gets it: decoded from the wire (data a view of the message).
            response = hvsock_pb2.SessionDataResponse(frames=[frame]).SerializeToString()
            with link.lock:
                link._route(_decode_frames(response))
    assert not link._early
    buffer = bytearray(512)
    for key, (_, chunks) in zip(keys, ends, strict=True):
        got = bytearray()
        while n := pipes[key].rx.read_into(buffer, 0, 0):
            got += buffer[:n]
        assert bytes(got) == b"".join(chunks)
