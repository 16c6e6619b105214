"""Bad input against a live host: every failure has its precise status, nothing leaks.

Each test ends by checking the invariants of a healthy host: the server still answers, the
other partition still works, no channel is left (ListChannels) and the private shared-memory
directory holds nothing but what a live attachment legitimately owns.
"""

from __future__ import annotations

import errno
import pathlib
import queue
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc

from .hostproc import HostProcess, run_host
from .rawclient import RawPartition, RelayStream
from .test_host_api import (
    PARENT,
    SERVICE,
    WILDCARD,
    attach_host,
    attach_vm,
    create_vm,
    open_pair,
    prove,
)

pytestmark = pytest.mark.integration

BAD_GUIDS = [
    "",
    "not-a-guid",
    "3049197c-facb-11e6-bd58-64006a7986d",
    "{" + "0" * 36 + "}",
    "x" * 500,
]


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path, "--max-queued-responses", "200") as process:
        yield process


def errno_of(error: grpc.RpcError) -> int | None:
    """The ErrnoDetail in the rich status of a failed call, or None."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        found = hvsock_pb2.ErrnoDetail()
        if detail.Unpack(found):
            return found.errno
    return None


def admin_call(host: HostProcess, method: str, request: Any, metadata: Any = None) -> Any:
    channel, admin = host.admin()
    with channel:
        return getattr(admin, method)(
            request, metadata=host.metadata if metadata is None else metadata, timeout=10
        )


def attach_error(host: HostProcess, *requests: hvsock_pb2.AttachRequest) -> grpc.RpcError:
    with grpc.insecure_channel(host.target) as channel:
        stub = hvsock_pb2_grpc.HostServiceStub(channel)
        call = stub.Attach(iter(requests), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        return info.value


def assert_healthy(host: HostProcess, *allowed_probes: RawPartition) -> None:
    """Server alive, a fresh pair of partitions can connect, nothing left over."""
    assert host.proc.poll() is None
    vm = create_vm(host, f"probe-{uuid.uuid4().hex[:6]}")
    guest = attach_vm(host, vm)
    service = str(uuid.uuid4())
    listening = guest.request(
        listen=hvsock_pb2.Listen(address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=service))
    )
    assert listening.HasField("listening"), listening
    root = attach_host(host) if not any(p.welcome.host for p in allowed_probes) else None
    if root is not None:
        connect_id = root.send(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=vm.partition.vm_id, service_id=service)
            )
        )
        offer = guest.event().offer
        assert guest.request(
            accept=hvsock_pb2.Accept(channel_id=offer.channel.channel_id)
        ).HasField("opened")
        assert root.answer(connect_id).HasField("opened")
        root.close()
    guest.close()
    wait_for_no_channels(host)
    assert host.no_segments_within() == []


def wait_for_no_channels(host: HostProcess, vm_id: str = "") -> None:
    """Follow the event stream until ListChannels is empty (no fixed sleeps)."""
    channel, admin = host.admin()
    with channel:
        events = admin.WatchEvents(hvsock_pb2.WatchEventsRequest(), metadata=host.metadata)
        try:
            while admin.ListChannels(
                hvsock_pb2.ListChannelsRequest(vm_id=vm_id), metadata=host.metadata, timeout=10
            ).channels:
                next(events)
        finally:
            events.cancel()


def wait_for_sessions(host: HostProcess, vm_id: str, count: int) -> None:
    """Follow the event stream until the partition has ``count`` sessions (no fixed sleeps).

    The replayed event arrives once the host is watching for us, so no change is missed
    between a check and the next event."""
    channel, admin = host.admin()
    get = hvsock_pb2.GetPartitionRequest(vm_id=vm_id)
    with channel:
        events = admin.WatchEvents(hvsock_pb2.WatchEventsRequest(replay=1), metadata=host.metadata)
        try:
            while (
                admin.GetPartition(get, metadata=host.metadata, timeout=10).partition.session_count
                != count
            ):
                next(events)
        finally:
            events.cancel()


def wait_for_event(host: HostProcess, kind: str, vm_id: str, replay: int = 64) -> None:
    channel, admin = host.admin()
    with channel:
        events = admin.WatchEvents(
            hvsock_pb2.WatchEventsRequest(replay=replay), metadata=host.metadata, timeout=30
        )
        try:
            for event in events:
                if event.kind == kind and event.vm_id == vm_id:
                    return
        finally:
            events.cancel()


def get_partition(host: HostProcess, vm_id: str) -> hvsock_pb2.Partition:
    request = hvsock_pb2.GetPartitionRequest(vm_id=vm_id)
    return admin_call(host, "GetPartition", request).partition


def wait_until(predicate: Any, timeout: float = 30) -> None:
    """Poll a condition the host reaches on its own (no event marks it for this client)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# -- hello -------------------------------------------------------------------------------------


