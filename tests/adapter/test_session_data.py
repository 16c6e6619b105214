"""The SessionData servicer in process: windows as the Channel message states them, hostile
frames answered per channel, and a session stream that stops reading costing nobody else."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc
import pytest

from host_service.core.relay import DEFAULT_RELAY_WINDOW
from hvsock.v1 import hvsock_pb2
from hvsock_common import addresses

from .harness import AttachStream, InProcessHost, in_process_host

pytestmark = pytest.mark.adapter

SERVICE = addresses.service_id_for_port(5100)
_NAMES = itertools.count(1)


async def _attached(h: InProcessHost) -> tuple[AttachStream, AttachStream, str]:
    """(guest, root, service): a new VM's session and the host's, the root listening on
    ``service`` with auto-accept credit for two connects."""
    number = next(_NAMES)
    service = addresses.service_id_for_port(5100 + number)
    created = await h.admin.CreatePartition(
        hvsock_pb2.CreatePartitionRequest(name=f"vm{number}"), metadata=h.admin_metadata
    )
    root = await h.attach(hvsock_pb2.Hello(host=True, token=h.token))
    guest = await h.attach(hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token))
    listening = await root.request(
        listen=hvsock_pb2.Listen(
            address=hvsock_pb2.Address(vm_id=addresses.WILDCARD, service_id=service),
            auto_accept=2,
        )
    )
    assert listening.HasField("listening"), listening
    return guest, root, service


async def _connect(
    guest: AttachStream, root: AttachStream, service: str, **connect: Any
) -> tuple[Any, Any]:
    """(guest's Channel, root's Channel): a relayed channel, guest -> host."""
    opened = await guest.request(
        connect=hvsock_pb2.Connect(
            remote=hvsock_pb2.Address(vm_id=addresses.PARENT, service_id=service), **connect
        )
    )
    assert opened.HasField("opened"), opened
    theirs = await root.next_unsolicited()
    assert theirs.HasField("opened"), theirs
    return opened.opened, theirs.opened


async def _pair(h: InProcessHost, **connect: Any) -> tuple[AttachStream, AttachStream, Any, Any]:
    """(guest, root, guest's Channel, root's Channel): a relayed channel, guest -> host."""
    guest, root, service = await _attached(h)
    mine, theirs = await _connect(guest, root, service, **connect)
    return guest, root, mine, theirs


async def _first(stream: Any, attached: AttachStream, *frames: hvsock_pb2.RelayFrame) -> None:
    """A SessionData stream's first request: the session of ``attached``, with ``frames``."""
    session = attached.welcome.session  # type: ignore[union-attr]
    await stream.write(hvsock_pb2.SessionDataRequest(session=session, frames=frames))


async def _frames(call: Any) -> list[hvsock_pb2.RelayFrame]:
    response = await asyncio.wait_for(call.read(), 5)
    assert response is not grpc.aio.EOF
    return list(response.frames)


async def _until_unknown_answered(call: Any) -> list[hvsock_pb2.RelayFrame]:
    """The frames that come before the host's NOT_FOUND answer to a frame for channel 99."""
    before: list[hvsock_pb2.RelayFrame] = []
    while True:
        for frame in await _frames(call):
            if frame.channel_id == 99:
                assert frame.reset.code == grpc.StatusCode.NOT_FOUND.value[0], frame
                return before
            before.append(frame)


async def test_the_first_send_limit_is_the_ring_room_plus_the_window() -> None:
    async with in_process_host(relay_window=100_000) as h:
        _guest, _root, mine, theirs = await _pair(h)
        assert mine.data_path == hvsock_pb2.DATA_PATH_GRPC_RELAY
        assert mine.relay_window == 100_000 and theirs.relay_window == 100_000
        room = mine.relay_send_limit - 100_000
        assert 4000 < room < 4096  # the 2-page ring, less its framing
        assert theirs.relay_receive_window == room + 100_000  # the same ring, read by root
        # No stream was open as they opened: nothing comes to either before its first credit.
        assert not mine.relay_receive_credited and not theirs.relay_receive_credited
        _, _, mine, _ = await _pair(h, relay_window=0)
        assert mine.relay_window == 0 and mine.relay_send_limit == room


async def test_a_window_above_the_maximum_is_refused() -> None:
    async with in_process_host() as h:
        created = await h.admin.CreatePartition(
            hvsock_pb2.CreatePartitionRequest(name="big"), metadata=h.admin_metadata
        )
        guest = await h.attach(hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token))
        answer = await guest.request(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=addresses.PARENT, service_id=SERVICE),
                relay_window=16 * 1024 * 1024 + 1,
            )
        )
        assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer
        assert "relay_window is at most" in answer.error.message


