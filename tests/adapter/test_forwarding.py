"""Channels relayed at both ends, in process: no rings, frames passed stream to stream, with
the window, FIN and close, hostile frames, pause/resume and the channel listing as on a ring.

(In process every end is relayed, so every channel of tests/adapter is forwarded; these tests
check what is particular to forwarding.)
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from host_service.core.types import Side
from hvsock.v1 import hvsock_pb2
from hvsock_common import addresses
from ring import ring_capacity, shm
from ring._constants import MAX_PAYLOAD

from .harness import InProcessHost, in_process_host
from .test_session_data import _pair

pytestmark = pytest.mark.adapter

_PORTS = itertools.count(5300)
#: A channel id no test opens: a frame for it is answered NOT_FOUND, after those before it.
PROBE = 99_999


class Stream:
    """One session's SessionData stream, and what came on it per end."""

    def __init__(self, h: InProcessHost) -> None:
        self.call = h.host_api.SessionData()
        self.data: dict[tuple[int, int], bytearray] = {}
        self.frames: list[hvsock_pb2.RelayFrame] = []  # taken, in order
        self._backlog: list[hvsock_pb2.RelayFrame] = []

    async def open(self, session: str, *frames: hvsock_pb2.RelayFrame) -> None:
        await self.call.write(hvsock_pb2.SessionDataRequest(session=session, frames=frames))

    async def send(self, *frames: hvsock_pb2.RelayFrame) -> None:
        await self.call.write(hvsock_pb2.SessionDataRequest(frames=frames))

    async def until(
        self, condition: Callable[[hvsock_pb2.RelayFrame], bool]
    ) -> hvsock_pb2.RelayFrame:
        """Take frames until one meets ``condition``; return it (frames after it in the same
        response are kept for the next call)."""
        while True:
            while self._backlog:
                frame = self._backlog.pop(0)
                self.frames.append(frame)
                self.data.setdefault((frame.channel_id, frame.end), bytearray()).extend(frame.data)
                if condition(frame):
                    return frame
            response = await asyncio.wait_for(self.call.read(), 5)
            assert response is not grpc.aio.EOF
            self._backlog.extend(response.frames)

    def got(self, cid: int, end: int) -> bytes:
        return bytes(self.data.get((cid, end), b""))


def frame(cid: int, end: int, **fields: Any) -> hvsock_pb2.RelayFrame:
    return hvsock_pb2.RelayFrame(channel_id=cid, end=end, **fields)


async def _streams(h: InProcessHost, **connect: Any) -> tuple[Any, Any, Stream, Stream, Any]:
    """A forwarded channel guest (end 0) -> root (end 1), both streams open, each end having
    granted its first credit (its receive window): (mine, theirs, guest stream, root stream,
    the attach streams)."""
    guest, root, mine, theirs = await _pair(h, **connect)
    gs, rs = Stream(h), Stream(h)
    cid = mine.channel_id
    await gs.open(guest.welcome.session, frame(cid, 0, credit=mine.relay_receive_window))
    await rs.open(root.welcome.session, frame(cid, 1, credit=theirs.relay_receive_window))
    for stream in (gs, rs):  # the answer to a frame behind the credit: the host took it
        await stream.send(frame(PROBE, 0, credit=1))
        await stream.until(lambda f: f.channel_id == PROBE)
    return mine, theirs, gs, rs, (guest, root)


async def test_both_ends_relayed_means_no_rings_and_frames_in_order() -> None:
    async with in_process_host() as h:
        mine, _theirs, gs, rs, _ = await _streams(h)
        cid = mine.channel_id
        assert h.host.dataplane.forwarded(cid)
        assert h.host.dataplane.ring_used(cid) == (0, 0)
        await gs.send(frame(cid, 0, data=b"to root"), frame(cid, 0, data=b"!", fin=True))
        await rs.until(lambda f: f.fin)
        assert rs.got(cid, 1) == b"to root!"
        await rs.send(frame(cid, 1, data=b"to guest", close=True))
        await rs.until(lambda f: f.close_done)
        # Both ends are past FIN and one closed: the channel goes, and the other end hears the
        # rescind behind the data and the FIN, as from a ring.
        await gs.until(lambda f: f.fin)
        assert gs.got(cid, 0) == b"to guest"
        reset = await gs.until(lambda f: f.HasField("reset"))
        assert reset.reset.code == grpc.StatusCode.UNAVAILABLE.value[0], reset
        await h.until(lambda: not h.host.dataplane.forwarded(cid))
        listed = await h.admin.ListChannels(
            hvsock_pb2.ListChannelsRequest(), metadata=h.admin_metadata
        )
        assert cid not in [c.channel_id for c in listed.channels]
        gs.call.cancel()
        rs.call.cancel()


