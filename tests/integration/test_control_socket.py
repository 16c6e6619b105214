"""Control frames on the descriptor socket (Welcome.control_socket), on a live host.

A session that maps shared memory may move its attach requests and answers from the gRPC
stream to its descriptor connection. These tests speak the frames by hand, as a client in
another language would, and check the rules the proto states: the first frame proves the
probe; answers then come as frames, with descriptors in order; the client's EOF ends the
session cleanly after what it sent; bad frames close the connection and, once requests moved
there, end the session with INVALID_ARGUMENT; the host keeps serving everyone else.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import uuid
from collections.abc import Iterator

import grpc
import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2
from ring.handover import (
    KIND_CHANNEL,
    KIND_REQUEST,
    KIND_RESPONSE,
    MAGIC,
    MAX_CONTROL_FRAME,
    MESSAGE,
    connect,
    frame,
    receive_any,
)

from .hostproc import HostProcess, run_host
from .rawclient import RawPartition
from .test_host_api import attach_host, attach_vm, create_vm
from .test_host_badinput import assert_healthy

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path) as process:
        yield process


class Control:
    """A session's descriptor connection, driven frame by frame."""

    def __init__(self, partition: RawPartition) -> None:
        assert partition.welcome.control_socket
        self.sock, self.nonce = connect(
            partition.welcome.shm_socket, partition.welcome.session, TIMEOUT
        )
        self.ids = iter(range(1, 1 << 30))
        self.descriptors: dict[int, int] = {}

    def send(self, **kind: object) -> int:
        request_id = next(self.ids)
        request = hvsock_pb2.AttachRequest(request_id=request_id, **kind)  # type: ignore[arg-type]
        self.sock.sendall(frame(KIND_REQUEST, request.SerializeToString()))
        return request_id

    def answer(self) -> hvsock_pb2.AttachResponse:
        """The next answer frame (descriptors before it are kept by channel id)."""
        while True:
            kind, value, item = receive_any(self.sock)
            if kind == KIND_RESPONSE:
                assert isinstance(item, bytes)
                return hvsock_pb2.AttachResponse.FromString(item)
            assert kind == KIND_CHANNEL and isinstance(item, int)
            self.descriptors[value] = item

    def prove(self) -> None:
        request_id = self.send(prove_shared_memory=hvsock_pb2.ProveSharedMemory(nonce=self.nonce))
        answer = self.answer()
        assert answer.request_id == request_id and answer.HasField("ack")

    def closed_by_host(self) -> bool:
        """Whether the host closed the connection (after anything it sent before)."""
        self.sock.settimeout(TIMEOUT)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        for fd in self.descriptors.values():
            os.close(fd)
        self.sock.close()


def _listen(control: Control, service: str) -> int:
    request_id = control.send(
        listen=hvsock_pb2.Listen(
            address=hvsock_pb2.Address(vm_id=hv.HV_GUID_WILDCARD, service_id=service),
            auto_accept=8,
        )
    )
    answer = control.answer()
    assert answer.request_id == request_id, answer
    return answer.listening.listener_id


def _status(partition: RawPartition) -> grpc.RpcError | None:
    """Wait for the attach stream to end; its error, or None when it ended OK."""
    partition._reader.join(TIMEOUT)
    assert not partition._reader.is_alive()
    return partition.ended