async def test_data_flows_and_hostile_frames_reset_only_their_channel() -> None:
    async with in_process_host() as h:
        guest, root, mine, _theirs = await _pair(h)
        cid = mine.channel_id
        gs, rs = h.host_api.SessionData(), h.host_api.SessionData()
        await _first(rs, root, hvsock_pb2.RelayFrame(channel_id=cid, end=1, credit=1 << 20))
        await _first(
            gs,
            guest,
            hvsock_pb2.RelayFrame(channel_id=cid, end=0, data=b"hello", fin=True),
            # Another session's channel, seen from here: unknown.
            hvsock_pb2.RelayFrame(channel_id=cid, end=1, data=b"x"),
        )
        (reset,) = await _frames(gs)
        assert (reset.channel_id, reset.end) == (cid, 1)
        assert reset.reset.code == grpc.StatusCode.NOT_FOUND.value[0]
        got = b""
        fin = False
        while not fin:
            for frame in await _frames(rs):
                got += frame.data
                fin = fin or frame.fin
        assert got == b"hello"
        # The root's end breaks a rule: only that end is reset (and the channel rescinded).
        await rs.write(
            hvsock_pb2.SessionDataRequest(
                frames=[hvsock_pb2.RelayFrame(channel_id=cid, end=1, data=bytes(262145))]
            )
        )
        frames = await _frames(rs)
        assert frames[-1].reset.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], frames
        assert "exceeds 262144" in frames[-1].reset.message
        # The guest's end hears the rescind on its stream (after its data), the streams live on.
        (rescinded,) = await _frames(gs)
        assert rescinded.reset.code == grpc.StatusCode.UNAVAILABLE.value[0], rescinded
        await gs.write(
            hvsock_pb2.SessionDataRequest(frames=[hvsock_pb2.RelayFrame(channel_id=99, credit=1)])
        )
        (unknown,) = await _frames(gs)
        assert unknown.reset.code == grpc.StatusCode.NOT_FOUND.value[0]
        gs.cancel()
        rs.cancel()


async def test_a_second_stream_and_a_bad_session_are_refused() -> None:
    async with in_process_host() as h:
        guest, _root, _mine, _theirs = await _pair(h)
        first = h.host_api.SessionData()
        await first.write(
            hvsock_pb2.SessionDataRequest(
                session=guest.welcome.session,  # type: ignore[union-attr]
                frames=[hvsock_pb2.RelayFrame(channel_id=77, credit=1)],
            )
        )
        await _frames(first)  # running
        for session, code in (
            (guest.welcome.session, grpc.StatusCode.FAILED_PRECONDITION),  # type: ignore[union-attr]
            ("forged", grpc.StatusCode.UNAUTHENTICATED),
        ):
            second = h.host_api.SessionData()
            await second.write(hvsock_pb2.SessionDataRequest(session=session))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await second.read()
            assert caught.value.code() == code
        first.cancel()


async def test_a_stream_that_stops_reading_costs_only_its_own_channel() -> None:
    async with in_process_host() as h:
        guest, root, mine, _theirs = await _pair(h)
        cid = mine.channel_id
        # The guest grants a lot of credit and never reads its stream; root floods it.
        gs, rs = h.host_api.SessionData(), h.host_api.SessionData()
        await gs.write(
            hvsock_pb2.SessionDataRequest(
                session=guest.welcome.session,  # type: ignore[union-attr]
                frames=[hvsock_pb2.RelayFrame(channel_id=cid, end=0, credit=1 << 40)],
            )
        )
        await rs.write(
            hvsock_pb2.SessionDataRequest(session=root.welcome.session)  # type: ignore[union-attr]
        )
        # What the host may hold: the window, plus what gRPC's flow control and the guest
        # stream's unsent queue take (about 5 MiB, measured with 1 and 4 MiB windows).
        bound = DEFAULT_RELAY_WINDOW + (6 << 20)
        limit = _theirs.relay_send_limit
        sent = stalls = 0
        # A read is kept across waits for credit: cancelling one would cancel the stream.
        reading: asyncio.Future[Any] | None = None
        while sent < 2 * bound and stalls < 3:
            chunk = min(262144, limit - sent)
            if chunk <= 0:
                reading = reading or asyncio.ensure_future(rs.read())
                if not (await asyncio.wait({reading}, timeout=0.2))[0]:
                    stalls += 1
                    continue
                frames, reading = reading.result(), None
                limit = max([limit, *(f.credit for f in frames.frames)])
                continue
            await rs.write(
                hvsock_pb2.SessionDataRequest(
                    frames=[hvsock_pb2.RelayFrame(channel_id=cid, end=1, data=bytes(chunk))]
                )
            )
            sent += chunk
        # The host holds a bounded amount; the root is held at its limit, and everyone else
        # is served: a new partition attaches and lists.
        assert sent < bound
        other = await h.attach(hvsock_pb2.Hello(host=True, token=h.token))
        assert (await other.request(unlisten=hvsock_pb2.Unlisten(listener_id=424242))).HasField(
            "error"
        )
        gs.cancel()
        rs.cancel()