async def test_the_strict_window_keeps_exactly_a_ring_in_flight() -> None:
    async with in_process_host(relay_window=0) as h:
        mine, theirs, gs, rs, _ = await _streams(h)
        cid = mine.channel_id
        ring = mine.relay_send_limit
        assert theirs.relay_receive_window == ring  # the root accepts a ring's worth
        await gs.send(frame(cid, 0, data=bytes(ring)))
        await rs.until(lambda f: len(rs.got(cid, 1)) == ring)
        # Nothing consumed: the guest may send nothing more. The root reads 1000 bytes and
        # grants them back: the guest's next limit is exactly that much further.
        await rs.send(frame(cid, 1, credit=ring + 1000))
        credit = await gs.until(lambda f: f.credit > 0)
        assert credit.credit == ring + 1000
        status = (
            await h.admin.ListChannels(hvsock_pb2.ListChannelsRequest(), metadata=h.admin_metadata)
        ).channels
        (channel,) = [c for c in status if c.channel_id == cid]
        assert channel.to_listener.bytes == ring
        assert channel.to_listener.ring_used == ring - 1000  # in flight, as a ring would hold
        gs.call.cancel()
        rs.call.cancel()


async def test_the_fill_is_what_the_receiver_has_not_consumed() -> None:
    async with in_process_host() as h:
        mine, theirs, gs, rs, _ = await _streams(h)
        cid = mine.channel_id
        await gs.send(frame(cid, 0, data=b"c" * 3000))
        await rs.until(lambda f: len(rs.got(cid, 1)) == 3000)
        assert h.host.dataplane.ring_used(cid) == (3000, 0)
        assert h.host.dataplane.bytes_sent(cid, Side.CONNECTOR) == 3000
        await rs.send(frame(cid, 1, credit=theirs.relay_receive_window + 3000))
        await h.until(lambda: h.host.dataplane.ring_used(cid) == (0, 0))
        gs.call.cancel()
        rs.call.cancel()


@pytest.mark.parametrize("broken", ["beyond the limit", "data after fin"])
async def test_a_broken_rule_resets_the_sender_and_the_peer_gets_what_came_first(
    broken: str,
) -> None:
    async with in_process_host(relay_window=1000) as h:
        mine, _theirs, gs, rs, _ = await _streams(h)
        cid = mine.channel_id
        if broken == "beyond the limit":
            await gs.send(frame(cid, 0, data=b"ok"))
            await gs.send(frame(cid, 0, data=bytes(mine.relay_send_limit)))
            expected = "beyond the send limit"
        else:
            await gs.send(frame(cid, 0, data=b"ok", fin=True), frame(cid, 0, data=b"late"))
            expected = "data after fin"
        reset = await gs.until(lambda f: f.HasField("reset"))
        assert reset.reset.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert expected in reset.reset.message
        # The peer: what came before, (the FIN if it came), then the rescind.
        rescinded = await rs.until(lambda f: f.HasField("reset"))
        assert rescinded.reset.code == grpc.StatusCode.UNAVAILABLE.value[0], rescinded
        assert rs.got(cid, 1) == b"ok"
        assert any(f.fin for f in rs.frames) == (broken == "data after fin")
        # Both streams serve on: a frame for a channel now unknown is answered NOT_FOUND.
        for stream, end in ((gs, 0), (rs, 1)):
            await stream.send(frame(cid, end, credit=1 << 30))
            unknown = await stream.until(lambda f: f.HasField("reset"))
            assert unknown.reset.code == grpc.StatusCode.NOT_FOUND.value[0]
        await h.until(lambda: not h.host.dataplane.forwarded(cid))
        gs.call.cancel()
        rs.call.cancel()