def test_answers_and_descriptors_come_as_frames_and_eof_ends_the_session(
    host: HostProcess,
) -> None:
    vm = attach_vm(host, create_vm(host, "vm1"))
    root = attach_host(host)
    control = Control(root)
    control.prove()
    service = str(uuid.uuid4())
    _listen(control, service)
    vm.prove_shared_memory()
    connected = vm.request(
        connect=hvsock_pb2.Connect(
            remote=hvsock_pb2.Address(vm_id=hv.HV_GUID_PARENT, service_id=service)
        )
    )
    assert connected.HasField("opened"), connected
    # The auto-accepted end: its descriptor came on the connection before its answer.
    opened = control.answer()
    assert opened.HasField("opened")
    channel_id = opened.opened.channel_id
    assert opened.opened.data_path == hvsock_pb2.DATA_PATH_SHARED_MEMORY
    assert channel_id in control.descriptors
    # Nothing came on the attach stream after the welcome.
    assert root.events.empty() and all(q.empty() for q in root.answers.values())
    # Requests sent just before EOF are still carried out (the close is a notification).
    control.send(close=hvsock_pb2.Close(channel_id=channel_id))
    control.sock.shutdown(socket.SHUT_WR)
    assert control.closed_by_host()
    assert _status(root) is None  # the stream ended OK: a client ending its requests
    control.close()
    root.close()
    vm.close()
    assert_healthy(host)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(
            lambda c: hvsock_pb2.AttachRequest(
                request_id=1, listen=hvsock_pb2.Listen(address=hvsock_pb2.Address())
            ),
            id="not-a-proof",
        ),
        pytest.param(
            lambda c: hvsock_pb2.AttachRequest(
                request_id=1, prove_shared_memory=hvsock_pb2.ProveSharedMemory(nonce=b"x" * 32)
            ),
            id="wrong-nonce",
        ),
    ],
)
def test_a_first_frame_that_does_not_prove_closes_the_connection_only(
    host: HostProcess, first: object
) -> None:
    root = attach_host(host)
    control = Control(root)
    request = first(control)  # type: ignore[operator]
    control.sock.sendall(frame(KIND_REQUEST, request.SerializeToString()))
    assert control.closed_by_host()
    control.close()
    # The session goes on, on its gRPC stream (its channels on the relay).
    answer = root.request(
        listen=hvsock_pb2.Listen(
            address=hvsock_pb2.Address(vm_id=hv.HV_GUID_WILDCARD, service_id=str(uuid.uuid4()))
        )
    )
    assert answer.HasField("listening")
    root.close()
    assert_healthy(host)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"junk", id="bad-magic"),
        pytest.param(MESSAGE.pack(MAGIC, KIND_RESPONSE, 0), id="wrong-kind"),
        pytest.param(MESSAGE.pack(MAGIC, KIND_REQUEST, MAX_CONTROL_FRAME + 1), id="oversize"),
        pytest.param(frame(KIND_REQUEST, b"\xff\xff\xff"), id="undecodable"),
    ],
)
def test_a_bad_frame_after_the_move_ends_the_session_invalid_argument(
    host: HostProcess, bad: bytes
) -> None:
    root = attach_host(host)
    control = Control(root)
    control.prove()
    control.sock.sendall(bad)
    assert control.closed_by_host()
    error = _status(root)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "descriptor socket" in (error.details() or "")
    control.close()
    root.close()
    # Everyone else is still served: a new session of the same partition works.
    with hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token)) as again:
        assert again.shm and again._control is not None
    assert_healthy(host)


def test_the_library_moves_a_shared_memory_session_and_keeps_a_relayed_one(
    host: HostProcess,
) -> None:
    with hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token)) as root:
        assert root.shm and root._control is not None
    relayed = hv.Partition(
        host.target, hvsock_pb2.Hello(host=True, token=host.token), data_path="relay"
    )
    with relayed:
        assert not relayed.shm and relayed._control is None
    assert_healthy(host)


def test_a_client_that_stops_reading_its_answers_is_detached(tmp_path: pathlib.Path) -> None:
    """Answers a client does not take fill its socket, then the host's queue for it: the
    session is ended as one that stopped reading; the host and others go on."""
    with run_host(tmp_path, "--max-queued-responses", "200") as host:
        lazy = attach_vm(host, create_vm(host, "lazy"))
        control = Control(lazy)
        control.prove()
        unlisten = hvsock_pb2.AttachRequest(
            request_id=1, unlisten=hvsock_pb2.Unlisten(listener_id=999)
        )
        # Enough answers that neither the socket buffers nor the host's queue can hold them;
        # the host drops the connection at some point, which breaks our sending.
        burst = frame(KIND_REQUEST, unlisten.SerializeToString()) * 20_000
        with contextlib.suppress(OSError):
            control.sock.sendall(burst)
        error = _status(lazy)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "stopped reading" in (error.details() or "")
        control.close()
        lazy.close()
        busy = attach_vm(host, create_vm(host, "busy"))
        busy_control = Control(busy)
        busy_control.prove()
        _listen(busy_control, str(uuid.uuid4()))
        busy_control.close()
        busy.close()
        assert_healthy(host)
