"""Streams that end every way but the normal one, against a live host, and what it holds after.

Shared by tests/adversity/test_fuzz_live_server.py and bench/bench_abnormal_ends.py. Frames are
raw bytes on generic gRPC calls (the generated stubs cannot send what does not encode), so a
stream can carry a valid ``Hello`` and then bytes that are no ``AttachRequest``.
"""

from __future__ import annotations

import errno
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from grpc_status import rpc_status

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common.addresses import PARENT, WILDCARD

from ..integration.hostproc import HostProcess

ATTACH = "/hvsock.v1.HostService/Attach"
SESSION_DATA = "/hvsock.v1.HostService/SessionData"
WATCH_EVENTS = "/hvsock.v1.AdminService/WatchEvents"

#: Bytes that do not parse as any request message (the patterns of the issue's findings).
MALFORMED: dict[str, bytes] = {
    "garbage": b"\xff\xff\xff\xff",
    # A valid request with its last bytes cut off: a length prefix overruns the end.
    "truncated": hvsock_pb2.AttachRequest(
        request_id=7,
        listen=hvsock_pb2.Listen(address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=PARENT)),
    ).SerializeToString()[:-5],
    # Field 1 with wire type 7, which does not exist. (A mismatched but valid wire type parses
    # as an unknown field: no error to provoke there.)
    "wrong_wire_type": b"\x0f\x01",
}
#: Where an attach stream is when it ends.
ATTACH_STATES = ("welcomed", "listening", "connecting", "open")
#: How a stream ends.
ENDS = ("malformed", "cancel", "deadline")
#: Long enough to set a stream up on a loaded machine, short enough to wait for.
DEADLINE = 1.5
#: Bound on waiting for the host to end a stream it should end by itself.
PEER_DEADLINE = 30.0


def _identity(raw: bytes) -> bytes:
    return raw


@dataclass(frozen=True)
class Counts:
    """What the host holds, from its own API and its /proc entry."""

    sessions: int
    channels: int
    segments: int
    threads: int
    fds: int

    def within(self, baseline: Counts) -> bool:
        return all(getattr(self, k) <= v for k, v in asdict(baseline).items())


def counts(host: HostProcess, admin: hvsock_pb2_grpc.AdminServiceStub) -> Counts:
    partitions = admin.ListPartitions(
        hvsock_pb2.ListPartitionsRequest(), metadata=host.metadata, timeout=10
    ).partitions
    channels = admin.ListChannels(
        hvsock_pb2.ListChannelsRequest(), metadata=host.metadata, timeout=10
    ).channels
    pid = host.proc.pid
    return Counts(
        sessions=sum(p.session_count for p in partitions),
        channels=len(channels),
        segments=len(host.segments()),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def wait_for(
    host: HostProcess, admin: hvsock_pb2_grpc.AdminServiceStub, baseline: Counts, timeout: float
) -> tuple[Counts, float]:
    """Poll the host's counts until none is above ``baseline``; (last counts, seconds taken).
    Idle worker threads leave after workers.IDLE_TIMEOUT (2 s), so allow a few seconds."""
    started = time.monotonic()
    while True:
        now = counts(host, admin)
        waited = time.monotonic() - started
        if now.within(baseline) or waited > timeout:
            return now, waited
        time.sleep(0.05)


def errno_of(error: grpc.RpcError) -> int | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        found = hvsock_pb2.ErrnoDetail()
        if detail.Unpack(found):
            return found.errno
    return None


class RawStream:
    """A bidi call of raw frames: ``send`` bytes, ``end`` half-closes, ``cancel`` cancels."""

    def __init__(
        self,
        channel: grpc.Channel,
        method: str,
        decode: Callable[[bytes], Any],
        timeout: float | None = None,
        metadata: Any = None,
    ) -> None:
        self._frames: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        call = channel.stream_stream(
            method, request_serializer=_identity, response_deserializer=decode
        )
        self.call = call(self._iter(), timeout=timeout, metadata=metadata)

    def _iter(self) -> Iterator[bytes]:
        while (frame := self._frames.get()) is not None:
            yield frame

    def send(self, frame: bytes) -> None:
        self._frames.put(frame)

    def end(self) -> None:
        self._frames.put(None)

    def next(self) -> Any:
        return next(self.call)

    def error(self) -> grpc.RpcError:
        """Read to the end; the error the stream ended with."""
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as exc:
            return exc
        finally:
            self.end()
        raise AssertionError("the stream ended OK")

    def cancel(self) -> None:
        self.call.cancel()
        self.end()


class Attached:
    """An attach stream past its welcome, with numbered requests."""

    def __init__(
        self, channel: grpc.Channel, hello: hvsock_pb2.Hello, timeout: float | None = None
    ) -> None:
        self.stream = RawStream(channel, ATTACH, hvsock_pb2.AttachResponse.FromString, timeout)
        self.stream.send(hvsock_pb2.AttachRequest(hello=hello).SerializeToString())
        first = self.stream.next()
        assert first.HasField("welcome"), first
        self.session = first.welcome.session
        self._ids = iter(range(1, 1 << 30))

    def send(self, **kind: Any) -> int:
        request_id = next(self._ids)
        self.stream.send(
            hvsock_pb2.AttachRequest(request_id=request_id, **kind).SerializeToString()
        )
        return request_id

    def request(self, **kind: Any) -> hvsock_pb2.AttachResponse:
        request_id = self.send(**kind)
        while True:
            answer = self.stream.next()
            if answer.request_id == request_id:
                return answer


@dataclass
class Target:
    """A live host, a VM to attach as, and the host partition's hello."""

    host: HostProcess
    channel: grpc.Channel
    vm: hvsock_pb2.CreatePartitionResponse

    @property
    def vm_hello(self) -> hvsock_pb2.Hello:
        return hvsock_pb2.Hello(vm_id=self.vm.partition.vm_id, token=self.vm.token)

    @property
    def root_hello(self) -> hvsock_pb2.Hello:
        return hvsock_pb2.Hello(host=True, token=self.host.token)


def open_relayed(target: Target, timeout: float | None = None) -> tuple[Attached, Attached, int]:
    """(guest, root, channel id): a channel with both ends on the relay path."""
    root = Attached(target.channel, target.root_hello, timeout)
    guest = Attached(target.channel, target.vm_hello, timeout)
    service = str(uuid.uuid4())
    listening = root.request(
        listen=hvsock_pb2.Listen(
            address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=service), auto_accept=1
        )
    )
    assert listening.HasField("listening"), listening
    opened = guest.request(
        connect=hvsock_pb2.Connect(
            remote=hvsock_pb2.Address(vm_id=PARENT, service_id=service), force_relay=True
        )
    )
    assert opened.HasField("opened"), opened
    return guest, root, opened.opened.channel_id


