"""The bridge's per-connection protocol, with fake transports (no network, no event loop)."""

from __future__ import annotations

import asyncio

import pytest

from hvsock_tools.bridge import Side, parse_endpoint

pytestmark = pytest.mark.unit


class FakeTransport(asyncio.Transport):
    """What ``Side`` uses of an asyncio transport; records what was written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.eof_written = False
        self.closed = False

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _side() -> tuple[Side, FakeTransport]:
    side, transport = Side(), FakeTransport()
    side.connection_made(transport)
    return side, transport


def test_a_new_side_does_not_read_until_linked() -> None:
    side, transport = _side()
    assert not transport.reading
    other, _ = _side()
    side.link(other)
    assert transport.reading


def test_bytes_and_eof_that_arrive_before_the_other_end_exists_are_passed_on() -> None:
    """Python 3.11.2's transports start reading after connection_made paused them: what the
    client sent meanwhile must reach the other end, in order, and reading must stop again."""
    accepted, accepted_transport = _side()
    accepted_transport.reading = True  # the transport's reader came on regardless
    accepted.buffer[:4] = b"GET "
    accepted.buffer_updated(4)
    assert not accepted_transport.reading  # stopped again until linked
    accepted.buffer[:2] = b"/\n"
    accepted.buffer_updated(2)
    assert accepted.eof_received()  # the client half-closed too; keep the other direction

    other, other_transport = _side()
    accepted.link(other)
    assert other_transport.written == b"GET /\n"
    assert other_transport.eof_written
    accepted.buffer[:3] = b"end"
    accepted.buffer_updated(3)
    assert other_transport.written == b"GET /\nend"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("garbage", "expected HOST:PORT, not 'garbage'"),
        ("tcp:127.0.0.1:http", "expected HOST:PORT, not '127.0.0.1:http'"),
        ("tcp:127.0.0.1:99999", "not a TCP port: 99999 (in '127.0.0.1:99999'; 0-65535)"),
        ("unix:", "unix: needs a path"),
        ("hv:5", "expected hv:VM:SERVICE, not 'hv:5'"),
    ],
)
def test_a_bad_endpoint_says_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_endpoint(text)
    assert str(info.value) == error