async def test_a_pause_holds_data_and_close_in_the_host_and_resume_delivers_them() -> None:
    async with in_process_host() as h:
        mine, _theirs, gs, rs, (guest, _root) = await _streams(h)
        cid = mine.channel_id
        vm_id = guest.welcome.vm_id
        await h.admin.PausePartition(
            hvsock_pb2.PausePartitionRequest(vm_id=vm_id), metadata=h.admin_metadata
        )
        # A frame for an unknown channel behind them: its answer says the host took the rest.
        await gs.send(frame(cid, 0, data=b"held"), frame(cid, 0, close=True))
        await gs.send(frame(PROBE, 0, credit=1))
        await gs.until(lambda f: f.channel_id == PROBE)
        assert h.host.dataplane.bytes_sent(cid, Side.CONNECTOR) == 0  # nothing went
        assert not [f for f in gs.frames if f.close_done]
        await h.admin.ResumePartition(
            hvsock_pb2.ResumePartitionRequest(vm_id=vm_id), metadata=h.admin_metadata
        )
        await rs.until(lambda f: f.fin)
        assert rs.got(cid, 1) == b"held"
        await gs.until(lambda f: f.close_done)
        gs.call.cancel()
        rs.call.cancel()


async def test_a_stall_of_one_direction_leaves_the_other_flowing() -> None:
    async with in_process_host() as h:
        mine, _theirs, gs, rs, _ = await _streams(h)
        cid = mine.channel_id
        h.host.dataplane.stall(cid, Side.CONNECTOR)  # the ring the connector writes
        await gs.send(frame(cid, 0, data=b"stalled"))
        await rs.send(frame(cid, 1, data=b"flowing"))
        await gs.until(lambda f: len(gs.got(cid, 0)) == 7)
        assert gs.got(cid, 0) == b"flowing"
        await gs.send(frame(PROBE, 0, credit=1))  # the host has taken the guest's data
        await gs.until(lambda f: f.channel_id == PROBE)
        assert h.host.dataplane.bytes_sent(cid, Side.CONNECTOR) == 0
        h.host.dataplane.unstall(cid)
        await rs.until(lambda f: len(rs.got(cid, 1)) == 7)
        assert rs.got(cid, 1) == b"stalled"
        gs.call.cancel()
        rs.call.cancel()


async def test_a_stream_gone_resets_the_peer_behind_what_was_forwarded() -> None:
    async with in_process_host() as h:
        mine, _theirs, gs, rs, _ = await _streams(h)
        cid = mine.channel_id
        await gs.send(frame(cid, 0, data=b"last words"))
        await rs.until(lambda f: len(rs.got(cid, 1)) == 10)
        gs.call.cancel()
        reset = await rs.until(lambda f: f.HasField("reset"))
        assert reset.reset.code == grpc.StatusCode.UNAVAILABLE.value[0]
        await h.until(lambda: not h.host.dataplane.forwarded(cid))
        rs.call.cancel()


async def test_a_loopback_channel_forwards_between_the_two_ends_of_one_session() -> None:
    async with in_process_host() as h:
        root = await h.attach(hvsock_pb2.Hello(host=True, token=h.token))
        service = addresses.service_id_for_port(next(_PORTS))
        listening = await root.request(
            listen=hvsock_pb2.Listen(
                address=hvsock_pb2.Address(vm_id=addresses.WILDCARD, service_id=service),
                auto_accept=1,
            )
        )
        assert listening.HasField("listening"), listening
        opened = await root.request(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=addresses.LOOPBACK, service_id=service)
            )
        )
        accepted = await root.next_unsolicited()
        assert opened.HasField("opened") and accepted.HasField("opened")
        cid = opened.opened.channel_id
        assert h.host.dataplane.forwarded(cid)
        s = Stream(h)
        await s.open(
            root.welcome.session,  # type: ignore[union-attr]
            frame(cid, 0, credit=opened.opened.relay_receive_window),
            frame(cid, 1, credit=accepted.opened.relay_receive_window),
            frame(cid, 0, data=b"ping"),
        )
        await s.until(lambda f: (f.channel_id, f.end) == (cid, 1) and len(f.data) > 0)
        await s.send(frame(cid, 1, data=b"pong", fin=True))
        await s.until(lambda f: f.end == 0 and f.fin)
        assert (s.got(cid, 1), s.got(cid, 0)) == (b"ping", b"pong")
        s.call.cancel()


@pytest.mark.parametrize("pages", [2, 3, 4, 17, 64])
def test_the_limits_told_before_any_ring_exists_are_an_empty_rings(pages: int) -> None:
    """A relayed first end is told its limits before its rings are made (if ever): they must
    be what the rings, once made, give (dataplane._settle relies on it)."""
    broker = shm.Channel.create(pages, 2, end=None)
    try:
        end = shm.Channel.attach_fd(broker.fileno(), end=0)
        try:
            assert ring_capacity(pages, MAX_PAYLOAD) == end.tx.writable()
        finally:
            end.close()
    finally:
        broker.close()
