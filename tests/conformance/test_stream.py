"""Byte-stream semantics every transport must have (Linux vsock_test cases adapted to hv_sock)."""

from __future__ import annotations

import errno
import hashlib
import random
import socket
import threading

import pytest

import guest_client as hv
from host_service.core.relay import DEFAULT_RELAY_WINDOW

from .conftest import Env

pytestmark = pytest.mark.integration


def test_echo_both_ways(any_env: Env) -> None:
    client, server = any_env.pair()
    client.sendall(b"ping")
    assert server.recv(100) == b"ping"
    server.sendall(b"pong")
    assert client.recv(100) == b"pong"


def test_client_close_is_eof_for_the_server(any_env: Env) -> None:
    client, server = any_env.pair()
    client.sendall(b"last words")
    client.close()
    assert server.recv(100) == b"last words"
    assert server.recv(100) == b""


def test_server_close_is_eof_for_the_client(any_env: Env) -> None:
    client, server = any_env.pair()
    server.close()
    assert client.recv(100) == b""


def test_fin_arrives_after_all_data(any_env: Env) -> None:
    client, server = any_env.pair()
    data = random.Random(1).randbytes(3 << 20)
    writer = threading.Thread(target=lambda: (client.sendall(data), client.shutdown(hv.SHUT_WR)))
    writer.start()
    received = bytearray()
    while chunk := server.recv(65536):
        received += chunk
    writer.join()
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_send_after_shut_wr_is_epipe(any_env: Env) -> None:
    client, server = any_env.pair()
    client.shutdown(hv.SHUT_WR)
    with pytest.raises(BrokenPipeError):
        client.send(b"x")
    assert server.recv(10) == b""
    server.sendall(b"still open the other way")
    assert client.recv(100) == b"still open the other way"


def test_shut_rd_is_local_only(any_env: Env) -> None:
    client, server = any_env.pair()
    server.shutdown(hv.SHUT_RD)
    client.sendall(b"nobody reads this")  # no error: there is no wire signal for SHUT_RD
    assert server.recv(100) == b""
    server.sendall(b"but it can still send")
    assert client.recv(100) == b"but it can still send"


def test_no_single_delivery_above_16_kib(any_env: Env) -> None:
    client, server = any_env.pair()
    writer = threading.Thread(target=lambda: client.sendall(b"z" * (256 << 10)))
    writer.start()
    sizes = []
    total = 0
    while total < 256 << 10:
        chunk = server.recv(1 << 20)
        sizes.append(len(chunk))
        total += len(chunk)
    writer.join()
    assert max(sizes) <= 16384


def test_close_with_unread_data_does_not_block(any_env: Env) -> None:
    client, server = any_env.pair()
    server.sendall(b"unread" * 100)
    client.close()  # returns at once; the data is simply dropped
    server.close()


def test_writer_blocked_by_a_full_ring_resumes_when_the_peer_reads(any_env: Env) -> None:
    client, server = any_env.pair()
    client.setblocking(False)
    sent = 0
    with pytest.raises(BlockingIOError):
        while True:
            sent += client.send(b"f" * 1024)
    # The default rings hold a few KiB (and the relay its window more), never unbounded.
    assert 0 < sent <= 2 * DEFAULT_RELAY_WINDOW
    blocked = threading.Event()
    done = threading.Event()

    def blocking_send() -> None:
        client.setblocking(True)
        blocked.set()
        client.sendall(b"more")
        done.set()

    thread = threading.Thread(target=blocking_send)
    thread.start()
    blocked.wait()
    received = 0
    while received < sent + 4:
        received += len(server.recv(65536))
    thread.join(timeout=10)
    assert done.is_set()


def test_nonblocking_recv_would_block_then_timeout(any_env: Env) -> None:
    _client, server = any_env.pair()
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.recv(10)
    server.settimeout(0.05)
    with pytest.raises(TimeoutError):
        server.recv(10)
    assert server.gettimeout() == 0.05


def test_peek_oob_and_datagrams_are_not_supported(any_env: Env) -> None:
    client, server = any_env.pair()
    for flags in (socket.MSG_PEEK, socket.MSG_OOB):
        with pytest.raises(OSError) as info:
            server.recv(10, flags)
        assert info.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as info:
        client.sendto(b"x", ("a", "b"))
    assert info.value.errno == errno.EOPNOTSUPP


def test_recv_into_and_makefile(any_env: Env) -> None:
    client, server = any_env.pair()
    client.sendall(b"line one\nline two\n")
    buffer = bytearray(4)
    assert server.recv_into(buffer) == 4 and buffer == b"line"
    reader = server.makefile("rb")
    assert reader.readline() == b" one\n"
    assert reader.readline() == b"line two\n"
    reader.close()


def test_select_sees_readability(any_env: Env) -> None:
    import select

    client, server = any_env.pair()
    readable, _, _ = select.select([server], [], [], 0)
    assert readable == []
    client.sendall(b"wake up")
    readable, _, _ = select.select([server], [], [], 10)
    assert readable == [server]
    _, writable, _ = select.select([], [client], [], 10)
    assert writable == [client]
    assert server.recv(100) == b"wake up"
    readable, _, _ = select.select([server], [], [], 0)
    assert readable == []