def hello(**fields: Any) -> hvsock_pb2.AttachRequest:
    return hvsock_pb2.AttachRequest(hello=hvsock_pb2.Hello(**fields))


@pytest.mark.parametrize("bad", BAD_GUIDS[1:])
def test_hello_with_malformed_vm_id(host: HostProcess, bad: str) -> None:
    error = attach_error(host, hello(vm_id=bad, token="t"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "VM id" in (error.details() or "")
    assert errno_of(error) == errno.EINVAL
    assert_healthy(host)


def test_hello_failures_have_precise_statuses(host: HostProcess) -> None:
    vm = create_vm(host, "vm1")
    vm_id = vm.partition.vm_id
    unknown = str(uuid.uuid4())
    cases = [
        (
            hello(vm_id=unknown, token="t"),
            grpc.StatusCode.NOT_FOUND,
            f"no partition with VM id {unknown}",
            errno.ENOENT,
        ),
        (hello(vm_id=vm_id), grpc.StatusCode.UNAUTHENTICATED, "a token is required", errno.EACCES),
        (
            hello(vm_id=vm_id, token="wrong"),
            grpc.StatusCode.UNAUTHENTICATED,
            f"wrong token for partition {vm_id}",
            errno.EACCES,
        ),
        (
            hello(host=True, token="wrong"),
            grpc.StatusCode.UNAUTHENTICATED,
            "wrong token",
            errno.EACCES,
        ),
        (hello(host=True), grpc.StatusCode.UNAUTHENTICATED, "a token is required", errno.EACCES),
        (
            hello(host=True, vm_id=vm_id, token=vm.token),
            grpc.StatusCode.INVALID_ARGUMENT,
            "either host or vm_id",
            errno.EINVAL,
        ),
        (
            hello(name="auto"),
            grpc.StatusCode.PERMISSION_DENIED,
            "auto_create_on_attach",
            errno.EACCES,
        ),
        (
            hvsock_pb2.AttachRequest(listen=hvsock_pb2.Listen()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "the first request must be hello",
            errno.EINVAL,
        ),
        (
            hvsock_pb2.AttachRequest(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "the first request must be hello",
            errno.EINVAL,
        ),
    ]
    for request, code, message, number in cases:
        error = attach_error(host, request)
        assert error.code() == code, (request, error)
        assert message in (error.details() or ""), (request, error.details())
        assert errno_of(error) == number, request
    # A second attach with the same VM id while the first is live opens a second session (a
    # second process of the VM); the first is unaffected, and they share the VM's addresses.
    first = attach_vm(host, vm)
    second = attach_vm(host, vm)
    assert second.welcome.vm_id == vm_id and second.welcome.session != first.welcome.session
    listen = hvsock_pb2.Listen(address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=SERVICE))
    assert first.request(listen=listen).HasField("listening")
    taken = second.request(listen=listen)
    assert taken.HasField("error") and taken.error.errno.errno == errno.EADDRINUSE
    assert taken.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    partition = admin_call(host, "GetPartition", hvsock_pb2.GetPartitionRequest(vm_id=vm_id))
    assert partition.partition.attached and partition.partition.session_count == 2
    second.close()
    first.close()
    # A stopped VM cannot attach.
    admin_call(host, "StopPartition", hvsock_pb2.StopPartitionRequest(vm_id=vm_id))
    error = attach_error(host, hello(vm_id=vm_id, token=vm.token))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is off" in (error.details() or "")
    assert errno_of(error) == errno.ENETDOWN
    assert_healthy(host)


def test_client_that_disconnects_mid_handshake(host: HostProcess) -> None:
    """Streams that end before or right after hello leave no attachment and no probe."""
    vm = create_vm(host, "vm1")
    with grpc.insecure_channel(host.target) as channel:
        stub = hvsock_pb2_grpc.HostServiceStub(channel)
        # Ends without any request: an empty stream, answered with nothing.
        assert list(stub.Attach(iter(()), timeout=10)) == []
        # Sends hello and hangs up before reading welcome.
        for _ in range(20):
            requests: queue.SimpleQueue[hvsock_pb2.AttachRequest | None] = queue.SimpleQueue()
            requests.put(hello(vm_id=vm.partition.vm_id, token=vm.token))
            call = stub.Attach(iter(requests.get, None), timeout=10)
            call.cancel()
        # Reads welcome, then hangs up.
        requests = queue.SimpleQueue()
        requests.put(hello(vm_id=vm.partition.vm_id, token=vm.token))
        call = stub.Attach(iter(requests.get, None), timeout=10)
        assert next(call).HasField("welcome")
        call.cancel()
    # No stale session was left behind: every abandoned stream was detached.
    wait_for_sessions(host, vm.partition.vm_id, 0)
    again = attach_vm(host, vm)
    assert again.welcome.vm_id == vm.partition.vm_id
    get = hvsock_pb2.GetPartitionRequest(vm_id=vm.partition.vm_id)
    assert admin_call(host, "GetPartition", get).partition.session_count == 1
    again.close()
    wait_for_sessions(host, vm.partition.vm_id, 0)
    assert not admin_call(host, "GetPartition", get).partition.attached
    assert_healthy(host)


# -- requests on the attach stream ---------------------------------------------------------------


def test_attach_stream_requests_in_wrong_state_or_with_bad_fields(host: HostProcess) -> None:
    vm = create_vm(host, "vm1")
    other = create_vm(host, "vm2")
    guest, root = attach_vm(host, vm), attach_host(host)
    vm_id = vm.partition.vm_id
    addr = hvsock_pb2.Address

    def error(partition: RawPartition, **kind: Any) -> hvsock_pb2.Error:
        answer = partition.request(**kind)
        assert answer.WhichOneof("kind") == "error", (kind, answer)
        return answer.error

    cases: list[tuple[RawPartition, dict[str, Any], grpc.StatusCode, str, int]] = [
        (
            guest,
            {"listen": hvsock_pb2.Listen(address=addr(vm_id="bad", service_id=SERVICE))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "VM id",
            errno.EINVAL,
        ),
        (
            guest,
            {"listen": hvsock_pb2.Listen(address=addr(vm_id=WILDCARD, service_id="bad"))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "service id",
            errno.EINVAL,
        ),
        (
            guest,
            {
                "listen": hvsock_pb2.Listen(
                    address=addr(vm_id=other.partition.vm_id, service_id=SERVICE)
                )
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "a VM listens on WILDCARD, PARENT or LOOPBACK",
            errno.EINVAL,
        ),
        (
            guest,
            {"connect": hvsock_pb2.Connect(remote=addr(vm_id="{nope}", service_id=SERVICE))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "VM id",
            errno.EINVAL,
        ),
        (
            guest,
            {
                "connect": hvsock_pb2.Connect(
                    remote=addr(vm_id=PARENT, service_id=SERVICE), connect_timeout_ms=300_001
                )
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "connect_timeout_ms is at most 300000",
            errno.EINVAL,
        ),
        (
            guest,
            {
                "connect": hvsock_pb2.Connect(
                    remote=addr(vm_id=other.partition.vm_id, service_id=SERVICE)
                )
            },
            grpc.StatusCode.PERMISSION_DENIED,
            "",
            errno.ENETUNREACH,
        ),
        (
            guest,
            {"unlisten": hvsock_pb2.Unlisten(listener_id=424242)},
            grpc.StatusCode.NOT_FOUND,
            "424242",
            errno.ENOENT,
        ),
        (
            guest,
            {"accept": hvsock_pb2.Accept(channel_id=424242)},
            grpc.StatusCode.NOT_FOUND,
            "424242",
            errno.ENOENT,
        ),
        (
            guest,
            {"shutdown": hvsock_pb2.Shutdown(channel_id=424242)},
            grpc.StatusCode.NOT_FOUND,
            "424242",
            errno.ENOENT,
        ),
        (
            guest,
            {"hello": hvsock_pb2.Hello(vm_id=vm_id, token=vm.token)},
            grpc.StatusCode.FAILED_PRECONDITION,
            "hello is only the first request",
            errno.EINVAL,
        ),
        (
            guest,
            {"prove_shared_memory": hvsock_pb2.ProveSharedMemory(nonce=b"guess")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "does not match",
            errno.EINVAL,
        ),
        (guest, {}, grpc.StatusCode.INVALID_ARGUMENT, "empty request", errno.EINVAL),
    ]
    # Closing is idempotent: an unknown (already torn down) channel is simply acknowledged.
    assert guest.request(close=hvsock_pb2.Close(channel_id=424242)).HasField("ack")
    for partition, kind, code, message, number in cases:
        got = error(partition, **kind)
        assert (got.code, got.errno.errno) == (code.value[0], number), (kind, got)
        assert message in got.message, (kind, got)
        assert got.errno.name == errno.errorcode[number]

    # Duplicate bind, then wrong-state requests on a live channel.
    g, h = open_pair(guest, root)
    dup = error(root, listen=hvsock_pb2.Listen(address=addr(vm_id=WILDCARD, service_id=SERVICE)))
    assert (dup.code, dup.errno.errno) == (
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        errno.EADDRINUSE,
    )
    # Accepting an open channel is a protocol error: it closes the channel (both ends told).
    again = error(root, accept=hvsock_pb2.Accept(channel_id=h.channel_id))
    assert again.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], again
    assert again.errno.errno == errno.EPROTO
    for p in (guest, root):
        notice = p.event().notice
        assert (notice.channel_id, notice.kind) == (
            g.channel_id,
            hvsock_pb2.ChannelNotice.KIND_RESCINDED,
        )
        assert "protocol error" in notice.reason
    # The other partition's channel id means nothing to a third partition.
    third = attach_vm(host, other)
    stranger = error(third, shutdown=hvsock_pb2.Shutdown(channel_id=g.channel_id))
    assert stranger.code == grpc.StatusCode.NOT_FOUND.value[0], stranger
    # Bad requests never end the stream: the guest can still listen.
    assert guest.request(
        listen=hvsock_pb2.Listen(address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=SERVICE))
    ).HasField("listening")
    for p in (guest, root, third):
        p.close()
    assert_healthy(host)


def test_client_that_stops_reading_is_detached(host: HostProcess) -> None:
    """A partition that never reads its answers is cut off; the host and others go on."""
    vm = create_vm(host, "lazy")
    busy = create_vm(host, "busy")
    lazy = RawPartition.__new__(RawPartition)  # attach by hand: no reader thread at all
    lazy_requests: queue.SimpleQueue[hvsock_pb2.AttachRequest | None] = queue.SimpleQueue()
    lazy_requests.put(hello(vm_id=vm.partition.vm_id, token=vm.token))
    # Without BDP probing the client keeps HTTP/2's 64 KiB stream window, so answers it does
    # not read back up into the host at once (with it, grpc buffers megabytes client-side).
    options = [("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(host.target, options=options) as channel:
        call = hvsock_pb2_grpc.HostServiceStub(channel).Attach(iter(lazy_requests.get, None))
        assert next(call).HasField("welcome")
        # Enough answers that neither HTTP/2 windows nor the host's queue can hold them.
        for i in range(20_000):
            lazy_requests.put(
                hvsock_pb2.AttachRequest(
                    request_id=i + 1, unlisten=hvsock_pb2.Unlisten(listener_id=999)
                )
            )
        admin_channel, admin = host.admin()
        with admin_channel:
            get = hvsock_pb2.GetPartitionRequest(vm_id=vm.partition.vm_id)
            wait_until(
                lambda: not admin.GetPartition(get, metadata=host.metadata).partition.attached
            )
        worker = attach_vm(host, busy)
        lazy_requests.put(None)
        # The host cut the stream off at its end; the lazy client just lets it go.
        call.cancel()
        del lazy
    # The busy partition kept working throughout.
    assert worker.request(
        listen=hvsock_pb2.Listen(address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=SERVICE))
    ).HasField("listening")
    worker.close()
    assert_healthy(host)


# -- SessionData -----------------------------------------------------------------------------


def data_error(partition: RawPartition, *requests: hvsock_pb2.SessionDataRequest) -> grpc.RpcError:
    """The status a SessionData stream of ``requests`` ends with (it must end with one)."""
    call = partition.stub.SessionData(iter(requests), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    return info.value


def session_request(partition: RawPartition) -> hvsock_pb2.SessionDataRequest:
    return hvsock_pb2.SessionDataRequest(session=partition.welcome.session)


def stray_reset(partition: RawPartition, frame: hvsock_pb2.RelayFrame) -> hvsock_pb2.Error:
    """Send ``frame`` on the session's stream; the reset the host answers it with."""
    stream = partition.data()
    stream.send(frame)
    answer = stream.stray.get(timeout=10)
    assert (answer.channel_id, answer.end) == (frame.channel_id, frame.end), answer
    assert answer.HasField("reset"), answer
    return answer.reset


def test_session_data_stream_errors(host: HostProcess) -> None:
    vm = create_vm(host, "vm1")
    guest, root = attach_vm(host, vm), attach_host(host)
    g, _h = open_pair(guest, root)
    cases = [
        (
            (hvsock_pb2.SessionDataRequest(frames=[hvsock_pb2.RelayFrame(channel_id=1)]),),
            grpc.StatusCode.UNAUTHENTICATED,
            "unknown or ended session",
        ),
        (
            (hvsock_pb2.SessionDataRequest(session="forged"),),
            grpc.StatusCode.UNAUTHENTICATED,
            "unknown or ended session",
        ),
        (
            (session_request(guest), session_request(guest)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "session is only in the first request",
        ),
    ]
    for requests, code, message in cases:
        error = data_error(guest, *requests)
        assert error.code() == code, error
        assert message in (error.details() or "")
    # A second stream for the session while the first is open.
    first = RelayStream(guest, g.channel_id)
    first.send_all(b"x")
    error = data_error(guest, session_request(guest))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has a SessionData stream open already" in (error.details() or "")
    first.close()
    guest.close()
    root.close()
    assert_healthy(host)


def test_relay_frames_for_unknown_and_shared_memory_ends(host: HostProcess) -> None:
    vm = create_vm(host, "vm1")
    guest, root = attach_vm(host, vm), attach_host(host)
    prove(guest)
    g, _h = open_pair(guest, root)
    assert g.data_path == hvsock_pb2.DATA_PATH_SHARED_MEMORY
    for frame in (
        hvsock_pb2.RelayFrame(channel_id=424242, data=b"x"),
        hvsock_pb2.RelayFrame(channel_id=g.channel_id, end=0, data=b"x"),  # on shared memory
    ):
        reset = stray_reset(guest, frame)
        assert reset.code == grpc.StatusCode.NOT_FOUND.value[0], reset
        assert reset.errno.name == "ENOENT" and "no relayed end" in reset.message
    reset = stray_reset(guest, hvsock_pb2.RelayFrame(channel_id=0, data=b"x"))
    assert reset.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The channel on shared memory is untouched.
    listed = admin_call(host, "ListChannels", hvsock_pb2.ListChannelsRequest()).channels
    assert [c.state for c in listed] == [hvsock_pb2.CHANNEL_STATE_OPEN]
    guest.close()
    root.close()
    assert_healthy(host)


@pytest.mark.parametrize(
    "violation", ["oversize", "beyond_limit", "after_fin", "after_close", "from_client", "empty"]
)
def test_relay_frame_violations_reset_only_that_channel(host: HostProcess, violation: str) -> None:
    vm = create_vm(host, "vm1")
    guest, root = attach_vm(host, vm), attach_host(host)
    g, _h = open_pair(guest, root)
    other, _ = open_pair(guest, root, listen=False)
    limit = guest.opened[g.channel_id][1].relay_send_limit
    frames = {
        "oversize": [hvsock_pb2.RelayFrame(data=bytes(262145))],
        "beyond_limit": [
            hvsock_pb2.RelayFrame(data=bytes(min(262144, limit + 1 - start)))
            for start in range(0, limit + 1, 262144)
        ],
        "after_fin": [hvsock_pb2.RelayFrame(fin=True), hvsock_pb2.RelayFrame(data=b"late")],
        "after_close": [hvsock_pb2.RelayFrame(close=True), hvsock_pb2.RelayFrame(credit=5)],
        "from_client": [hvsock_pb2.RelayFrame(close_done=True)],
        "empty": [hvsock_pb2.RelayFrame()],
    }[violation]
    stream = guest.data()
    for frame in frames:
        frame.channel_id = g.channel_id
    if violation == "beyond_limit":
        for frame in frames:  # a message each: together they exceed gRPC's 1 MiB message
            stream.send(frame)
    else:
        stream.send(*frames)
    answer = stream.stray.get(timeout=10)
    # A frame after close is refused before the close is carried out (the close waits for
    # the data before it to leave), so that end is reset, not closed.
    assert answer.channel_id == g.channel_id and answer.HasField("reset"), answer
    assert answer.reset.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer
    assert answer.reset.errno.errno == errno.EINVAL
    assert {
        "oversize": "frame of 262145 bytes exceeds 262144",
        "beyond_limit": "beyond the send limit",
        "after_fin": "data after fin",
        "after_close": "credit after close",
        "from_client": "reset and close_done are the host's",
        "empty": "empty relay frame",
    }[violation] in answer.reset.message
    # The protocol violation closes the channel for both ends, as the core's machine does.
    for p in (guest, root):
        kinds = []
        while not kinds or kinds[-1] != hvsock_pb2.ChannelNotice.KIND_RESCINDED:
            kinds.append(p.event().notice.kind)
    # The other channel of the session, and the stream, still work.
    mine = RelayStream(guest, other.channel_id)
    peer = RelayStream(root, other.channel_id)
    mine.send_all(b"still here")
    mine.send_fin()
    assert peer.read_all() == b"still here"
    mine.close()
    peer.close()
    guest.close()
    root.close()
    assert_healthy(host)


def test_relay_end_of_a_rescinded_channel(host: HostProcess) -> None:
    vm = create_vm(host, "vm1")
    guest, root = attach_vm(host, vm), attach_host(host)
    g, h = open_pair(guest, root)
    stream = RelayStream(guest, g.channel_id)
    stream.send_all(b"before")
    peer = RelayStream(root, h.channel_id)
    admin_call(host, "RescindChannel", hvsock_pb2.RescindChannelRequest(channel_id=g.channel_id))
    assert guest.event().notice.kind == hvsock_pb2.ChannelNotice.KIND_RESCINDED
    # The end of a rescinded channel is reset with UNAVAILABLE / ECONNRESET after its data.
    assert peer.read_all() in (b"", b"before")
    assert stream.read_all() == b""
    assert stream.reset is not None
    assert stream.reset.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "rescinded" in stream.reset.message
    assert stream.reset.errno.errno == errno.ECONNRESET
    # Once ended, the end is unknown to the stream.
    wait_for_no_channels(host)
    reset = stray_reset(guest, hvsock_pb2.RelayFrame(channel_id=g.channel_id, credit=1))
    assert reset.code == grpc.StatusCode.NOT_FOUND.value[0]
    guest.close()
    root.close()
    assert_healthy(host)


# -- admin -----------------------------------------------------------------------------------------


def test_admin_bad_input(host: HostProcess) -> None:
    unknown = str(uuid.uuid4())
    vm = create_vm(host, "vm1")
    cases = [
        (
            "GetPartition",
            hvsock_pb2.GetPartitionRequest(vm_id="nope"),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "GetPartition",
            hvsock_pb2.GetPartitionRequest(vm_id=unknown),
            grpc.StatusCode.NOT_FOUND,
            errno.ENOENT,
        ),
        (
            "DeletePartition",
            hvsock_pb2.DeletePartitionRequest(vm_id=unknown),
            grpc.StatusCode.NOT_FOUND,
            errno.ENOENT,
        ),
        (
            "DeletePartition",
            hvsock_pb2.DeletePartitionRequest(vm_id=PARENT),
            grpc.StatusCode.FAILED_PRECONDITION,
            errno.EINVAL,
        ),
        (
            "PausePartition",
            hvsock_pb2.PausePartitionRequest(vm_id=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "ResumePartition",
            hvsock_pb2.ResumePartitionRequest(vm_id=vm.partition.vm_id),
            grpc.StatusCode.FAILED_PRECONDITION,
            errno.EINVAL,
        ),
        (
            "StopPartition",
            hvsock_pb2.StopPartitionRequest(vm_id=unknown),
            grpc.StatusCode.NOT_FOUND,
            errno.ENOENT,
        ),
        (
            "CreatePartition",
            hvsock_pb2.CreatePartitionRequest(name=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "CreatePartition",
            hvsock_pb2.CreatePartitionRequest(name="x", vm_id="bad"),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "CreatePartition",
            hvsock_pb2.CreatePartitionRequest(name="x", vm_id=PARENT),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "CreatePartition",
            hvsock_pb2.CreatePartitionRequest(name="x", vm_id=vm.partition.vm_id),
            grpc.StatusCode.ALREADY_EXISTS,
            errno.EEXIST,
        ),
        (
            "CreatePartition",
            hvsock_pb2.CreatePartitionRequest(name="x", personality=7),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "RegisterService",
            hvsock_pb2.RegisterServiceRequest(service_id="bad", element_name="x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "UnregisterService",
            hvsock_pb2.UnregisterServiceRequest(service_id=SERVICE),
            grpc.StatusCode.NOT_FOUND,
            errno.ENOENT,
        ),
        (
            "ListChannels",
            hvsock_pb2.ListChannelsRequest(vm_id="bad"),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "RescindChannel",
            hvsock_pb2.RescindChannelRequest(channel_id=424242),
            grpc.StatusCode.NOT_FOUND,
            errno.ENOENT,
        ),
        (
            "StallRing",
            hvsock_pb2.StallRingRequest(channel_id=424242, duration_ms=10),
            grpc.StatusCode.NOT_FOUND,
            errno.ENOENT,
        ),
        (
            "StallRing",
            hvsock_pb2.StallRingRequest(channel_id=1, duration_ms=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
        (
            "StallRing",
            hvsock_pb2.StallRingRequest(channel_id=1, duration_ms=600_001),
            grpc.StatusCode.INVALID_ARGUMENT,
            errno.EINVAL,
        ),
    ]
    for method, request, code, number in cases:
        with pytest.raises(grpc.RpcError) as info:
            admin_call(host, method, request)
        assert info.value.code() == code, (method, request, info.value)
        assert info.value.details(), method
        assert errno_of(info.value) == number, (method, request)
    for metadata in ((), (("x-hvsock-token", ""),), (("x-hvsock-token", vm.token),)):
        with pytest.raises(grpc.RpcError) as info:
            admin_call(host, "ListPartitions", hvsock_pb2.ListPartitionsRequest(), metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "x-hvsock-token" in (info.value.details() or "")
    assert_healthy(host)


def test_guest_to_guest_refused_unless_allowed(tmp_path: pathlib.Path) -> None:
    for flags, allowed in (((), False), (("--allow-guest-to-guest",), True)):
        with run_host(tmp_path, *flags) as host:
            a, b = create_vm(host, "a"), create_vm(host, "b")
            ga, gb = attach_vm(host, a), attach_vm(host, b)
            service = str(uuid.uuid4())
            assert gb.request(
                listen=hvsock_pb2.Listen(
                    address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=service)
                )
            ).HasField("listening")
            connect_id = ga.send(
                connect=hvsock_pb2.Connect(
                    remote=hvsock_pb2.Address(vm_id=b.partition.vm_id, service_id=service)
                )
            )
            if allowed:
                offer = gb.event().offer
                assert gb.request(
                    accept=hvsock_pb2.Accept(channel_id=offer.channel.channel_id)
                ).HasField("opened")
                assert ga.answer(connect_id).opened.remote.vm_id == b.partition.vm_id
            else:
                answer = ga.answer(connect_id).error
                assert answer.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
                assert answer.errno.errno == errno.ENETUNREACH
                assert "guest" in answer.message
            ga.close()
            gb.close()
            assert_healthy(host)