def _end(stream: RawStream, how: str, malformed: bytes) -> grpc.StatusCode:
    """End ``stream`` as ``how`` says; the status the client sees. A malformed frame must be
    refused with INVALID_ARGUMENT and an EINVAL detail."""
    if how == "cancel":
        stream.cancel()
        return grpc.StatusCode.CANCELLED
    if how == "malformed":
        stream.send(malformed)
    error = stream.error()
    if how == "malformed":
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert errno_of(error) == errno.EINVAL, error
        assert "malformed request" in (error.details() or ""), error.details()
    else:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    return error.code()  # type: ignore[no-any-return]


def attach_ends(target: Target, state: str, how: str, malformed: bytes) -> grpc.StatusCode:
    """Attach the VM, get to ``state``, end the attach stream ``how``."""
    timeout = DEADLINE if how == "deadline" else None
    others: list[Attached] = []
    if state == "open":
        guest, root, _ = open_relayed(target, timeout)
        others.append(root)
    else:
        guest = Attached(target.channel, target.vm_hello, timeout)
        if state == "listening":
            answer = guest.request(
                listen=hvsock_pb2.Listen(
                    address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=str(uuid.uuid4()))
                )
            )
            assert answer.HasField("listening"), answer
        elif state == "connecting":
            # No such service: a Linux guest's connect waits out the connect timeout.
            guest.send(
                connect=hvsock_pb2.Connect(
                    remote=hvsock_pb2.Address(vm_id=PARENT, service_id=str(uuid.uuid4())),
                    connect_timeout_ms=60_000,
                )
            )
    try:
        return _end(guest.stream, how, malformed)
    finally:
        for other in others:
            other.stream.cancel()


def session_stream(target: Target, attached: Attached, timeout: float | None = None) -> RawStream:
    """A SessionData stream of ``attached``'s session, proven running: a frame for a channel
    nobody has is answered with a NOT_FOUND reset."""
    stream = RawStream(
        target.channel, SESSION_DATA, hvsock_pb2.SessionDataResponse.FromString, timeout
    )
    stream.send(
        hvsock_pb2.SessionDataRequest(
            session=attached.session,
            frames=[hvsock_pb2.RelayFrame(channel_id=UNKNOWN_CHANNEL, credit=1)],
        ).SerializeToString()
    )
    (answer,) = stream.next().frames
    assert answer.channel_id == UNKNOWN_CHANNEL and answer.reset.code == 5, answer  # NOT_FOUND
    return stream