async def test_idle_relayed_ends_hold_no_thread() -> None:
    # Both ends of 16 channels relayed, each having moved a message each way: afterwards every
    # reader is parked in the ring watcher (a thread per 127 waits), no writer runs, and no
    # pump holds a worker (issue 12, item 5).
    from host_service import ringrelay

    # On rings with pumps (--relay-rings): both ends relayed are forwarded otherwise.
    async with in_process_host(forward=False) as h:
        pairs = [await _pair(h) for _ in range(16)]
        streams = []
        for guest, root, mine, theirs in pairs:
            for attach, end, channel in ((guest, 0, mine), (root, 1, theirs)):
                call = h.host_api.SessionData()
                await call.write(
                    hvsock_pb2.SessionDataRequest(
                        session=attach.welcome.session,  # type: ignore[union-attr]
                        frames=[
                            hvsock_pb2.RelayFrame(
                                channel_id=mine.channel_id,
                                end=end,
                                credit=channel.relay_receive_window,
                                data=b"ping" if end == 0 else b"pong",
                            )
                        ],
                    )
                )
                streams.append((call, end))
        for call, end in streams:
            got = b""
            while len(got) < 4:
                for frame in await _frames(call):
                    got += frame.data
            assert got == (b"pong" if end == 0 else b"ping")
        ids = {mine.channel_id for _, _, mine, _ in pairs}
        relays = [
            relay
            for attachment in h.host.attachments.values()
            for relay in attachment.data.relays.values()
            if relay.channel_id in ids
        ]
        assert len(relays) == 32

        def parked() -> bool:
            return all(
                r._rx_watch is not None and not r._tx_active and r._alive == 1 for r in relays
            )

        await h.until(parked)
        # 32 waits: one futex_waitv sleeper (two if another test's waits are still armed).
        assert ringrelay._WATCHER.threads <= 2
        for call, _ in streams:
            call.cancel()


@pytest.mark.parametrize("forward", [True, False], ids=["forwarded", "on-rings"])
async def test_an_end_opening_on_a_stream_that_takes_early_frames_is_credited(
    forward: bool,
) -> None:
    """SessionDataRequest.early_frames: an end that opens while its session's stream said so is
    credited with its receive window at once (Channel.relay_receive_credited), so its peer's
    data and FIN reach it with no credit from it; an end of a stream that did not say so gets
    nothing before its first credit, as before (nor does one that opens with no stream open:
    see the first test)."""
    async with in_process_host(forward=forward) as h:
        guest, root, service = await _attached(h)
        gs, rs = h.host_api.SessionData(), h.host_api.SessionData()
        guest_session = guest.welcome.session  # type: ignore[union-attr]
        await gs.write(hvsock_pb2.SessionDataRequest(session=guest_session, early_frames=True))
        await rs.write(
            hvsock_pb2.SessionDataRequest(session=root.welcome.session)  # type: ignore[union-attr]
        )
        # Both streams are open (the host has read their first requests) once a frame for an
        # unknown channel is answered on each.
        for stream in (gs, rs):
            await stream.write(
                hvsock_pb2.SessionDataRequest(
                    frames=[hvsock_pb2.RelayFrame(channel_id=99, credit=1)]
                )
            )
            await _until_unknown_answered(stream)
        mine, theirs = await _connect(guest, root, service)
        assert mine.relay_receive_credited and not theirs.relay_receive_credited
        cid = mine.channel_id
        # The root's data and FIN come to the guest, which never granted anything.
        await rs.write(
            hvsock_pb2.SessionDataRequest(
                frames=[hvsock_pb2.RelayFrame(channel_id=cid, end=1, data=b"first", fin=True)]
            )
        )
        got, fin = b"", False
        while not fin:
            for frame in await _frames(gs):
                assert (frame.channel_id, frame.end) == (cid, 0), frame
                assert not frame.HasField("reset"), frame
                got += frame.data
                fin = fin or frame.fin
        assert got == b"first"
        # The other way, nothing comes before the root's first credit: once the host has
        # taken the guest's data (it answers the unknown channel behind it), the root's next
        # frame is the answer to its own unknown channel, not data.
        await gs.write(
            hvsock_pb2.SessionDataRequest(
                frames=[
                    hvsock_pb2.RelayFrame(channel_id=cid, end=0, data=b"back"),
                    hvsock_pb2.RelayFrame(channel_id=99, credit=1),
                ]
            )
        )
        await _until_unknown_answered(gs)
        await rs.write(
            hvsock_pb2.SessionDataRequest(frames=[hvsock_pb2.RelayFrame(channel_id=99, credit=1)])
        )
        assert not any(frame.data for frame in await _until_unknown_answered(rs))
        await rs.write(
            hvsock_pb2.SessionDataRequest(
                frames=[
                    hvsock_pb2.RelayFrame(channel_id=cid, end=1, credit=theirs.relay_receive_window)
                ]
            )
        )
        got = b""
        while len(got) < 4:
            for frame in await _frames(rs):
                got += frame.data
        assert got == b"back"
        gs.cancel()
        rs.cancel()


