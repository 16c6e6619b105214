"""``guest_client._relay.Link`` and early frames: the host may send a credited end's frames on
the SessionData stream before the attach stream's reader has built the end (the two streams are
not ordered); the link holds them until the end is registered. No network: the stream is a
fake call fed by the test."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from guest_client._pipe import MAX_FRAME_DATA
from guest_client._relay import MAX_REQUEST_DATA, Link
from hvsock.v1 import hvsock_pb2

pytestmark = pytest.mark.unit

_NOT_FOUND, _UNAVAILABLE = 5, 14


class _FakeCall:
    """The stream's responses, as the test hands them over: :meth:`send` returns once the link
    has handled the response (it asked for the next one)."""

    def __init__(self) -> None:
        self.responses: queue.SimpleQueue[hvsock_pb2.SessionDataResponse | None] = (
            queue.SimpleQueue()
        )
        self._asked = threading.Condition()
        self._asks = 0  # how many responses the link has asked for
        self._sent = 0
        #: The link's response deserializer: responses reach it as from the wire.
        self.deserialize: Any = None

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._asked:
                self._asks += 1
                self._asked.notify_all()
            response = self.responses.get()
            if response is None:
                return
            yield self.deserialize(response.SerializeToString())

    def send(self, *frames: hvsock_pb2.RelayFrame) -> None:
        self._sent += 1
        self.responses.put(hvsock_pb2.SessionDataResponse(frames=frames))
        with self._asked:
            assert self._asked.wait_for(lambda: self._asks > self._sent, timeout=10)

    def cancel(self) -> None:
        self.responses.put(None)


class _FakeChannel:
    def __init__(self) -> None:
        self.call = _FakeCall()

    def stream_stream(self, _method: str, response_deserializer: Any) -> Any:
        self.call.deserialize = response_deserializer
        return lambda _requests: self.call


def _channel(channel_id: int, credited: bool) -> hvsock_pb2.Channel:
    return hvsock_pb2.Channel(
        channel_id=channel_id,
        data_path=hvsock_pb2.DATA_PATH_GRPC_RELAY,
        geometry=hvsock_pb2.RingGeometry(send_ring_pages=2, recv_ring_pages=2, max_payload=4096),
        relay_send_limit=4000,
        relay_receive_window=8000,
        relay_receive_credited=credited,
    )


@pytest.fixture
def link() -> Iterator[tuple[Link, _FakeCall]]:
    fake = _FakeChannel()
    link = Link(fake, "session")  # type: ignore[arg-type]
    first = link.open_end(_channel(1, credited=False), 0)  # starts the stream thread
    assert first.pending()  # an end not credited queues its first credit
    yield link, fake.call
    link.close()


def _read_all(pipe: Any) -> bytes:
    got = bytearray()
    buffer = bytearray(64)
    while n := pipe.rx.read_into(buffer, 0, 5):
        got += buffer[:n]
    return bytes(got)


def test_frames_before_the_end_is_built_are_held_for_it(link: tuple[Link, _FakeCall]) -> None:
    link_, call = link
    call.send(
        hvsock_pb2.RelayFrame(channel_id=7, end=1, data=b"early "),
        hvsock_pb2.RelayFrame(channel_id=7, end=1, data=b"bytes", fin=True),
    )
    pipe = link_.open_end(_channel(7, credited=True), 1)
    assert not pipe.pending()  # credited as it opened: no first credit to send
    assert _read_all(pipe) == b"early bytes"  # in order, then EOF
    # The end is registered now: later frames go straight to it.
    other = link_.open_end(_channel(8, credited=True), 0)
    call.send(hvsock_pb2.RelayFrame(channel_id=8, end=0, data=b"late", fin=True))
    assert _read_all(other) == b"late"


def test_a_not_found_reset_for_an_unknown_end_is_not_held(link: tuple[Link, _FakeCall]) -> None:
    """The host's answer to frames that crossed a reset names an end the link forgot; were it
    held, a later end of that key would open reset (and the link would keep it forever)."""
    link_, call = link
    call.send(
        hvsock_pb2.RelayFrame(channel_id=9, end=0, reset=hvsock_pb2.Error(code=_NOT_FOUND)),
    )
    pipe = link_.open_end(_channel(9, credited=True), 0)
    assert not pipe.over
    call.send(hvsock_pb2.RelayFrame(channel_id=9, end=0, data=b"ok", fin=True))
    assert _read_all(pipe) == b"ok"


def test_an_end_reset_before_it_is_built_opens_over(link: tuple[Link, _FakeCall]) -> None:
    """A rescind can come right behind the opening: the end is built already over, its data
    readable, then EOF."""
    link_, call = link
    call.send(
        hvsock_pb2.RelayFrame(channel_id=11, end=0, data=b"last"),
        hvsock_pb2.RelayFrame(channel_id=11, end=0, reset=hvsock_pb2.Error(code=_UNAVAILABLE)),
    )
    pipe = link_.open_end(_channel(11, credited=True), 0)
    assert pipe.over and pipe.ended_by_host
    assert _read_all(pipe) == b"last"


def test_a_lone_busy_end_fills_each_request(link: tuple[Link, _FakeCall]) -> None:
    """An end with much queued goes out in requests of several full frames up to the request's
    data budget, not in a request per frame: every message costs each process on its way."""
    link_, _call = link
    channel = _channel(12, credited=True)
    channel.relay_send_limit = 3 * MAX_REQUEST_DATA
    pipe = link_.open_end(channel, 0)
    data = bytes(range(256)) * (2 * MAX_REQUEST_DATA // 256)
    pipe.tx.write_all(data, 5)
    requests = link_._requests()  # the stream's requests, pulled here instead of by gRPC
    assert hvsock_pb2.SessionDataRequest.FromString(next(requests)).session == "session"
    sent, sizes = bytearray(), []
    while len(sent) < len(data):
        request = hvsock_pb2.SessionDataRequest.FromString(next(requests))
        frames = [frame for frame in request.frames if frame.channel_id == 12]
        sizes.append(sum(len(frame.data) for frame in frames))
        assert all(len(frame.data) <= MAX_FRAME_DATA for frame in frames)
        for frame in frames:
            sent += frame.data
    assert bytes(sent) == data
    assert sizes == [MAX_REQUEST_DATA, len(data) - MAX_REQUEST_DATA]


def test_busy_ends_side_by_side_take_a_frame_each_in_turn(link: tuple[Link, _FakeCall]) -> None:
    """Two ends with much queued share each request frame by frame: neither waits behind a
    whole request of the other's."""
    link_, _call = link
    pipes = []
    for channel_id in (13, 14):
        channel = _channel(channel_id, credited=True)
        channel.relay_send_limit = 3 * MAX_REQUEST_DATA
        pipes.append(link_.open_end(channel, 0))
    for pipe in pipes:
        pipe.tx.write_all(bytes(2 * MAX_FRAME_DATA), 5)
    requests = link_._requests()
    next(requests)  # the session
    request = hvsock_pb2.SessionDataRequest.FromString(next(requests))
    data_frames = [(f.channel_id, len(f.data)) for f in request.frames if f.data]
    assert data_frames == [(13, MAX_FRAME_DATA), (14, MAX_FRAME_DATA)]