#: A channel id no test opens.
UNKNOWN_CHANNEL = 2**63 - 5


def frames(*frames: hvsock_pb2.RelayFrame) -> bytes:
    return hvsock_pb2.SessionDataRequest(frames=frames).SerializeToString()


def wait_reset(stream: RawStream, channel_id: int) -> hvsock_pb2.Error:
    """Read ``stream`` until the reset of ``channel_id``; that reset."""
    while True:
        for frame in stream.next().frames:
            if frame.channel_id == channel_id and frame.HasField("reset"):
                return frame.reset


def session_data_ends(
    target: Target, how: str, malformed: bytes, *, backlog: bool = False
) -> grpc.StatusCode:
    """Open a relayed channel, the guest session's SessionData stream, end that stream ``how``.
    With ``backlog`` the peer first sends frames the guest's end takes (the host's reader of
    that end is running), and must then see the channel reset when the guest's stream ends."""
    timeout = DEADLINE if how == "deadline" else None
    guest, root, channel_id = open_relayed(target)
    peer: RawStream | None = None
    try:
        stream = session_stream(target, guest, timeout)
        stream.send(frames(hvsock_pb2.RelayFrame(channel_id=channel_id, end=0, credit=1 << 20)))
        if backlog:
            peer = session_stream(target, root, PEER_DEADLINE)
            peer.send(
                frames(*[hvsock_pb2.RelayFrame(channel_id=channel_id, end=1, data=b"x" * 100)] * 8)
            )
            # The guest's stream sees the first of them: the host's reader is running.
            assert any(frame.data for frame in stream.next().frames)
        code = _end(stream, how, malformed)
        if peer is not None:
            # Rescinded (the malformed frame, the cancel or the deadline ended the channel):
            # the peer's end is reset on its own stream, which goes on.
            reset = wait_reset(peer, channel_id)
            assert reset.code == grpc.StatusCode.UNAVAILABLE.value[0], reset
        return code
    finally:
        guest.stream.cancel()
        root.stream.cancel()
        if peer is not None:
            peer.cancel()


def watch_ends(target: Target, how: str, malformed: bytes) -> grpc.StatusCode:
    """A WatchEvents stream (unary request) that ends ``how``."""
    timeout = DEADLINE if how == "deadline" else None
    call = target.channel.unary_stream(
        WATCH_EVENTS,
        request_serializer=_identity,
        response_deserializer=hvsock_pb2.WatchEventsResponse.FromString,
    )
    request = (
        malformed
        if how == "malformed"
        else hvsock_pb2.WatchEventsRequest(replay=5).SerializeToString()
    )
    responses = call(request, timeout=timeout, metadata=target.host.metadata)
    if how == "cancel":
        next(responses)  # replayed: the host's handler is past its start
        responses.cancel()
        return grpc.StatusCode.CANCELLED
    try:
        for _ in responses:
            pass
    except grpc.RpcError as error:
        want = (
            grpc.StatusCode.INVALID_ARGUMENT
            if how == "malformed"
            else grpc.StatusCode.DEADLINE_EXCEEDED
        )
        assert error.code() == want, error
        return error.code()  # type: ignore[no-any-return]
    raise AssertionError("the watch ended OK")


def every_method(host: HostProcess) -> list[tuple[str, bool, bool]]:
    """(path, request streaming, response streaming) of every method the host serves."""
    from hvsock.v1 import hvsock_pb2 as pb

    methods = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            methods.append(
                (
                    f"/{service.full_name}/{method.name}",
                    method.client_streaming,
                    method.server_streaming,
                )
            )
    methods += [
        ("/grpc.health.v1.Health/Check", False, False),
        ("/grpc.health.v1.Health/Watch", False, True),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True, True),
    ]
    return methods


def malformed_call(
    channel: grpc.Channel, method: tuple[str, bool, bool], raw: bytes, metadata: Any
) -> grpc.RpcError:
    """Send ``raw`` as the (first) request of ``method``; the error it ends with."""
    path, client_streaming, server_streaming = method
    kwargs = {"request_serializer": _identity, "response_deserializer": _identity}
    try:
        if client_streaming and server_streaming:
            for _ in channel.stream_stream(path, **kwargs)(
                iter([raw]), metadata=metadata, timeout=10
            ):
                pass
        elif client_streaming:
            channel.stream_unary(path, **kwargs)(iter([raw]), metadata=metadata, timeout=10)
        elif server_streaming:
            for _ in channel.unary_stream(path, **kwargs)(raw, metadata=metadata, timeout=10):
                pass
        else:
            channel.unary_unary(path, **kwargs)(raw, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"{path} accepted {raw!r}")