@pytest.mark.parametrize("forward", [True, False], ids=["forwarded", "on-rings"])
async def test_ends_that_close_before_granting_are_both_closed(forward: bool) -> None:
    """A client that closes its end without ever granting credit (it never meant to read) must
    not hold its peer's close: each end's close completes (close_done) though neither granted."""
    async with in_process_host(forward=forward) as h:
        guest, root, mine, _theirs = await _pair(h)
        cid = mine.channel_id
        gs, rs = h.host_api.SessionData(), h.host_api.SessionData()
        for stream, attached, end in ((gs, guest, 0), (rs, root, 1)):
            await _first(
                stream, attached, hvsock_pb2.RelayFrame(channel_id=cid, end=end, close=True)
            )
        for stream in (gs, rs):
            frames: list[hvsock_pb2.RelayFrame] = []
            while not any(frame.close_done for frame in frames):
                frames += await _frames(stream)
            assert not any(frame.HasField("reset") for frame in frames), frames
        gs.cancel()
        rs.cancel()


@pytest.mark.parametrize("forward", [True, False], ids=["forwarded", "on-rings"])
async def test_an_end_that_grants_after_both_fins_still_reads_what_was_sent(
    forward: bool,
) -> None:
    """Both ends shut down writing, one of them before it granted any credit: the channel is
    over (both FINs; the host rescinds it), but what the peer sent before its FIN is still that
    end's to read, as on Hyper-V, where the rescind leaves the ring's data readable. Once it
    grants, it gets the data, then the end of the stream (FIN or the rescind's reset)."""
    async with in_process_host(forward=forward) as h:
        guest, root, mine, _theirs = await _pair(h)
        cid = mine.channel_id
        gs, rs = h.host_api.SessionData(), h.host_api.SessionData()
        await _first(
            gs, guest, hvsock_pb2.RelayFrame(channel_id=cid, end=0, data=b"hello", fin=True)
        )
        await _first(rs, root, hvsock_pb2.RelayFrame(channel_id=cid, end=1, fin=True))
        # The channel is over once the guest's end hears of it (the root's FIN, or the reset
        # of the channel rescinded on both FINs: it granted nothing, so that waits for it).
        await gs.write(
            hvsock_pb2.SessionDataRequest(
                frames=[hvsock_pb2.RelayFrame(channel_id=cid, end=0, credit=1 << 20)]
            )
        )
        while not any(frame.fin or frame.HasField("reset") for frame in await _frames(gs)):
            pass
        await rs.write(
            hvsock_pb2.SessionDataRequest(
                frames=[hvsock_pb2.RelayFrame(channel_id=cid, end=1, credit=1 << 20)]
            )
        )
        got, last = b"", None
        while last is None:
            for frame in await _frames(rs):
                assert (frame.channel_id, frame.end) == (cid, 1), frame
                got += frame.data
                if frame.fin or frame.HasField("reset"):
                    last = frame
        assert got == b"hello"
        assert last.fin or last.reset.code == grpc.StatusCode.UNAVAILABLE.value[0], last
        gs.cancel()
        rs.cancel()
